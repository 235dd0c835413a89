#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| zerodrop_fuzzing::targets::client_binary_frame(data));
