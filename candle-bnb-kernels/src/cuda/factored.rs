//! The launches of a factored-optimizer step over a table of parameters (`kernels/factored.cu`,
//! multi-tensor: each launch steps every slot of the table), on any [`Backend`]: stateless, the
//! addresses come from the caller (the optimizer's device state), the slots laid out as
//! [`crate::slot_table::FactoredSlot`] writes them.

use candle_core::{bail, DType, Result};

use super::backend::{Backend, KernelArg, Module};
use super::{grid, THREADS};
use crate::rules::FactoredCudaRule;
use crate::slot_table::FactoredLayout;

/// One multi-tensor factored step: a table of slots of one dtype, all matrices or all vectors.
/// Every address is a device address.
#[derive(Clone, Copy, Debug)]
pub struct FactoredLaunch<'a> {
    /// The table: `layouts.len()` consecutive `FactoredSlot<R>` (their rules are updated by the
    /// launches: the parameter scale of Adafactor).
    pub slots: u64,
    /// Each slot's layout, in table order (as the slot holds it); no parameter without elements.
    pub layouts: &'a [FactoredLayout],
    /// The rule has a confidence step (CAME).
    pub confidence: bool,
    /// The signed dynamic map's `QuantTable` when a slot has an 8-bit momentum, else 0.
    pub quant_table: u64,
    /// The parameters' dtype (F32, F16 or BF16).
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

/// Launches the step of every parameter of `a`'s table with rule `R`: for matrices the
/// statistics, the clipping divisor and the update (CAME: then the residual statistics and the
/// confidence-weighted update), for vectors their statistic and update; 3 to 15 launches
/// whatever the number of parameters. An empty table launches nothing.
///
/// # Safety
/// Every address of `a` is live device memory of `dev`: the table holds `a.layouts.len()`
/// `FactoredSlot<R>`s, each with pointers covering its parameter, gradient, statistics, momentum
/// and scales, and its own scratch of [`FactoredLayout::scratch_words`] words; a slot with an
/// 8-bit momentum only with a `quant_table`; nothing else touches that memory until the
/// launches are done.
///
/// # Errors
/// A table mixing matrices and vectors, a parameter without elements, more than `i32::MAX`
/// slots (nothing launched); device errors.
pub unsafe fn launch_factored<R: FactoredCudaRule, B: Backend>(
    dev: &B,
    a: &FactoredLaunch<'_>,
) -> Result<()> {
    let Some(first) = a.layouts.first() else {
        return Ok(());
    };
    let factored = first.factored;
    if let Some((k, l)) = a
        .layouts
        .iter()
        .enumerate()
        .find(|(_, l)| l.n == 0 || l.factored != factored)
    {
        bail!(
            "factored launch: slot {k} ({l:?}) is empty or not a {} like slot 0",
            if factored { "matrix" } else { "vector" }
        )
    }
    let Ok(n_slots) = i32::try_from(a.layouts.len()) else {
        bail!(
            "factored launch: {} slots, at most {}",
            a.layouts.len(),
            i32::MAX
        )
    };
    // Each launch's grid: the most any slot of the table can use (they are grid-stride).
    let widest = |units: &dyn Fn(&FactoredLayout) -> (u64, u64)| {
        a.layouts
            .iter()
            .map(|l| {
                let (units, per_block) = units(l);
                grid(units, per_block)
            })
            .max()
            .unwrap_or(1)
    };
    let dtype = match a.dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    };
    // The kernels over elements: bnb_factored_{rows,cols,apply}_<rule>_<dtype>(FactoredSlot*,
    // int, const float*, const int*, const QuantTable*, int pass); full_stats takes all but
    // `pass`.
    let element_args = |pass: i32| {
        [
            KernelArg::U64(a.slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(a.grad_scales),
            KernelArg::U64(a.flags),
            KernelArg::U64(a.quant_table),
            KernelArg::I32(pass),
        ]
    };
    let elements = |kernel: &str, cfg: u32, pass: i32| {
        let name = format!("bnb_factored_{kernel}_{}_{dtype}", R::KERNEL_NAME);
        // SAFETY: the signature above, with the addresses the caller promises.
        unsafe { dev.launch(Module::Factored, &name, cfg, &element_args(pass)) }
    };
    // The statistics kernels: bnb_factored_{average,means,factors}_<rule>(FactoredSlot*, int,
    // const int*, int which).
    let statistic = |kernel: &str, cfg: u32, which: i32| {
        let args = [
            KernelArg::U64(a.slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(a.flags),
            KernelArg::I32(which),
        ];
        let name = format!("bnb_factored_{kernel}_{}", R::KERNEL_NAME);
        // SAFETY: the signature above, with the addresses the caller promises.
        unsafe { dev.launch(Module::Factored, &name, cfg, &args) }
    };
    let apply_grid = widest(&|l| {
        let block = l.block_size.unwrap_or(PLAIN_BLOCK);
        (
            l.n.div_ceil(block) as u64,
            (THREADS as usize / (block / 16)) as u64,
        )
    });
    let divisor = || {
        let args = [
            KernelArg::U64(a.slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(a.flags),
        ];
        let cfg = grid(n_slots as u64, THREADS as u64);
        let name = format!("bnb_factored_divisor_{}", R::KERNEL_NAME);
        // SAFETY: bnb_factored_divisor_*(FactoredSlot*, int, const int*).
        unsafe { dev.launch(Module::Factored, &name, cfg, &args) }
    };
    if !factored {
        let cfg = widest(&|l| (l.tasks as u64, ROWS_PER_BLOCK));
        let name = format!("bnb_factored_full_stats_{}_{dtype}", R::KERNEL_NAME);
        // SAFETY: bnb_factored_full_stats_*(FactoredSlot*, int, const float*, const int*, const
        // QuantTable*), with the addresses the caller promises.
        unsafe { dev.launch(Module::Factored, &name, cfg, &element_args(0)[..5]) }?;
        divisor()?;
        return elements("apply", apply_grid, FULL_UPDATE);
    }
    let rows_grid = widest(&|l| ((l.batch * l.rows) as u64, ROWS_PER_BLOCK));
    let cols_grid = widest(&|l| (l.scratch_lens()[2] as u64, THREADS as u64));
    let items_grid = widest(&|l| ((l.batch * (l.rows + l.cols)) as u64, THREADS as u64));
    // `means` spreads the matrices of all slots over its grid.
    let matrices: usize = a.layouts.iter().map(|l| l.batch).sum();
    let means_grid = grid(matrices as u64, THREADS as u64);
    let sums = |pass: i32| {
        elements("rows", rows_grid, pass)?;
        elements("cols", cols_grid, pass)
    };
    let statistics = |which: i32| {
        statistic("average", items_grid, which)?;
        statistic("means", means_grid, which)?;
        statistic("factors", items_grid, which)
    };
    sums(STATS)?;
    statistics(0)?;
    elements("rows", rows_grid, SQUARES)?;
    divisor()?;
    statistic("factors", items_grid, 0)?;
    if !a.confidence {
        return elements("apply", apply_grid, UPDATE);
    }
    sums(RESIDUAL)?;
    elements("apply", apply_grid, ADVANCE)?;
    statistics(1)?;
    elements("apply", apply_grid, CONFIDENT)
}
