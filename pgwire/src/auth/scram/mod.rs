//! SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, as PostgreSQL runs it.
//!
//! Differences from the RFCs follow PostgreSQL (src/backend/libpq/auth-scram.c):
//! the user name in the client-first message is ignored (it comes from the
//! startup packet), authorization identities and mandatory extensions are
//! refused, and unknown optional extensions are skipped. Channel binding
//! (SCRAM-SHA-256-PLUS) needs TLS, which the proxy refuses, so a client that
//! requires it (`p=` flag) is turned away.
//!
//! The exchange is a type-state machine: [`ScramServer`] consumes the
//! client-first message and becomes a [`ScramAwaitingFinal`], which consumes
//! the client-final message and yields the server-final message.

mod parse;
mod secret;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use self::secret::ScramSecret;
use super::constant_time_eq;
use crate::sqlstate::{self, SqlState};

/// The SASL mechanism name the server offers in `AuthenticationSASL` and the
/// client names in `SASLInitialResponse`.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// PostgreSQL's default iteration count (the `scram_iterations` setting).
pub const SCRAM_DEFAULT_ITERATIONS: u32 = 4096;

/// PostgreSQL's salt length for new secrets, in bytes.
pub const SCRAM_DEFAULT_SALT_LEN: usize = 16;

/// Random bytes in the server's half of the nonce (PostgreSQL's
/// `SCRAM_RAW_NONCE_LEN`); sent base64-encoded.
const SERVER_NONCE_RAW_LEN: usize = 18;

/// Base64 of the GS2 headers `n,,` and `y,,`, the only channel-binding
/// attributes a client may send when no channel binding was negotiated.
const CBIND_NONE: [&str; 2] = ["biws", "eSws"];

/// Why a SCRAM exchange failed. Every error ends the exchange.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScramError {
    /// A client message does not follow the SCRAM grammar.
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client requires channel binding (SCRAM-SHA-256-PLUS), which needs TLS.
    #[error("client requires SCRAM channel binding, which is not supported")]
    ChannelBindingUnsupported,
    /// The channel-binding attribute of the client-final message is not the
    /// GS2 header of a client that does not use channel binding.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// The client asked for a SCRAM feature PostgreSQL does not support either.
    #[error("client requires an unsupported SCRAM feature: {0}")]
    Unsupported(&'static str),
    /// The nonce in the client-final message is not the one the server sent.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    /// The client's proof does not match the secret: wrong password, or an
    /// unknown user.
    #[error("SCRAM proof does not match")]
    InvalidProof,
    /// A stored secret could not be parsed or built. Comes from configuration,
    /// not from the client.
    #[error("invalid SCRAM secret: {0}")]
    InvalidSecret(&'static str),
    /// A server nonce given to [`ScramServer::with_nonce`] is empty or has
    /// characters other than printable ASCII without ','.
    #[error("invalid SCRAM server nonce")]
    InvalidServerNonce,
}

impl ScramError {
    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ScramError::Malformed(_) => "malformed",
            ScramError::ChannelBindingUnsupported => "channel_binding_unsupported",
            ScramError::ChannelBindingMismatch => "channel_binding_mismatch",
            ScramError::Unsupported(_) => "unsupported",
            ScramError::NonceMismatch => "nonce_mismatch",
            ScramError::InvalidProof => "invalid_proof",
            ScramError::InvalidSecret(_) => "invalid_secret",
            ScramError::InvalidServerNonce => "invalid_server_nonce",
        }
    }

    /// Whether the client caused the error (as opposed to configuration or
    /// the caller).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            ScramError::InvalidSecret(_) | ScramError::InvalidServerNonce
        )
    }

    /// The SQLSTATE PostgreSQL sends in the `ErrorResponse` for this failure.
    ///
    /// A broken stored secret gets `28P01` (invalid_password) like a wrong
    /// password: PostgreSQL does not tell the client that the secret is bad.
    pub fn sqlstate(&self) -> SqlState {
        match self {
            ScramError::Malformed(_)
            | ScramError::ChannelBindingUnsupported
            | ScramError::ChannelBindingMismatch
            | ScramError::NonceMismatch => sqlstate::PROTOCOL_VIOLATION,
            ScramError::Unsupported(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            ScramError::InvalidProof | ScramError::InvalidSecret(_) => sqlstate::INVALID_PASSWORD,
            ScramError::InvalidServerNonce => sqlstate::INTERNAL_ERROR,
        }
    }
}

/// The server at the start of an exchange, waiting for the client-first
/// message.
#[derive(Debug)]
pub struct ScramServer {
    secret: ScramSecret,
    server_nonce: String,
    /// Set for an unknown user: run the whole exchange, then fail.
    doomed: bool,
}

impl ScramServer {
    /// Starts an exchange that checks the client against `secret`, with a
    /// random server nonce.
    pub fn new(secret: ScramSecret) -> Self {
        let mut raw = [0u8; SERVER_NONCE_RAW_LEN];
        rand::thread_rng().fill_bytes(&mut raw);
        Self {
            secret,
            server_nonce: STANDARD.encode(raw),
            doomed: false,
        }
    }

    /// Starts an exchange with a fixed server nonce, for deterministic tests.
    ///
    /// The nonce must be printable ASCII without ','. Never use a fixed nonce
    /// on a real connection: it lets a recorded exchange be replayed.
    pub fn with_nonce(secret: ScramSecret, server_nonce: &str) -> Result<Self, ScramError> {
        if !parse::is_printable_nonce(server_nonce) {
            return Err(ScramError::InvalidServerNonce);
        }
        Ok(Self {
            secret,
            server_nonce: server_nonce.to_owned(),
            doomed: false,
        })
    }

    /// Starts an exchange for a user that does not exist (or has no usable
    /// secret). It looks like a real one to the client — same messages, same
    /// work, a salt that stays the same across attempts for the same `user` —
    /// and always ends in [`ScramError::InvalidProof`], so that a client cannot
    /// tell which users exist. `mock_key` must be a secret random value that
    /// stays the same across connections (PostgreSQL keeps one in pg_control);
    /// if it changed, the salt for an unknown user would change too.
    pub fn for_unknown_user(user: &str, mock_key: &[u8]) -> Self {
        let mut server = Self::new(ScramSecret::mock(user, mock_key));
        server.doomed = true;
        server
    }

    /// Takes the client-first message (the data of `SASLInitialResponse`) and
    /// prepares the server-first message, which
    /// [`ScramAwaitingFinal::server_first_message`] returns.
    pub fn client_first(self, message: &[u8]) -> Result<ScramAwaitingFinal, ScramError> {
        let client_first = parse::client_first(message)?;
        let nonce = format!("{}{}", client_first.nonce, self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&self.secret.salt),
            self.secret.iterations
        );
        let auth_message_start = format!("{},{server_first},", client_first.bare);
        Ok(ScramAwaitingFinal {
            secret: self.secret,
            doomed: self.doomed,
            nonce,
            server_first,
            auth_message_start,
        })
    }
}

/// The server after the server-first message, waiting for the client-final
/// message.
#[derive(Debug)]
pub struct ScramAwaitingFinal {
    secret: ScramSecret,
    doomed: bool,
    /// Client nonce followed by server nonce.
    nonce: String,
    server_first: String,
    /// `client-first-message-bare "," server-first-message ","`, the start of
    /// the AuthMessage both sides sign.
    auth_message_start: String,
}

impl ScramAwaitingFinal {
    /// The server-first message, to send in `AuthenticationSASLContinue`.
    pub fn server_first_message(&self) -> &[u8] {
        self.server_first.as_bytes()
    }

    /// Takes the client-final message (the data of `SASLResponse`), checks the
    /// client's proof in constant time, and returns the server-final message
    /// (`v=<ServerSignature>`) to send in `AuthenticationSASLFinal` before
    /// `AuthenticationOk`.
    pub fn client_final(self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        let client_final = parse::client_final(message)?;
        // PostgreSQL accepts either header here whichever flag the client sent
        // first; without channel binding on offer, the difference is moot.
        if !CBIND_NONE.contains(&client_final.channel_binding) {
            return Err(ScramError::ChannelBindingMismatch);
        }
        if client_final.nonce != self.nonce {
            return Err(ScramError::NonceMismatch);
        }

        let auth_message = [
            self.auth_message_start.as_bytes(),
            client_final.without_proof.as_bytes(),
        ];
        // ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage); the proof is
        // right if H(ClientKey) is StoredKey.
        let client_signature = hmac_sha256(&self.secret.stored_key, &auth_message);
        let mut client_key = client_final.proof;
        for (key, signature) in client_key.iter_mut().zip(client_signature) {
            *key ^= signature;
        }
        let stored_key = Sha256::digest(client_key);
        let proof_ok = constant_time_eq(&stored_key, &self.secret.stored_key);
        if !proof_ok || self.doomed {
            return Err(ScramError::InvalidProof);
        }

        let server_signature = hmac_sha256(&self.secret.server_key, &auth_message);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// HMAC-SHA-256 of the concatenation of `parts` under `key`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length (longer ones are hashed first), so this
    // never fails; the fallback keeps the code free of panics regardless.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return [0; 32];
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests;
