//! [`Backend`] on the emulated CUDA device (the `emulator` feature, for tests): device memory is
//! host memory, every operation runs at once on the calling thread, and launches run the
//! kernels' own source compiled for the CPU (`emu/`), whose runtime gives CUDA blocks, warps,
//! barriers and shuffles their meaning and fails a launch that a GPU would punish (barrier
//! divergence, a shuffle mask leaving out a lane, an out-of-bounds access, `__trap`).
//!
//! Launches run at most [`MAX_EMULATED_GRID`] CUDA blocks, whatever grid the host asks for:
//! every kernel is a grid-stride loop, and a small grid makes every such loop wrap.
//!
//! The device records what it is asked to do ([`DeviceOp`]), so tests can check the promises
//! the CUDA path makes about a step (no allocation after the first, no host wait, the same
//! operations every step).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};

use super::backend::{Backend, Element, KernelArg, Module};
use super::THREADS;
use crate::checks::contiguous_range;

/// Most CUDA blocks an emulated launch runs.
pub const MAX_EMULATED_GRID: u32 = 3;
/// Alignment of emulated allocations (cudaMalloc's).
const ALIGN: usize = 256;
/// What uninitialised device memory holds: every f32/f64 reads as a NaN, every code as 255.
const POISON: u8 = 0xff;

mod ffi {
    use super::*;

    /// `BnbEmuRange` (emu/runtime.h).
    #[repr(C)]
    pub(super) struct Range {
        pub(super) start: *const c_void,
        pub(super) bytes: usize,
        pub(super) name: *const c_char,
    }

    /// `BnbEmuKernel` (emu/runtime.h); only passed back to the runtime.
    #[repr(C)]
    pub(super) struct Kernel {
        _private: [u8; 0],
    }

    /// `BnbEmuStats` (emu/runtime.h).
    #[repr(C)]
    #[derive(Default)]
    pub(super) struct Stats {
        pub(super) launches: u64,
        pub(super) blocks: u64,
        pub(super) threads: u64,
        pub(super) switches: u64,
    }

    extern "C" {
        pub(super) fn bnb_emu_find_kernel(name: *const c_char) -> *const Kernel;
        #[allow(clippy::too_many_arguments)]
        pub(super) fn bnb_emu_launch(
            kernel: *const Kernel,
            grid: c_uint,
            block: c_uint,
            args: *const *mut c_void,
            arg_sizes: *const usize,
            n_args: usize,
            ranges: *const Range,
            n_ranges: usize,
            message: *mut c_char,
            message_len: usize,
        ) -> c_int;
        pub(super) fn bnb_emu_stats(out: *mut Stats);
    }
}

/// Totals of the emulator's runtime since the process started (all emulated devices).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmulatorStats {
    /// Kernel launches.
    pub launches: u64,
    /// CUDA blocks run.
    pub blocks: u64,
    /// CUDA threads run.
    pub threads: u64,
    /// Switches between CUDA threads (at barriers, shuffles and votes).
    pub switches: u64,
}

/// The totals of every emulated launch so far in this process.
pub fn emulator_stats() -> EmulatorStats {
    let mut s = ffi::Stats::default();
    // SAFETY: the runtime fills the struct it is given.
    unsafe { ffi::bnb_emu_stats(&mut s) };
    EmulatorStats {
        launches: s.launches,
        blocks: s.blocks,
        threads: s.threads,
        switches: s.switches,
    }
}

/// One operation the emulated device was asked to do, in issue order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOp {
    /// A device allocation of this many bytes.
    Alloc {
        /// Bytes.
        bytes: usize,
    },
    /// A device buffer of this many bytes freed.
    Free {
        /// Bytes.
        bytes: usize,
    },
    /// A pinned host allocation of this many bytes.
    AllocPinned {
        /// Bytes.
        bytes: usize,
    },
    /// A copy from pageable host memory into device memory.
    Upload {
        /// Bytes.
        bytes: usize,
    },
    /// A copy from device memory into pageable host memory; the host waits for the device.
    Download {
        /// Bytes.
        bytes: usize,
    },
    /// A stream-ordered copy from pinned host memory into device memory.
    CopyFromPinned {
        /// Bytes.
        bytes: usize,
    },
    /// A stream-ordered copy from device memory into pinned host memory.
    CopyToPinned {
        /// Bytes.
        bytes: usize,
    },
    /// An event recorded in the stream.
    RecordEvent {
        /// The event (numbered from 0 per device).
        event: u64,
    },
    /// The host asked whether an event has completed (no wait).
    QueryEvent {
        /// The event.
        event: u64,
    },
    /// The host waited for an event.
    WaitEvent {
        /// The event.
        event: u64,
    },
    /// The host waited for the whole stream.
    Synchronize,
    /// A kernel launch with the grid the host asked for (the emulator runs at most
    /// [`MAX_EMULATED_GRID`] blocks of it).
    Launch {
        /// The kernel's name.
        kernel: String,
        /// CUDA blocks asked for.
        grid: u32,
    },
}

impl DeviceOp {
    /// Whether the host waits for the device here.
    pub fn waits(&self) -> bool {
        matches!(
            self,
            Self::Download { .. } | Self::WaitEvent { .. } | Self::Synchronize
        )
    }

    /// Whether the operation may be issued while a CUDA graph is being captured (stream-ordered
    /// copies between device and pinned memory, event records and launches; not allocations,
    /// copies from pageable memory, event queries or any wait).
    pub fn capturable(&self) -> bool {
        matches!(
            self,
            Self::CopyFromPinned { .. }
                | Self::CopyToPinned { .. }
                | Self::RecordEvent { .. }
                | Self::Launch { .. }
        )
    }
}

/// Memory the kernels may touch: a device allocation or a held host tensor.
struct Region {
    bytes: usize,
    name: CString,
}

/// A host tensor's memory handed to kernels, and how many holds keep it open.
struct Held {
    region: Region,
    holds: usize,
}

#[derive(Default)]
struct State {
    /// Live device allocations by address.
    allocations: BTreeMap<usize, Region>,
    /// Host tensor memory handed to kernels by address.
    held: BTreeMap<usize, Held>,
    trace: Vec<DeviceOp>,
    events: u64,
    allocated: u64,
    kernels: HashMap<String, usize>,
    /// Whether events report incomplete until the host waits ([`Emulator::set_lagging`]).
    lagging: bool,
    /// Recorded events the host has not waited for yet (only kept while lagging).
    unwaited: std::collections::HashSet<u64>,
}

/// An emulated CUDA device: cheap to clone (clones are the same device).
#[derive(Clone, Default)]
pub struct Emulator {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("Emulator")
            .field("allocations", &s.allocations.len())
            .field("trace_len", &s.trace.len())
            .finish()
    }
}

impl Emulator {
    /// A new emulated device with nothing allocated.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, op: DeviceOp) {
        self.lock().trace.push(op);
    }

    /// Makes the device behave as one running behind the host: every recorded event reports
    /// incomplete until the host waits for it (or for the whole stream). The work itself still
    /// runs at once, so results do not change; what changes is which waits the host code
    /// takes, and those paths get exercised.
    pub fn set_lagging(&self, lagging: bool) {
        let mut s = self.lock();
        s.lagging = lagging;
        s.unwaited.clear();
    }

    /// The operations issued since the last [`Emulator::take_trace`] (or since creation), which
    /// it then forgets.
    pub fn take_trace(&self) -> Vec<DeviceOp> {
        std::mem::take(&mut self.lock().trace)
    }

    /// Bytes of device memory allocated now.
    pub fn allocated_bytes(&self) -> usize {
        self.lock().allocations.values().map(|r| r.bytes).sum()
    }

    fn alloc<T: Element>(&self, len: usize, fill: u8) -> Result<EmuBuffer<T>> {
        if len == 0 {
            bail!("emulated CUDA: an allocation of 0 elements (cuMemAlloc refuses 0 bytes)")
        }
        let Some(bytes) = len.checked_mul(std::mem::size_of::<T>()) else {
            bail!(
                "emulated CUDA: {len} elements of {} overflow usize",
                std::any::type_name::<T>()
            )
        };
        let layout = std::alloc::Layout::from_size_align(bytes, ALIGN)
            .map_err(|e| candle_core::Error::Msg(format!("emulated CUDA: {bytes} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = NonNull::new(ptr) else {
            bail!("emulated CUDA: out of memory allocating {bytes} bytes")
        };
        // SAFETY: `bytes` bytes were just allocated at `ptr`.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), fill, bytes) };
        let mut s = self.lock();
        s.allocated += 1;
        let name = format!(
            "device buffer #{} ({len} x {})",
            s.allocated,
            std::any::type_name::<T>()
        );
        s.allocations.insert(
            ptr.as_ptr() as usize,
            Region {
                bytes,
                name: CString::new(name).expect("no NUL in the name"),
            },
        );
        s.trace.push(DeviceOp::Alloc { bytes });
        Ok(EmuBuffer {
            ptr: ptr.cast(),
            len,
            owner: self.clone(),
        })
    }

    fn free(&self, ptr: NonNull<u8>, bytes: usize) {
        let mut s = self.lock();
        s.allocations.remove(&(ptr.as_ptr() as usize));
        s.trace.push(DeviceOp::Free { bytes });
        drop(s);
        // SAFETY: allocated in `alloc` with this size and alignment, freed once (by the buffer's
        // drop).
        unsafe {
            std::alloc::dealloc(
                ptr.as_ptr(),
                std::alloc::Layout::from_size_align_unchecked(bytes, ALIGN),
            )
        }
    }

    fn kernel(&self, s: &mut State, name: &str) -> Result<*const ffi::Kernel> {
        if let Some(&k) = s.kernels.get(name) {
            return Ok(k as *const ffi::Kernel);
        }
        let c = CString::new(name).map_err(|_| candle_core::Error::Msg("NUL in a name".into()))?;
        // SAFETY: a NUL-terminated string; the runtime returns a static entry or null.
        let k = unsafe { ffi::bnb_emu_find_kernel(c.as_ptr()) };
        if k.is_null() {
            bail!("emulated CUDA: no kernel named {name:?}")
        }
        s.kernels.insert(name.to_string(), k as usize);
        Ok(k)
    }

    /// A device buffer holding `values` (not empty).
    ///
    /// # Errors
    /// `values` is empty.
    pub fn buffer<T: Element>(&self, values: &[T]) -> Result<EmuBuffer<T>> {
        self.upload(values)
    }

    /// A device buffer of `len` zeros (`len` > 0).
    ///
    /// # Errors
    /// `len` is 0.
    pub fn zeroed<T: Element>(&self, len: usize) -> Result<EmuBuffer<T>> {
        self.alloc_zeros(len)
    }

    /// Runs `kernel` with `block` threads per CUDA block (the library's kernels take
    /// [`THREADS`]) over at most [`MAX_EMULATED_GRID`] blocks of `grid`, to completion.
    ///
    /// # Errors
    /// An unknown kernel, arguments whose count or sizes do not match its signature, and every
    /// fault the emulator detects (barrier divergence, a shuffle mask leaving out a lane, an
    /// out-of-bounds access, `__trap`), named with the kernel, block and thread.
    ///
    /// # Safety
    /// `args` match the kernel's signature in meaning too (the runtime checks only their count
    /// and sizes), and nothing else reads or writes the memory the kernel touches during the
    /// call (it writes through raw addresses, past Rust's borrows and Candle's storage locks).
    /// The kernel can only touch live allocations of this device and held tensors: anything
    /// else is refused by the runtime's bounds check.
    pub unsafe fn launch_kernel(
        &self,
        kernel: &str,
        grid: u32,
        block: u32,
        args: &[KernelArg],
    ) -> Result<()> {
        if grid == 0 {
            bail!("emulated CUDA: {kernel} launched with an empty grid")
        }
        let mut s = self.lock();
        let k = self.kernel(&mut s, kernel)?;
        s.trace.push(DeviceOp::Launch {
            kernel: kernel.to_string(),
            grid,
        });
        let mut values: Vec<[u8; 8]> = args
            .iter()
            .map(|a| match a {
                KernelArg::U64(v) => v.to_ne_bytes(),
                KernelArg::F64(v) => v.to_ne_bytes(),
                KernelArg::I32(v) => {
                    let mut b = [0u8; 8];
                    b[..4].copy_from_slice(&v.to_ne_bytes());
                    b
                }
            })
            .collect();
        let sizes: Vec<usize> = args
            .iter()
            .map(|a| match a {
                KernelArg::I32(_) => 4,
                _ => 8,
            })
            .collect();
        let pointers: Vec<*mut c_void> = values
            .iter_mut()
            .map(|v| v.as_mut_ptr().cast::<c_void>())
            .collect();
        let ranges: Vec<ffi::Range> = s
            .allocations
            .iter()
            .chain(s.held.iter().map(|(start, h)| (start, &h.region)))
            .map(|(&start, r)| ffi::Range {
                start: start as *const c_void,
                bytes: r.bytes,
                name: r.name.as_ptr(),
            })
            .collect();
        let mut message = vec![0u8; 1024];
        // SAFETY: the arguments' values live in `values` for the call; the ranges are live
        // allocations and held tensors (the lock keeps them so); the message buffer has the
        // length given.
        let status = unsafe {
            ffi::bnb_emu_launch(
                k,
                grid.min(MAX_EMULATED_GRID),
                block,
                pointers.as_ptr(),
                sizes.as_ptr(),
                sizes.len(),
                ranges.as_ptr(),
                ranges.len(),
                message.as_mut_ptr().cast::<c_char>(),
                message.len(),
            )
        };
        if status != 0 {
            let text = CStr::from_bytes_until_nul(&message)
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown failure".to_string());
            bail!("emulated CUDA: {text}")
        }
        Ok(())
    }
}

/// Device memory of the emulated device: `len` elements of `T` at a 256-byte aligned address.
pub struct EmuBuffer<T> {
    ptr: NonNull<T>,
    len: usize,
    owner: Emulator,
}

// SAFETY: the buffer owns its memory (as a Vec would); access goes through &self / &mut self.
unsafe impl<T: Send> Send for EmuBuffer<T> {}
// SAFETY: as above; shared references only read.
unsafe impl<T: Sync> Sync for EmuBuffer<T> {}

impl<T> EmuBuffer<T> {
    fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised elements (zeroed, poisoned or copied in; every `T` here is a
        // plain number for which any bit pattern is valid).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The device address of the first element.
    pub fn address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element (never: allocations are not empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Element> EmuBuffer<T> {
    /// The elements, copied to a `Vec` (reading device memory directly: not an operation of
    /// the device).
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }
}

impl<T> Drop for EmuBuffer<T> {
    fn drop(&mut self) {
        self.owner
            .free(self.ptr.cast(), self.len * std::mem::size_of::<T>());
    }
}

/// Pinned host memory of the emulated device.
pub struct EmuPinned<T>(Vec<T>);

/// An event of the emulated device (every operation has run by the time it returns, so events
/// are complete as soon as they are recorded).
pub struct EmuEvent(u64);

/// A held host tensor: its memory stays valid and open to kernels until this is dropped.
pub struct EmuHold {
    owner: Emulator,
    address: usize,
    _tensor: Tensor,
}

impl Drop for EmuHold {
    fn drop(&mut self) {
        let mut s = self.owner.lock();
        if let Some(r) = s.held.get_mut(&self.address) {
            r.holds -= 1;
            if r.holds == 0 {
                s.held.remove(&self.address);
            }
        }
    }
}

impl Backend for Emulator {
    type Buffer<T: Element> = EmuBuffer<T>;
    type Pinned<T: Element> = EmuPinned<T>;
    type Event = EmuEvent;
    type Hold = EmuHold;

    fn alloc_zeros<T: Element>(&self, len: usize) -> Result<EmuBuffer<T>> {
        self.alloc(len, 0)
    }

    fn alloc_uninit<T: Element>(&self, len: usize) -> Result<EmuBuffer<T>> {
        self.alloc(len, POISON)
    }

    fn upload<T: Element>(&self, src: &[T]) -> Result<EmuBuffer<T>> {
        let mut b = self.alloc(src.len(), POISON)?;
        self.copy_to_device(src, &mut b)?;
        Ok(b)
    }

    fn copy_to_device<T: Element>(&self, src: &[T], dst: &mut EmuBuffer<T>) -> Result<()> {
        if src.len() > dst.len {
            bail!(
                "emulated CUDA: copying {} elements into a buffer of {}",
                src.len(),
                dst.len
            )
        }
        dst.as_mut_slice()[..src.len()].copy_from_slice(src);
        self.push(DeviceOp::Upload {
            bytes: std::mem::size_of_val(src),
        });
        Ok(())
    }

    fn download<T: Element>(&self, src: &EmuBuffer<T>) -> Result<Vec<T>> {
        self.download_range(src, 0, src.len)
    }

    fn download_range<T: Element>(
        &self,
        src: &EmuBuffer<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let Some(part) = src.as_slice().get(start..start + len) else {
            bail!(
                "emulated CUDA: reading {len} elements from {start} of a buffer of {}",
                src.len
            )
        };
        self.push(DeviceOp::Download {
            bytes: std::mem::size_of_val(part),
        });
        Ok(part.to_vec())
    }

    fn address<T: Element>(&self, buf: &EmuBuffer<T>) -> u64 {
        buf.address()
    }

    fn alloc_pinned<T: Element>(&self, len: usize) -> Result<EmuPinned<T>> {
        if len == 0 {
            bail!("emulated CUDA: a pinned allocation of 0 elements")
        }
        self.push(DeviceOp::AllocPinned {
            bytes: len * std::mem::size_of::<T>(),
        });
        Ok(EmuPinned(vec![T::default(); len]))
    }

    fn pinned_mut<'a, T: Element>(&self, p: &'a mut EmuPinned<T>) -> Result<&'a mut [T]> {
        Ok(&mut p.0)
    }

    fn pinned_ref<'a, T: Element>(&self, p: &'a EmuPinned<T>) -> Result<&'a [T]> {
        Ok(&p.0)
    }

    fn copy_from_pinned<T: Element>(
        &self,
        src: &EmuPinned<T>,
        dst: &mut EmuBuffer<T>,
    ) -> Result<()> {
        if src.0.len() > dst.len {
            bail!(
                "emulated CUDA: copying {} pinned elements into a buffer of {}",
                src.0.len(),
                dst.len
            )
        }
        dst.as_mut_slice()[..src.0.len()].copy_from_slice(&src.0);
        self.push(DeviceOp::CopyFromPinned {
            bytes: std::mem::size_of_val(&src.0[..]),
        });
        Ok(())
    }

    fn copy_to_pinned<T: Element>(&self, src: &EmuBuffer<T>, dst: &mut EmuPinned<T>) -> Result<()> {
        if dst.0.len() > src.len {
            bail!(
                "emulated CUDA: copying a buffer of {} into {} pinned elements",
                src.len,
                dst.0.len()
            )
        }
        let n = dst.0.len();
        dst.0.copy_from_slice(&src.as_slice()[..n]);
        self.push(DeviceOp::CopyToPinned {
            bytes: n * std::mem::size_of::<T>(),
        });
        Ok(())
    }

    fn new_event(&self) -> Result<EmuEvent> {
        let mut s = self.lock();
        s.events += 1;
        Ok(EmuEvent(s.events - 1))
    }

    fn record(&self, event: &EmuEvent) -> Result<()> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::RecordEvent { event: event.0 });
        if s.lagging {
            s.unwaited.insert(event.0);
        }
        Ok(())
    }

    fn is_complete(&self, event: &EmuEvent) -> Result<bool> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::QueryEvent { event: event.0 });
        Ok(!s.unwaited.contains(&event.0))
    }

    fn wait_event(&self, event: &EmuEvent) -> Result<()> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::WaitEvent { event: event.0 });
        s.unwaited.remove(&event.0);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::Synchronize);
        s.unwaited.clear();
        Ok(())
    }

    unsafe fn launch(
        &self,
        _module: Module,
        kernel: &str,
        grid: u32,
        args: &[KernelArg],
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.launch_kernel(kernel, grid, THREADS, args) }
    }

    fn tensor_address(&self, t: &Tensor, what: &str) -> Result<(u64, EmuHold)> {
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = contiguous_range(layout, what)?;
        let (base, size) = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => (v.as_ptr() as usize, 4),
            Storage::Cpu(CpuStorage::F16(v)) => (v.as_ptr() as usize, 2),
            Storage::Cpu(CpuStorage::BF16(v)) => (v.as_ptr() as usize, 2),
            Storage::Cpu(_) => bail!(
                "{what}: dtype must be F32, F16 or BF16, got {:?}",
                t.dtype()
            ),
            _ => bail!(
                "{what}: the emulated CUDA device steps tensors on the CPU, got one on {:?}",
                t.device().location()
            ),
        };
        drop(storage);
        let address = base + start * size;
        let bytes = (end - start) * size;
        let mut s = self.lock();
        let held = s.held.entry(address).or_insert_with(|| Held {
            region: Region {
                bytes,
                name: CString::new(format!("{what} ({} elements)", end - start))
                    .unwrap_or_else(|_| CString::new("host tensor").expect("no NUL")),
            },
            holds: 0,
        });
        held.region.bytes = held.region.bytes.max(bytes);
        held.holds += 1;
        Ok((
            address as u64,
            EmuHold {
                owner: self.clone(),
                address,
                _tensor: t.clone(),
            },
        ))
    }
}
