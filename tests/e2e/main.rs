//! End-to-end tests: the real `eir` binary and the real guest components.
//!
//! The guests are built by `scripts/build.sh` (the README's test command runs it first);
//! a missing component fails the test with that instruction, it is never skipped.

mod batching;
mod bundle;
mod cli;
mod common;
mod embed;
mod fleet;
mod gateway;
mod grants;
mod languages;
mod limits;
mod llm;
mod nn;
mod onnx;
mod plugins;
mod safety;
