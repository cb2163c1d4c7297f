#![no_main]
//! `tallyd::fuzzing::cloudevents` (see there for what the input is).
libfuzzer_sys::fuzz_target!(|data: &[u8]| tallyd::fuzzing::cloudevents(data));
