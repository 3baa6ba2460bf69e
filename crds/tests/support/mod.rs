//! Shared test support for the crds tests.
// Each test binary uses a different part of the support code.
#![allow(dead_code)]
pub mod cases;
