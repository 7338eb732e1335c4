//! Errors raised while framing or parsing wire input.

use crate::sqlstate::{self, SqlState};

/// A wire message could not be framed or parsed.
///
/// Each variant maps to the SQLSTATE PostgreSQL itself uses for the same problem, so the proxy
/// can answer the peer with a FATAL ErrorResponse before closing the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The length field is smaller than the length field itself.
    #[error("invalid message length {len}")]
    InvalidLength {
        /// The length the peer declared.
        len: i64,
    },
    /// The declared length exceeds the configured cap.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The length the peer declared.
        len: usize,
        /// The configured maximum.
        limit: usize,
    },
    /// A tag byte that means nothing in this direction.
    #[error("invalid frontend message type {0}")]
    UnknownTag(u8),
    /// The startup packet asked for a protocol version we do not speak.
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.x")]
    UnsupportedProtocol {
        /// Major version requested.
        major: u16,
        /// Minor version requested.
        minor: u16,
    },
    /// The body of a message does not match its type's layout.
    #[error("malformed {what} message: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What was wrong with it.
        detail: &'static str,
    },
}

impl ProtocolError {
    /// The SQLSTATE to report this error with.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ProtocolError::TooLarge { .. } => sqlstate::PROGRAM_LIMIT_EXCEEDED,
            ProtocolError::UnsupportedProtocol { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }

    /// Shorthand for [`ProtocolError::Malformed`].
    pub(crate) fn malformed(what: &'static str, detail: &'static str) -> Self {
        ProtocolError::Malformed { what, detail }
    }
}
