//! An ErrorResponse or NoticeResponse body, well formed or not, through `backend::error_fields`
//! (which the proxy uses to log what a server refused) and the `ErrorFields` accessors.
#![no_main]

#[path = "../../tests/support/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_error_body(data);
});
