//! A step's launches, with this state's buffers as their arguments: the gradient pre-pass
//! (and the copy of its outcome to the host), then per group the update
//! (`candle_bnb_kernels::cuda::{launch_prepass, launch_update}`).

use candle_bnb_kernels::cuda::{
    launch_prepass, launch_update, Backend, PrepassLaunch, UpdateLaunch,
};
use candle_bnb_kernels::CudaRule;
use candle_core::Result;

use super::tables::GroupTable;
use super::StepState;

impl<B: Backend> StepState<B> {
    /// Launches the pre-pass over `n_slots` gradients, then copies its flags into pinned host
    /// memory and records the event the outcome is read behind.
    pub(super) fn launch_prepass(
        &mut self,
        n_slots: usize,
        total_chunks: u64,
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        let dev = &self.backend;
        let launch = PrepassLaunch {
            grad_slots: self.table_address(0),
            n_slots,
            total_chunks,
            partials: dev.address(&self.partials),
            sq: dev.address(&self.sq),
            max_grad_norm,
            percentile: dev.address(&self.percentile),
            history: dev.address(&self.history),
            history_count: dev.address(&self.history_count),
            grad_scales: dev.address(&self.grad_scales),
            flags: dev.address(&self.flags),
        };
        // SAFETY: the table holds n_slots GradSlots naming parameter indices below
        // `params.len()`; partials has room for every chunk of every parameter, the
        // per-parameter buffers one entry (history: CUDA_GRAD_NORM_HISTORY) per parameter,
        // flags two; this state alone uses them, on the device's stream.
        unsafe { launch_prepass(dev, &launch) }?;
        dev.copy_to_pinned(&self.flags, &mut self.outcome)?;
        self.outcome_after = self.table_copies;
        self.backend.record(&self.outcome_ready)
    }

    /// Launches the update of group `g` with rule `R` over the slots of `table`.
    pub(super) fn launch_group<R: CudaRule>(&mut self, g: usize, table: &GroupTable) -> Result<()> {
        if R::LAYERWISE && self.groups[g].partials.is_none() {
            let blocks = self.groups[g].total_blocks;
            self.groups[g].partials = Some(self.backend.alloc_zeros::<f64>(2 * blocks.max(1))?);
        }
        let dev = &self.backend;
        let group = &self.groups[g];
        let launch = UpdateLaunch {
            slots: self.table_address(table.offset),
            n_slots: table.n_slots,
            total_blocks: table.total_blocks,
            block_size: group.block_size,
            dtype: group.dtype,
            quantized: group.quantized,
            n_states: group.n_states,
            quant_tables: group.tables.as_ref().map_or(0, |t| dev.address(t)),
            grad_scales: dev.address(&self.grad_scales),
            flags: dev.address(&self.flags),
            partials: group.partials.as_ref().map_or(0, |p| dev.address(p)),
        };
        // SAFETY: the table holds n_slots slots of this group, each with the pointers of its
        // parameter, gradient, states and scales (n elements, ceil(n / block_size) scales);
        // partials has 2 * total_blocks entries for a layer-wise rule (allocated above); this
        // state alone uses them, on the device's stream.
        unsafe { launch_update::<R, B>(dev, &launch) }
    }
}
