//! The session's part in shadow reads (`crate::shadow`): which of its reads are shadowed, what
//! they were (the Query, or the Parse and Bind behind a portal), and its settings. The client's
//! messages and OLD's answers go exactly as without shadow reads; the session only keeps
//! references to frames it relays.

use super::*;

impl<R, W, H> MirrorSession<'_, R, W, H>
where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send,
    H: SessionHost,
{
    /// Reads are shadowed outside a transaction that may have written a migrated table (its
    /// own uncommitted rows are not on NEW yet), and outside the proxy's own transaction.
    fn shadow_allowed(&self) -> bool {
        !self.dirty && !self.txn.implicit()
    }

    /// A Query message: keeps a SET for the settings; a capture if it is a shadowed read.
    pub(super) fn shadow_query(
        &mut self,
        sql: &str,
        analysis: &Analysis,
        frame: &Bytes,
    ) -> Option<Box<Capture>> {
        let allowed = self.shadow_allowed();
        let settings = self.shadow_settings.as_mut()?;
        settings.statement(sql);
        if !allowed {
            return None;
        }
        let [one] = analysis.stmts.as_slice() else {
            return None;
        };
        let shape = one.read.as_ref()?;
        let shadow = self.mirror.shadow.as_ref()?;
        shadow.begin(
            shape,
            || ShadowRequest::Simple { query: frame.clone() },
            || settings.prelude(),
            self.params.login.as_ref(),
        )
    }

    /// A Parse message for statement `name`.
    pub(super) fn shadow_parse(&mut self, name: &[u8], sql: &str, analysis: &Analysis, frame: &Bytes) {
        let Some(settings) = self.shadow_settings.as_mut() else {
            return;
        };
        settings.statement(sql);
        match analysis.stmts.as_slice() {
            [Analyzed {
                read: Some(shape), ..
            }] => {
                self.shadow_statements
                    .insert(name.to_vec(), (Arc::clone(shape), frame.clone()));
            }
            _ => {
                self.shadow_statements.remove(name);
            }
        }
    }

    /// A Bind message of `portal` from `statement`.
    pub(super) fn shadow_bind(&mut self, portal: &[u8], statement: &[u8], frame: &Bytes) {
        if self.shadow_settings.is_none() {
            return;
        }
        match self.shadow_statements.get(statement) {
            Some((shape, parse)) => {
                let entry = (Arc::clone(shape), parse.clone(), frame.clone());
                self.shadow_portals.insert(portal.to_vec(), entry);
            }
            None => {
                self.shadow_portals.remove(portal);
            }
        }
    }

    /// A Close message.
    pub(super) fn shadow_close(&mut self, target: Target, name: &[u8]) {
        match target {
            Target::Statement => self.shadow_statements.remove(name),
            Target::Portal => self.shadow_portals.remove(name).map(|(s, p, _)| (s, p)),
        };
    }

    /// An Execute message: a capture if it runs a shadowed read to its end.
    pub(super) fn shadow_execute(&mut self, portal: &[u8], max_rows: i32) -> Option<Box<Capture>> {
        if max_rows != 0 || !self.shadow_allowed() {
            return None;
        }
        let (shape, parse, bind) = self.shadow_portals.get(portal)?;
        let shadow = self.mirror.shadow.as_ref()?;
        let settings = self.shadow_settings.as_mut()?;
        shadow.begin(
            shape,
            || ShadowRequest::Extended {
                parse: parse.clone(),
                bind: bind.clone(),
            },
            || settings.prelude(),
            self.params.login.as_ref(),
        )
    }

    /// A ParameterStatus from OLD: the session's settings changed.
    pub(super) fn shadow_reported(&mut self, frame: &Bytes) {
        if let Some(settings) = self.shadow_settings.as_mut() {
            if let Ok(ServerMessage::ParameterStatus { name, value }) = backend::parse(b'S', &frame[5..]) {
                settings.reported(name, value);
            }
        }
    }

    /// OLD completed a shadowed read: compare in the background.
    pub(super) fn shadow_completed(&self, capture: Box<Capture>) {
        if let Some(shadow) = &self.mirror.shadow {
            shadow.finish(capture);
        }
    }
}
