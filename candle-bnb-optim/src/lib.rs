//! 8-bit optimizers for Candle: optimizer state stored as blockwise-quantized 8-bit codes,
//! implementing `candle_nn::Optimizer`.
//!
//! The optimizers themselves are being built; this crate currently re-exports the quantization
//! layer they stand on.
#![deny(missing_docs)]

pub use candle_bnb_kernels as kernels;
