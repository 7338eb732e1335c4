//! The startup phase: the first packet a client sends has no tag byte.
//!
//! It is a big-endian `i32` length (counting itself), a 32-bit request code and a body. The code
//! is a protocol version for a StartupMessage, or one of the magic numbers of SSLRequest,
//! GSSENCRequest and CancelRequest.
//! <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP>

use bytes::{BufMut, Bytes, BytesMut};

use crate::read::BodyReader;
use crate::ProtocolError;

/// PostgreSQL refuses startup packets longer than this (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET_LEN: usize = 10_000;
/// Request code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol 3.0, what every current driver sends.
pub const PROTOCOL_3_0: i32 = 0x0003_0000;
/// Protocol 3.2 (PostgreSQL 18): variable-length cancel keys.
pub const PROTOCOL_3_2: i32 = 0x0003_0002;

/// A packet of the startup phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// A StartupMessage: protocol version and connection parameters in the client's order.
    Startup(StartupMessage),
    /// The client asks to switch to TLS.
    SslRequest,
    /// The client asks to switch to GSSAPI encryption.
    GssEncRequest,
    /// Cancel the query running on the backend identified by this pid and secret key.
    Cancel(CancelKey),
}

/// A StartupMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupMessage {
    /// The protocol version word (major << 16 | minor).
    pub protocol: i32,
    /// Parameters as sent, names and values in order (`user`, `database`, `options`, GUCs...).
    pub params: Vec<(String, String)>,
}

impl StartupMessage {
    /// The value of a parameter, if the client sent it.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// What a server whose newest protocol is `newest` negotiates for this startup, as
    /// PostgreSQL's `ProcessStartupPacket` does: when the client asked for a newer minor version
    /// or sent `_pq_.` options (PostgreSQL recognizes none), the version both speak and the
    /// options in the client's order; `None` when nothing needs saying.
    pub fn negotiation(&self, newest: i32) -> Option<(i32, Vec<&str>)> {
        let options: Vec<&str> = self
            .params
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("_pq_."))
            .collect();
        let newer = (self.protocol & 0xffff) > (newest & 0xffff);
        (newer || !options.is_empty()).then(|| (self.protocol.min(newest), options))
    }

    /// Encodes this message for sending to a server.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_i32(0);
        out.put_i32(self.protocol);
        for (k, v) in &self.params {
            put_cstr(out, k.as_bytes());
            put_cstr(out, v.as_bytes());
        }
        out.put_u8(0);
        patch_len(out, start);
    }
}

/// A backend's identity for cancellation: its process id and secret key.
///
/// The key is 4 bytes in protocol 3.0 and up to 256 bytes in 3.2, so it is kept as bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CancelKey {
    /// Backend process id.
    pub pid: i32,
    /// Secret key bytes.
    pub secret: Bytes,
}

impl CancelKey {
    /// Encodes a CancelRequest carrying this key.
    pub fn encode_request(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_i32(0);
        out.put_i32(CANCEL_REQUEST_CODE);
        out.put_i32(self.pid);
        out.put_slice(&self.secret);
        patch_len(out, start);
    }
}

/// Decodes the startup packet at the start of `buf`.
///
/// Returns `Ok(None)` until the whole packet is buffered, then the packet and its size.
pub fn decode(buf: &[u8]) -> Result<Option<(StartupPacket, usize)>, ProtocolError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = i32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if len < 8 || len as usize > MAX_STARTUP_PACKET_LEN {
        return Err(ProtocolError::InvalidLength { len: len.into() });
    }
    let len = len as usize;
    let Some(packet) = buf.get(..len) else {
        return Ok(None);
    };
    let mut r = BodyReader::new(&packet[4..], "startup");
    let code = r.i32()?;
    let decoded = match code {
        SSL_REQUEST_CODE => expect_empty(&r, StartupPacket::SslRequest)?,
        GSSENC_REQUEST_CODE => expect_empty(&r, StartupPacket::GssEncRequest)?,
        CANCEL_REQUEST_CODE => {
            let pid = r.i32()?;
            let secret = r.remaining();
            if secret.len() < 4 || secret.len() > 256 {
                return Err(ProtocolError::malformed("CancelRequest", "bad secret key length"));
            }
            StartupPacket::Cancel(CancelKey {
                pid,
                secret: Bytes::copy_from_slice(secret),
            })
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            // Any 3.x: a newer minor version is negotiated down by the server
            // (NegotiateProtocolVersion), which the proxy forwards.
            if major != 3 {
                return Err(ProtocolError::UnsupportedProtocol { major, minor });
            }
            StartupPacket::Startup(StartupMessage {
                protocol: code,
                params: decode_params(&mut r)?,
            })
        }
    };
    Ok(Some((decoded, len)))
}

fn expect_empty(r: &BodyReader<'_>, packet: StartupPacket) -> Result<StartupPacket, ProtocolError> {
    r.finish()?;
    Ok(packet)
}

fn decode_params(r: &mut BodyReader<'_>) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let name = r.str()?;
        if name.is_empty() {
            r.finish()?;
            return Ok(params);
        }
        let value = r.str()?;
        params.push((name.to_owned(), value.to_owned()));
    }
}

pub(crate) fn put_cstr(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(s);
    out.put_u8(0);
}

/// Writes the length of the message that starts at `start` (no tag byte) into its first 4 bytes.
pub(crate) fn patch_len(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_as_postgresql_does() {
        let startup = |protocol, params: &[&str]| StartupMessage {
            protocol,
            params: params.iter().map(|k| (k.to_string(), "1".to_owned())).collect(),
        };
        // Nothing to say: the version is spoken and no option was sent.
        assert_eq!(startup(PROTOCOL_3_0, &["user"]).negotiation(PROTOCOL_3_2), None);
        assert_eq!(startup(PROTOCOL_3_2, &["user"]).negotiation(PROTOCOL_3_2), None);
        // A newer minor version comes down to the server's.
        assert_eq!(
            startup(0x0003_0009, &["user"]).negotiation(PROTOCOL_3_2),
            Some((PROTOCOL_3_2, vec![]))
        );
        assert_eq!(
            startup(PROTOCOL_3_2, &["user"]).negotiation(PROTOCOL_3_0),
            Some((PROTOCOL_3_0, vec![]))
        );
        // Options are listed in the client's order, at the version asked for if spoken.
        assert_eq!(
            startup(PROTOCOL_3_0, &["_pq_.b", "user", "_pq_.a"]).negotiation(PROTOCOL_3_2),
            Some((PROTOCOL_3_0, vec!["_pq_.b", "_pq_.a"]))
        );
    }

    #[test]
    fn round_trips_a_startup_message() {
        let msg = StartupMessage {
            protocol: PROTOCOL_3_0,
            params: vec![
                ("user".into(), "app".into()),
                ("database".into(), "shop".into()),
                ("application_name".into(), "psql".into()),
            ],
        };
        let mut buf = BytesMut::new();
        msg.encode(&mut buf);
        let (decoded, used) = decode(&buf).unwrap().unwrap();
        assert_eq!(used, buf.len());
        assert_eq!(decoded, StartupPacket::Startup(msg.clone()));
        assert_eq!(msg.param("database"), Some("shop"));
        assert_eq!(decode(&buf[..buf.len() - 1]).unwrap(), None);
    }

    #[test]
    fn decodes_ssl_and_cancel_requests() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(decode(&ssl).unwrap(), Some((StartupPacket::SslRequest, 8)));
        let key = CancelKey {
            pid: 4242,
            secret: Bytes::from_static(&[1, 2, 3, 4]),
        };
        let mut buf = BytesMut::new();
        key.encode_request(&mut buf);
        assert_eq!(decode(&buf).unwrap(), Some((StartupPacket::Cancel(key), 16)));
    }

    #[test]
    fn refuses_garbage_and_bad_versions() {
        assert!(matches!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(ProtocolError::InvalidLength { .. })
        ));
        assert!(matches!(
            decode(&[0, 0, 0, 8, 0, 2, 0, 0]),
            Err(ProtocolError::UnsupportedProtocol { major: 2, minor: 0 })
        ));
        assert!(matches!(
            decode(&[0, 0, 0, 9, 0, 3, 0, 7, 0]),
            Ok(Some((
                StartupPacket::Startup(StartupMessage {
                    protocol: 0x0003_0007,
                    ..
                }),
                9
            )))
        ));
        // parameters without the final terminator
        assert!(decode(&[0, 0, 0, 10, 0, 3, 0, 0, b'u', 0]).is_err());
    }
}
