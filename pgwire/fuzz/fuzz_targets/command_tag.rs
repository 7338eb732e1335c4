//! A CommandComplete body, well formed or not, through `backend::command_tag`.
#![no_main]

#[path = "../../tests/support/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_command_tag(data);
});
