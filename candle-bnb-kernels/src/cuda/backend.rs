//! The device operations the CUDA host code uses, as one small interface with two
//! implementations: `driver::CudaDriver` (cudarc, a real GPU; the `cuda` feature) and
//! `emulator::Emulator` (host memory and the kernels compiled for the CPU; the `emulator`
//! feature). Everything
//! above it (slot tables, grouping, the pre-pass, the outcome protocol, uploads and downloads) is
//! the same code for both, so the emulator executes exactly what a GPU would be given.
//!
//! All operations are issued on one stream, in order. Copies to and from pinned host memory and
//! launches are stream-ordered (the host does not wait); `download`, `wait_event` and
//! `synchronize` make the host wait.

use candle_core::{Result, Tensor};
use half::{bf16, f16};

/// The kernel files, one module each (`kernels/<name>.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Module {
    /// `kernels/quantize.cu`.
    Quantize,
    /// `kernels/fused.cu`.
    Fused,
    /// `kernels/norms.cu`.
    Norms,
    /// `kernels/factored.cu`.
    Factored,
}

/// One kernel argument, passed by value as the kernel's C signature declares it: pointers are
/// device addresses in `U64`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    /// `unsigned long long` or any pointer.
    U64(u64),
    /// `int`.
    I32(i32),
    /// `double`.
    F64(f64),
}

/// The element types device buffers hold.
///
/// # Safety
/// Plain numbers: `Copy`, no padding, no pointers, and every bit pattern is a value (device memory
/// is filled with arbitrary bytes and read back as `Self`).
#[cfg(feature = "cuda")]
pub unsafe trait Element:
    Copy
    + Default
    + Send
    + Sync
    + 'static
    + candle_core::cuda_backend::cudarc::driver::DeviceRepr
    + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits
{
}
/// The element types device buffers hold.
///
/// # Safety
/// Plain numbers: `Copy`, no padding, no pointers, and every bit pattern is a value (device memory
/// is filled with arbitrary bytes and read back as `Self`).
#[cfg(not(feature = "cuda"))]
pub unsafe trait Element: Copy + Default + Send + Sync + 'static {}

// SAFETY: plain numbers; every bit pattern is a value.
unsafe impl Element for u8 {}
// SAFETY: as above.
unsafe impl Element for i32 {}
// SAFETY: as above.
unsafe impl Element for u32 {}
// SAFETY: as above.
unsafe impl Element for u64 {}
// SAFETY: as above (NaN payloads included).
unsafe impl Element for f32 {}
// SAFETY: as above.
unsafe impl Element for f64 {}
// SAFETY: as above.
unsafe impl Element for f16 {}
// SAFETY: as above.
unsafe impl Element for bf16 {}

/// A device the CUDA host code runs on: a GPU (`CudaDriver`) or the emulated device
/// (`Emulator`); sealed, those are the two.
pub trait Backend: sealed::Sealed {
    /// `len` elements of `T` in device memory.
    type Buffer<T: Element>;
    /// `len` elements of `T` in page-locked host memory (the source or target of stream-ordered
    /// copies).
    type Pinned<T: Element>;
    /// A point in the stream the host can query or wait for.
    type Event;
    /// Keeps a tensor's memory usable by the kernels until dropped (see
    /// [`Backend::tensor_address`]).
    type Hold;

    /// `len` zeroed elements (`len` > 0: CUDA refuses empty allocations).
    fn alloc_zeros<T: Element>(&self, len: usize) -> Result<Self::Buffer<T>>;
    /// `len` elements the caller must write before any read (`len` > 0).
    fn alloc_uninit<T: Element>(&self, len: usize) -> Result<Self::Buffer<T>>;
    /// A new buffer holding `src` (not empty).
    fn upload<T: Element>(&self, src: &[T]) -> Result<Self::Buffer<T>>;
    /// Copies `src` into the start of `dst` (at most its length).
    fn copy_to_device<T: Element>(&self, src: &[T], dst: &mut Self::Buffer<T>) -> Result<()>;
    /// The whole of `src` on the host (waits for the device).
    fn download<T: Element>(&self, src: &Self::Buffer<T>) -> Result<Vec<T>>;
    /// `len` elements of `src` from element `start` on the host (waits for the device).
    fn download_range<T: Element>(
        &self,
        src: &Self::Buffer<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>>;
    /// The device address of `buf`'s first element (what the kernels' tables hold).
    fn address<T: Element>(&self, buf: &Self::Buffer<T>) -> u64;

    /// `len` elements of page-locked host memory (`len` > 0).
    fn alloc_pinned<T: Element>(&self, len: usize) -> Result<Self::Pinned<T>>;
    /// The host's view of pinned memory. The caller makes sure no copy from or into it is in
    /// flight (an event recorded after the copy).
    fn pinned_mut<'a, T: Element>(&self, p: &'a mut Self::Pinned<T>) -> Result<&'a mut [T]>;
    /// The host's view of pinned memory, as [`Backend::pinned_mut`].
    fn pinned_ref<'a, T: Element>(&self, p: &'a Self::Pinned<T>) -> Result<&'a [T]>;
    /// Stream-ordered copy of pinned host memory into device memory.
    fn copy_from_pinned<T: Element>(
        &self,
        src: &Self::Pinned<T>,
        dst: &mut Self::Buffer<T>,
    ) -> Result<()>;
    /// Stream-ordered copy of device memory into pinned host memory.
    fn copy_to_pinned<T: Element>(
        &self,
        src: &Self::Buffer<T>,
        dst: &mut Self::Pinned<T>,
    ) -> Result<()>;

    /// A new event; the host can wait on it without spinning a core.
    fn new_event(&self) -> Result<Self::Event>;
    /// Records `event` at the current end of the stream.
    fn record(&self, event: &Self::Event) -> Result<()>;
    /// Whether everything before `event`'s last record has run (does not wait).
    fn is_complete(&self, event: &Self::Event) -> Result<bool>;
    /// Waits until everything before `event`'s last record has run.
    fn wait_event(&self, event: &Self::Event) -> Result<()>;
    /// Waits until everything issued so far has run.
    fn synchronize(&self) -> Result<()>;

    /// Launches `kernel` of `module` with `grid` CUDA blocks of 256 threads
    /// ([`super::THREADS`]) and no dynamic shared memory.
    ///
    /// # Safety
    /// `args` match the kernel's C signature, every address in them (or in tables they point to)
    /// covers what the kernel touches, and nothing else reads or writes that memory until the
    /// launch is done (stream order on a GPU; the call's return on the emulated device).
    unsafe fn launch(
        &self,
        module: Module,
        kernel: &str,
        grid: u32,
        args: &[KernelArg],
    ) -> Result<()>;

    /// The device address of the first element of `t` (contiguous, `F32`, `F16` or `BF16`, on
    /// this device; `what` names it in errors), and a hold that keeps that memory usable by
    /// launches until dropped: drop it after the last launch that reads the address.
    fn tensor_address(&self, t: &Tensor, what: &str) -> Result<(u64, Self::Hold)>;
}

/// Keeps [`Backend`] to this crate's devices.
mod sealed {
    pub trait Sealed {}
    #[cfg(feature = "cuda")]
    impl Sealed for super::super::driver::CudaDriver {}
    #[cfg(feature = "emulator")]
    impl Sealed for super::super::emulator::Emulator {}
}
