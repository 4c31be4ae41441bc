//! Blockwise quantization of Candle tensors: public functions over private custom ops.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Storage,
    Tensor,
};

use crate::checks::{
    check_block_size, check_codes_and_absmax, check_dequantize_into, check_float_dtype, contiguous,
};
use crate::cpu::{self, Element, Isa};
use crate::QuantMap;

/// A tensor quantized blockwise to 8-bit codes.
///
/// The flattened (row-major) tensor is cut into blocks of `block_size` consecutive elements, the
/// last one possibly partial. Each block stores its `absmax` (max `|x|`, f32) and each element the
/// code of the map value nearest to `x / absmax`, so `x ≈ map[code] * absmax`.
#[derive(Clone, Debug)]
pub struct Quantized {
    /// `U8` codes, with the shape of the quantized tensor.
    pub codes: Tensor,
    /// `F32` per-block scales, shape `[n_blocks]` with `n_blocks = ceil(elem_count / block_size)`.
    pub absmax: Tensor,
    /// Elements per block; one of [`SUPPORTED_BLOCK_SIZES`](crate::SUPPORTED_BLOCK_SIZES).
    pub block_size: usize,
    /// The map the codes index.
    pub map: QuantMap,
}

impl Quantized {
    /// Number of blocks, `ceil(codes.elem_count() / block_size)`.
    pub fn n_blocks(&self) -> usize {
        self.codes.elem_count().div_ceil(self.block_size)
    }

    /// Bytes held by the codes and the absmax scales (the map is shared and not counted).
    pub fn storage_bytes(&self) -> usize {
        self.codes.elem_count() * self.codes.dtype().size_in_bytes()
            + self.absmax.elem_count() * self.absmax.dtype().size_in_bytes()
    }

    /// Reconstructs the tensor: `map[code] * absmax[block]` in f32, rounded to `dtype`.
    ///
    /// # Errors
    /// See [`dequantize_blockwise`].
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        dequantize_blockwise(&self.codes, &self.absmax, &self.map, self.block_size, dtype)
    }

    /// Like [`Quantized::dequantize`], but writes into `out`, a contiguous `F32`, `F16` or `BF16`
    /// tensor with as many elements as `codes` (any shape), allocated beforehand.
    ///
    /// # Errors
    /// See [`dequantize_blockwise_into`].
    pub fn dequantize_into(&self, out: &Tensor) -> Result<()> {
        dequantize_blockwise_into(&self.codes, &self.absmax, &self.map, self.block_size, out)
    }
}

/// Quantizes `x` blockwise with `map` (see [`Quantized`] for the format).
///
/// `x` may be `F32`, `F16` or `BF16`, of any shape and layout (a non-contiguous `x` is made
/// contiguous first), and empty (zero blocks). The code of each element is the index of the map
/// value nearest to `x / absmax` computed in f32, ties to the even index; an all-zero block has
/// `absmax = 0` and the code of `0.0`, so it dequantizes to exact zeros.
///
/// # Errors
/// An integer `x`, a `block_size` not in [`SUPPORTED_BLOCK_SIZES`](crate::SUPPORTED_BLOCK_SIZES), or a non-finite element of
/// `x` (the message names its flat index). Nothing is allocated or returned on error.
pub fn quantize_blockwise(x: &Tensor, map: &QuantMap, block_size: usize) -> Result<Quantized> {
    check_block_size(block_size)?;
    check_float_dtype("quantize_blockwise: input", x.dtype())?;
    let x = x.contiguous()?;
    let op = QuantizeBlockwise {
        map,
        block_size,
        absmax: RefCell::new(None),
    };
    let codes = x.apply_op1_no_bwd(&op)?;
    let Some(absmax) = op.absmax.into_inner() else {
        bail!("quantize_blockwise: the kernel produced no absmax")
    };
    let absmax = Tensor::from_storage(
        absmax,
        codes.elem_count().div_ceil(block_size),
        BackpropOp::none(),
        false,
    );
    Ok(Quantized {
        codes,
        absmax,
        block_size,
        map: map.clone(),
    })
}

/// Dequantizes blockwise `codes` with per-block `absmax` and `map` into a tensor of `dtype`
/// (`F32`, `F16` or `BF16`) with the shape of `codes`: `map[code] * absmax[block]` in f32, then
/// rounded to nearest-even in `dtype`.
///
/// # Errors
/// `codes` not `U8`, `absmax` not `F32` or not of length `ceil(codes.elem_count() / block_size)`,
/// a non-finite `absmax` entry, `codes` and `absmax` on different devices, an unsupported
/// `block_size` or `dtype`.
pub fn dequantize_blockwise(
    codes: &Tensor,
    absmax: &Tensor,
    map: &QuantMap,
    block_size: usize,
    dtype: DType,
) -> Result<Tensor> {
    check_float_dtype("dequantize_blockwise: output", dtype)?;
    check_codes_and_absmax("dequantize_blockwise", codes, absmax, block_size)?;
    let absmax = absmax.flatten_all()?.contiguous()?;
    codes.contiguous()?.apply_op2_no_bwd(
        &absmax,
        &DequantizeBlockwise {
            map,
            block_size,
            dtype,
        },
    )
}

/// Dequantizes like [`dequantize_blockwise`], writing into `out` instead of a new tensor: `out`
/// must be a contiguous `F32`, `F16` or `BF16` tensor with as many elements as `codes` (its shape
/// is kept). This avoids allocating (and page-faulting) a fresh output on every call.
///
/// # Errors
/// Those of [`dequantize_blockwise`], plus an `out` that is not contiguous, has another element
/// count, or lives on another device. `out` is untouched on error.
pub fn dequantize_blockwise_into(
    codes: &Tensor,
    absmax: &Tensor,
    map: &QuantMap,
    block_size: usize,
    out: &Tensor,
) -> Result<()> {
    check_dequantize_into(codes, absmax, block_size, out)?;
    if out.elem_count() == 0 {
        // Candle refuses in-place writes to shapes such as `[5, 0]` (repeated zero strides).
        return Ok(());
    }
    let absmax = absmax.flatten_all()?.contiguous()?;
    out.inplace_op3(
        &codes.contiguous()?,
        &absmax,
        &DequantizeBlockwise {
            map,
            block_size,
            dtype: out.dtype(),
        },
    )
}

/// Quantizes one contiguous tensor; codes are the op's output, the absmax scales a side output
/// (Candle custom ops return a single tensor).
struct QuantizeBlockwise<'a> {
    map: &'a QuantMap,
    block_size: usize,
    absmax: RefCell<Option<Storage>>,
}

impl QuantizeBlockwise<'_> {
    fn run<T: Element>(&self, data: &[T], layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(data, layout, self.name())?;
        let (codes, absmax) = cpu::quantize(Isa::selected(), x, self.map, self.block_size)?;
        *self.absmax.borrow_mut() = Some(Storage::Cpu(CpuStorage::F32(absmax)));
        Ok((CpuStorage::U8(codes), layout.shape().clone()))
    }
}

impl CustomOp1 for QuantizeBlockwise<'_> {
    fn name(&self) -> &'static str {
        "quantize-blockwise"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match storage {
            CpuStorage::F32(data) => self.run(data, layout),
            CpuStorage::F16(data) => self.run(data, layout),
            CpuStorage::BF16(data) => self.run(data, layout),
            other => bail!(
                "{}: unsupported input dtype {:?}",
                self.name(),
                other.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (codes, absmax) =
            crate::cuda::quantize::storage::quantize(storage, layout, self.map, self.block_size)?;
        *self.absmax.borrow_mut() = Some(Storage::Cuda(absmax));
        Ok((codes, layout.shape().clone()))
    }
}

/// Dequantizes contiguous `codes` with contiguous `absmax`: into a fresh tensor of `dtype` as a
/// custom op, or into an existing contiguous tensor as an in-place op.
struct DequantizeBlockwise<'a> {
    map: &'a QuantMap,
    block_size: usize,
    dtype: DType,
}

impl DequantizeBlockwise<'_> {
    /// The validated contiguous inputs.
    fn inputs<'s>(
        &self,
        codes: &'s CpuStorage,
        codes_layout: &Layout,
        absmax: &'s CpuStorage,
        absmax_layout: &Layout,
    ) -> Result<(&'s [u8], &'s [f32])> {
        let (CpuStorage::U8(codes), CpuStorage::F32(absmax)) = (codes, absmax) else {
            bail!(
                "{}: expected U8 codes and F32 absmax, got {:?} and {:?}",
                CustomOp2::name(self),
                codes.dtype(),
                absmax.dtype()
            )
        };
        let codes = contiguous(codes, codes_layout, CustomOp2::name(self))?;
        let absmax = contiguous(absmax, absmax_layout, CustomOp2::name(self))?;
        if let Some((i, a)) = absmax.iter().enumerate().find(|(_, a)| !a.is_finite()) {
            bail!(
                "{}: absmax of block {i} is not finite: {a}",
                CustomOp2::name(self)
            )
        }
        Ok((codes, absmax))
    }

    fn run<T: Element>(&self, codes: &[u8], absmax: &[f32], out: &mut [T]) {
        cpu::dequantize(codes, absmax, self.map, self.block_size, out)
    }

    fn alloc<T: Element>(&self, codes: &[u8], absmax: &[f32]) -> Vec<T> {
        let mut out = vec![T::ZERO; codes.len()];
        self.run(codes, absmax, &mut out);
        out
    }
}

impl CustomOp2 for DequantizeBlockwise<'_> {
    fn name(&self) -> &'static str {
        "dequantize-blockwise"
    }

    fn cpu_fwd(
        &self,
        codes: &CpuStorage,
        codes_layout: &Layout,
        absmax: &CpuStorage,
        absmax_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (codes, absmax) = self.inputs(codes, codes_layout, absmax, absmax_layout)?;
        let out = match self.dtype {
            DType::F32 => CpuStorage::F32(self.alloc(codes, absmax)),
            DType::F16 => CpuStorage::F16(self.alloc(codes, absmax)),
            DType::BF16 => CpuStorage::BF16(self.alloc(codes, absmax)),
            other => bail!(
                "{}: unsupported output dtype {other:?}",
                CustomOp2::name(self)
            ),
        };
        Ok((out, codes_layout.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        codes: &candle_core::CudaStorage,
        codes_layout: &Layout,
        absmax: &candle_core::CudaStorage,
        absmax_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = crate::cuda::quantize::storage::dequantize(
            codes,
            codes_layout,
            absmax,
            absmax_layout,
            self.map,
            self.block_size,
            self.dtype,
        )?;
        Ok((out, codes_layout.shape().clone()))
    }
}

impl InplaceOp3 for DequantizeBlockwise<'_> {
    fn name(&self) -> &'static str {
        "dequantize-blockwise-into"
    }

    fn cpu_fwd(
        &self,
        out: &mut CpuStorage,
        out_layout: &Layout,
        codes: &CpuStorage,
        codes_layout: &Layout,
        absmax: &CpuStorage,
        absmax_layout: &Layout,
    ) -> Result<()> {
        let (codes, absmax) = self.inputs(codes, codes_layout, absmax, absmax_layout)?;
        let Some((start, end)) = out_layout.contiguous_offsets() else {
            bail!("{}: out must be contiguous", InplaceOp3::name(self))
        };
        match out {
            CpuStorage::F32(o) => self.run(codes, absmax, &mut o[start..end]),
            CpuStorage::F16(o) => self.run(codes, absmax, &mut o[start..end]),
            CpuStorage::BF16(o) => self.run(codes, absmax, &mut o[start..end]),
            other => bail!(
                "{}: unsupported output dtype {:?}",
                InplaceOp3::name(self),
                other.dtype()
            ),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        out: &mut candle_core::CudaStorage,
        out_layout: &Layout,
        codes: &candle_core::CudaStorage,
        codes_layout: &Layout,
        absmax: &candle_core::CudaStorage,
        absmax_layout: &Layout,
    ) -> Result<()> {
        crate::cuda::quantize::storage::dequantize_into(
            codes,
            codes_layout,
            absmax,
            absmax_layout,
            self.map,
            self.block_size,
            out,
            out_layout,
        )
    }
}
