//! `startup::decode` on arbitrary bytes: no panic, `used` matches the length field, and
//! StartupMessage / CancelRequest re-encode to exactly the decoded bytes.
#![no_main]

#[path = "../../tests/support/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_startup(data);
});
