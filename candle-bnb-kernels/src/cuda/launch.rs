//! The optimizer-step kernels' launches (`kernels/norms.cu`, `kernels/fused.cu`) with typed
//! arguments, on any [`Backend`]: stateless, the device addresses come from the caller (the
//! optimizer's device state in `candle-bnb-optim`), laid out as [`crate::slot_table`] writes
//! them.

use candle_core::{DType, Result};

use super::backend::{Backend, KernelArg, Module};
use super::{grid, MAX_GRID, THREADS};
use crate::rules::CudaRule;

/// The gradient pre-pass of one step: `bnb_sum_squares` (partial sums of squares per
/// [`NORM_CHUNK`](crate::slot_table::NORM_CHUNK) elements), then `bnb_prepass_finish` (each
/// parameter's squared norm, the non-finite check, global and percentile clipping into
/// `grad_scales`, the skip flags). Every field is a device address except the counts.
#[derive(Clone, Copy, Debug)]
pub struct PrepassLaunch {
    /// `n_slots` `GradSlot`s.
    pub grad_slots: u64,
    /// Gradients of the step.
    pub n_slots: usize,
    /// Chunks over every gradient (the sum of `ceil(n / NORM_CHUNK)`).
    pub total_chunks: u64,
    /// `total_chunks` f64 partial sums.
    pub partials: u64,
    /// One f64 squared norm per parameter index.
    pub sq: u64,
    /// Global clipping threshold (`None`: off).
    pub max_grad_norm: Option<f64>,
    /// One i32 percentile (1..=100) per parameter index.
    pub percentile: u64,
    /// [`CUDA_GRAD_NORM_HISTORY`](crate::slot_table::CUDA_GRAD_NORM_HISTORY) f64 per parameter
    /// index (ring buffers).
    pub history: u64,
    /// One u64 count of recorded norms per parameter index.
    pub history_count: u64,
    /// One f32 gradient scale per parameter index (written).
    pub grad_scales: u64,
    /// Two i32, `[skip, first_bad]` (written).
    pub flags: u64,
}

/// Launches the gradient pre-pass described by `a`.
///
/// # Safety
/// Every address of `a` is live device memory of `dev` of the size its field documents, the
/// grad slots name parameter indices within the per-parameter arrays and gradients of their
/// `n` elements, and nothing else touches that memory until the launches are done.
///
/// # Errors
/// Device errors.
pub unsafe fn launch_prepass<B: Backend>(dev: &B, a: &PrepassLaunch) -> Result<()> {
    let n_slots = a.n_slots as i32;
    let args = [
        KernelArg::U64(a.grad_slots),
        KernelArg::I32(n_slots),
        KernelArg::U64(a.total_chunks),
        KernelArg::U64(a.partials),
    ];
    let grid_size = grid(a.total_chunks, 8);
    // SAFETY: bnb_sum_squares(const GradSlot*, int, u64, double*), as the caller promises.
    unsafe { dev.launch(Module::Norms, "bnb_sum_squares", grid_size, &args) }?;
    let args = [
        KernelArg::U64(a.grad_slots),
        KernelArg::I32(n_slots),
        KernelArg::U64(a.partials),
        KernelArg::U64(a.sq),
        KernelArg::F64(a.max_grad_norm.unwrap_or(0.0)),
        KernelArg::U64(a.percentile),
        KernelArg::U64(a.history),
        KernelArg::U64(a.history_count),
        KernelArg::U64(a.grad_scales),
        KernelArg::U64(a.flags),
        KernelArg::U64(a.flags + 4),
    ];
    // SAFETY: the arguments of bnb_prepass_finish in kernels/norms.cu, in order.
    unsafe { dev.launch(Module::Norms, "bnb_prepass_finish", 1, &args) }
}

/// The update of one group of parameters (same dtype, state precision, state count, block size
/// and maps): for a layer-wise rule the norms pass and the trust ratios first, then the fused
/// update. Every field is a device address except the counts and kinds.
#[derive(Clone, Copy, Debug)]
pub struct UpdateLaunch {
    /// `n_slots` `Slot<R>`s.
    pub slots: u64,
    /// Parameters of the group with a gradient this step.
    pub n_slots: usize,
    /// Blocks over the slots (the sum of `ceil(n / block_size)`).
    pub total_blocks: u64,
    /// Elements per block (the quantization block of 8-bit state; the tile of 32-bit state).
    pub block_size: usize,
    /// The parameters' dtype (F32, F16 or BF16).
    pub dtype: DType,
    /// 8-bit (blockwise) state, else f32.
    pub quantized: bool,
    /// States per element (0 to [`MAX_STATES`](crate::MAX_STATES)).
    pub n_states: usize,
    /// `n_states` `QuantTable`s (8-bit state; 0 otherwise).
    pub quant_tables: u64,
    /// The pre-pass's f32 gradient scales.
    pub grad_scales: u64,
    /// The pre-pass's `[skip, first_bad]` flags.
    pub flags: u64,
    /// `2 * total_blocks` f64 for a layer-wise rule's norms (0 otherwise).
    pub partials: u64,
}

/// Launches the update of the group described by `a` with rule `R`.
///
/// # Safety
/// As [`launch_prepass`]: every address is live device memory of `dev` of the size its field
/// documents, each slot's pointers cover its `n` elements (states, codes) and
/// `ceil(n / block_size)` scales, and nothing else touches that memory until the launches are
/// done.
///
/// # Errors
/// Device errors; a kernel that does not exist for this dtype, precision and state count.
pub unsafe fn launch_update<R: CudaRule, B: Backend>(dev: &B, a: &UpdateLaunch) -> Result<()> {
    if a.n_slots == 0 || a.total_blocks == 0 {
        return Ok(());
    }
    let step_args = [
        KernelArg::U64(a.slots),
        KernelArg::I32(a.n_slots as i32),
        KernelArg::U64(a.total_blocks),
        KernelArg::I32(a.block_size as i32),
        KernelArg::U64(a.quant_tables),
        KernelArg::U64(a.grad_scales),
        KernelArg::U64(a.flags),
    ];
    let precision = if a.quantized { "q8" } else { "f32" };
    let suffix = format!(
        "{}_{}_{precision}_s{}",
        R::KERNEL_NAME,
        dtype_suffix(a.dtype),
        a.n_states
    );
    let per_tile = (THREADS as usize / (a.block_size / 16)) as u64;
    let cfg = grid(a.total_blocks, per_tile);
    if R::LAYERWISE {
        let mut measure = step_args.to_vec();
        measure.push(KernelArg::U64(a.partials));
        let kernel = format!("bnb_measure_{suffix}");
        // SAFETY: bnb_measure_* (BNB_STEP_ARGS, double* partials), as the caller promises.
        unsafe { dev.launch(Module::Fused, &kernel, cfg, &measure) }?;
        let trust = [
            KernelArg::U64(a.slots),
            KernelArg::I32(a.n_slots as i32),
            KernelArg::I32(a.block_size as i32),
            KernelArg::U64(a.partials),
            KernelArg::U64(a.flags),
        ];
        let kernel = format!("bnb_set_trust_{}", R::KERNEL_NAME);
        let blocks = (a.n_slots as u32).min(MAX_GRID as u32);
        // SAFETY: bnb_set_trust_*(Slot*, int, int, const double*, const int*).
        unsafe { dev.launch(Module::Fused, &kernel, blocks, &trust) }?;
    }
    let kernel = format!("bnb_fused_{suffix}");
    // SAFETY: bnb_fused_* (BNB_STEP_ARGS), as the caller promises.
    unsafe { dev.launch(Module::Fused, &kernel, cfg, &step_args) }
}

fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}
