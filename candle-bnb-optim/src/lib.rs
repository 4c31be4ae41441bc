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
//! default). Each is one generic optimizer, [`Optim`], over its algorithm's config (e.g.
//! [`AdamWConfig`]: `AdamW` is `Optim<AdamWConfig>`, `AdamW8bit` is `Optim<AdamWConfig, 8>`).
//! Every config holds the shared [`Settings`]: state precision (`optim_bits`) and block size,
//! gradient clipping (`max_grad_norm`, `percentile_clipping`) and what a step does with NaN/inf
//! gradients ([`NonFinitePolicy`]). Every optimizer saves and loads its whole state
//! ([`checkpoint`]), on the CPU or on CUDA (the `cuda` feature).
//!
//! Per-parameter settings are a value, [`Overrides`]; embeddings built with [`nn::Embedding`] or
//! [`nn::StableEmbedding`] keep 32-bit state without one ([`keep_32bit_state`]).
#![deny(missing_docs)]

mod algorithms;
mod check;
pub mod checkpoint;
mod config;
#[cfg(any(feature = "cuda", feature = "emulator"))]
mod cuda;
mod engine;
mod field;
mod marks;
pub mod nn;
mod optimizer;
mod overrides;
pub mod plan;
mod settings;

pub use algorithms::adafactor::{Adafactor, Adafactor8bit, Adafactor8bitConfig, AdafactorConfig};
pub use algorithms::adagrad::{Adagrad, Adagrad8bit, Adagrad8bitConfig, AdagradConfig};
pub use algorithms::adam::{Adam, Adam8bit, Adam8bitConfig, AdamConfig};
pub use algorithms::adamw::{AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig};
pub use algorithms::ademamix::{AdEMAMix, AdEMAMix8bit, AdEMAMix8bitConfig, AdEMAMixConfig};
pub use algorithms::came::{CAME8bit, CAME8bitConfig, CAMEConfig, CAME};
pub use algorithms::lamb::{LAMB8bit, LAMB8bitConfig, LAMBConfig, LAMB};
pub use algorithms::lars::{LARS8bit, LARS8bitConfig, LARSConfig, LARS};
pub use algorithms::lion::{Lion, Lion8bit, Lion8bitConfig, LionConfig};
pub use algorithms::rmsprop::{RMSprop, RMSprop8bit, RMSprop8bitConfig, RMSpropConfig};
pub use algorithms::sgd::{SGD8bit, SGD8bitConfig, SGDConfig, SGD};
pub use candle_bnb_kernels as kernels;
pub use config::OptimizerConfig;
pub use marks::{keep_32bit_state, keeps_32bit_state};
pub use optimizer::Optim;
pub use overrides::{Overrides, Target, TargetSettings};
pub use settings::{NonFinitePolicy, Settings, GRAD_NORM_HISTORY};
