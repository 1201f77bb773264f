//! Compile tests for the macros: the error each misuse gets (`tests/ui/fail/*.rs`, with the
//! expected compiler output in `.stderr` beside each).
//!
//! What they accept (`tests/ui/pass/*.rs`) is built as examples of this package (see its
//! `Cargo.toml`), not here: with compile-fail cases only, trybuild type-checks its project
//! with `cargo check` instead of building and linking slim-bus and all its dependencies
//! once more, which took most of a cold test run.
//!
//! After changing a message, regenerate the snapshots with `TRYBUILD=overwrite` and read
//! every changed `.stderr`.

/// One test, so one trybuild project: two tests would each check slim-bus and its
/// dependencies for their cases, one after the other (they share a lock).
#[test]
fn macros_reject_misuse_with_a_spanned_error() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
}
