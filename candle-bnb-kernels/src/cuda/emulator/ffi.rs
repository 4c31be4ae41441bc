//! The emulator runtime's C interface (`emu/runtime.h`) and its process-wide totals.

use std::ffi::{c_char, c_int, c_uint, c_void};

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
    let mut s = Stats::default();
    // SAFETY: the runtime fills the struct it is given.
    unsafe { bnb_emu_stats(&mut s) };
    EmulatorStats {
        launches: s.launches,
        blocks: s.blocks,
        threads: s.threads,
        switches: s.switches,
    }
}
