//! A server byte stream: `Frames` with a small `MessageLimits`, then `backend::parse` on every
//! frame, with the same framing invariants as `client_stream`.
#![no_main]

#[path = "../../tests/support/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_stream(data, checks::SMALL_LIMITS, checks::check_backend_message);
});
