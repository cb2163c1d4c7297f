#![no_main]
//! `tallyd::fuzzing::kafka_message` (see there for what the input is).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tallyd::fuzzing::kafka_message(data));
