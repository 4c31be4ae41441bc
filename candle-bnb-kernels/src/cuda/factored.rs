//! The launches of one parameter's factored-optimizer step (`kernels/factored.cu`), on any
//! [`Backend`]: stateless, the addresses come from the caller (the optimizer's device state),
//! the slot laid out as [`crate::slot_table::FactoredSlot`] writes it.

use candle_core::{DType, Result};

use super::backend::{Backend, KernelArg, Module};
use super::{grid, THREADS};
use crate::rules::FactoredCudaRule;
use crate::slot_table::FactoredLayout;

/// One parameter's factored step. Every field is a device address except the layout, flags and
/// kinds.
#[derive(Clone, Copy, Debug)]
pub struct FactoredLaunch {
    /// The parameter's `FactoredSlot<R>` (its rule is updated by the launches: the parameter
    /// scale of Adafactor).
    pub slot: u64,
    /// The parameter's shape and tasks, as the slot holds them.
    pub layout: FactoredLayout,
    /// The rule has a confidence step (CAME).
    pub confidence: bool,
    /// The momentum's block size when it is 8-bit (then `quant_table` is its map's
    /// `QuantTable`), else `None`.
    pub block_size: Option<usize>,
    /// The signed dynamic map's `QuantTable` (8-bit momentum; 0 otherwise).
    pub quant_table: u64,
    /// The parameter's dtype (F32, F16 or BF16).
    pub dtype: DType,
    /// The pre-pass's f32 gradient scales.
    pub grad_scales: u64,
    /// The pre-pass's `[skip, first_bad]` flags.
    pub flags: u64,
}

/// `factored.cu`'s SumPass.
const STATS: i32 = 0;
const SQUARES: i32 = 1;
const RESIDUAL: i32 = 2;
/// `factored.cu`'s ApplyPass.
const UPDATE: i32 = 0;
const ADVANCE: i32 = 1;
const CONFIDENT: i32 = 2;
const FULL_UPDATE: i32 = 3;
/// Rows (or vector tasks) per CUDA block of the lane-sum kernels: 8 threads each.
const ROWS_PER_BLOCK: u64 = THREADS as u64 / 8;
/// `factored.cu`'s kPlainBlock.
const PLAIN_BLOCK: usize = 256;

/// Launches the step of the parameter described by `a` with rule `R`: for a matrix the
/// statistics, the clipping divisor and the update (CAME: then the residual statistics and the
/// confidence-weighted update), for a vector its statistic and update. A parameter without
/// elements launches nothing.
///
/// # Safety
/// Every address of `a` is live device memory of `dev`: the slot a `FactoredSlot<R>` whose
/// pointers cover the parameter, gradient, statistics, momentum and scales of `a.layout`, and
/// scratch buffers of at least [`FactoredLayout::scratch_lens`] elements; nothing else touches
/// that memory until the launches are done.
///
/// # Errors
/// Device errors.
pub unsafe fn launch_factored<R: FactoredCudaRule, B: Backend>(
    dev: &B,
    a: &FactoredLaunch,
) -> Result<()> {
    let l = &a.layout;
    if l.n == 0 {
        return Ok(());
    }
    let dtype = match a.dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    };
    let name = |pass: &str| format!("bnb_factored_{pass}_{}_{dtype}", R::KERNEL_NAME);
    let stats_name = |pass: &str| format!("bnb_factored_{pass}_{}", R::KERNEL_NAME);
    let with_pass = |pass: i32| {
        [
            KernelArg::U64(a.slot),
            KernelArg::U64(a.grad_scales),
            KernelArg::U64(a.flags),
            KernelArg::U64(a.quant_table),
            KernelArg::I32(pass),
        ]
    };
    let which = |w: i32| {
        [
            KernelArg::U64(a.slot),
            KernelArg::U64(a.flags),
            KernelArg::I32(w),
        ]
    };
    let block = a.block_size.unwrap_or(PLAIN_BLOCK);
    let apply_grid = grid(
        l.n.div_ceil(block) as u64,
        (THREADS as usize / (block / 16)) as u64,
    );
    let apply = |pass: i32| {
        // SAFETY: bnb_factored_apply_*(FactoredSlot*, const float*, const int*, const
        // QuantTable*, int), as the caller promises.
        unsafe {
            dev.launch(
                Module::Factored,
                &name("apply"),
                apply_grid,
                &with_pass(pass),
            )
        }
    };
    let divisor = || {
        let args = [KernelArg::U64(a.slot), KernelArg::U64(a.flags)];
        // SAFETY: bnb_factored_divisor_*(FactoredSlot*, const int*).
        unsafe { dev.launch(Module::Factored, &stats_name("divisor"), 1, &args) }
    };
    if !l.factored {
        let args = &with_pass(0)[..4];
        let cfg = grid(l.tasks as u64, ROWS_PER_BLOCK);
        // SAFETY: bnb_factored_full_stats_*(FactoredSlot*, const float*, const int*, const
        // QuantTable*).
        unsafe { dev.launch(Module::Factored, &name("full_stats"), cfg, args) }?;
        divisor()?;
        return apply(FULL_UPDATE);
    }
    let n_rows = (l.batch * l.rows) as u64;
    let stat_items = n_rows + (l.batch * l.cols) as u64;
    let rows_grid = grid(n_rows, ROWS_PER_BLOCK);
    let cols_grid = grid(l.scratch_lens()[2] as u64, THREADS as u64);
    let sums = |pass: i32| {
        // SAFETY: bnb_factored_{rows,cols}_*(FactoredSlot*, const float*, const int*, const
        // QuantTable*, int).
        unsafe {
            dev.launch(Module::Factored, &name("rows"), rows_grid, &with_pass(pass))?;
            dev.launch(Module::Factored, &name("cols"), cols_grid, &with_pass(pass))
        }
    };
    let statistics = |w: i32| {
        let items = grid(stat_items, THREADS as u64);
        // SAFETY: bnb_factored_{average,means,factors}_*(FactoredSlot*, const int*, int).
        unsafe {
            dev.launch(Module::Factored, &stats_name("average"), items, &which(w))?;
            let means = grid(l.batch as u64, THREADS as u64);
            dev.launch(Module::Factored, &stats_name("means"), means, &which(w))?;
            dev.launch(Module::Factored, &stats_name("factors"), items, &which(w))
        }
    };
    let factors = |w: i32| {
        let items = grid(stat_items, THREADS as u64);
        // SAFETY: as above.
        unsafe { dev.launch(Module::Factored, &stats_name("factors"), items, &which(w)) }
    };
    sums(STATS)?;
    statistics(0)?;
    // SAFETY: bnb_factored_rows_*, as above.
    unsafe {
        dev.launch(
            Module::Factored,
            &name("rows"),
            rows_grid,
            &with_pass(SQUARES),
        )
    }?;
    divisor()?;
    factors(0)?;
    if !a.confidence {
        return apply(UPDATE);
    }
    sums(RESIDUAL)?;
    apply(ADVANCE)?;
    statistics(1)?;
    apply(CONFIDENT)
}
