//! The benchmarks behind `pstrain bench` (compute and training throughput, memory) and
//! `pstrain bench-net` (the TCP transport), each writing JSON.

pub mod codecs;
pub mod compute;
pub mod fleet;
pub mod memory;
pub mod net;
pub mod net_config;
