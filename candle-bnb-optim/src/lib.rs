//! 8-bit optimizers for Candle: optimizer state stored as blockwise-quantized 8-bit codes,
//! implementing `candle_nn::Optimizer`.
//!
//! ```
//! use candle_bnb_optim::{AdamW8bit, AdamW8bitConfig};
//! use candle_core::{Device, Tensor, Var};
//! use candle_nn::Optimizer;
//!
//! let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (128, 64), &Device::Cpu)?)?;
//! let mut opt = AdamW8bit::new(vec![w.clone()], AdamW8bitConfig::default())?;
//! let loss = w.as_tensor().sqr()?.mean_all()?;
//! opt.backward_step(&loss)?;
//! assert!(opt.state_bytes() < 8 * 128 * 64 / 3);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! Status: Adam, AdamW, Lion and SGD (8- and 32-bit, CPU) are here; the rest of the family,
//! clipping and checkpoints are being built.
#![deny(missing_docs)]

mod adam;
mod define;
mod engine;
mod lion;
mod sgd;

pub use adam::{
    Adam, Adam8bit, Adam8bitConfig, AdamConfig, AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig,
};
pub use candle_bnb_kernels as kernels;
pub use engine::NonFinitePolicy;
pub use lion::{Lion, Lion8bit, Lion8bitConfig, LionConfig};
pub use sgd::{SGD8bit, SGD8bitConfig, SGDConfig, SGD};
