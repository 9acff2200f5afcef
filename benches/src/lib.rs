//! Marina's load harness.
