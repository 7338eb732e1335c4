//! The session's own settings, replayed on the connections that run its shadow reads: what the
//! client asked for at startup (its parameters and `options`' `-c name=value`), the values the
//! server reported since (ParameterStatus: `TimeZone`, `DateStyle`, `IntervalStyle`,
//! `client_encoding`, `standard_conforming_strings`, `search_path` where reported), and the
//! client's own `SET`/`RESET` statements, in order. From these a prelude is built that a
//! shadow connection runs before the statement (once per connection while it stays the same):
//! `RESET ALL`, the values by `set_config`, the `SET` statements as the client wrote them.

use std::sync::Arc;

/// Names that are never replayed: they are not settings (`user`, `database`, protocol
/// options), or they would lift what keeps a shadow connection harmless (read only, bounded),
/// or they would change who reads (`role`, `session_authorization`: the shadow connection is the
/// proxy's own login).
const NOT_REPLAYED: &[&str] = &[
    "user",
    "database",
    "replication",
    "options",
    "application_name",
    "role",
    "session_authorization",
    "default_transaction_read_only",
    "transaction_read_only",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "session_replication_role",
];

/// ParameterStatus values that are settings a client can set (the others, such as
/// `server_version` or `is_superuser`, only report).
const REPORTED_SETTINGS: &[&str] = &[
    "timezone",
    "datestyle",
    "intervalstyle",
    "client_encoding",
    "standard_conforming_strings",
    "search_path",
];

/// The delimiter of the prelude's literals: dollar quoting reads the same whatever the
/// session's `standard_conforming_strings`.
const QUOTE: &str = "$switchyard_shadow$";

/// A session's settings as far as its shadow reads need them.
#[derive(Debug, Default)]
pub(crate) struct SessionSettings {
    /// Lower-cased name and value, from startup and ParameterStatus.
    values: Vec<(String, String)>,
    /// Lower-cased name and the client's `SET` statement, oldest first.
    sets: Vec<(String, String)>,
    /// The prelude built from the above, until they change.
    prelude: Option<Arc<str>>,
}

impl SessionSettings {
    /// The settings a client's startup parameters ask for.
    pub(crate) fn from_startup(params: &[(String, String)]) -> SessionSettings {
        let mut s = SessionSettings::default();
        for (name, value) in params {
            if name == "options" {
                for (n, v) in option_settings(value) {
                    s.value(&n, &v);
                }
            } else if !name.starts_with("_pq_.") {
                s.value(name, value);
            }
        }
        s
    }

    fn value(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        if NOT_REPLAYED.contains(&name.as_str()) || value.contains(QUOTE) || name.contains(QUOTE) {
            return;
        }
        self.prelude = None;
        self.sets.retain(|(n, _)| *n != name);
        match self.values.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.values.push((name, value.to_owned())),
        }
    }

    /// The server reported `name = value` (ParameterStatus).
    pub(crate) fn reported(&mut self, name: &str, value: &str) {
        if REPORTED_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
            self.value(name, value);
        }
    }

    /// The client sent `sql`: if it is a session-level `SET` or `RESET` (alone in its string),
    /// it is kept for replay. Cheap for everything else (a look at the first word).
    pub(crate) fn statement(&mut self, sql: &str) {
        let Some(change) = setting_change(sql) else {
            return;
        };
        self.prelude = None;
        match change {
            Change::ResetAll => self.sets.clear(),
            Change::Reset(name) => self.sets.retain(|(n, _)| *n != name),
            Change::Set(name) => {
                if NOT_REPLAYED.contains(&name.as_str()) {
                    return;
                }
                self.sets.retain(|(n, _)| *n != name);
                self.sets
                    .push((name, sql.trim().trim_end_matches(';').to_owned()));
            }
        }
    }

    /// The statements that give a shadow connection these settings.
    pub(crate) fn prelude(&mut self) -> Arc<str> {
        if let Some(p) = &self.prelude {
            return Arc::clone(p);
        }
        let mut sql = String::from("RESET ALL");
        if !self.values.is_empty() {
            let calls: Vec<String> = self
                .values
                .iter()
                .map(|(n, v)| format!("set_config({QUOTE}{n}{QUOTE}, {QUOTE}{v}{QUOTE}, false)"))
                .collect();
            sql.push_str("; SELECT ");
            sql.push_str(&calls.join(", "));
        }
        for (_, set) in &self.sets {
            sql.push_str("; ");
            sql.push_str(set);
        }
        let p: Arc<str> = sql.into();
        self.prelude = Some(Arc::clone(&p));
        p
    }
}

/// `-c name=value` and `--name=value` of a startup `options` string (backslash escapes a
/// space, as libpq's `PGOPTIONS` allows).
fn option_settings(options: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let setting = match words[i].as_str() {
            "-c" => {
                i += 1;
                words.get(i).map(String::as_str)
            }
            w => w.strip_prefix("-c").or_else(|| w.strip_prefix("--")),
        };
        if let Some((n, v)) = setting.and_then(|s| s.split_once('=')) {
            out.push((n.replace('-', "_"), v.to_owned()));
        }
        i += 1;
    }
    out
}

#[derive(Debug, PartialEq, Eq)]
enum Change {
    Set(String),
    Reset(String),
    ResetAll,
}

/// What a `SET`/`RESET` statement changes for the session, if `sql` is one alone (not
/// `SET LOCAL`, `SET TRANSACTION` or `SET CONSTRAINTS`, which last a transaction at most).
fn setting_change(sql: &str) -> Option<Change> {
    let head = sql.trim_start().get(..6)?.to_ascii_lowercase();
    if !head.starts_with("set ") && !head.starts_with("reset") && !head.starts_with("discar") {
        return None;
    }
    let text = sql.trim().trim_end_matches(';');
    if text.contains(';') {
        return None;
    }
    let lower = text.to_ascii_lowercase();
    let mut words = lower.split_whitespace();
    let verb = words.next()?;
    let mut name = words.next()?;
    if name == "session" {
        name = words.next()?;
    }
    let name = name.split('=').next().unwrap_or(name);
    let name = match name {
        "local" | "transaction" | "constraints" | "characteristics" => return None,
        "time" => "timezone",
        "authorization" => "session_authorization",
        n => n,
    };
    match verb {
        // DISCARD ALL runs RESET ALL (among others); DISCARD PLANS, TEMP, SEQUENCES keep them.
        "reset" | "discard" if name == "all" => Some(Change::ResetAll),
        "discard" => None,
        "reset" => Some(Change::Reset(name.to_owned())),
        "set" => Some(Change::Set(name.to_owned())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_reports_and_sets_make_one_prelude() {
        let params = [
            ("user".to_owned(), "app".to_owned()),
            ("DateStyle".to_owned(), "SQL, DMY".to_owned()),
            (
                "options".to_owned(),
                "-c search_path=shop,public --extra-float-digits=0 -c default_transaction_read_only=off"
                    .to_owned(),
            ),
        ];
        let mut s = SessionSettings::from_startup(&params);
        s.statement("SET TIME ZONE 'Asia/Tokyo'");
        s.statement("set local work_mem = '1MB'");
        s.statement("SET role = admin");
        s.statement("select 1; set x = 1");
        s.statement("SET intervalstyle TO iso_8601;");
        let q = QUOTE;
        assert_eq!(
            &*s.prelude(),
            format!(
                "RESET ALL; SELECT set_config({q}datestyle{q}, {q}SQL, DMY{q}, false), \
                 set_config({q}search_path{q}, {q}shop,public{q}, false), \
                 set_config({q}extra_float_digits{q}, {q}0{q}, false); \
                 SET TIME ZONE 'Asia/Tokyo'; SET intervalstyle TO iso_8601"
            )
        );
        // The server's report of the same setting replaces the client's SET.
        s.reported("TimeZone", "Asia/Tokyo");
        s.reported("server_version", "15");
        s.statement("RESET intervalstyle");
        let p = s.prelude();
        assert!(
            p.ends_with(&format!("set_config({q}timezone{q}, {q}Asia/Tokyo{q}, false)")),
            "{p}"
        );
        s.statement("SET statement_timeout = 0");
        s.statement("reset all");
        assert!(!s.prelude().contains("; SET"), "{}", s.prelude());
        s.statement("SET work_mem = '8MB'");
        s.statement("DISCARD PLANS");
        assert!(s.prelude().contains("; SET work_mem"), "{}", s.prelude());
        s.statement("discard all;");
        assert!(!s.prelude().contains("; SET"), "{}", s.prelude());
    }
}
