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
use std::ffi::{c_char, c_void, CStr, CString};
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

mod backend;
mod ffi;
mod memory;
mod trace;

pub use ffi::{emulator_stats, EmulatorStats};
pub use memory::{EmuBuffer, EmuEvent, EmuHold, EmuPinned};
pub use trace::DeviceOp;

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
