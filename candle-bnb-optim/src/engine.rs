//! What every optimizer of the family shares: per-parameter state slots, the step counter, the
//! gradient pre-pass and the non-finite policy.

use candle_bnb_kernels::{all_finite, check_fused_update, fused_update, ParamState, UpdateRule};
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

struct Slot {
    var: Var,
    state: ParamState,
}

/// The parameters of one optimizer with their state.
pub(crate) struct Slots {
    slots: Vec<Slot>,
    steps: u64,
    skipped: u64,
}

impl Slots {
    /// Zero state for every floating-point var (others are ignored, as in candle-nn): 8-bit when
    /// `optim_bits == 8` and the var has at least `min_8bit_size` elements, else f32.
    pub(crate) fn new<R: UpdateRule>(
        vars: Vec<Var>,
        layout: StateLayout,
        rule: &R,
    ) -> Result<Self> {
        layout.validate()?;
        let slots = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let n = var.elem_count();
                let state = if layout.optim_bits == 8 && n >= layout.min_8bit_size {
                    ParamState::new_blockwise(rule, n, layout.block_size)?
                } else {
                    ParamState::new_f32(rule, n)
                };
                Ok(Slot { var, state })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            steps: 0,
            skipped: 0,
        })
    }

    /// One step: check every gradient first (finite, matching shapes, dtypes, devices), then
    /// update each parameter that has one with the rule `make_rule(step)`.
    pub(crate) fn step<R: UpdateRule>(
        &mut self,
        grads: &GradStore,
        policy: NonFinitePolicy,
        make_rule: impl FnOnce(u64) -> R,
    ) -> Result<()> {
        let rule = make_rule(self.steps + 1);
        for (i, slot) in self.slots.iter().enumerate() {
            let Some(grad) = grads.get(&slot.var) else {
                continue;
            };
            check_fused_update(&rule, slot.var.as_tensor(), grad, &slot.state)
                .map_err(|e| e.context(format!("parameter {i} (shape {:?})", slot.var.dims())))?;
            if !all_finite(grad)? {
                match policy {
                    NonFinitePolicy::Skip => {
                        self.skipped += 1;
                        return Ok(());
                    }
                    NonFinitePolicy::Error => {
                        bail!(
                            "the gradient of parameter {i} (shape {:?}) is not finite",
                            slot.var.dims()
                        )
                    }
                }
            }
        }
        self.steps += 1;
        for slot in self.slots.iter_mut() {
            if let Some(grad) = grads.get(&slot.var) {
                fused_update(&rule, slot.var.as_tensor(), grad, &mut slot.state)?;
            }
        }
        Ok(())
    }

    pub(crate) fn steps(&self) -> u64 {
        self.steps
    }

    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }

    pub(crate) fn state_bytes(&self) -> usize {
        self.slots.iter().map(|s| s.state.bytes()).sum()
    }

    pub(crate) fn states(&self) -> impl Iterator<Item = (&Var, &ParamState)> {
        self.slots.iter().map(|s| (&s.var, &s.state))
    }
}
