//! The stored form of a SCRAM-SHA-256 password.
//!
//! PostgreSQL keeps `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`
//! in `pg_authid.rolpassword` (base64 for the last three fields); see
//! `parse_scram_secret` and `scram_build_secret` in PostgreSQL's
//! src/backend/libpq/auth-scram.c and src/common/scram-common.c.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha2::{Digest, Sha256};

use super::{hmac_sha256, ScramError, SCRAM_DEFAULT_ITERATIONS, SCRAM_DEFAULT_SALT_LEN};

/// The text that starts every SCRAM-SHA-256 secret.
const SECRET_PREFIX: &str = "SCRAM-SHA-256$";

/// What the server needs to verify a SCRAM-SHA-256 client without knowing the
/// password.
///
/// `Debug` hides the keys: with `StoredKey` and a recorded exchange, or with
/// `ServerKey`, an attacker can impersonate the client or the server.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramSecret {
    /// PBKDF2 iteration count; at least 1.
    pub iterations: u32,
    /// PBKDF2 salt; not empty.
    pub salt: Vec<u8>,
    /// `H(HMAC(SaltedPassword, "Client Key"))`.
    pub stored_key: [u8; 32],
    /// `HMAC(SaltedPassword, "Server Key")`.
    pub server_key: [u8; 32],
}

impl ScramSecret {
    /// Parses PostgreSQL's stored form,
    /// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Result<Self, ScramError> {
        let rest = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(ScramError::InvalidSecret("missing SCRAM-SHA-256$ prefix"))?;
        let (params, keys) = rest
            .split_once('$')
            .ok_or(ScramError::InvalidSecret("missing '$' before the keys"))?;
        let (iterations, salt) = params
            .split_once(':')
            .ok_or(ScramError::InvalidSecret("missing ':' after the iteration count"))?;
        let (stored_key, server_key) = keys
            .split_once(':')
            .ok_or(ScramError::InvalidSecret("missing ':' between the keys"))?;

        // `u32::from_str` would also take a leading '+'.
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ScramError::InvalidSecret("iteration count is not a number"));
        }
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ScramError::InvalidSecret("iteration count is out of range"))?;
        if iterations == 0 {
            return Err(ScramError::InvalidSecret("iteration count is zero"));
        }
        let salt = STANDARD
            .decode(salt)
            .map_err(|_| ScramError::InvalidSecret("salt is not valid base64"))?;
        if salt.is_empty() {
            return Err(ScramError::InvalidSecret("salt is empty"));
        }
        Ok(Self {
            iterations,
            salt,
            stored_key: decode_key(stored_key, "StoredKey is not 32 bytes of base64")?,
            server_key: decode_key(server_key, "ServerKey is not 32 bytes of base64")?,
        })
    }

    /// Derives the secret for `password` with a given salt and iteration count, as `CREATE ROLE
    /// ... PASSWORD` does: the password first goes through SASLprep (RFC 4013: NFKC
    /// normalisation, non-ASCII spaces mapped to a space, some characters mapped to nothing), and
    /// is used as its raw bytes when SASLprep refuses it (`pg_saslprep` in
    /// src/common/saslprep.c). Clients (libpq, postgres-protocol) prepare the password the same
    /// way before computing their proof. For reproducible fixtures (tests, fuzz targets);
    /// [`ScramSecret::generate`] makes real secrets.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Result<Self, ScramError> {
        if iterations == 0 {
            return Err(ScramError::InvalidSecret("iteration count is zero"));
        }
        if salt.is_empty() {
            return Err(ScramError::InvalidSecret("salt is empty"));
        }
        let prepared = stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password));
        Ok(Self::derive(&prepared, salt, iterations))
    }

    /// Derives the secret for `password` with a fresh random salt and PostgreSQL's defaults
    /// (16 bytes of salt, 4096 iterations), by postgres-protocol's
    /// `password::scram_sha_256`, which prepares the password with SASLprep as PostgreSQL does.
    pub fn generate(password: &str) -> Result<Self, ScramError> {
        Self::parse(&postgres_protocol::password::scram_sha_256(password.as_bytes()))
    }

    /// A secret no password matches, with a salt that depends only on `user`
    /// and `mock_key`, so repeated attempts for an unknown user see the same
    /// salt, as they would for a real one (PostgreSQL's `scram_mock_salt`).
    pub(super) fn mock(user: &str, mock_key: &[u8]) -> Self {
        let digest = Sha256::new()
            .chain_update(mock_key)
            .chain_update([0u8])
            .chain_update(user.as_bytes())
            .finalize();
        Self {
            iterations: SCRAM_DEFAULT_ITERATIONS,
            salt: digest.iter().copied().take(SCRAM_DEFAULT_SALT_LEN).collect(),
            stored_key: [0; 32],
            server_key: [0; 32],
        }
    }

    fn derive(password: &str, salt: &[u8], iterations: u32) -> Self {
        let salted_password = pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(password.as_bytes(), salt, iterations);
        let client_key = hmac_sha256(&salted_password, &[b"Client Key"]);
        Self {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac_sha256(&salted_password, &[b"Server Key"]),
        }
    }
}

fn decode_key(text: &str, error: &'static str) -> Result<[u8; 32], ScramError> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| ScramError::InvalidSecret(error))?;
    bytes.try_into().map_err(|_| ScramError::InvalidSecret(error))
}

impl fmt::Display for ScramSecret {
    /// Writes PostgreSQL's stored form, the inverse of [`ScramSecret::parse`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SECRET_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key),
        )
    }
}

impl fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt", &STANDARD.encode(&self.salt))
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

impl FromStr for ScramSecret {
    type Err = ScramError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// RFC 7677's example password and salt; the stored form was computed with
    /// Python's hashlib.pbkdf2_hmac and hmac.
    const PENCIL: &str = "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
        WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
        wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU=";

    #[test]
    fn from_password_matches_known_secret() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let secret = ScramSecret::from_password("pencil", &salt, 4096).unwrap();
        assert_eq!(secret.to_string(), PENCIL);
        assert_eq!(ScramSecret::parse(PENCIL).unwrap(), secret);
    }

    #[test]
    fn parse_and_format_round_trip() {
        let secret = ScramSecret::parse(PENCIL).unwrap();
        assert_eq!(secret.iterations, 4096);
        assert_eq!(secret.salt.len(), 16);
        assert_eq!(secret.to_string(), PENCIL);
        assert_eq!(PENCIL.parse::<ScramSecret>().unwrap(), secret);

        let generated = ScramSecret::generate("pencil").unwrap();
        assert_eq!(generated.iterations, SCRAM_DEFAULT_ITERATIONS);
        assert_eq!(generated.salt.len(), SCRAM_DEFAULT_SALT_LEN);
        assert_eq!(ScramSecret::parse(&generated.to_string()).unwrap(), generated);
    }

    #[test]
    fn malformed_secrets_are_rejected() {
        let key = "WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=";
        let bad = [
            String::new(),
            "md553f48b7c4b76a86ce72276c5755f217d".to_owned(),
            "SCRAM-SHA-256$".to_owned(),
            "SCRAM-SHA-1$4096:W22ZaJ0SNY7soEsUEjb6gQ==$a:b".to_owned(),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${key}"),
            format!("SCRAM-SHA-256$4096W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}"),
            format!("SCRAM-SHA-256$:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}"),
            format!("SCRAM-SHA-256$0:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}"),
            format!("SCRAM-SHA-256$+4096:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}"),
            format!("SCRAM-SHA-256$-1:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}"),
            format!("SCRAM-SHA-256$99999999999:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}"),
            format!("SCRAM-SHA-256$4096:${key}:{key}"),
            format!("SCRAM-SHA-256$4096:not base64!${key}:{key}"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ$${key}:{key}"),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$AAAA:AAAA".to_owned(),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}:"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key}$"),
            format!("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==${key}:{key} "),
        ];
        for text in &bad {
            assert!(
                matches!(ScramSecret::parse(text), Err(ScramError::InvalidSecret(_))),
                "{text:?} should be rejected"
            );
        }
        assert!(ScramSecret::from_password("pw", b"salt", 0).is_err());
        assert!(ScramSecret::from_password("pw", b"", 4096).is_err());
    }

    #[test]
    fn parse_never_panics_on_random_input() {
        let mut rng = StdRng::seed_from_u64(0x5c4a_5ec7);
        let alphabet = b"SCRAM-SHA-256$:=+/0123456789abcdefWXYZ \xff";
        for _ in 0..5_000 {
            let len = rng.gen_range(0..120);
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect();
            let text = String::from_utf8_lossy(&bytes);
            let _ = ScramSecret::parse(&text);
            // Mutations of a valid secret reach deeper into the parser.
            let mut mutated = PENCIL.as_bytes().to_vec();
            let at = rng.gen_range(0..mutated.len());
            mutated[at] = alphabet[rng.gen_range(0..alphabet.len())];
            let _ = ScramSecret::parse(&String::from_utf8_lossy(&mutated));
        }
    }

    #[test]
    fn debug_hides_keys() {
        let secret = ScramSecret::parse(PENCIL).unwrap();
        let shown = format!("{secret:?}");
        assert!(!shown.contains("WG5d8oPm"));
        assert!(!shown.contains("wfPLwcE6"));
        assert!(shown.contains("4096"));
    }

    #[test]
    fn mock_salt_depends_on_user_and_key() {
        let a = ScramSecret::mock("alice", b"key");
        assert_eq!(a, ScramSecret::mock("alice", b"key"));
        assert_ne!(a.salt, ScramSecret::mock("bob", b"key").salt);
        assert_ne!(a.salt, ScramSecret::mock("alice", b"other").salt);
        assert_eq!(a.salt.len(), SCRAM_DEFAULT_SALT_LEN);
    }
}
