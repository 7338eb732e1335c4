//! A byte stream fed to `frame::take_frame` in pieces, as reads deliver it, under the server's
//! limit, a client's default or a small cap (the first byte picks them and the piece size): it
//! must take the frames `Frames` finds, fail where `Frames` fails, and keep what it does not take.
#![no_main]

#[path = "../../tests/support/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    checks::check_take_frame_input(data);
});
