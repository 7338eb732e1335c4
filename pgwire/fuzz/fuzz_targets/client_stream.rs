//! A client byte stream after startup: `Frames` with a small `MessageLimits`, then
//! `frontend::parse` on every frame, and `parse_sasl_initial_response` / `parse_password`
//! (plus the MD5 check) on every body. Invariants: `consumed() <= len`, every
//! `frame_len >= 5`, framing a prefix agrees with framing the whole, parsed fields are borrowed
//! from the body and re-encode to the same frame.
#![no_main]

#[path = "../../tests/support/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_stream(data, checks::SMALL_LIMITS, checks::check_frontend_message);
});
