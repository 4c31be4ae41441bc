//! Blockwise 8-bit quantization for [Candle](https://github.com/huggingface/candle) tensors, as
//! custom ops: the kernel layer of `candle-bnb`.
//!
//! A tensor is cut into blocks of `block_size` consecutive elements; each block keeps its absolute
//! maximum as an f32 scale and each element an 8-bit code, the index of the nearest value of a
//! 256-entry [`QuantMap`]. The dynamic maps equal bitsandbytes' bit for bit.
//!
//! ```
//! use candle_bnb_kernels::{quantize_blockwise, QuantMap};
//! use candle_core::{DType, Device, Tensor};
//!
//! let x = Tensor::randn(0f32, 1.0, (64, 1000), &Device::Cpu)?;
//! let q = quantize_blockwise(&x, &QuantMap::dynamic_signed(), 256)?;
//! let y = q.dequantize(DType::F32)?;
//! let err = (x - y)?.abs()?.mean_all()?.to_scalar::<f32>()?;
//! // bitsandbytes' bound. Over 3000 seeded draws of these 64k N(0, 1) values the mean |err| was
//! // 0.00852 with an sd of 5.6e-5 (largest 0.00872): 0.011 is 44 sd away, so this unseeded draw
//! // does not fail it in practice.
//! assert!(err < 0.011);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! On the CPU the kernels pick AVX-512 or AVX2 at run time when the processor has them (a portable
//! path otherwise; see [`Isa`]) and use rayon's thread pool.
#![deny(missing_docs)]

mod blockwise;
mod checks;
mod cpu;
/// The CUDA host side (the `cuda` feature; `emulator` for tests): the device interface and the
/// step launches that `candle-bnb-optim`'s device state drives. Not a public promise: hidden
/// from the docs.
#[cfg(any(feature = "cuda", feature = "emulator"))]
#[doc(hidden)]
pub mod cuda;
mod factored;
mod lookup;
mod midpoint;
mod qmap;
mod rules;
/// The byte layout of the CUDA step tables, for `candle-bnb-optim`'s device state. Not a public
/// promise: hidden from the docs.
#[doc(hidden)]
pub mod slot_table;
mod sum_squares;
mod update;

pub use blockwise::{
    dequantize_blockwise, dequantize_blockwise_into, quantize_blockwise, Quantized,
};
pub use checks::SUPPORTED_BLOCK_SIZES;
pub use cpu::{Isa, CPU_ISA_ENV};

/// The emulated CUDA device (the `emulator` feature): the CUDA kernels compiled for the CPU and
/// run with the GPU's execution model, behind the same host code as on a GPU. For tests; not a
/// public promise.
#[cfg(feature = "emulator")]
#[doc(hidden)]
pub mod emulator {
    pub use crate::cuda::backend::{Element, KernelArg};
    pub use crate::cuda::emulator::{
        emulator_stats, DeviceOp, EmuBuffer, Emulator, EmulatorStats, MAX_EMULATED_GRID,
    };
    pub use crate::cuda::quantize::emulated::{
        dequantize_blockwise, dequantize_blockwise_into, quantize_blockwise,
    };
}
pub use factored::{check_factored_update, factored_update, FactoredState, Factoring, Momentum};
pub use qmap::{QuantMap, QUANT_MAP_LEN};
pub use rules::{
    AdEMAMixRule, AdafactorRule, AdafactorStepSize, AdagradRule, AdamRule, CameRule, CudaRule,
    FactoredCudaRule, FactoredRule, LambRule, LarsRule, LionRule, RmspropRule, ScaledGrad,
    SecondMomentStep, SgdRule, UpdateRule, MAX_STATES,
};
pub use sum_squares::sum_squares;
pub use update::{check_fused_update, fused_update, BlockwiseState, ParamState};
