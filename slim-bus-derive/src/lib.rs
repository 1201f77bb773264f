//! Macros for slim-bus; use them through the `slim-bus` crate.
