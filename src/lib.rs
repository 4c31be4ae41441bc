//! `candle-bnb`: bitsandbytes-style 8-bit optimizers and blockwise quantization for Candle.
//!
//! This crate re-exports the workspace's two libraries:
//! - [`kernels`] (`candle-bnb-kernels`): quantization maps and blockwise quantization ops;
//! - [`optim`] (`candle-bnb-optim`): the optimizers;
//!
//! and with the `hub` feature (on by default) `hub`: model files from the Hugging Face hub.
#![deny(missing_docs)]

#[cfg(feature = "hub")]
pub mod hub;

pub use candle_bnb_kernels as kernels;
pub use candle_bnb_optim as optim;

pub use candle_bnb_kernels::{dequantize_blockwise, quantize_blockwise, QuantMap, Quantized};

/// Every optimizer by the name the command-line tool (`candle-bnb plan --optimizer`) and the LoRA
/// example (`--optimizer`) take: each algorithm of the family with 8-bit (`...8bit`) and 32-bit
/// (`...32`) state (`adafactor` and `came` are the 32-bit forms of the factored optimizers, as
/// their papers name them), and `candle-adamw` for `candle_nn::AdamW`.
pub const OPTIMIZER_NAMES: [&str; 23] = [
    "adamw8bit",
    "adamw32",
    "adam8bit",
    "adam32",
    "lion8bit",
    "lion32",
    "sgd8bit",
    "sgd32",
    "rmsprop8bit",
    "rmsprop32",
    "adagrad8bit",
    "adagrad32",
    "lamb8bit",
    "lamb32",
    "lars8bit",
    "lars32",
    "ademamix8bit",
    "ademamix32",
    "adafactor8bit",
    "adafactor",
    "came8bit",
    "came",
    "candle-adamw",
];

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
