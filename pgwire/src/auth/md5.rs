//! MD5 password authentication (`AuthenticationMD5Password`).
//!
//! PostgreSQL stores an MD5 password as `"md5" + hex(md5(password + user))`
//! and challenges the client with a random 4-byte salt; the client answers
//! `"md5" + hex(md5(hex(md5(password + user)) + salt))`. See
//! <https://www.postgresql.org/docs/current/auth-password.html> and
//! `pg_md5_encrypt` in PostgreSQL's `src/common/md5_common.c`.

use ::md5::{Digest, Md5};
use rand::RngCore;

use super::constant_time_eq;

/// Length of a stored MD5 secret: `"md5"` followed by 32 hex digits.
const MD5_SECRET_LEN: usize = 3 + 32;

/// What the proxy knows about a user's password when it checks an MD5 answer.
#[derive(Clone, PartialEq, Eq)]
pub enum Md5Source {
    /// The password itself.
    Password(String),
    /// A stored secret as found in `pg_authid.rolpassword`: `"md5"` followed
    /// by 32 lowercase hex digits.
    Secret(String),
}

impl std::fmt::Debug for Md5Source {
    // Neither form may end up in logs: both are enough to log in.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Md5Source::Password(_) => f.write_str("Md5Source::Password(<redacted>)"),
            Md5Source::Secret(_) => f.write_str("Md5Source::Secret(<redacted>)"),
        }
    }
}

/// Returns the stored form of an MD5 password: `"md5" + hex(md5(password + user))`, by
/// postgres-protocol's `password::md5`. PostgreSQL hashes the password's bytes as they are (no
/// SASLprep for md5).
pub fn md5_secret(password: &str, user: &str) -> String {
    postgres_protocol::password::md5(password.as_bytes(), user)
}

/// Returns a random salt for an `AuthenticationMD5Password` message.
pub fn md5_salt() -> [u8; 4] {
    let mut salt = [0u8; 4];
    rand::thread_rng().fill_bytes(&mut salt);
    salt
}

/// Checks the client's answer to an `AuthenticationMD5Password(salt)` challenge.
///
/// `client_response` is the body of the client's `PasswordMessage` without its
/// terminating NUL. Returns `false` for a wrong answer, for any malformed
/// answer, and for a [`Md5Source::Secret`] that is not a well-formed MD5
/// secret. The comparison runs in constant time.
pub fn verify_md5_response(source: &Md5Source, user: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    let secret = match source {
        Md5Source::Password(password) => md5_secret(password, user),
        Md5Source::Secret(secret) if is_md5_secret(secret) => secret.clone(),
        Md5Source::Secret(_) => return false,
    };
    let expected = md5_response_from_secret(&secret, salt);
    constant_time_eq(expected.as_bytes(), client_response)
}

/// The answer to an `AuthenticationMD5Password(salt)` challenge computed from the stored secret
/// (`"md5" + hex(md5(password + user))`) rather than the password: what a client with the
/// password sends, and what the proxy sends upstream when it holds only the secret.
pub fn md5_response_from_secret(secret: &str, salt: [u8; 4]) -> String {
    // PostgreSQL hashes the stored hex digits as they are (see `md5_crypt_verify`
    // in src/backend/libpq/crypt.c), so neither side normalises their case.
    let hex_digest = secret.get(3..).unwrap_or_default();
    let mut hasher = Md5::new();
    hasher.update(hex_digest.as_bytes());
    hasher.update(salt);
    let mut expected = String::with_capacity(MD5_SECRET_LEN);
    expected.push_str("md5");
    push_hex(&mut expected, &hasher.finalize());
    expected
}

/// The same test PostgreSQL's `get_password_type` applies to a stored password.
fn is_md5_secret(secret: &str) -> bool {
    secret.len() == MD5_SECRET_LEN
        && secret.starts_with("md5")
        && secret.bytes().skip(3).all(|b| b.is_ascii_hexdigit())
}

/// Appends `bytes` to `out` as lowercase hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::md5_hash;

    // Expected values computed with Python's hashlib:
    // "md5" + md5(b"secretpostgres").hexdigest()
    const SECRET_POSTGRES: &str = "md553f48b7c4b76a86ce72276c5755f217d";
    // "md5" + md5(SECRET_POSTGRES[3:].encode() + bytes([1, 2, 3, 4])).hexdigest()
    const RESPONSE_1234: &str = "md5bb41a296aab6baccb36ff243a562abff";

    /// The proxy answers a server's md5 challenge from the stored secret alone.
    #[test]
    fn response_from_the_secret_is_the_clients() {
        assert_eq!(
            md5_response_from_secret(SECRET_POSTGRES, [1, 2, 3, 4]),
            RESPONSE_1234
        );
    }

    #[test]
    fn secret_matches_known_value() {
        assert_eq!(md5_secret("secret", "postgres"), SECRET_POSTGRES);
    }

    #[test]
    fn known_response_verifies_from_password_and_secret() {
        let salt = [1, 2, 3, 4];
        for source in [
            Md5Source::Password("secret".into()),
            Md5Source::Secret(SECRET_POSTGRES.into()),
        ] {
            assert!(verify_md5_response(
                &source,
                "postgres",
                salt,
                RESPONSE_1234.as_bytes()
            ));
        }
    }

    #[test]
    fn postgres_protocol_client_response_verifies() {
        let salt = md5_salt();
        let response = md5_hash(b"alice", b"s3cr3t pass", salt);
        let password = Md5Source::Password("s3cr3t pass".into());
        let secret = Md5Source::Secret(md5_secret("s3cr3t pass", "alice"));
        assert!(verify_md5_response(&password, "alice", salt, response.as_bytes()));
        assert!(verify_md5_response(&secret, "alice", salt, response.as_bytes()));

        let wrong = md5_hash(b"alice", b"wrong", salt);
        assert!(!verify_md5_response(&password, "alice", salt, wrong.as_bytes()));
        assert!(!verify_md5_response(&secret, "alice", salt, wrong.as_bytes()));
        // The user name is part of the hash.
        assert!(!verify_md5_response(&password, "bob", salt, response.as_bytes()));
        // So is the salt.
        let other_salt = [salt[0] ^ 1, salt[1], salt[2], salt[3]];
        assert!(!verify_md5_response(
            &password,
            "alice",
            other_salt,
            response.as_bytes()
        ));
    }

    #[test]
    fn malformed_responses_and_secrets_are_rejected() {
        let salt = [1, 2, 3, 4];
        let source = Md5Source::Secret(SECRET_POSTGRES.into());
        for response in [
            &b""[..],
            b"md5",
            &RESPONSE_1234.as_bytes()[..34],
            &RESPONSE_1234.to_uppercase().into_bytes(),
            b"md5bb41a296aab6baccb36ff243a562abff\0",
            &[0xff; 35],
        ] {
            assert!(!verify_md5_response(&source, "postgres", salt, response));
        }
        for secret in [
            "",
            "md5",
            "53f48b7c4b76a86ce72276c5755f217d",
            "md553f48b7c4b76a86ce72276c5755f217",
            "md553f48b7c4b76a86ce72276c5755f217dd",
            "md553f48b7c4b76a86ce72276c5755f217g",
            "md553f48b7c4b76a86ce72276c5755f21é",
        ] {
            let source = Md5Source::Secret(secret.into());
            assert!(!verify_md5_response(
                &source,
                "postgres",
                salt,
                RESPONSE_1234.as_bytes()
            ));
        }
    }

    #[test]
    fn debug_does_not_show_the_password() {
        let shown = format!("{:?}", Md5Source::Password("hunter2".into()));
        assert!(!shown.contains("hunter2"));
    }
}
