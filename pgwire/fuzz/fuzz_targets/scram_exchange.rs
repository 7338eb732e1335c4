//! SCRAM-SHA-256 server against a fixed secret and nonce. The input is split at its first NUL
//! into client-first and client-final. No panic, only client-side errors, a well-formed
//! server-first message, and no accepted proof (the fuzzer does not know the password).
#![no_main]

use std::sync::OnceLock;

use switchyard_pgwire::auth::ScramSecret;

#[path = "../../tests/support/checks.rs"]
mod checks;

static SECRET: OnceLock<ScramSecret> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let secret = SECRET.get_or_init(checks::scram_secret);
    let accepted = checks::check_scram_input(secret, data);
    assert!(accepted.is_none(), "fuzzer forged a SCRAM proof: {data:?}");
});
