//! SCRAM-SHA-256 (RFC 5802, RFC 7677), server side, as PostgreSQL runs it.
//!
//! Differences from the RFCs follow PostgreSQL (src/backend/libpq/auth-scram.c):
//! the user name in the client-first message is ignored (it comes from the
//! startup packet), authorization identities and mandatory extensions are
//! refused, and unknown optional extensions are skipped. Channel binding
//! (SCRAM-SHA-256-PLUS, RFC 5929's `tls-server-end-point`: a hash of the
//! server's certificate) is offered on TLS connections
//! ([`ScramServer::with_channel_binding`]); without TLS a client that requires
//! it (`p=` flag) is turned away, and on TLS a client that says it supports
//! channel binding but thinks the server does not (`y` flag) is refused as a
//! possible downgrade.
//!
//! The exchange is a type-state machine: [`ScramServer`] consumes the
//! client-first message and becomes a [`ScramAwaitingFinal`], which consumes
//! the client-final message and yields the server-final message.

mod client;
mod parse;
mod secret;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

pub use self::client::{ScramKeyClient, ScramKeyClientAwaitingFinal, ScramKeys};
use self::parse::Gs2Flag;
pub use self::secret::ScramSecret;
use super::constant_time_eq;
use crate::sqlstate::{self, SqlState};

/// The SASL mechanism name the server offers in `AuthenticationSASL` and the
/// client names in `SASLInitialResponse`.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// The mechanism with channel binding, offered (first) on TLS connections.
pub const SCRAM_SHA_256_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// The one channel-binding type PostgreSQL supports.
pub const TLS_SERVER_END_POINT: &str = "tls-server-end-point";

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
    /// GS2 header (and, with channel binding, the channel's data) the client
    /// started with.
    #[error("SCRAM channel binding check failed")]
    ChannelBindingMismatch,
    /// The client supports channel binding but thinks this server does not,
    /// though it offered it: someone may have stripped SCRAM-SHA-256-PLUS from
    /// the offer.
    #[error("SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not; this server does support it")]
    ChannelBindingDowngrade,
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
    /// Logging in to a server with reused keys ([`ScramKeyClient`]): the server's messages do
    /// not fit the keys (another salt or iteration count, a wrong signature, a malformed
    /// message, or the server's own `e=` error).
    #[error("SCRAM login to the server: {0}")]
    Server(String),
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
            ScramError::ChannelBindingDowngrade => "channel_binding_downgrade",
            ScramError::Unsupported(_) => "unsupported",
            ScramError::NonceMismatch => "nonce_mismatch",
            ScramError::InvalidProof => "invalid_proof",
            ScramError::InvalidSecret(_) => "invalid_secret",
            ScramError::InvalidServerNonce => "invalid_server_nonce",
            ScramError::Server(_) => "server",
        }
    }

    /// Whether the client caused the error (as opposed to configuration or
    /// the caller).
    pub fn is_client_error(&self) -> bool {
        !matches!(
            self,
            ScramError::InvalidSecret(_) | ScramError::InvalidServerNonce | ScramError::Server(_)
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
            | ScramError::ChannelBindingDowngrade
            | ScramError::NonceMismatch => sqlstate::PROTOCOL_VIOLATION,
            ScramError::Unsupported(_) => sqlstate::FEATURE_NOT_SUPPORTED,
            ScramError::InvalidProof | ScramError::InvalidSecret(_) => sqlstate::INVALID_PASSWORD,
            ScramError::InvalidServerNonce | ScramError::Server(_) => sqlstate::INTERNAL_ERROR,
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
    /// `tls-server-end-point` data, when the connection is TLS.
    channel_binding: Option<Vec<u8>>,
    /// Whether the client selected SCRAM-SHA-256-PLUS.
    plus: bool,
}

impl ScramServer {
    /// Starts an exchange that checks the client against `secret`, with a
    /// random server nonce.
    pub fn new(secret: ScramSecret) -> Self {
        Self {
            secret,
            server_nonce: random_nonce(),
            doomed: false,
            channel_binding: None,
            plus: false,
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
            channel_binding: None,
            plus: false,
        })
    }

    /// On a TLS connection: `data` is the channel's `tls-server-end-point`
    /// binding (see [`tls_server_end_point`]), offered with
    /// SCRAM-SHA-256-PLUS; `plus` says whether the client selected that
    /// mechanism (its messages must then carry the binding, and otherwise must
    /// not).
    pub fn with_channel_binding(mut self, data: Vec<u8>, plus: bool) -> Self {
        self.channel_binding = Some(data);
        self.plus = plus;
        self
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
        // The c= attribute the client-final message must carry. As PostgreSQL
        // does, a client without channel binding may send either header there.
        let expected = match (client_first.flag, &self.channel_binding) {
            (Gs2Flag::Binding(_), None) => return Err(ScramError::ChannelBindingUnsupported),
            (Gs2Flag::Binding(_), _) if !self.plus => {
                return Err(ScramError::Malformed(
                    "the client selected SCRAM-SHA-256 without channel binding, but the message includes channel binding data",
                ))
            }
            (Gs2Flag::Binding(name), Some(_)) if name != TLS_SERVER_END_POINT => {
                return Err(ScramError::Unsupported("channel-binding type other than tls-server-end-point"))
            }
            (Gs2Flag::Binding(_), Some(data)) => {
                let header = client_first.flag.header();
                CbindExpected::Exactly(STANDARD.encode([header.as_bytes(), data].concat()))
            }
            _ if self.plus => {
                return Err(ScramError::Malformed(
                    "the client selected SCRAM-SHA-256-PLUS, but the message does not include channel binding data",
                ))
            }
            (Gs2Flag::NotOffered, Some(_)) => return Err(ScramError::ChannelBindingDowngrade),
            (Gs2Flag::NotOffered | Gs2Flag::NotSupported, _) => CbindExpected::NoBinding,
        };
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
            expected,
        })
    }
}

/// What the client-final message's channel-binding attribute must be.
#[derive(Debug)]
enum CbindExpected {
    /// `n,,` or `y,,` in base64.
    NoBinding,
    /// The GS2 header and the channel's data, in base64.
    Exactly(String),
}

/// The `tls-server-end-point` channel binding of a server certificate (RFC
/// 5929, section 4.1): its hash with the hash function of its signature
/// algorithm, SHA-256 for MD5 and SHA-1. `None` for algorithms without a
/// single hash (Ed25519, RSASSA-PSS), for which PostgreSQL cannot bind either,
/// and for input that is not a certificate.
pub fn tls_server_end_point(certificate_der: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Sha384, Sha512};
    let oid = parse::signature_algorithm_oid(certificate_der)?;
    // 1.2.840.113549.1.1.{4,5,11,12,13}: md5/sha1/sha256/sha384/sha512 with RSA;
    // 1.2.840.10045.4.1 and 4.3.{2,3,4}: ECDSA with sha1/sha256/sha384/sha512.
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01];
    const ECDSA_SHA2: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    let bits = match oid {
        [rsa @ .., n] if rsa == RSA => match n {
            4 | 5 | 11 => 256,
            12 => 384,
            13 => 512,
            _ => return None,
        },
        o if o == ECDSA_SHA1 => 256,
        [ecdsa @ .., n] if ecdsa == ECDSA_SHA2 => match n {
            2 => 256,
            3 => 384,
            4 => 512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match bits {
        256 => Sha256::digest(certificate_der).to_vec(),
        384 => Sha384::digest(certificate_der).to_vec(),
        _ => Sha512::digest(certificate_der).to_vec(),
    })
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
    expected: CbindExpected,
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
        self.client_final_with_keys(message)
            .map(|(server_final, _)| server_final)
    }

    /// As [`ScramAwaitingFinal::client_final`], and also returns the keys the verified client
    /// proved it holds: its ClientKey (recovered as ClientProof XOR ClientSignature) with the
    /// secret, enough to log in as that client to a server that holds the same secret
    /// ([`ScramKeyClient`]) without ever knowing the password.
    pub fn client_final_with_keys(self, message: &[u8]) -> Result<(Vec<u8>, ScramKeys), ScramError> {
        let client_final = parse::client_final(message)?;
        let binding_ok = match &self.expected {
            // PostgreSQL accepts either header here whichever flag the client
            // sent first.
            CbindExpected::NoBinding => CBIND_NONE.contains(&client_final.channel_binding),
            CbindExpected::Exactly(expected) => {
                constant_time_eq(expected.as_bytes(), client_final.channel_binding.as_bytes())
            }
        };
        if !binding_ok {
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
        let server_final = format!("v={}", STANDARD.encode(server_signature)).into_bytes();
        Ok((
            server_final,
            ScramKeys {
                client_key,
                secret: self.secret,
            },
        ))
    }
}

/// A fresh random nonce (either side's half), base64 of [`SERVER_NONCE_RAW_LEN`] random bytes.
fn random_nonce() -> String {
    let mut raw = [0u8; SERVER_NONCE_RAW_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    STANDARD.encode(raw)
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
