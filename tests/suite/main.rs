//! The integration tests of the library crates, as one test binary: one link and one copy of
//! each generic kernel the tests instantiate, instead of one per file (a cold
//! `cargo test --workspace` on 2 cores is mostly compile time). `tests/llama_lora.rs` (which sets
//! process environment variables) and `tests/cuda.rs` (packed alone for GPU hosts) stay separate.

#[path = "../common/mod.rs"]
mod common;

mod adam;
mod checkpoint;
mod embedding;
mod factored;
mod factored_reference;
mod family;
mod grad_handling;
mod hardening;
mod overrides;
mod plan;
mod quantize;
mod rules;
mod training;
