//! The step on the CPU: the gradient pre-pass (checks, squared norms, the non-finite policy),
//! global and percentile clipping, then each parameter's update by the CPU kernels.

use std::collections::VecDeque;

use candle_bnb_kernels::sum_squares;
use candle_core::backprop::GradStore;
use candle_core::{bail, Result};

use super::{StepConfig, StepRule, TrackedParams};
use crate::{NonFinitePolicy, Settings, GRAD_NORM_HISTORY};

impl TrackedParams {
    /// The CPU step of [`TrackedParams::step`]: the pre-pass (checks, squared norms, the
    /// non-finite policy), clipping, then each update by the CPU kernels.
    pub(super) fn step_cpu<C: StepConfig>(
        &mut self,
        grads: &GradStore,
        handling: &Settings,
        params: &[C],
    ) -> Result<()> {
        let mut norms: Vec<Option<f64>> = Vec::with_capacity(self.params.len());
        for (i, slot) in self.params.iter().enumerate() {
            let Some(grad) = grads.get(&slot.var) else {
                norms.push(None);
                continue;
            };
            let rule = params[i].rule(slot.steps + 1);
            rule.check(slot.var.as_tensor(), grad, &slot.state)
                .map_err(|e| {
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
            let scale = global_scale
                * percentile_scale(
                    &mut slot.grad_norms,
                    sq,
                    params[i].step_settings().percentile_clipping,
                );
            params[i].rule(slot.steps + 1).update(
                scale as f32,
                slot.var.as_tensor(),
                grad,
                &mut slot.state,
            )?;
            slot.steps += 1;
        }
        Ok(())
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
