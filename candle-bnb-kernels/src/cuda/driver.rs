//! [`Backend`] on a real GPU: cudarc through Candle's [`CudaDevice`], its per-thread stream, and
//! the kernels' PTX compiled by the build script.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{
    CudaEvent, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{bail, CudaDevice, Device, Result, Storage, Tensor};

use super::backend::{Backend, Element, KernelArg, Module};
use super::THREADS;
use crate::checks::contiguous_range;

/// The PTX of `kernels/quantize.cu`.
const QUANTIZE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quantize.ptx"));
/// The PTX of `kernels/fused.cu`.
const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
/// The PTX of `kernels/norms.cu`.
const NORMS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norms.ptx"));
/// The PTX of `kernels/factored.cu`.
const FACTORED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/factored.ptx"));

/// A CUDA device and its stream (Candle's per-thread stream: the tables hold raw addresses, which
/// cudarc's cross-stream event tracking does not see, so everything stays on this one).
#[derive(Clone)]
pub struct CudaDriver {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
}

impl CudaDriver {
    /// The device `dev` on its current stream.
    pub fn new(dev: &CudaDevice) -> Self {
        Self {
            dev: dev.clone(),
            stream: dev.cuda_stream(),
        }
    }

    /// The Candle device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }
}

fn ptx(module: Module) -> (&'static str, &'static str) {
    match module {
        Module::Quantize => ("candle_bnb_quantize", QUANTIZE_PTX),
        Module::Fused => ("candle_bnb_fused", FUSED_PTX),
        Module::Norms => ("candle_bnb_norms", NORMS_PTX),
        Module::Factored => ("candle_bnb_factored", FACTORED_PTX),
    }
}

impl Backend for CudaDriver {
    type Buffer<T: Element> = CudaSlice<T>;
    type Pinned<T: Element> = PinnedHostSlice<T>;
    type Event = CudaEvent;
    type Hold = ();

    fn alloc_zeros<T: Element>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.dev.alloc_zeros::<T>(len)
    }

    fn alloc_uninit<T: Element>(&self, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the trait's contract: the caller writes every element before reading it.
        unsafe { self.dev.alloc::<T>(len) }
    }

    fn upload<T: Element>(&self, src: &[T]) -> Result<CudaSlice<T>> {
        self.dev.clone_htod(src)
    }

    fn copy_to_device<T: Element>(&self, src: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
        self.dev.memcpy_htod(src, dst)
    }

    fn download<T: Element>(&self, src: &CudaSlice<T>) -> Result<Vec<T>> {
        self.dev.clone_dtoh(src)
    }

    fn download_range<T: Element>(
        &self,
        src: &CudaSlice<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        self.dev.clone_dtoh(&src.slice(start..start + len))
    }

    fn address<T: Element>(&self, buf: &CudaSlice<T>) -> u64 {
        let (ptr, _sync) = buf.device_ptr(&self.stream);
        ptr
    }

    fn alloc_pinned<T: Element>(&self, len: usize) -> Result<PinnedHostSlice<T>> {
        // Flags 0: not write-combined, since the host also reads pinned memory back.
        // SAFETY: the memory is written (tables) or filled by a device copy (outcome) before it
        // is read.
        unsafe { self.stream.context().alloc_pinned_with_flags::<T>(len, 0) }.w()
    }

    fn pinned_mut<'a, T: Element>(&self, p: &'a mut PinnedHostSlice<T>) -> Result<&'a mut [T]> {
        p.as_mut_slice().w()
    }

    fn pinned_ref<'a, T: Element>(&self, p: &'a PinnedHostSlice<T>) -> Result<&'a [T]> {
        p.as_slice().w()
    }

    fn copy_from_pinned<T: Element>(
        &self,
        src: &PinnedHostSlice<T>,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream.memcpy_htod(src, dst).w()
    }

    fn copy_to_pinned<T: Element>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut PinnedHostSlice<T>,
    ) -> Result<()> {
        self.stream.memcpy_dtoh(src, dst).w()
    }

    fn new_event(&self) -> Result<CudaEvent> {
        // Blocking sync: a wait sleeps instead of spinning a core. cudarc's flag type is an enum,
        // so timing stays enabled rather than combining it with DISABLE_TIMING.
        self.stream
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .w()
    }

    fn record(&self, event: &CudaEvent) -> Result<()> {
        event.record(&self.stream).w()
    }

    fn is_complete(&self, event: &CudaEvent) -> Result<bool> {
        event.try_is_complete().w()
    }

    fn wait_event(&self, event: &CudaEvent) -> Result<()> {
        event.synchronize().w()
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().w()
    }

    unsafe fn launch(
        &self,
        module: Module,
        kernel: &str,
        grid: u32,
        args: &[KernelArg],
    ) -> Result<()> {
        let (module_name, ptx) = ptx(module);
        let func = self
            .dev
            .get_or_load_custom_func(kernel, module_name, ptx)?
            .into_cuda_function();
        let mut builder = self.stream.launch_builder(&func);
        for arg in args {
            match arg {
                KernelArg::U64(v) => builder.arg(v),
                KernelArg::I32(v) => builder.arg(v),
                KernelArg::F64(v) => builder.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the caller's contract (arguments match the kernel's signature and cover what
        // it touches).
        unsafe { builder.launch(cfg) }.w()?;
        Ok(())
    }

    fn tensor_address(&self, t: &Tensor, what: &str) -> Result<(u64, ())> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            bail!(
                "{what}: expected a tensor on CUDA, got one on {:?}",
                t.device().location()
            )
        };
        if s.device.id() != self.dev.id() {
            bail!(
                "{what}: tensor on {:?}, the optimizer state is on {:?}",
                t.device().location(),
                Device::Cuda(self.dev.clone()).location()
            )
        }
        let (start, _) = contiguous_range(layout, what)?;
        let (base, size) = match &s.slice {
            CudaStorageSlice::F32(x) => (self.address(x), 4),
            CudaStorageSlice::F16(x) => (self.address(x), 2),
            CudaStorageSlice::BF16(x) => (self.address(x), 2),
            _ => bail!(
                "{what}: dtype must be F32, F16 or BF16, got {:?}",
                t.dtype()
            ),
        };
        Ok((base + (start * size) as u64, ()))
    }
}
