//! A step's launches: the gradient pre-pass, then per group the layer-wise passes and the fused
//! update.

use candle_core::{DType, Result};

use super::tables::GroupTable;
use super::StepState;
use crate::cuda::backend::{Backend, KernelArg, Module};
use crate::cuda::{grid, MAX_GRID, THREADS};
use crate::rules::CudaRule;

/// The arguments every fused-step kernel starts with (`BNB_STEP_ARGS` in fused.cu).
struct StepArgs {
    slots: u64,
    n_slots: i32,
    total_blocks: u64,
    block_size: i32,
    tables: u64,
    grad_scales: u64,
    skip: u64,
}

impl StepArgs {
    pub(super) fn args(&self) -> Vec<KernelArg> {
        vec![
            KernelArg::U64(self.slots),
            KernelArg::I32(self.n_slots),
            KernelArg::U64(self.total_blocks),
            KernelArg::I32(self.block_size),
            KernelArg::U64(self.tables),
            KernelArg::U64(self.grad_scales),
            KernelArg::U64(self.skip),
        ]
    }
}

impl<B: Backend> StepState<B> {
    pub(super) fn launch_prepass(
        &mut self,
        n_slots: usize,
        total_chunks: u64,
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        let dev = &self.backend;
        let slots = self.table_address(0);
        let n_slots = n_slots as i32;
        let args = [
            KernelArg::U64(slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(total_chunks),
            KernelArg::U64(dev.address(&self.partials)),
        ];
        // SAFETY: bnb_sum_squares(const GradSlot*, int, u64, double*): the table holds n_slots
        // GradSlots, partials has room for every chunk of every parameter.
        unsafe {
            dev.launch(
                Module::Norms,
                "bnb_sum_squares",
                grid(total_chunks, 8),
                &args,
            )
        }?;
        let flags = dev.address(&self.flags);
        let (skip, first_bad) = (flags, flags + 4);
        let args = [
            KernelArg::U64(slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(dev.address(&self.partials)),
            KernelArg::U64(dev.address(&self.sq)),
            KernelArg::F64(max_grad_norm.unwrap_or(0.0)),
            KernelArg::U64(dev.address(&self.percentile)),
            KernelArg::U64(dev.address(&self.history)),
            KernelArg::U64(dev.address(&self.history_count)),
            KernelArg::U64(dev.address(&self.grad_scales)),
            KernelArg::U64(skip),
            KernelArg::U64(first_bad),
        ];
        // SAFETY: the arguments of bnb_prepass_finish in kernels/norms.cu, in order; the
        // per-parameter arrays cover every parameter index the grad slots name.
        unsafe { dev.launch(Module::Norms, "bnb_prepass_finish", 1, &args) }?;
        dev.copy_to_pinned(&self.flags, &mut self.outcome)?;
        self.outcome_after = self.table_copies;
        self.backend.record(&self.outcome_ready)
    }

    pub(super) fn launch_group<R: CudaRule>(&mut self, g: usize, table: &GroupTable) -> Result<()> {
        if table.n_slots == 0 || table.total_blocks == 0 {
            return Ok(());
        }
        if R::LAYERWISE && self.groups[g].partials.is_none() {
            let blocks = self.groups[g].total_blocks;
            self.groups[g].partials = Some(self.backend.alloc_zeros::<f64>(2 * blocks.max(1))?);
        }
        let dev = &self.backend;
        let group = &self.groups[g];
        let args = StepArgs {
            slots: self.table_address(table.offset),
            n_slots: table.n_slots as i32,
            total_blocks: table.total_blocks,
            block_size: group.block_size as i32,
            tables: group.tables.as_ref().map_or(0, |t| dev.address(t)),
            grad_scales: dev.address(&self.grad_scales),
            skip: dev.address(&self.flags),
        };
        let precision = if group.quantized { "q8" } else { "f32" };
        let suffix = format!(
            "{}_{}_{precision}_s{}",
            R::KERNEL_NAME,
            dtype_suffix(group.dtype),
            group.n_states
        );
        let per_tile = (THREADS as usize / (group.block_size / 16)) as u64;
        let cfg = grid(table.total_blocks, per_tile);
        if R::LAYERWISE {
            let partials = dev.address(group.partials.as_ref().expect("allocated above"));
            let mut measure = args.args();
            measure.push(KernelArg::U64(partials));
            // SAFETY: bnb_measure_* (BNB_STEP_ARGS, double* partials): the slot table holds
            // n_slots slots of this group with their pointers; partials has 2 * total_blocks.
            unsafe {
                dev.launch(
                    Module::Fused,
                    &format!("bnb_measure_{suffix}"),
                    cfg,
                    &measure,
                )
            }?;
            let trust = [
                KernelArg::U64(args.slots),
                KernelArg::I32(args.n_slots),
                KernelArg::I32(args.block_size),
                KernelArg::U64(partials),
                KernelArg::U64(args.skip),
            ];
            let kernel = format!("bnb_set_trust_{}", R::KERNEL_NAME);
            let blocks = (table.n_slots as u32).min(MAX_GRID as u32);
            // SAFETY: bnb_set_trust_*(Slot*, int, int, const double*, const int*).
            unsafe { dev.launch(Module::Fused, &kernel, blocks, &trust) }?;
        }
        // SAFETY: bnb_fused_* (BNB_STEP_ARGS): the slot table holds n_slots slots whose
        // pointers cover n elements (states, codes) and ceil(n / block_size) scales each.
        unsafe {
            dev.launch(
                Module::Fused,
                &format!("bnb_fused_{suffix}"),
                cfg,
                &args.args(),
            )
        }
    }
}

fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}
