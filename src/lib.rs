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

/// The README's examples, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
