//! Compile tests for the macros: what they accept, and the error each misuse gets
//! (`tests/ui/fail/*.rs`, with the expected compiler output in `.stderr` beside each).
//!
//! After changing a message, regenerate the snapshots with `TRYBUILD=overwrite` and read
//! every changed `.stderr`.

/// One test, so one trybuild project: two tests would each build slim-bus and its
/// dependencies for their cases, one after the other (they share a lock), doubling the
/// time a cold run spends here.
#[test]
fn macros_accept_the_documented_forms_and_reject_misuse_with_a_spanned_error() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
    cases.compile_fail("tests/ui/fail/*.rs");
}
