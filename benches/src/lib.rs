//! Marina's load harness: the benchmark load generator (`bench-load`, a black-box client) and
//! the deployment load test (`loadtest`, [`loadtest`]).

pub mod loadtest;
