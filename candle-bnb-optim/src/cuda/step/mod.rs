//! Host side of `candle_bnb_kernels`' `fused.cu`, `factored.cu` and `norms.cu`: an optimizer's
//! state on one device, and a whole step (gradient pre-pass, layer-wise norms, fused updates of
//! every parameter, or the factored passes of each) as a handful of launches, written once over [`Backend`] (a GPU or the emulated
//! device). The order of a step's operations and what the host waits for are documented on
//! [`CudaOptimizerState`](super::CudaOptimizerState), which holds a [`StepState`] per device
//! kind.

mod device_state;
mod factored;
mod grouping;
mod launch;
mod outcome;
mod tables;

use std::collections::VecDeque;

use candle_core::{bail, Result, Tensor};

use candle_bnb_kernels::cuda::Backend;
use candle_bnb_kernels::slot_table::{dtype_code, CUDA_GRAD_NORM_HISTORY, NORM_CHUNK};
use candle_bnb_kernels::{CudaRule, ParamState};
use device_state::{state_addresses, upload_state, DeviceState};
use grouping::{group_params, Group};
use tables::Staging;

/// One parameter of a [`CudaOptimizerState`](super::CudaOptimizerState): the parameter tensor
/// (contiguous, `F32`, `F16` or `BF16`, on the state's CUDA device; on the CPU for the emulated
/// device), its initial state, its percentile-clipping setting (1..=100, 100 = off) and the
/// squared gradient norms recorded so far (at most [`CUDA_GRAD_NORM_HISTORY`], oldest first).
pub(crate) struct CudaParam<'a> {
    /// The parameter, updated in place by every step.
    pub(crate) param: &'a Tensor,
    /// Its optimizer state (host copy, uploaded).
    pub(crate) state: &'a ParamState,
    /// Percentile clipping, 1..=100 (100: off).
    pub(crate) percentile_clipping: u32,
    /// The squared gradient norms recorded so far, oldest first.
    pub(crate) grad_norms: &'a VecDeque<f64>,
}

/// What the device decided about a step once the host reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CudaStepOutcome {
    /// Every gradient was finite: the parameters with a gradient were updated.
    Taken,
    /// The gradient of the parameter with this index (the first one) was not finite: nothing
    /// changed on the device.
    Skipped {
        /// Index of the first parameter whose gradient holds NaN or ±inf.
        first_bad: usize,
    },
}

/// The state of an optimizer whose parameters are on one device of backend `B`, with what a
/// step launches: the host side of every CUDA step, the same code on a GPU and on the emulator.
pub(crate) struct StepState<B: Backend> {
    backend: B,
    params: Vec<Tensor>,
    states: Vec<DeviceState<B>>,
    /// Per parameter: the addresses of its state buffers and scales (fixed for its lifetime).
    state_ptrs: Vec<([u64; 3], [u64; 3])>,
    groups: Vec<Group<B>>,
    // The pre-pass buffers (norms.cu).
    partials: B::Buffer<f64>,
    sq: B::Buffer<f64>,
    percentile: B::Buffer<i32>,
    /// What `percentile` holds, to upload only changes.
    percentile_host: Vec<i32>,
    history: B::Buffer<f64>,
    history_count: B::Buffer<u64>,
    grad_scales: B::Buffer<f32>,
    /// `[skip, first_bad]`.
    flags: B::Buffer<i32>,
    /// The flags of the last step, copied back without waiting.
    outcome: B::Pinned<i32>,
    outcome_ready: B::Event,
    /// The parameter indices that had a gradient in the step whose outcome is pending, in
    /// pre-pass order (`first_bad` indexes this list).
    pending: Option<Vec<usize>>,
    /// Table copies issued so far (one per step that got as far as writing its tables).
    table_copies: u64,
    /// `table_copies` when `outcome_ready` was last recorded: everything issued before that
    /// record, this many table copies included, has run once the event is complete.
    outcome_after: u64,
    /// `outcome_after` of the last record the host has seen complete.
    seen_after: Option<u64>,
    staging: Option<Staging<B>>,
    /// The scratch buffers of factored parameters' steps (when there are such parameters).
    factored: Option<factored::FactoredBuffers<B>>,
}

impl<B: Backend> StepState<B> {
    /// Uploads the state of `params` to `backend` and allocates every buffer a step needs.
    ///
    /// # Errors
    /// A parameter not on the device, not contiguous, or not `F32`/`F16`/`BF16`; a state whose
    /// length differs from its parameter's; a percentile outside 1..=100; more than
    /// [`CUDA_GRAD_NORM_HISTORY`] recorded norms; more than `u32::MAX` parameters; CUDA errors.
    pub(crate) fn new(backend: B, params: &[CudaParam<'_>]) -> Result<Self> {
        let dev = &backend;
        if params.len() > u32::MAX as usize {
            bail!(
                "{} parameters; CUDA steps take at most {}",
                params.len(),
                u32::MAX
            )
        }
        let mut states = Vec::with_capacity(params.len());
        let mut percentile = Vec::with_capacity(params.len());
        let mut chunks = 0usize;
        for (i, p) in params.iter().enumerate() {
            let what = format!("CUDA optimizer state: parameter {i}");
            dev.tensor_address(p.param, &what)?;
            dtype_code(p.param.dtype())?;
            if !(1..=100).contains(&p.percentile_clipping) {
                bail!(
                    "{what}: percentile_clipping must be in 1..=100, got {}",
                    p.percentile_clipping
                )
            }
            percentile.push(p.percentile_clipping as i32);
            chunks += p.param.elem_count().div_ceil(NORM_CHUNK);
            states.push(upload_state(dev, p.param.elem_count(), p.state, &what)?);
        }
        let groups = group_params(dev, params, &states)?;
        let factored = factored::FactoredBuffers::new(dev, &states)?;
        let state_ptrs = states.iter().map(|s| state_addresses(dev, s)).collect();
        let n = params.len().max(1);
        // Padded to one entry: CUDA refuses empty allocations.
        percentile.resize(n, 100);
        let mut this = Self {
            params: params.iter().map(|p| p.param.clone()).collect(),
            states,
            state_ptrs,
            groups,
            partials: dev.alloc_zeros::<f64>(chunks.max(1))?,
            sq: dev.alloc_zeros::<f64>(n)?,
            percentile: dev.upload(&percentile)?,
            percentile_host: percentile[..params.len()].to_vec(),
            history: dev.alloc_zeros::<f64>(n * CUDA_GRAD_NORM_HISTORY)?,
            history_count: dev.alloc_zeros::<u64>(n)?,
            grad_scales: dev.alloc_zeros::<f32>(n)?,
            flags: dev.alloc_zeros::<i32>(2)?,
            outcome: dev.alloc_pinned::<i32>(2)?,
            outcome_ready: dev.new_event()?,
            pending: None,
            table_copies: 0,
            outcome_after: 0,
            seen_after: None,
            staging: None,
            factored,
            backend,
        };
        let norms: Vec<&VecDeque<f64>> = params.iter().map(|p| p.grad_norms).collect();
        this.upload_histories(&norms)?;
        Ok(this)
    }

    /// As [`CudaOptimizerState::step`](super::CudaOptimizerState::step).
    pub(crate) fn step<R: CudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        self.check_rules(grads, |i, state, rule| {
            if let DeviceState::Factored { .. } = state {
                bail!("CUDA step: parameter {i} holds a factored optimizer's state")
            }
            let n_states = self.n_states(i);
            if rule.signed_states().len() != n_states {
                bail!(
                    "CUDA step: gradient of parameter {i}: the rule keeps {} states per element, the state has {n_states}",
                    rule.signed_states().len()
                )
            }
            Ok(())
        })?;
        let inputs = self.prepare(grads.iter().map(|e| e.as_ref().map(|(g, _)| *g)))?;
        let tables = self.write_and_copy_tables(
            grads,
            &inputs.with_grad,
            &inputs.grad_address,
            &inputs.param_address,
        )?;
        self.launch_prepass(inputs.with_grad.len(), tables.total_chunks, max_grad_norm)?;
        // From here the pre-pass has run (history, clipping scales): the outcome is pending even
        // if a later launch fails.
        self.pending = Some(inputs.with_grad.clone());
        for (g, table) in tables.groups.iter().enumerate() {
            self.launch_group::<R>(g, table)?;
        }
        // The gradients copied to be contiguous are freed in stream order, after the kernels.
        drop(inputs);
        Ok(())
    }

    /// Checks that `grads` has one entry per parameter (an error names both counts) and each
    /// rule given against its parameter's state with `check(index, state, rule)`, before
    /// anything is written.
    fn check_rules<R>(
        &self,
        grads: &[Option<(&Tensor, R)>],
        check: impl Fn(usize, &DeviceState<B>, &R) -> Result<()>,
    ) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!(
                "CUDA step: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        for (i, entry) in grads.iter().enumerate() {
            if let Some((_, rule)) = entry {
                check(i, &self.states[i], rule)?;
            }
        }
        Ok(())
    }

    /// Checks each gradient against its parameter (shape, dtype, device) and takes the device
    /// addresses of both; nothing is launched unless every gradient is usable.
    fn prepare<'a>(
        &self,
        grads: impl Iterator<Item = Option<&'a Tensor>>,
    ) -> Result<StepInputs<B>> {
        let n = self.params.len();
        let mut inputs = StepInputs {
            with_grad: Vec::with_capacity(n),
            grad_address: vec![0u64; n],
            param_address: vec![0u64; n],
            contiguous: Vec::new(),
            holds: Vec::with_capacity(2 * n),
        };
        for (i, grad) in grads.enumerate() {
            let Some(grad) = grad else { continue };
            let param = &self.params[i];
            let what = format!("CUDA step: gradient of parameter {i}");
            if grad.dims() != param.dims() || grad.dtype() != param.dtype() {
                bail!(
                    "{what}: shape {:?} / dtype {:?}, the parameter has {:?} / {:?}",
                    grad.dims(),
                    grad.dtype(),
                    param.dims(),
                    param.dtype()
                )
            }
            let (address, hold) = if grad.is_contiguous() {
                self.backend.tensor_address(grad, &what)?
            } else {
                let g = grad.contiguous()?;
                let a = self.backend.tensor_address(&g, &what)?;
                inputs.contiguous.push(g);
                a
            };
            inputs.grad_address[i] = address;
            inputs.holds.push(hold);
            let (address, hold) = self
                .backend
                .tensor_address(param, &format!("CUDA step: parameter {i}"))?;
            inputs.param_address[i] = address;
            inputs.holds.push(hold);
            inputs.with_grad.push(i);
        }
        Ok(inputs)
    }

    /// As [`CudaOptimizerState::state_bytes`](super::CudaOptimizerState::state_bytes).
    pub(crate) fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .zip(&self.params)
            .map(|(s, p)| {
                let n = p.elem_count();
                match s {
                    DeviceState::F32(d) => d.len() * n * 4,
                    DeviceState::Blockwise {
                        codes, block_size, ..
                    } => codes.len() * (n + n.div_ceil(*block_size) * 4),
                    DeviceState::Factored(f) => f.bytes(n),
                }
            })
            .sum()
    }
}

/// What a step launches with: the parameters with a gradient (in order), the device addresses
/// of every gradient and parameter (0 without a gradient), and what keeps them valid until the
/// launches are issued (gradients copied to be contiguous, the backend's holds).
struct StepInputs<B: Backend> {
    with_grad: Vec<usize>,
    grad_address: Vec<u64>,
    param_address: Vec<u64>,
    contiguous: Vec<Tensor>,
    holds: Vec<B::Hold>,
}

impl<B: Backend> Drop for StepState<B> {
    /// Waits for the device before the pinned buffers are freed: their last copies may still be
    /// in flight, and cudarc tracks no events for them on a single stream.
    fn drop(&mut self) {
        let _ = self.backend.synchronize();
    }
}
