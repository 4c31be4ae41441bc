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
//! The family: [`Adam`], [`AdamW`], [`SGD`], [`Lion`], [`RMSprop`], [`Adagrad`], [`LAMB`],
//! [`LARS`], [`AdEMAMix`] (32-bit state by default) and their `...8bit` forms (8-bit state by
//! default); every config has `optim_bits` to choose. Each optimizer clips gradients
//! (`max_grad_norm`, `percentile_clipping`), skips steps with NaN/inf gradients (or errors, see
//! [`NonFinitePolicy`]), and saves and loads its whole state ([`checkpoint`]). CPU for now.
//!
//! Per-parameter settings are a value, [`Overrides`]; embeddings built with [`nn::Embedding`] or
//! [`nn::StableEmbedding`] keep 32-bit state without one ([`keep_32bit_state`]).
#![deny(missing_docs)]

mod adam;
mod ademamix;
pub mod checkpoint;
mod define;
mod engine;
mod lamb;
mod lion;
mod marks;
pub mod nn;
mod optimizer;
mod overrides;
mod rmsprop;
mod sgd;

pub use adam::{
    Adam, Adam8bit, Adam8bitConfig, AdamConfig, AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig,
};
pub use ademamix::{AdEMAMix, AdEMAMix8bit, AdEMAMix8bitConfig, AdEMAMixConfig};
pub use candle_bnb_kernels as kernels;
pub use engine::{NonFinitePolicy, GRAD_NORM_HISTORY};
pub use lamb::{
    LAMB8bit, LAMB8bitConfig, LAMBConfig, LARS8bit, LARS8bitConfig, LARSConfig, LAMB, LARS,
};
pub use lion::{Lion, Lion8bit, Lion8bitConfig, LionConfig};
pub use marks::{keep_32bit_state, keeps_32bit_state};
pub use optimizer::{Optim, OptimizerConfig};
pub use overrides::{Overrides, Target, TargetSettings};
pub use rmsprop::{
    Adagrad, Adagrad8bit, Adagrad8bitConfig, AdagradConfig, RMSprop, RMSprop8bit,
    RMSprop8bitConfig, RMSpropConfig,
};
pub use sgd::{SGD8bit, SGD8bitConfig, SGDConfig, SGD};
