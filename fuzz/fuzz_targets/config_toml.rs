#![no_main]
//! `tallyd::fuzzing::config_toml` (see there for what the input is).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tallyd::fuzzing::config_toml(data));
