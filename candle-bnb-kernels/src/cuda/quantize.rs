//! Host side of `kernels/quantize.cu` (which mirrors `cpu/mod.rs`): blockwise quantize and
//! dequantize on a device, written once over [`Backend`]; then the entry points for CUDA
//! storage (the custom ops' `cuda_fwd`) and for the emulated device (tests).

use candle_core::{bail, DType, Result};

use super::backend::{Backend, KernelArg, Module};
use super::{grid, quant_table_bytes, THREADS};
use crate::QuantMap;

/// The name suffix of a kernel for element type `dtype`.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("CUDA blockwise kernels take F32, F16 or BF16, got {other:?}"),
    })
}

/// Quantizes the `n` contiguous elements of `dtype` at device address `x` blockwise into fresh
/// `(codes, absmax)` buffers (of at least one element: CUDA refuses empty allocations). A NaN or
/// infinite element is an error naming the first one's flat index and its value, read by
/// `value_at` (this reads one value back, so the call waits for the kernel).
pub(crate) fn quantize_on<B: Backend>(
    dev: &B,
    x: u64,
    n: usize,
    dtype: DType,
    map: &QuantMap,
    block_size: usize,
    value_at: impl FnOnce(usize) -> Result<f32>,
) -> Result<(B::Buffer<u8>, B::Buffer<f32>)> {
    let n_blocks = n.div_ceil(block_size);
    let codes = dev.alloc_uninit::<u8>(n.max(1))?;
    let absmax = dev.alloc_uninit::<f32>(n_blocks.max(1))?;
    if n == 0 {
        return Ok((codes, absmax));
    }
    let name = format!("bnb_quantize_blockwise_{}", suffix(dtype)?);
    let table = dev.upload(&quant_table_bytes(map))?;
    let first_bad = dev.upload(&[u64::MAX])?;
    let blocks_per_tile = (THREADS as usize / block_size.min(THREADS as usize)).max(1);
    let args = [
        KernelArg::U64(x),
        KernelArg::U64(n as u64),
        KernelArg::I32(block_size as i32),
        KernelArg::U64(dev.address(&table)),
        KernelArg::U64(dev.address(&codes)),
        KernelArg::U64(dev.address(&absmax)),
        KernelArg::U64(dev.address(&first_bad)),
    ];
    let cfg = grid(n_blocks as u64, blocks_per_tile as u64);
    // SAFETY: the arguments match `bnb_quantize_blockwise_*` in kernels/quantize.cu; x covers
    // the caller's n elements, codes and absmax were allocated for n elements and their blocks.
    unsafe { dev.launch(Module::Quantize, &name, cfg, &args) }?;
    let bad = dev.download(&first_bad)?[0];
    if bad != u64::MAX {
        let value = value_at(bad as usize)?;
        bail!("quantize_blockwise: input is not finite at flat index {bad}: {value}")
    }
    Ok((codes, absmax))
}

/// Dequantizes `n` codes at device address `codes` with their per-block scales at `absmax`
/// (finite: the callers check) into the `n` contiguous elements of `out_dtype` at `out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dequantize_on<B: Backend>(
    dev: &B,
    codes: u64,
    absmax: u64,
    n: usize,
    map: &QuantMap,
    block_size: usize,
    out: u64,
    out_dtype: DType,
) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let name = format!("bnb_dequantize_blockwise_{}", suffix(out_dtype)?);
    let values = dev.upload(&map.values()[..])?;
    let args = [
        KernelArg::U64(codes),
        KernelArg::U64(absmax),
        KernelArg::U64(n as u64),
        KernelArg::I32(block_size as i32),
        KernelArg::U64(dev.address(&values)),
        KernelArg::U64(out),
    ];
    // SAFETY: the arguments match `bnb_dequantize_blockwise_*` in kernels/quantize.cu; codes,
    // absmax and out cover the n elements (and their blocks) the kernel touches.
    unsafe {
        dev.launch(
            Module::Quantize,
            &name,
            grid(n as u64, THREADS as u64),
            &args,
        )
    }
}

/// The entry points for Candle's CUDA storage.
#[cfg(feature = "cuda")]
pub(crate) mod storage {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::CudaStorageSlice;
    use candle_core::{bail, CudaStorage, DType, Layout, Result};
    use half::{bf16, f16};

    use super::super::backend::Backend;
    use super::super::driver::CudaDriver;
    use super::{dequantize_on, quantize_on};
    use crate::checks::contiguous_range;
    use crate::QuantMap;

    /// The device address of element `start` of a float storage.
    fn float_address(dev: &CudaDriver, slice: &CudaStorageSlice, start: usize) -> Result<u64> {
        Ok(match slice {
            CudaStorageSlice::F32(s) => dev.address(s) + 4 * start as u64,
            CudaStorageSlice::F16(s) => dev.address(s) + 2 * start as u64,
            CudaStorageSlice::BF16(s) => dev.address(s) + 2 * start as u64,
            _ => bail!("CUDA blockwise kernels take F32, F16 or BF16 tensors"),
        })
    }

    /// Element `i` of a float storage as f32 (a device-to-host copy of one value).
    fn read_f32(dev: &CudaDriver, slice: &CudaStorageSlice, i: usize) -> Result<f32> {
        Ok(match slice {
            CudaStorageSlice::F32(s) => dev.download_range(s, i, 1)?[0],
            CudaStorageSlice::F16(s) => dev.download_range(s, i, 1)?[0].to_f32(),
            CudaStorageSlice::BF16(s) => dev.download_range(s, i, 1)?[0].to_f32(),
            _ => bail!("CUDA blockwise kernels take F32, F16 or BF16 tensors"),
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
        let dev = CudaDriver::new(&x.device);
        let (start, end) = contiguous_range(layout, "quantize_blockwise")?;
        let address = float_address(&dev, &x.slice, start)?;
        let (codes, absmax) = quantize_on(
            &dev,
            address,
            end - start,
            x.dtype(),
            map,
            block_size,
            |i| read_f32(&dev, &x.slice, start + i),
        )?;
        Ok((
            CudaStorage::wrap_cuda_slice(codes, x.device.clone()),
            CudaStorage::wrap_cuda_slice(absmax, x.device.clone()),
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
        let dev = CudaDriver::new(&codes.device);
        let (CudaStorageSlice::U8(c), CudaStorageSlice::F32(a)) = (&codes.slice, &absmax.slice)
        else {
            bail!(
                "dequantize_blockwise: expected U8 codes and F32 absmax, got {:?} and {:?}",
                codes.dtype(),
                absmax.dtype()
            )
        };
        // The CPU path refuses non-finite scales; so does this one, at the cost of copying the
        // scales (1/64 of the codes' bytes at block 256) back to the host.
        if let Some((i, v)) = dev
            .download_range(a, as_, ae - as_)?
            .into_iter()
            .enumerate()
            .find(|(_, v)| !v.is_finite())
        {
            bail!("dequantize-blockwise: absmax of block {i} is not finite: {v}")
        }
        let out_dtype = out.dtype();
        let out_address = float_address(&dev, &out.slice, os)?;
        dequantize_on(
            &dev,
            dev.address(c) + cs as u64,
            dev.address(a) + 4 * as_ as u64,
            n,
            map,
            block_size,
            out_address,
            out_dtype,
        )
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
        let dev = CudaDriver::new(&codes.device);
        let n = codes_layout.shape().elem_count();
        let cuda = codes.device.clone();
        let mut out = match dtype {
            DType::F32 => CudaStorage::wrap_cuda_slice(dev.alloc_uninit::<f32>(n.max(1))?, cuda),
            DType::F16 => CudaStorage::wrap_cuda_slice(dev.alloc_uninit::<f16>(n.max(1))?, cuda),
            DType::BF16 => CudaStorage::wrap_cuda_slice(dev.alloc_uninit::<bf16>(n.max(1))?, cuda),
            other => {
                bail!("dequantize_blockwise: output dtype must be F32, F16 or BF16, got {other:?}")
            }
        };
        dequantize_into(
            codes,
            codes_layout,
            absmax,
            absmax_layout,
            map,
            block_size,
            &mut out,
            &Layout::contiguous(n),
        )?;
        Ok(out)
    }
}

/// The entry points on the emulated device, for tests: CPU tensors in and out, the inputs
/// uploaded to device buffers, the kernels run by the emulator.
#[cfg(feature = "emulator")]
pub mod emulated {
    use candle_core::{bail, DType, Device, Result, Tensor};
    use half::{bf16, f16};

    use super::super::backend::{Backend, Element};
    use super::super::emulator::Emulator;
    use super::{dequantize_on, quantize_on};
    use crate::checks::{check_block_size, check_dequantize_into, check_float_dtype};
    use crate::QuantMap;

    /// [`crate::quantize_blockwise`] on the emulated device: `x` (a CPU tensor) is copied to
    /// the device, quantized by `kernels/quantize.cu`, and the codes and scales are copied back:
    /// `(codes, absmax)` as CPU tensors, `U8` codes with `x`'s shape and `F32` scales of shape
    /// `[ceil(n / block_size)]`.
    ///
    /// # Errors
    /// As [`crate::quantize_blockwise`]; a launch the emulator refuses.
    pub fn quantize_blockwise(
        emu: &Emulator,
        x: &Tensor,
        map: &QuantMap,
        block_size: usize,
    ) -> Result<(Tensor, Tensor)> {
        check_block_size(block_size)?;
        check_float_dtype("quantize_blockwise: input", x.dtype())?;
        let flat = x.flatten_all()?;
        let as_f32: Vec<f32> = flat.to_dtype(DType::F32)?.to_vec1()?;
        let (codes, absmax) = match x.dtype() {
            DType::F16 => {
                let values = flat.to_vec1::<f16>()?;
                quantize_values(emu, &values, &as_f32, DType::F16, map, block_size)?
            }
            DType::BF16 => {
                let values = flat.to_vec1::<bf16>()?;
                quantize_values(emu, &values, &as_f32, DType::BF16, map, block_size)?
            }
            _ => quantize_values(emu, &as_f32, &as_f32, DType::F32, map, block_size)?,
        };
        let n_blocks = absmax.len();
        Ok((
            Tensor::from_vec(codes, x.shape(), &Device::Cpu)?,
            Tensor::from_vec(absmax, n_blocks, &Device::Cpu)?,
        ))
    }

    /// Uploads `values`, quantizes them and downloads `(codes, absmax)`; `as_f32` are the same
    /// values widened, for the error message of a non-finite one.
    fn quantize_values<T: Element>(
        emu: &Emulator,
        values: &[T],
        as_f32: &[f32],
        dtype: DType,
        map: &QuantMap,
        block_size: usize,
    ) -> Result<(Vec<u8>, Vec<f32>)> {
        let n = values.len();
        if n == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        let x = emu.upload(values)?;
        let (codes, absmax) = quantize_on(emu, x.address(), n, dtype, map, block_size, |i| {
            Ok(as_f32[i])
        })?;
        Ok((
            emu.download_range(&codes, 0, n)?,
            emu.download_range(&absmax, 0, n.div_ceil(block_size))?,
        ))
    }

    /// [`crate::dequantize_blockwise_into`] on the emulated device: `codes` and `absmax` (CPU
    /// tensors) are copied to the device and `kernels/quantize.cu` writes straight into `out`, a
    /// contiguous CPU tensor the device was given.
    ///
    /// # Errors
    /// As [`crate::dequantize_blockwise_into`]; a launch the emulator refuses.
    pub fn dequantize_blockwise_into(
        emu: &Emulator,
        codes: &Tensor,
        absmax: &Tensor,
        map: &QuantMap,
        block_size: usize,
        out: &Tensor,
    ) -> Result<()> {
        check_dequantize_into(codes, absmax, block_size, out)?;
        let n = codes.elem_count();
        if n == 0 {
            return Ok(());
        }
        let scales: Vec<f32> = absmax.flatten_all()?.to_vec1()?;
        if let Some((i, v)) = scales.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            bail!("dequantize-blockwise: absmax of block {i} is not finite: {v}")
        }
        let codes = emu.upload(&codes.flatten_all()?.to_vec1::<u8>()?)?;
        let scales = emu.upload(&scales)?;
        let (address, hold) = emu.tensor_address(out, "dequantize_blockwise_into: out")?;
        dequantize_on(
            emu,
            codes.address(),
            scales.address(),
            n,
            map,
            block_size,
            address,
            out.dtype(),
        )?;
        drop(hold);
        Ok(())
    }

    /// [`crate::dequantize_blockwise`] on the emulated device, into a new CPU tensor of `dtype`.
    ///
    /// # Errors
    /// As [`crate::dequantize_blockwise`]; a launch the emulator refuses.
    pub fn dequantize_blockwise(
        emu: &Emulator,
        codes: &Tensor,
        absmax: &Tensor,
        map: &QuantMap,
        block_size: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        check_float_dtype("dequantize_blockwise: output", dtype)?;
        let out = Tensor::zeros(codes.shape(), dtype, &Device::Cpu)?;
        dequantize_blockwise_into(emu, codes, absmax, map, block_size, &out)?;
        Ok(out)
    }
}
