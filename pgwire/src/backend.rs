//! Messages a server sends, and builders for the ones the proxy itself answers with.

use bytes::{BufMut, BytesMut};

use crate::read::BodyReader;
use crate::sqlstate::SqlState;
use crate::startup::{patch_len, put_cstr};
use crate::ProtocolError;

/// Transaction status reported by ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionStatus {
    /// `'I'`: not in a transaction block.
    Idle,
    /// `'T'`: in a transaction block.
    InTransaction,
    /// `'E'`: in a failed transaction block; statements are refused until it ends.
    Failed,
}

impl TransactionStatus {
    /// The status of a ReadyForQuery status byte, if it is one of the three.
    pub fn from_byte(b: u8) -> Option<TransactionStatus> {
        match b {
            b'I' => Some(TransactionStatus::Idle),
            b'T' => Some(TransactionStatus::InTransaction),
            b'E' => Some(TransactionStatus::Failed),
            _ => None,
        }
    }

    /// The status byte on the wire.
    pub fn as_byte(self) -> u8 {
        match self {
            TransactionStatus::Idle => b'I',
            TransactionStatus::InTransaction => b'T',
            TransactionStatus::Failed => b'E',
        }
    }
}

/// An authentication request from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication<'a> {
    /// Authentication succeeded.
    Ok,
    /// Send the password in clear text.
    CleartextPassword,
    /// Send `md5(md5(password || user) || salt)`.
    Md5Password {
        /// The four-byte salt.
        salt: [u8; 4],
    },
    /// Start SASL with one of these mechanisms.
    Sasl {
        /// Mechanisms the server offers, in its order of preference.
        mechanisms: Vec<&'a str>,
    },
    /// A SASL challenge.
    SaslContinue(&'a [u8]),
    /// SASL outcome data (server signature).
    SaslFinal(&'a [u8]),
    /// A method the proxy does not implement (Kerberos, GSS, SSPI).
    Unsupported(i32),
}

/// A message from the server, borrowed from its frame body. Only the messages the proxy acts on
/// are decoded; everything else is [`ServerMessage::Other`] and is forwarded as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMessage<'a> {
    /// `'R'`.
    Authentication(Authentication<'a>),
    /// `'K'`: the backend's process id and cancel key.
    BackendKeyData {
        /// Process id.
        pid: i32,
        /// Secret key (4 bytes in protocol 3.0, longer in 3.2).
        secret: &'a [u8],
    },
    /// `'S'`: a run-time parameter's current value.
    ParameterStatus {
        /// Parameter name.
        name: &'a str,
        /// Its value.
        value: &'a str,
    },
    /// `'Z'`: ready for a new query.
    ReadyForQuery(TransactionStatus),
    /// `'E'`.
    ErrorResponse(ErrorFields<'a>),
    /// `'N'`.
    NoticeResponse(ErrorFields<'a>),
    /// Any other message.
    Other(u8),
}

/// The fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields<'a> {
    fields: Vec<(u8, &'a [u8])>,
}

impl<'a> ErrorFields<'a> {
    /// The raw value of a field by its type byte (`b'C'` for the code, `b'M'` for the message).
    pub fn get(&self, kind: u8) -> Option<&'a [u8]> {
        self.fields.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
    }

    /// Every field, in order: its type byte and raw value.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + '_ {
        self.fields.iter().copied()
    }

    /// SQLSTATE, if present and well formed.
    pub fn code(&self) -> Option<SqlState> {
        let c = self.get(b'C')?;
        Some(SqlState(c.try_into().ok()?))
    }

    /// The primary message, lossily decoded.
    pub fn message(&self) -> String {
        String::from_utf8_lossy(self.get(b'M').unwrap_or_default()).into_owned()
    }

    /// The message and SQLSTATE in one line, for logs: `message (SQLSTATE code)`.
    pub fn summary(&self) -> String {
        let code = String::from_utf8_lossy(self.get(b'C').unwrap_or_default());
        format!("{} (SQLSTATE {code})", self.message())
    }

    /// Non-localized severity (`V`), falling back to the localized one (`S`).
    pub fn severity(&self) -> String {
        let raw = self.get(b'V').or_else(|| self.get(b'S')).unwrap_or_default();
        String::from_utf8_lossy(raw).into_owned()
    }
}

/// The command tag of a CommandComplete body (`INSERT 0 1`, `COMMIT`): the bytes up to its
/// terminator, all of them when it has none.
pub fn command_tag(body: &[u8]) -> &[u8] {
    body.split(|&b| b == 0).next().unwrap_or_default()
}

/// The fields of an ErrorResponse or NoticeResponse body, however malformed: a field without
/// its terminator ends the list (what [`parse`] would refuse is still worth logging).
pub fn error_fields(body: &[u8]) -> ErrorFields<'_> {
    let mut fields = Vec::new();
    let mut rest = body;
    while let Some((&kind, after)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let Some(end) = after.iter().position(|&b| b == 0) else {
            break;
        };
        fields.push((kind, &after[..end]));
        rest = &after[end + 1..];
    }
    ErrorFields { fields }
}

/// The fields of a DataRow body (`None` is NULL), or `None` when the body is malformed.
pub fn data_row_fields(body: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut r = BodyReader::new(body, "DataRow");
    let n = r.i16().ok()?;
    let mut fields = Vec::with_capacity(usize::try_from(n).ok()?);
    for _ in 0..n {
        let len = r.i32().ok()?;
        fields.push(match usize::try_from(len) {
            Ok(len) => Some(r.bytes(len).ok()?),
            Err(_) => None,
        });
    }
    r.finish().ok()?;
    Some(fields)
}

/// Parses a server message body with the given tag.
pub fn parse(tag: u8, body: &[u8]) -> Result<ServerMessage<'_>, ProtocolError> {
    let msg = match tag {
        b'R' => ServerMessage::Authentication(parse_auth(body)?),
        b'K' => {
            let mut r = BodyReader::new(body, "BackendKeyData");
            let pid = r.i32()?;
            ServerMessage::BackendKeyData {
                pid,
                secret: r.remaining(),
            }
        }
        b'S' => {
            let mut r = BodyReader::new(body, "ParameterStatus");
            let name = r.str()?;
            let value = r.str()?;
            r.finish()?;
            ServerMessage::ParameterStatus { name, value }
        }
        b'Z' => {
            let status = match body {
                [b'I'] => TransactionStatus::Idle,
                [b'T'] => TransactionStatus::InTransaction,
                [b'E'] => TransactionStatus::Failed,
                _ => return Err(ProtocolError::malformed("ReadyForQuery", "bad status")),
            };
            ServerMessage::ReadyForQuery(status)
        }
        b'E' => ServerMessage::ErrorResponse(parse_fields(body)?),
        b'N' => ServerMessage::NoticeResponse(parse_fields(body)?),
        other => ServerMessage::Other(other),
    };
    Ok(msg)
}

fn parse_auth(body: &[u8]) -> Result<Authentication<'_>, ProtocolError> {
    let mut r = BodyReader::new(body, "Authentication");
    let auth = match r.i32()? {
        0 => Authentication::Ok,
        3 => Authentication::CleartextPassword,
        5 => {
            let salt = r.bytes(4)?;
            Authentication::Md5Password {
                salt: [salt[0], salt[1], salt[2], salt[3]],
            }
        }
        10 => {
            let mut mechanisms = Vec::new();
            loop {
                let m = r.str()?;
                if m.is_empty() {
                    break;
                }
                mechanisms.push(m);
            }
            Authentication::Sasl { mechanisms }
        }
        11 => Authentication::SaslContinue(r.remaining()),
        12 => Authentication::SaslFinal(r.remaining()),
        other => Authentication::Unsupported(other),
    };
    Ok(auth)
}

fn parse_fields(body: &[u8]) -> Result<ErrorFields<'_>, ProtocolError> {
    let mut r = BodyReader::new(body, "ErrorResponse");
    let mut fields = Vec::new();
    loop {
        let kind = r.u8()?;
        if kind == 0 {
            break;
        }
        fields.push((kind, r.cstr()?));
    }
    Ok(ErrorFields { fields })
}

/// Severity of a message the proxy itself raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
    /// Informational.
    Notice,
    /// A warning.
    Warning,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
            Severity::Notice => "NOTICE",
            Severity::Warning => "WARNING",
        }
    }
}

/// An ErrorResponse or NoticeResponse built by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorResponse {
    /// Severity.
    pub severity: Severity,
    /// SQLSTATE.
    pub code: SqlState,
    /// Primary message, phrased as PostgreSQL would.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl ErrorResponse {
    /// An error with just a severity, code and message.
    pub fn new(severity: Severity, code: SqlState, message: impl Into<String>) -> Self {
        ErrorResponse {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// A FATAL error: the connection closes after it.
    pub fn fatal(code: SqlState, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    /// Adds a detail line.
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds a hint line.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Writes it as an ErrorResponse (`'E'`), or a NoticeResponse (`'N'`) for notices and
    /// warnings.
    pub fn encode(&self, out: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Error | Severity::Fatal => b'E',
            Severity::Notice | Severity::Warning => b'N',
        };
        let start = begin(out, tag);
        for (kind, value) in [
            (b'S', Some(self.severity.as_str())),
            (b'V', Some(self.severity.as_str())),
            (b'C', Some(self.code.as_str())),
            (b'M', Some(self.message.as_str())),
            (b'D', self.detail.as_deref()),
            (b'H', self.hint.as_deref()),
        ] {
            if let Some(v) = value {
                out.put_u8(kind);
                put_cstr(out, v.as_bytes());
            }
        }
        out.put_u8(0);
        patch_len(out, start);
    }
}

fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let start = out.len();
    out.put_i32(0);
    start
}

/// Writes AuthenticationOk.
pub fn auth_ok(out: &mut BytesMut) {
    out.put_slice(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]);
}

/// Writes AuthenticationMD5Password with the given salt.
pub fn auth_md5(out: &mut BytesMut, salt: [u8; 4]) {
    out.put_slice(&[b'R', 0, 0, 0, 12, 0, 0, 0, 5]);
    out.put_slice(&salt);
}

/// Writes AuthenticationSASL offering these mechanisms.
pub fn auth_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    let start = begin(out, b'R');
    out.put_i32(10);
    for m in mechanisms {
        put_cstr(out, m.as_bytes());
    }
    out.put_u8(0);
    patch_len(out, start);
}

/// Writes AuthenticationSASLContinue.
pub fn auth_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    let start = begin(out, b'R');
    out.put_i32(11);
    out.put_slice(data);
    patch_len(out, start);
}

/// Writes AuthenticationSASLFinal.
pub fn auth_sasl_final(out: &mut BytesMut, data: &[u8]) {
    let start = begin(out, b'R');
    out.put_i32(12);
    out.put_slice(data);
    patch_len(out, start);
}

/// Writes NegotiateProtocolVersion: the newest protocol version the server speaks that is not
/// newer than the client's, and the `_pq_.` options it did not recognize.
/// <https://www.postgresql.org/docs/current/protocol-message-formats.html#PROTOCOL-MESSAGE-FORMATS-NEGOTIATEPROTOCOLVERSION>
pub fn negotiate_protocol_version(out: &mut BytesMut, version: i32, unrecognized: &[&str]) {
    let start = begin(out, b'v');
    out.put_i32(version);
    out.put_i32(i32::try_from(unrecognized.len()).unwrap_or(i32::MAX));
    for option in unrecognized {
        put_cstr(out, option.as_bytes());
    }
    patch_len(out, start);
}

/// The protocol version a NegotiateProtocolVersion body offers.
pub fn negotiated_version(body: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

/// Writes ParameterStatus.
pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    let start = begin(out, b'S');
    put_cstr(out, name.as_bytes());
    put_cstr(out, value.as_bytes());
    patch_len(out, start);
}

/// Writes an ErrorResponse (`tag` `E`) or NoticeResponse (`N`) with these fields, in order
/// (for passing on a server's message with a field taken out).
pub fn error_message<'f>(out: &mut BytesMut, tag: u8, fields: impl IntoIterator<Item = (u8, &'f [u8])>) {
    let start = begin(out, tag);
    for (kind, value) in fields {
        out.put_u8(kind);
        put_cstr(out, value);
    }
    out.put_u8(0);
    patch_len(out, start);
}

/// Writes ReadyForQuery.
pub fn ready_for_query(out: &mut BytesMut, status: TransactionStatus) {
    out.put_slice(&[b'Z', 0, 0, 0, 5, status.as_byte()]);
}

/// Writes ParseComplete (`1`), BindComplete (`2`), CloseComplete (`3`), NoData (`n`),
/// EmptyQueryResponse (`I`) or another message without a body, by its tag.
pub fn empty_message(out: &mut BytesMut, tag: u8) {
    out.put_slice(&[tag, 0, 0, 0, 4]);
}

/// Writes CommandComplete with its command tag (`INSERT 0 1`, `COMMIT`, ...).
pub fn command_complete(out: &mut BytesMut, command_tag: &str) {
    let start = begin(out, b'C');
    put_cstr(out, command_tag.as_bytes());
    patch_len(out, start);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frames, MessageLimits};
    use crate::sqlstate;

    #[test]
    fn data_row_fields_with_nulls_and_malformed_bodies() {
        let body = b"\0\x02\0\0\0\x0242\xff\xff\xff\xff";
        assert_eq!(data_row_fields(body), Some(vec![Some(&b"42"[..]), None]));
        assert_eq!(data_row_fields(b"\0\x01\0\0\0\x05ab"), None);
        assert_eq!(data_row_fields(b"\0\x00x"), None);
    }

    #[test]
    fn an_error_rebuilt_without_a_field_keeps_the_others() {
        let mut out = BytesMut::new();
        ErrorResponse::new(Severity::Error, sqlstate::FEATURE_NOT_SUPPORTED, "no")
            .with_hint("try")
            .encode(&mut out);
        let body = &out[5..];
        let fields = error_fields(body);
        let mut rebuilt = BytesMut::new();
        error_message(&mut rebuilt, b'E', fields.iter().filter(|(k, _)| *k != b'H'));
        let again = error_fields(&rebuilt[5..]);
        assert_eq!(again.get(b'H'), None);
        assert_eq!(again.message(), "no");
        assert_eq!(again.code(), Some(sqlstate::FEATURE_NOT_SUPPORTED));
        assert_eq!(rebuilt.len(), out.len() - "Htry\0".len());
    }

    #[test]
    fn built_messages_parse_back() {
        let mut out = BytesMut::new();
        empty_message(&mut out, b'1');
        command_complete(&mut out, "INSERT 0 1");
        let frames: Vec<_> = Frames::new(&out, MessageLimits::SERVER)
            .map(|f| f.unwrap())
            .collect();
        assert_eq!(frames.len(), 2);
        assert_eq!((frames[0].0.tag, frames[0].1.len()), (b'1', 0));
        assert_eq!(command_tag(frames[1].1), b"INSERT 0 1");
    }

    #[test]
    fn command_tags_and_lenient_error_fields() {
        assert_eq!(command_tag(b"INSERT 0 1\0"), b"INSERT 0 1");
        assert_eq!(command_tag(b"COMMIT"), b"COMMIT");
        assert_eq!(command_tag(b""), b"");
        let f = error_fields(b"SERROR\0C40001\0Mcould not serialize\0\0");
        assert_eq!(f.summary(), "could not serialize (SQLSTATE 40001)");
        // Cut off inside a field: the whole fields before it are kept.
        let f = error_fields(b"C57014\0Mcanceling stat");
        assert_eq!((f.get(b'C'), f.get(b'M')), (Some(&b"57014"[..]), None));
        assert_eq!(error_fields(b"").summary(), " (SQLSTATE )");
        for b in [b'I', b'T', b'E'] {
            assert_eq!(
                TransactionStatus::from_byte(b).map(TransactionStatus::as_byte),
                Some(b)
            );
        }
        assert_eq!(TransactionStatus::from_byte(b'X'), None);
    }

    fn frames(buf: &[u8]) -> Vec<ServerMessage<'_>> {
        Frames::new(buf, MessageLimits::default())
            .map(|f| {
                let (h, body) = f.unwrap();
                parse(h.tag, body).unwrap()
            })
            .collect()
    }

    #[test]
    fn error_response_round_trips() {
        let mut buf = BytesMut::new();
        ErrorResponse::fatal(
            sqlstate::INVALID_PASSWORD,
            "password authentication failed for user \"app\"",
        )
        .with_hint("check users.toml")
        .encode(&mut buf);
        let msgs = frames(&buf);
        let ServerMessage::ErrorResponse(fields) = &msgs[0] else {
            panic!("{msgs:?}")
        };
        assert_eq!(fields.code(), Some(sqlstate::INVALID_PASSWORD));
        assert_eq!(fields.severity(), "FATAL");
        assert_eq!(
            fields.message(),
            "password authentication failed for user \"app\""
        );
        assert_eq!(fields.get(b'H'), Some(&b"check users.toml"[..]));
    }

    #[test]
    fn parses_authentication_and_session_messages() {
        let mut buf = BytesMut::new();
        auth_sasl(&mut buf, &["SCRAM-SHA-256"]);
        auth_md5(&mut buf, [1, 2, 3, 4]);
        auth_ok(&mut buf);
        parameter_status(&mut buf, "server_version", "15.4");
        ready_for_query(&mut buf, TransactionStatus::InTransaction);
        assert_eq!(
            frames(&buf),
            vec![
                ServerMessage::Authentication(Authentication::Sasl {
                    mechanisms: vec!["SCRAM-SHA-256"]
                }),
                ServerMessage::Authentication(Authentication::Md5Password { salt: [1, 2, 3, 4] }),
                ServerMessage::Authentication(Authentication::Ok),
                ServerMessage::ParameterStatus {
                    name: "server_version",
                    value: "15.4"
                },
                ServerMessage::ReadyForQuery(TransactionStatus::InTransaction),
            ]
        );
    }

    #[test]
    fn rejects_malformed_server_messages() {
        assert!(parse(b'Z', b"X").is_err());
        assert!(parse(b'R', b"\0\0").is_err());
        assert!(parse(b'E', b"Cabc").is_err());
        assert_eq!(parse(b'D', b"anything").unwrap(), ServerMessage::Other(b'D'));
    }
}
