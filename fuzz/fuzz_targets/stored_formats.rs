#![no_main]
//! `tallyd::fuzzing::stored_formats` (see there for what the input is).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tallyd::fuzzing::stored_formats(data));
