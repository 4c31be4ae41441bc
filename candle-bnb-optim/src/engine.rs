//! What every optimizer of the family shares: each parameter's tracked state, the step counter,
//! the gradient pre-pass (norms, clipping, non-finite policy).

use std::borrow::Cow;
use std::collections::VecDeque;

use candle_bnb_kernels::{
    check_fused_update, fused_update, sum_squares, CudaRule, ParamState, ScaledGrad, UpdateRule,
};
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Result, Var};

use crate::settings::StateLayout;
use crate::{NonFinitePolicy, OptimizerConfig, Settings, GRAD_NORM_HISTORY};

/// One parameter with its name, state and gradient-norm history.
#[derive(Clone)]
pub(crate) struct TrackedParam {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) state: ParamState,
    /// Steps this parameter took (it skips steps where it has no gradient): rules see its own
    /// count, as torch keeps `state["step"]` per parameter.
    pub(crate) steps: u64,
    /// The last (up to [`GRAD_NORM_HISTORY`]) squared gradient norms, oldest first.
    pub(crate) grad_norms: VecDeque<f64>,
}

/// Everything [`TrackedParams`] holds besides the parameters themselves, in parameter order: what a
/// checkpoint restores.
pub(crate) struct TrackedState {
    pub(crate) states: Vec<ParamState>,
    pub(crate) grad_norms: Vec<VecDeque<f64>>,
    pub(crate) param_steps: Vec<u64>,
    pub(crate) steps: u64,
    pub(crate) skipped: u64,
}

/// The parameters of one optimizer with their state.
///
/// When every parameter is on one CUDA device (the `cuda` feature), or the optimizer was moved
/// to the emulated CUDA device (the `emulator` feature, for tests), the state lives there
/// (`device`), each `TrackedParam::state` is a placeholder of length 0 that only records the
/// state's kind (precision, count, block size), and `TrackedParam::grad_norms` is kept on the
/// device too; [`TrackedParams::synced`] gives a host copy. The device reports a step's outcome
/// (taken, or skipped for a non-finite gradient) asynchronously: `steps`, `skipped` and each
/// `TrackedParam::steps` count the steps whose outcome is known, the pending one is added by the
/// accessors.
pub struct TrackedParams {
    pub(crate) params: Vec<TrackedParam>,
    pub(crate) steps: u64,
    pub(crate) skipped: u64,
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    device: Option<crate::cuda::CudaOptimizerState>,
}

impl TrackedParams {
    /// Initial state for each var: `setup(i)` gives the i-th var's state layout (from a
    /// validated config), step-1 rule and percentile-clipping setting. `vars` come from
    /// [`float_vars`].
    ///
    /// # Errors
    /// Parameters on more than one device, or on a device without optimizer kernels.
    pub(crate) fn new<R: UpdateRule>(
        vars: Vec<(String, Var)>,
        setup: impl Fn(usize) -> (StateLayout, R, u32),
    ) -> Result<Self> {
        if let Some((first, v)) = vars.first() {
            if let Some((other, w)) = vars
                .iter()
                .find(|(_, w)| !w.device().same_device(v.device()))
            {
                bail!(
                    "the parameters of one optimizer must be on one device: {first:?} is on {:?}, {other:?} on {:?}",
                    v.device().location(),
                    w.device().location()
                )
            }
        }
        let params = vars
            .into_iter()
            .enumerate()
            .map(|(i, (name, var))| {
                let (layout, rule, _) = setup(i);
                let state = initial_state(&var, layout, &rule)?;
                Ok(TrackedParam {
                    name,
                    var,
                    state,
                    steps: 0,
                    grad_norms: VecDeque::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        #[allow(unused_mut)]
        let mut this = Self {
            params,
            steps: 0,
            skipped: 0,
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            device: None,
        };
        match this.params.first().map(|s| s.var.device().clone()) {
            None | Some(candle_core::Device::Cpu) => {}
            #[cfg(feature = "cuda")]
            Some(candle_core::Device::Cuda(dev)) => {
                let percentile: Vec<u32> = (0..this.params.len()).map(|i| setup(i).2).collect();
                this.move_to_device(&dev, &percentile)?;
            }
            Some(other) => bail!(
                "candle-bnb optimizers step parameters on the CPU{}; these are on {:?}",
                if cfg!(feature = "cuda") {
                    " or on CUDA"
                } else {
                    " (CUDA needs the `cuda` feature)"
                },
                other.location()
            ),
        }
        Ok(this)
    }

    /// Moves the state to `dev`, leaving placeholders on the host.
    #[cfg(feature = "cuda")]
    fn move_to_device(&mut self, dev: &candle_core::CudaDevice, percentile: &[u32]) -> Result<()> {
        let device = crate::cuda::CudaOptimizerState::new(dev, &self.device_params(percentile))?;
        self.adopt_device(device)
    }

    /// Moves the state to the emulated CUDA device `emu`, leaving placeholders on the host: the
    /// parameters stay CPU tensors, every later step runs the CUDA host code and kernels on the
    /// emulator. For tests; not a public promise.
    ///
    /// # Errors
    /// The parameters are not on the CPU; the state is on a device already.
    #[cfg(feature = "emulator")]
    pub(crate) fn emulate_cuda(
        &mut self,
        emu: &candle_bnb_kernels::emulator::Emulator,
        percentile: &[u32],
    ) -> Result<()> {
        if self.device.is_some() {
            bail!("the optimizer state is on a device already")
        }
        let device =
            crate::cuda::CudaOptimizerState::new_emulated(emu, &self.device_params(percentile))?;
        self.adopt_device(device)
    }

    /// What the device state is built from: every parameter with its host state.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn device_params(&self, percentile: &[u32]) -> Vec<crate::cuda::CudaParam<'_>> {
        self.params
            .iter()
            .zip(percentile)
            .map(|(s, &p)| crate::cuda::CudaParam {
                param: s.var.as_tensor(),
                state: &s.state,
                percentile_clipping: p,
                grad_norms: &s.grad_norms,
            })
            .collect()
    }

    /// Keeps `device` as the state, leaving placeholders on the host.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn adopt_device(&mut self, device: crate::cuda::CudaOptimizerState) -> Result<()> {
        let placeholders = self
            .params
            .iter()
            .map(|s| placeholder(&s.state))
            .collect::<Result<Vec<_>>>()?;
        for (slot, state) in self.params.iter_mut().zip(placeholders) {
            slot.state = state;
            slot.grad_norms.clear();
        }
        self.device = Some(device);
        Ok(())
    }

    /// Replaces every state, history and counter by a checkpoint's (already checked against
    /// these parameters).
    ///
    /// # Errors
    /// CUDA errors while uploading (the host side is then left unchanged).
    pub(crate) fn restore(&mut self, loaded: TrackedState) -> Result<()> {
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if self.device.is_some() {
            let states: Vec<&ParamState> = loaded.states.iter().collect();
            let norms: Vec<&VecDeque<f64>> = loaded.grad_norms.iter().collect();
            let device = self.device.as_ref().expect("checked");
            device.check_upload(&states, &norms)?;
            // The pending step is superseded by the checkpoint, but is counted first so that a
            // CUDA error while uploading leaves consistent counters.
            self.settle_cuda_outcome(true)?;
            let device = self.device.as_mut().expect("checked");
            device.upload(&states, &norms)?;
            for (slot, steps) in self.params.iter_mut().zip(loaded.param_steps) {
                slot.steps = steps;
            }
            self.steps = loaded.steps;
            self.skipped = loaded.skipped;
            return Ok(());
        }
        for (slot, (state, (steps, norms))) in self.params.iter_mut().zip(
            loaded
                .states
                .into_iter()
                .zip(loaded.param_steps.into_iter().zip(loaded.grad_norms)),
        ) {
            slot.state = state;
            slot.steps = steps;
            slot.grad_norms = norms;
        }
        self.steps = loaded.steps;
        self.skipped = loaded.skipped;
        Ok(())
    }

    /// Steps taken so far (on CUDA, including the last one once the device decided it).
    pub(crate) fn step_count(&self) -> u64 {
        match self.pending_outcome() {
            Some(true) => self.steps + 1,
            _ => self.steps,
        }
    }

    /// Steps skipped so far for a non-finite gradient.
    pub(crate) fn skipped_count(&self) -> u64 {
        match self.pending_outcome() {
            Some(false) => self.skipped + 1,
            _ => self.skipped,
        }
    }

    /// Whether the step still pending on the device was taken (`None`: no pending step, or on
    /// the CPU). A CUDA error here reads as "no pending step"; the next step reports it.
    fn pending_outcome(&self) -> Option<bool> {
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if let Some(device) = &self.device {
            return match device.peek_outcome() {
                Ok(Some(crate::cuda::CudaStepOutcome::Taken)) => Some(true),
                Ok(Some(crate::cuda::CudaStepOutcome::Skipped { .. })) => Some(false),
                _ => None,
            };
        }
        None
    }

    /// These parameters with every state on the host: themselves on the CPU, a copy downloaded from
    /// the device (pending step included) on CUDA.
    ///
    /// # Errors
    /// CUDA errors.
    pub(crate) fn synced(&self) -> Result<Cow<'_, [TrackedParam]>> {
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if let Some(device) = &self.device {
            let pending = match device.peek_outcome()? {
                Some(crate::cuda::CudaStepOutcome::Taken) => device.pending_params(),
                _ => &[],
            };
            let host = device.download()?;
            return Ok(Cow::Owned(
                self.params
                    .iter()
                    .zip(host)
                    .enumerate()
                    .map(|(i, (slot, (state, grad_norms)))| TrackedParam {
                        name: slot.name.clone(),
                        var: slot.var.clone(),
                        state,
                        steps: slot.steps + pending.contains(&i) as u64,
                        grad_norms,
                    })
                    .collect(),
            ));
        }
        Ok(Cow::Borrowed(&self.params))
    }

    /// One step of parameters whose configs are `params` (one per parameter), with `base`'s
    /// gradient handling (`non_finite`, `max_grad_norm`): [`Self::step`] with their rules.
    pub(crate) fn step_with<C: OptimizerConfig>(
        &mut self,
        grads: &GradStore,
        base: &C,
        params: &[C],
    ) -> Result<()> {
        self.step(
            grads,
            base.settings(),
            |i| params[i].settings().percentile_clipping,
            |i, t| params[i].rule(t),
        )
    }

    /// One step. First the pre-pass: every gradient is checked (shape, dtype, device) and its
    /// squared norm taken, which also detects NaN/inf; nothing is changed until all pass. Then
    /// each parameter `i` with a gradient is updated by `make_rule(i, step)` on its clipped
    /// gradient, `step` being that parameter's own 1-based step count; `percentile(i)` is its
    /// percentile-clipping setting.
    pub(crate) fn step<R: CudaRule>(
        &mut self,
        grads: &GradStore,
        handling: &Settings,
        percentile: impl Fn(usize) -> u32,
        make_rule: impl Fn(usize, u64) -> R,
    ) -> Result<()> {
        // Counters that cannot grow are refused before anything changes (checkpoints refuse
        // such counts, so this takes 2^64 steps to reach).
        if self.steps == u64::MAX || self.skipped == u64::MAX {
            bail!(
                "the step counters are exhausted ({} steps, {} skipped)",
                self.steps,
                self.skipped
            )
        }
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if self.device.is_some() {
            return self.step_cuda(grads, handling, percentile, make_rule);
        }
        let mut norms: Vec<Option<f64>> = Vec::with_capacity(self.params.len());
        for (i, slot) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(&slot.var) else {
                norms.push(None);
                continue;
            };
            let rule = make_rule(i, slot.steps + 1);
            check_fused_update(&rule, slot.var.as_tensor(), grad, &slot.state).map_err(|e| {
                e.context(format!(
                    "parameter {i} {:?} (shape {:?})",
                    slot.name,
                    slot.var.dims()
                ))
            })?;
            let sq = sum_squares(grad)?;
            if !sq.is_finite() {
                match handling.non_finite {
                    NonFinitePolicy::Skip => {
                        self.skipped += 1;
                        return Ok(());
                    }
                    NonFinitePolicy::Error => bail!(
                        "the gradient of parameter {i} {:?} (shape {:?}) is not finite",
                        slot.name,
                        slot.var.dims()
                    ),
                }
            }
            norms.push(Some(sq));
        }
        let global_scale = match handling.max_grad_norm {
            Some(max) => {
                let total = norms.iter().flatten().sum::<f64>().sqrt();
                (max / (total + 1e-6)).min(1.0)
            }
            None => 1.0,
        };
        self.steps += 1;
        for (i, (slot, sq)) in self.params.iter_mut().zip(norms).enumerate() {
            let (Some(sq), Some(grad)) = (sq, grads.get(&slot.var)) else {
                continue;
            };
            let scale = global_scale * percentile_scale(&mut slot.grad_norms, sq, percentile(i));
            fused_update(
                &ScaledGrad::new(make_rule(i, slot.steps + 1), scale as f32),
                slot.var.as_tensor(),
                grad,
                &mut slot.state,
            )?;
            slot.steps += 1;
        }
        Ok(())
    }

    /// The CUDA step: the pre-pass, clipping and every update run on the device (see
    /// `crate::cuda::CudaOptimizerState`). The last step's outcome is read first, so the
    /// rules are built from exact step counts; that read finds the device long done in a
    /// training loop. `NonFinitePolicy::Error` waits for this step's pre-pass to report.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn step_cuda<R: CudaRule>(
        &mut self,
        grads: &GradStore,
        handling: &Settings,
        percentile: impl Fn(usize) -> u32,
        make_rule: impl Fn(usize, u64) -> R,
    ) -> Result<()> {
        use crate::cuda::CudaStepOutcome;
        self.settle_cuda_outcome(true)?;
        let percentiles: Vec<u32> = (0..self.params.len()).map(&percentile).collect();
        let device = self.device.as_mut().expect("checked by the caller");
        device.set_percentiles(&percentiles)?;
        let inputs: Vec<Option<(&candle_core::Tensor, R)>> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                grads
                    .get(&slot.var)
                    .map(|g| (g, make_rule(i, slot.steps + 1)))
            })
            .collect();
        let skip = handling.non_finite == NonFinitePolicy::Skip;
        device
            .step(&inputs, handling.max_grad_norm)
            .map_err(|e| e.context("CUDA optimizer step"))?;
        if !skip {
            // NonFinitePolicy::Error: this step's outcome decides what `step` returns. A refused
            // step is not a skipped one.
            if let Some(CudaStepOutcome::Skipped { first_bad }) = self.settle_cuda_outcome(false)? {
                let slot = &self.params[first_bad];
                bail!(
                    "the gradient of parameter {first_bad} {:?} (shape {:?}) is not finite",
                    slot.name,
                    slot.var.dims()
                )
            }
        }
        Ok(())
    }

    /// Counts the outcome of the step still pending on the device, if any (waiting for it only
    /// if the device has not finished that step's pre-pass), and returns it. A skipped step is
    /// counted in `skipped` when `count_skipped` (NonFinitePolicy::Skip).
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn settle_cuda_outcome(
        &mut self,
        count_skipped: bool,
    ) -> Result<Option<crate::cuda::CudaStepOutcome>> {
        use crate::cuda::CudaStepOutcome;
        let Some(device) = self.device.as_mut() else {
            return Ok(None);
        };
        let Some((outcome, with_grad)) = device.take_outcome()? else {
            return Ok(None);
        };
        match outcome {
            CudaStepOutcome::Taken => {
                self.steps += 1;
                for i in with_grad {
                    self.params[i].steps += 1;
                }
            }
            CudaStepOutcome::Skipped { .. } => self.skipped += count_skipped as u64,
        }
        Ok(Some(outcome))
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|s| s.name.as_str())
    }

    pub(crate) fn state_bytes(&self) -> usize {
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if let Some(device) = &self.device {
            return device.state_bytes();
        }
        self.params.iter().map(|s| s.state.bytes()).sum()
    }

    /// Each parameter with its state (downloaded from the device on CUDA).
    ///
    /// # Errors
    /// CUDA errors.
    pub(crate) fn states(&self) -> Result<Vec<(&Var, Cow<'_, ParamState>)>> {
        let synced = self.synced()?;
        Ok(match synced {
            Cow::Borrowed(params) => params
                .iter()
                .map(|s| (&s.var, Cow::Borrowed(&s.state)))
                .collect(),
            Cow::Owned(params) => self
                .params
                .iter()
                .zip(params)
                .map(|(s, copy)| (&s.var, Cow::Owned(copy.state)))
                .collect(),
        })
    }
}

/// A state of the same kind as `state` (precision, count, maps, block size) with no elements:
/// what the host keeps of a state that lives on a device.
#[cfg(any(feature = "cuda", feature = "emulator"))]
fn placeholder(state: &ParamState) -> Result<ParamState> {
    Ok(match state {
        ParamState::F32(s) => ParamState::F32(vec![Vec::new(); s.len()]),
        ParamState::Blockwise(s) => ParamState::Blockwise(
            s.iter()
                .map(|s| {
                    candle_bnb_kernels::BlockwiseState::zeros(0, s.map().clone(), s.block_size())
                })
                .collect::<Result<_>>()?,
        ),
    })
}

/// The state a fresh optimizer gives `var`.
pub(crate) fn initial_state<R: UpdateRule>(
    var: &Var,
    layout: StateLayout,
    rule: &R,
) -> Result<ParamState> {
    let n = var.elem_count();
    if layout.optim_bits == 8 && n >= layout.min_8bit_size {
        ParamState::new_blockwise(rule, n, layout.block_size)
    } else {
        Ok(ParamState::new_f32(rule, n))
    }
}

/// Records the squared norm `sq` and returns the gradient scale of percentile clipping
/// (bitsandbytes ≤ 0.49): the clip value is the `percentile`-th percentile of the recorded
/// norms (this one included); a larger norm is scaled down to it. bitsandbytes starts from 100
/// zero norms, which zeroes the first updates; here only norms actually seen count, the
/// percentile taken over the `k` recorded (`k ≤ 100`, index `⌊percentile·k/100⌋`).
pub(crate) fn percentile_scale(history: &mut VecDeque<f64>, sq: f64, percentile: u32) -> f64 {
    if percentile >= 100 {
        return 1.0;
    }
    if history.len() == GRAD_NORM_HISTORY {
        history.pop_front();
    }
    history.push_back(sq);
    let mut sorted: Vec<f64> = history.iter().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let index = (percentile as usize * sorted.len() / 100).min(sorted.len() - 1);
    let (clip, current) = (sorted[index].sqrt(), sq.sqrt());
    if current > clip {
        clip / current
    } else {
        1.0
    }
}

/// The variables of `varmap` with their names, sorted by name.
pub(crate) fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The floating-point vars among `vars` (integer ones are ignored, as in candle-nn).
///
/// # Errors
/// A name given twice, one var given under two names (it would be stepped twice, with two
/// states), or a float dtype the update kernels do not take (F64, F8 and the like: every step
/// would fail).
pub(crate) fn float_vars(vars: Vec<(String, Var)>) -> Result<Vec<(String, Var)>> {
    let mut names = std::collections::HashSet::new();
    for (name, _) in &vars {
        if !names.insert(name.as_str()) {
            bail!("parameter name {name:?} is given twice")
        }
    }
    let vars: Vec<(String, Var)> = vars
        .into_iter()
        .filter(|(_, v)| v.dtype().is_float())
        .collect();
    let mut ids = std::collections::HashMap::new();
    for (name, var) in &vars {
        if let Some(first) = ids.insert(var.id(), name.as_str()) {
            bail!("one parameter is given twice, as {first:?} and as {name:?}")
        }
    }
    if let Some((name, var)) = vars
        .iter()
        .find(|(_, v)| !matches!(v.dtype(), DType::F32 | DType::F16 | DType::BF16))
    {
        bail!(
            "parameter {name:?} has dtype {:?}; the optimizers step F32, F16 and BF16 parameters",
            var.dtype()
        )
    }
    Ok(vars)
}
