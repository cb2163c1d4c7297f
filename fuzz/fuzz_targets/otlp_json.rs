#![no_main]
//! `tallyd::fuzzing::otlp_json` (see there for what the input is).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tallyd::fuzzing::otlp_json(data));
