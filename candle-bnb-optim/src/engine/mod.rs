//! What every optimizer of the family shares: each parameter's tracked state, the step counters,
//! and the step itself with its gradient pre-pass (norms, clipping, non-finite policy), on the
//! CPU (`cpu.rs`) or on a CUDA device (`cuda.rs`; the pre-pass runs there as kernels).

mod cpu;
#[cfg(any(feature = "cuda", feature = "emulator"))]
mod cuda;
mod rule;
mod vars;

pub use rule::{Elementwise, Factored, StepRule};

pub(crate) use vars::{float_vars, sorted_vars, steppable_dtypes, unique_names};

use std::borrow::Cow;
use std::collections::VecDeque;

use candle_bnb_kernels::ParamState;
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Var};

use crate::settings::StateLayout;
use crate::Settings;

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

/// What a step needs of each parameter's config: its update rule and its settings. Every
/// optimizer config has it (`config.rs` implements it for each
/// [`OptimizerConfig`](crate::OptimizerConfig)).
pub trait StepConfig {
    /// The update rule the config makes.
    type Rule: StepRule;
    /// The update rule of a parameter's `step`-th step (1-based).
    fn rule(&self, step: u64) -> Self::Rule;
    /// Its state and gradient settings.
    fn step_settings(&self) -> &Settings;
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
    pub(crate) placement: Placement,
}

/// Where an optimizer's state lives and is stepped.
pub(crate) enum Placement {
    /// On the host, in each [`TrackedParam`]; the CPU kernels step it.
    Cpu,
    /// On a CUDA device, or on the emulated one (the `emulator` feature, for tests): the host
    /// keeps placeholders, CUDA launches step it.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    Cuda(crate::cuda::CudaOptimizerState),
}

impl TrackedParams {
    /// Initial state for each var: `setup(i)` gives the i-th var's state layout (from a
    /// validated config), step-1 rule and percentile-clipping setting. `vars` come from
    /// [`float_vars`](vars::float_vars).
    ///
    /// # Errors
    /// Parameters on more than one device, or on a device without optimizer kernels.
    pub(crate) fn new<R: StepRule>(
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
                let state = rule.initial_state(var.dims(), layout)?;
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
            placement: Placement::Cpu,
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

    /// Replaces every state, history and counter by a checkpoint's (already checked against
    /// these parameters).
    ///
    /// # Errors
    /// CUDA errors while uploading (the host side is then left unchanged).
    pub(crate) fn restore(&mut self, loaded: TrackedState) -> Result<()> {
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if let Placement::Cuda(_) = self.placement {
            return self.restore_cuda(loaded);
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
        if let Placement::Cuda(device) = &self.placement {
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
        if let Placement::Cuda(device) = &self.placement {
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
    /// gradient handling (`non_finite`, `max_grad_norm`). First the pre-pass: every gradient is
    /// checked (shape, dtype, device) and its squared norm taken, which also detects NaN/inf;
    /// nothing is changed until all pass. Then each parameter `i` with a gradient is updated by
    /// `params[i].rule(step)` on its clipped gradient, `step` being that parameter's own
    /// 1-based step count.
    pub(crate) fn step<C: StepConfig>(
        &mut self,
        grads: &GradStore,
        base: &C,
        params: &[C],
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
        match &self.placement {
            Placement::Cpu => self.step_cpu(grads, base.step_settings(), params),
            #[cfg(any(feature = "cuda", feature = "emulator"))]
            Placement::Cuda(_) => {
                C::Rule::step_on_device(self, grads, base.step_settings(), params)
            }
        }
    }

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|s| s.name.as_str())
    }

    pub(crate) fn state_bytes(&self) -> usize {
        #[cfg(any(feature = "cuda", feature = "emulator"))]
        if let Placement::Cuda(device) = &self.placement {
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
