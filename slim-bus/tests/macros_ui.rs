//! Compile tests for the macros: what they accept, and the error each misuse gets
//! (`tests/ui/fail/*.rs`, with the expected compiler output in `.stderr` beside each).
//!
//! After changing a message, regenerate the snapshots with `TRYBUILD=overwrite` and read
//! every changed `.stderr`.

#[test]
fn macros_accept_the_documented_forms() {
    let cases = trybuild::TestCases::new();
    cases.pass("tests/ui/pass/*.rs");
}

#[test]
fn macro_misuse_gets_a_spanned_error_that_says_what_to_write() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
}
