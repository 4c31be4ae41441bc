//! Argument checks shared by the blockwise operations on every device: block sizes, dtypes,
//! shapes and layouts, each error naming the offending value.

use candle_core::{bail, DType, Layout, Result, Tensor};

/// Block sizes the kernels support (elements per block).
pub const SUPPORTED_BLOCK_SIZES: [usize; 7] = [64, 128, 256, 512, 1024, 2048, 4096];

/// Validates the arguments of [`crate::dequantize_blockwise_into`].
pub(crate) fn check_dequantize_into(
    codes: &Tensor,
    absmax: &Tensor,
    block_size: usize,
    out: &Tensor,
) -> Result<()> {
    check_float_dtype("dequantize_blockwise_into: out", out.dtype())?;
    check_codes_and_absmax("dequantize_blockwise_into", codes, absmax, block_size)?;
    if out.elem_count() != codes.elem_count() {
        bail!(
            "dequantize_blockwise_into: out has shape {:?} ({} elements) but codes have shape {:?}",
            out.dims(),
            out.elem_count(),
            codes.dims()
        )
    }
    if !out.is_contiguous() {
        bail!(
            "dequantize_blockwise_into: out must be contiguous, got strides {:?}",
            out.stride()
        )
    }
    check_same_device("dequantize_blockwise_into", "out", out, "codes", codes)
}

/// Validates blockwise `codes` and `absmax` for dequantization.
pub(crate) fn check_codes_and_absmax(
    op: &str,
    codes: &Tensor,
    absmax: &Tensor,
    block_size: usize,
) -> Result<()> {
    check_block_size(block_size)?;
    if codes.dtype() != DType::U8 {
        bail!("{op}: codes must be U8, got {:?}", codes.dtype())
    }
    if absmax.dtype() != DType::F32 {
        bail!("{op}: absmax must be F32, got {:?}", absmax.dtype())
    }
    let n_blocks = codes.elem_count().div_ceil(block_size);
    if absmax.elem_count() != n_blocks || absmax.rank() > 1 {
        bail!(
            "{op}: absmax has shape {:?}, expected [{n_blocks}] for {} codes in blocks of {block_size}",
            absmax.dims(),
            codes.elem_count()
        )
    }
    check_same_device(op, "codes", codes, "absmax", absmax)
}

fn check_same_device(op: &str, a_name: &str, a: &Tensor, b_name: &str, b: &Tensor) -> Result<()> {
    if !a.device().same_device(b.device()) {
        bail!(
            "{op}: {a_name} is on {:?} but {b_name} is on {:?}",
            a.device().location(),
            b.device().location()
        )
    }
    Ok(())
}

pub(crate) fn check_block_size(block_size: usize) -> Result<()> {
    if !SUPPORTED_BLOCK_SIZES.contains(&block_size) {
        bail!("block size {block_size} is not supported; use one of {SUPPORTED_BLOCK_SIZES:?}")
    }
    Ok(())
}

pub(crate) fn check_float_dtype(what: &str, dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        bail!("{what} dtype must be F32, F16 or BF16, got {dtype:?}")
    }
    Ok(())
}

/// The contiguous elements a layout covers.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    let (start, end) = contiguous_range(layout, op)?;
    Ok(&data[start..end])
}

/// The storage range of a contiguous `layout` (CPU and CUDA storage alike).
pub(crate) fn contiguous_range(layout: &Layout, op: &str) -> Result<(usize, usize)> {
    match layout.contiguous_offsets() {
        Some(range) => Ok(range),
        None => bail!(
            "{op}: expected a contiguous input, got strides {:?}",
            layout.stride()
        ),
    }
}
