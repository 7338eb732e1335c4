//! Client side of SCRAM-SHA-256 with reused keys instead of a password, as PgBouncer logs in
//! to a server on behalf of a client it verified (its `scram.c`, "SCRAM key reuse").
//!
//! A client that passes [`super::ScramAwaitingFinal::client_final_with_keys`] has shown its
//! ClientKey: ClientProof = ClientKey XOR HMAC(StoredKey, AuthMessage), so the server side
//! recovers ClientKey and checks H(ClientKey) = StoredKey. With that ClientKey and the secret's
//! ServerKey, the proxy can run a full exchange with a server that stores the same secret (same
//! salt, same iteration count): it signs the new AuthMessage with the ClientKey and checks the
//! server's signature with the ServerKey. The password itself is never known.
//!
//! ```text
//! proxy                                             server
//!   SASLInitialResponse("n,,n=,r=<nonce>")      ->
//!                                               <-  SASLContinue("r=<nonce+server>,s=<salt>,i=<n>")
//!   SASLResponse("c=biws,r=<nonce+server>,p=..") ->
//!                                               <-  SASLFinal("v=<ServerSignature>")
//! ```

use super::{hmac_sha256, random_nonce, ScramError, ScramSecret};
use crate::auth::constant_time_eq;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// What a verified SCRAM client leaves behind: its ClientKey and the secret it was checked
/// against. Enough to log in as that client to a server holding the same secret; as good as a
/// password there, so `Debug` shows neither key.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    /// `HMAC(SaltedPassword, "Client Key")`.
    pub client_key: [u8; 32],
    /// The salt, iteration count, StoredKey and ServerKey the client was verified against.
    pub secret: ScramSecret,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramKeys")
            .field("client_key", &"<redacted>")
            .field("secret", &self.secret)
            .finish()
    }
}

/// The start of a key-reuse login: the client-first message is ready.
#[derive(Debug)]
pub struct ScramKeyClient {
    keys: ScramKeys,
    nonce: String,
}

impl ScramKeyClient {
    /// Starts an exchange with a random nonce (as long as a server's).
    pub fn new(keys: ScramKeys) -> Self {
        Self {
            keys,
            nonce: random_nonce(),
        }
    }

    /// Starts an exchange with a chosen nonce, so tests and fuzz targets can write server
    /// messages that extend it. A login upstream uses [`ScramKeyClient::new`].
    pub fn with_nonce(keys: ScramKeys, nonce: &str) -> Self {
        Self {
            keys,
            nonce: nonce.to_owned(),
        }
    }

    /// The client-first message, for `SASLInitialResponse` with mechanism `SCRAM-SHA-256`. No
    /// channel binding (`n`), and an empty user name: PostgreSQL takes the user from the
    /// startup packet.
    pub fn client_first_message(&self) -> Vec<u8> {
        format!("n,,{}", self.client_first_bare()).into_bytes()
    }

    fn client_first_bare(&self) -> String {
        format!("n=,r={}", self.nonce)
    }

    /// Takes the server-first message (the data of `AuthenticationSASLContinue`) and returns
    /// the client-final message to send in `SASLResponse`. Fails when the server's salt or
    /// iteration count are not the secret's: the keys cannot prove anything to that server
    /// (the secret the proxy holds is not the role's secret there).
    pub fn server_first(self, message: &[u8]) -> Result<(ScramKeyClientAwaitingFinal, Vec<u8>), ScramError> {
        let text = std::str::from_utf8(message)
            .map_err(|_| ScramError::Server("the server-first message is not UTF-8".into()))?;
        let mut attributes = text.split(',');
        let mut next = |prefix: &str| {
            attributes
                .next()
                .and_then(|a| a.strip_prefix(prefix))
                .ok_or_else(|| {
                    ScramError::Server(format!("the server-first message has no {prefix} attribute"))
                })
        };
        let nonce = next("r=")?;
        let salt = next("s=")?;
        let iterations = next("i=")?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Server(
                "the server's nonce does not extend the client's".into(),
            ));
        }
        let secret = &self.keys.secret;
        let same_salt = STANDARD.decode(salt).is_ok_and(|s| s == secret.salt);
        if !same_salt || iterations.parse::<u32>().ok() != Some(secret.iterations) {
            return Err(ScramError::Server(
                "the server's salt or iteration count differ from the secret the proxy verified the client with: \
                 that secret is not this role's secret on the server"
                    .into(),
            ));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare());
        let client_signature = hmac_sha256(&secret.stored_key, &[auth_message.as_bytes()]);
        let mut proof = self.keys.client_key;
        for (p, s) in proof.iter_mut().zip(client_signature) {
            *p ^= s;
        }
        let client_final = format!("{without_proof},p={}", STANDARD.encode(proof)).into_bytes();
        let server_signature = hmac_sha256(&secret.server_key, &[auth_message.as_bytes()]);
        Ok((ScramKeyClientAwaitingFinal { server_signature }, client_final))
    }
}

/// A key-reuse login after the client-final message, waiting for the server's signature.
#[derive(Debug)]
pub struct ScramKeyClientAwaitingFinal {
    server_signature: [u8; 32],
}

impl ScramKeyClientAwaitingFinal {
    /// Checks the server-final message (the data of `AuthenticationSASLFinal`): the server
    /// must prove it holds the ServerKey too.
    pub fn server_final(self, message: &[u8]) -> Result<(), ScramError> {
        let text = std::str::from_utf8(message)
            .map_err(|_| ScramError::Server("the server-final message is not UTF-8".into()))?;
        if let Some(error) = text.strip_prefix("e=") {
            return Err(ScramError::Server(format!("the server answered {error}")));
        }
        let signature = text
            .split(',')
            .next()
            .and_then(|v| v.strip_prefix("v="))
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or_else(|| ScramError::Server("the server-final message has no signature".into()))?;
        if !constant_time_eq(&signature, &self.server_signature) {
            return Err(ScramError::Server("the server's signature is wrong".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::ScramServer;

    /// A client verified by one server exchange logs in to another server holding the same
    /// secret with the recovered keys, and is refused by one holding another secret.
    #[test]
    fn recovered_keys_log_in_where_the_secret_is_the_same() {
        let secret = ScramSecret::from_password("pencil", b"0123456789abcdef", 4096).unwrap();
        // A client with the password, against the proxy's server side.
        let mut client = postgres_protocol::authentication::sasl::ScramSha256::new(
            b"pencil",
            postgres_protocol::authentication::sasl::ChannelBinding::unsupported(),
        );
        let waiting = ScramServer::new(secret.clone())
            .client_first(client.message())
            .unwrap();
        client.update(waiting.server_first_message()).unwrap();
        let (server_final, keys) = waiting.client_final_with_keys(client.message()).unwrap();
        client.finish(&server_final).unwrap();

        // The proxy, with the keys only, against an upstream server side with the same secret.
        let login = ScramKeyClient::new(keys.clone());
        let upstream = ScramServer::new(secret)
            .client_first(&login.client_first_message())
            .unwrap();
        let (awaiting, client_final) = login.server_first(upstream.server_first_message()).unwrap();
        let upstream_final = upstream.client_final(&client_final).unwrap();
        awaiting.server_final(&upstream_final).unwrap();

        // Another secret (another salt): refused before a proof is sent.
        let other = ScramSecret::from_password("pencil", b"fedcba9876543210", 4096).unwrap();
        let login = ScramKeyClient::new(keys);
        let upstream = ScramServer::new(other)
            .client_first(&login.client_first_message())
            .unwrap();
        assert!(matches!(
            login.server_first(upstream.server_first_message()),
            Err(ScramError::Server(_))
        ));
    }

    #[test]
    fn a_wrong_server_signature_is_refused() {
        let awaiting = ScramKeyClientAwaitingFinal {
            server_signature: [7; 32],
        };
        let wrong = format!("v={}", STANDARD.encode([8u8; 32]));
        assert!(awaiting.server_final(wrong.as_bytes()).is_err());
        let awaiting = ScramKeyClientAwaitingFinal {
            server_signature: [7; 32],
        };
        assert!(awaiting.server_final(b"e=invalid-proof").is_err());
    }

    #[test]
    fn debug_hides_the_client_key() {
        let secret = ScramSecret::from_password("pencil", b"salt", 4096).unwrap();
        let keys = ScramKeys {
            client_key: [0xab; 32],
            secret,
        };
        assert!(!format!("{keys:?}").contains("171"));
    }
}
