//! Server side of PostgreSQL password authentication, without I/O.
//!
//! The proxy terminates client connections itself, so it has to run the
//! password exchange that PostgreSQL would otherwise run. Everything here is a
//! pure function or state machine over byte slices: the caller frames the
//! messages, reads and writes the socket, and turns errors into an
//! `ErrorResponse`.
//!
//! # SCRAM-SHA-256
//!
//! The exchange, as described in
//! <https://www.postgresql.org/docs/current/sasl-authentication.html>:
//!
//! ```text
//! server                                         client
//!   AuthenticationSASL("SCRAM-SHA-256")      ->
//!                                            <-  SASLInitialResponse(mechanism, client-first)
//!   AuthenticationSASLContinue(server-first) ->
//!                                            <-  SASLResponse(client-final)
//!   AuthenticationSASLFinal(server-final)    ->
//!   AuthenticationOk                         ->
//! ```
//!
//! [`ScramServer::client_first`] takes the data of the `SASLInitialResponse`
//! (after the caller has checked the mechanism name is [`SCRAM_SHA_256`]) and
//! yields the server-first message; [`ScramAwaitingFinal::client_final`] takes
//! the data of the `SASLResponse` and yields the server-final message once the
//! client's proof is verified. Any `Err` ends the exchange: the caller sends an
//! `ErrorResponse` with [`ScramError::sqlstate`] and closes the connection.
//!
//! # MD5
//!
//! `AuthenticationMD5Password(salt)` is answered by a `PasswordMessage` that
//! holds `"md5" + hex(md5(hex(md5(password + user)) + salt))`; see
//! [`verify_md5_response`]. MD5 is kept for old clients and old server
//! configurations only.

mod md5;
mod scram;

pub use self::md5::{md5_response_from_secret, md5_salt, md5_secret, verify_md5_response, Md5Source};
pub use self::scram::{
    tls_server_end_point, ScramAwaitingFinal, ScramError, ScramKeyClient, ScramKeyClientAwaitingFinal,
    ScramKeys, ScramSecret, ScramServer, SCRAM_DEFAULT_ITERATIONS, SCRAM_DEFAULT_SALT_LEN, SCRAM_SHA_256,
    SCRAM_SHA_256_PLUS, TLS_SERVER_END_POINT,
};

/// Compares two byte strings in time that depends only on their lengths.
///
/// Lengths are not secret here (digests, proofs and encoded hashes all have a
/// fixed size), so an early return on a length mismatch is fine.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the optimiser from turning the fold into an early-exit comparison.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn constant_time_eq_compares_contents_and_lengths() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }
}
