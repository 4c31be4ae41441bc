//! What every optimizer of the family shares: per-parameter state slots, the step counter, the
//! gradient pre-pass (norms, clipping, non-finite policy).

use std::collections::VecDeque;

use candle_bnb_kernels::{
    check_fused_update, fused_update, sum_squares, ParamState, ScaledGrad, UpdateRule,
};
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Var};

/// What a step does when some gradient holds NaN or ±inf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinitePolicy {
    /// Skip the whole step: every parameter and state stays bit-identical, and the step is
    /// counted in `skipped_steps()` instead of the step count.
    #[default]
    Skip,
    /// Return an error naming the first offending parameter (nothing is changed).
    Error,
}

/// Squared gradient norms kept per parameter for percentile clipping (as bitsandbytes does).
pub const GRAD_NORM_HISTORY: usize = 100;

/// How state is stored, shared by every optimizer config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StateLayout {
    pub(crate) optim_bits: u32,
    pub(crate) min_8bit_size: usize,
    pub(crate) block_size: usize,
}

impl StateLayout {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.optim_bits != 8 && self.optim_bits != 32 {
            bail!("optim_bits must be 8 or 32, got {}", self.optim_bits)
        }
        if !candle_bnb_kernels::SUPPORTED_BLOCK_SIZES.contains(&self.block_size) {
            bail!(
                "block_size {} is not supported; use one of {:?}",
                self.block_size,
                candle_bnb_kernels::SUPPORTED_BLOCK_SIZES
            )
        }
        Ok(())
    }
}

/// The gradient pre-pass settings shared by every optimizer config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GradHandling {
    pub(crate) non_finite: NonFinitePolicy,
    pub(crate) max_grad_norm: Option<f64>,
    pub(crate) percentile_clipping: u32,
}

impl GradHandling {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(max) = self.max_grad_norm {
            if !(max.is_finite() && max > 0.0) {
                bail!("max_grad_norm must be finite and > 0, got {max}")
            }
        }
        if !(1..=100).contains(&self.percentile_clipping) {
            bail!(
                "percentile_clipping must be in 1..=100 (100: off), got {}",
                self.percentile_clipping
            )
        }
        Ok(())
    }
}

/// One parameter with its name, state and gradient-norm history.
pub(crate) struct Slot {
    pub(crate) name: String,
    pub(crate) var: Var,
    pub(crate) state: ParamState,
    /// Steps this parameter took (it skips steps where it has no gradient): rules see its own
    /// count, as torch keeps `state["step"]` per parameter.
    pub(crate) steps: u64,
    /// The last (up to [`GRAD_NORM_HISTORY`]) squared gradient norms, oldest first.
    pub(crate) grad_norms: VecDeque<f64>,
}

/// The parameters of one optimizer with their state.
pub(crate) struct Slots {
    pub(crate) slots: Vec<Slot>,
    pub(crate) steps: u64,
    pub(crate) skipped: u64,
}

impl Slots {
    /// Initial state for each var: `setup(i)` gives the i-th var's state layout (from a
    /// validated config) and step-1 rule. `vars` come from [`float_vars`].
    pub(crate) fn new<R: UpdateRule>(
        vars: Vec<(String, Var)>,
        setup: impl Fn(usize) -> (StateLayout, R),
    ) -> Result<Self> {
        let slots = vars
            .into_iter()
            .enumerate()
            .map(|(i, (name, var))| {
                let (layout, rule) = setup(i);
                let state = initial_state(&var, layout, &rule)?;
                Ok(Slot {
                    name,
                    var,
                    state,
                    steps: 0,
                    grad_norms: VecDeque::new(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            steps: 0,
            skipped: 0,
        })
    }

    /// Replaces every state, history and counter by a checkpoint's (already checked against
    /// these slots).
    pub(crate) fn restore(&mut self, loaded: crate::checkpoint::Loaded) {
        for (slot, (state, (steps, norms))) in self.slots.iter_mut().zip(
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
    }

    /// One step. First the pre-pass: every gradient is checked (shape, dtype, device) and its
    /// squared norm taken, which also detects NaN/inf; nothing is changed until all pass. Then
    /// each parameter `i` with a gradient is updated by `make_rule(i, step)` on its clipped
    /// gradient, `step` being that parameter's own 1-based step count; `percentile(i)` is its
    /// percentile-clipping setting.
    pub(crate) fn step<R: UpdateRule>(
        &mut self,
        grads: &GradStore,
        handling: GradHandling,
        percentile: impl Fn(usize) -> u32,
        make_rule: impl Fn(usize, u64) -> R,
    ) -> Result<()> {
        let mut norms: Vec<Option<f64>> = Vec::with_capacity(self.slots.len());
        for (i, slot) in self.slots.iter().enumerate() {
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
        for (i, (slot, sq)) in self.slots.iter_mut().zip(norms).enumerate() {
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

    pub(crate) fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    pub(crate) fn state_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.state.bytes()).sum()
    }

    pub(crate) fn states(&self) -> impl Iterator<Item = (&Var, &ParamState)> {
        self.slots.iter().map(|s| (&s.var, &s.state))
    }
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

/// The floating-point vars among `vars` (others are ignored, as in candle-nn).
///
/// # Errors
/// A name given twice.
pub(crate) fn float_vars(vars: Vec<(String, Var)>) -> Result<Vec<(String, Var)>> {
    let mut seen = std::collections::HashSet::new();
    for (name, _) in &vars {
        if !seen.insert(name.as_str()) {
            bail!("parameter name {name:?} is given twice")
        }
    }
    Ok(vars
        .into_iter()
        .filter(|(_, v)| v.dtype().is_float())
        .collect())
}
