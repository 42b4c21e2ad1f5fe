#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mlx5_testbed::fuzzing::wqe_ring(data));
