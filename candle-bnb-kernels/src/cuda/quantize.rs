//! Host side of `kernels/quantize.cu` (which mirrors `cpu/mod.rs`): blockwise quantize and
//! dequantize on CUDA storage.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result};
use half::{bf16, f16};
use std::sync::Arc;

use super::{grid, upload_table, QUANTIZE_MODULE, QUANTIZE_PTX, THREADS};
use crate::blockwise::contiguous_range;
use crate::QuantMap;

fn config(grid_dim: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid_dim, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The name suffix of a kernel for element type `dtype`.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("CUDA blockwise kernels take F32, F16 or BF16, got {other:?}"),
    })
}

/// Quantizes the contiguous elements of `x` blockwise; returns `(codes U8, absmax F32)`
/// storages. A NaN or infinite element is an error naming the first one's flat index (this
/// reads one value back, so the call waits for the kernel).
pub(crate) fn quantize(
    x: &CudaStorage,
    layout: &Layout,
    map: &QuantMap,
    block_size: usize,
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = &x.device;
    let (start, end) = contiguous_range(layout, "quantize_blockwise")?;
    let n = end - start;
    let n_blocks = n.div_ceil(block_size);
    // cuMemAlloc refuses 0 bytes: empty tensors get a one-element buffer they never read.
    // SAFETY: the kernel writes every code and absmax of the n elements before any read.
    let mut codes = unsafe { dev.alloc::<u8>(n.max(1))? };
    let mut absmax = unsafe { dev.alloc::<f32>(n_blocks.max(1))? };
    if n > 0 {
        let table = upload_table(dev, map)?;
        let mut first_bad = dev.clone_htod(&[u64::MAX])?;
        let name = format!("bnb_quantize_blockwise_{}", suffix(x.dtype())?);
        let func = dev.get_or_load_custom_func(&name, QUANTIZE_MODULE, QUANTIZE_PTX)?;
        let (n64, bs) = (n as u64, block_size as i32);
        let blocks_per_tile = (THREADS as usize / block_size.min(THREADS as usize)).max(1);
        let cfg = config(grid(n_blocks as u64, blocks_per_tile as u64));
        let x_view = view(&x.slice, start, end)?;
        {
            let mut builder = func.builder();
            x_view.push(&mut builder);
            builder
                .arg(&n64)
                .arg(&bs)
                .arg(&table)
                .arg(&mut codes)
                .arg(&mut absmax)
                .arg(&mut first_bad);
            // SAFETY: the arguments match `bnb_quantize_blockwise_*` in kernels/quantize.cu;
            // every pointer covers the n elements (or n_blocks scales) the kernel touches.
            unsafe { builder.launch(cfg) }.w()?;
        }
        let bad = dev.clone_dtoh(&first_bad)?[0];
        if bad != u64::MAX {
            let value = x_view.read_f32(dev, bad as usize)?;
            bail!("quantize_blockwise: input is not finite at flat index {bad}: {value}")
        }
    }
    Ok((
        CudaStorage::wrap_cuda_slice(codes, dev.clone()),
        CudaStorage::wrap_cuda_slice(absmax, dev.clone()),
    ))
}

/// Dequantizes `codes` (one block of `block_size` per `absmax` entry) into the contiguous
/// elements of `out`, whose dtype picks the kernel. A non-finite scale is an error naming its
/// block (checked on the host, so the call waits for the scales).
#[allow(clippy::too_many_arguments)]
pub(crate) fn dequantize_into(
    codes: &CudaStorage,
    codes_layout: &Layout,
    absmax: &CudaStorage,
    absmax_layout: &Layout,
    map: &QuantMap,
    block_size: usize,
    out: &mut CudaStorage,
    out_layout: &Layout,
) -> Result<()> {
    let (cs, ce) = contiguous_range(codes_layout, "dequantize_blockwise: codes")?;
    let (as_, ae) = contiguous_range(absmax_layout, "dequantize_blockwise: absmax")?;
    let (os, oe) = contiguous_range(out_layout, "dequantize_blockwise: out")?;
    let n = ce - cs;
    if oe - os != n || ae - as_ != n.div_ceil(block_size) {
        bail!(
            "dequantize_blockwise: {n} codes, {} absmax values and {} outputs do not match blocks of {block_size}",
            ae - as_,
            oe - os
        )
    }
    if n == 0 {
        return Ok(());
    }
    let dev = codes.device.clone();
    let (CudaStorageSlice::U8(c), CudaStorageSlice::F32(a)) = (&codes.slice, &absmax.slice) else {
        bail!(
            "dequantize_blockwise: expected U8 codes and F32 absmax, got {:?} and {:?}",
            codes.dtype(),
            absmax.dtype()
        )
    };
    let values = dev.clone_htod(&map.values()[..])?;
    let out_dtype = out.dtype();
    let name = format!("bnb_dequantize_blockwise_{}", suffix(out_dtype)?);
    let func = dev
        .get_or_load_custom_func(&name, QUANTIZE_MODULE, QUANTIZE_PTX)?
        .into_cuda_function();
    let stream = dev.cuda_stream();
    let (c, a) = (c.slice(cs..ce), a.slice(as_..ae));
    // The CPU path refuses non-finite scales; so does this one, at the cost of copying the
    // scales (1/64 of the codes' bytes at block 256) back to the host.
    if let Some((i, v)) = dev
        .clone_dtoh(&a)?
        .into_iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
    {
        bail!("dequantize-blockwise: absmax of block {i} is not finite: {v}")
    }
    let args = DequantizeArgs {
        codes: &c,
        absmax: &a,
        n: n as u64,
        block_size: block_size as i32,
        values: &values,
        cfg: config(grid(n as u64, THREADS as u64)),
    };
    match &mut out.slice {
        CudaStorageSlice::F32(o) => args.launch(&stream, &func, &mut o.slice_mut(os..oe)),
        CudaStorageSlice::F16(o) => args.launch(&stream, &func, &mut o.slice_mut(os..oe)),
        CudaStorageSlice::BF16(o) => args.launch(&stream, &func, &mut o.slice_mut(os..oe)),
        _ => bail!("dequantize_blockwise: unsupported output dtype {out_dtype:?}"),
    }
}

/// The arguments of `bnb_dequantize_blockwise_*` but the output.
struct DequantizeArgs<'a> {
    codes: &'a CudaView<'a, u8>,
    absmax: &'a CudaView<'a, f32>,
    n: u64,
    block_size: i32,
    values: &'a CudaSlice<f32>,
    cfg: LaunchConfig,
}

impl DequantizeArgs<'_> {
    fn launch<T: DeviceRepr>(
        &self,
        stream: &Arc<CudaStream>,
        func: &CudaFunction,
        out: &mut CudaViewMut<'_, T>,
    ) -> Result<()> {
        let mut builder = stream.launch_builder(func);
        builder
            .arg(self.codes)
            .arg(self.absmax)
            .arg(&self.n)
            .arg(&self.block_size)
            .arg(self.values)
            .arg(out);
        // SAFETY: the arguments match `bnb_dequantize_blockwise_*` in kernels/quantize.cu;
        // codes, absmax and out cover the n elements (and their blocks) the kernel touches.
        unsafe { builder.launch(self.cfg) }.w()?;
        Ok(())
    }
}

/// Dequantizes into a fresh storage of `dtype` with `codes`' element count.
pub(crate) fn dequantize(
    codes: &CudaStorage,
    codes_layout: &Layout,
    absmax: &CudaStorage,
    absmax_layout: &Layout,
    map: &QuantMap,
    block_size: usize,
    dtype: DType,
) -> Result<CudaStorage> {
    let dev = &codes.device;
    let n = codes_layout.shape().elem_count();
    // SAFETY: every element is written by the kernel below before it can be read.
    let mut out = match dtype {
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n.max(1))? }, dev.clone())
        }
        DType::F16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f16>(n.max(1))? }, dev.clone())
        }
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n.max(1))? }, dev.clone())
        }
        other => {
            bail!("dequantize_blockwise: output dtype must be F32, F16 or BF16, got {other:?}")
        }
    };
    let out_layout = Layout::contiguous(n);
    dequantize_into(
        codes,
        codes_layout,
        absmax,
        absmax_layout,
        map,
        block_size,
        &mut out,
        &out_layout,
    )?;
    Ok(out)
}

/// A contiguous view of a float storage, whatever its element type.
enum CudaViewAny<'a> {
    F32(CudaView<'a, f32>),
    F16(CudaView<'a, f16>),
    BF16(CudaView<'a, bf16>),
}

fn view(slice: &CudaStorageSlice, start: usize, end: usize) -> Result<CudaViewAny<'_>> {
    Ok(match slice {
        CudaStorageSlice::F32(s) => CudaViewAny::F32(s.slice(start..end)),
        CudaStorageSlice::F16(s) => CudaViewAny::F16(s.slice(start..end)),
        CudaStorageSlice::BF16(s) => CudaViewAny::BF16(s.slice(start..end)),
        _ => bail!("quantize_blockwise: input dtype must be F32, F16 or BF16"),
    })
}

impl<'a> CudaViewAny<'a> {
    fn push<'b>(&'b self, builder: &mut LaunchArgs<'b>)
    where
        'a: 'b,
    {
        match self {
            Self::F32(v) => builder.arg(v),
            Self::F16(v) => builder.arg(v),
            Self::BF16(v) => builder.arg(v),
        };
    }

    /// Element `i` as f32 (a device-to-host copy of one value).
    fn read_f32(&self, dev: &CudaDevice, i: usize) -> Result<f32> {
        Ok(match self {
            Self::F32(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0],
            Self::F16(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0].to_f32(),
            Self::BF16(v) => dev.clone_dtoh(&v.slice(i..i + 1))?[0].to_f32(),
        })
    }
}
