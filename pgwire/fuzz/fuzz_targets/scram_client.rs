//! The client side of SCRAM with reused keys (`ScramKeyClient`, how the proxy logs in upstream
//! as a client it verified) fed the server's messages: the input is split at its first NUL into
//! server-first and server-final. No panic, errors that blame the server, a well-formed
//! client-final, and no accepted signature (the fuzzer does not know the ServerKey).
#![no_main]

use std::sync::OnceLock;

use switchyard_pgwire::auth::ScramSecret;

#[path = "../../tests/support/checks.rs"]
mod checks;

static SECRET: OnceLock<ScramSecret> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let secret = SECRET.get_or_init(checks::scram_secret);
    let accepted = checks::check_scram_client_input(secret, data);
    assert!(!accepted, "fuzzer forged a server signature: {data:?}");
});
