//! The rules of factored-second-moment optimizers (Adafactor, CAME): what their steps share and
//! what each computes per element. The passes over a parameter (row and column statistics, the
//! update's RMS, the update) are the kernels' (`cpu/factored.rs`); a rule holds the step's
//! scalars and the per-element math, written once for the 8-bit and the 32-bit momentum.

use super::{CameRule, ScaledGrad};

/// The second-moment statistics' step, shared by every factored rule: the gradient's squares
/// plus `eps1` are averaged per row and per column (or kept per element for tensors of fewer
/// than two dims) into exponential averages with decay `beta2`, and the update they give is
/// divided by `max(1, RMS(update) / clip_threshold)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SecondMomentStep {
    /// Added to each squared gradient before averaging (Adafactor's and CAME's `eps[0]`).
    pub eps1: f32,
    /// The statistics' decay this step.
    pub beta2: f32,
    /// `1 - beta2`, rounded once from f64.
    pub one_minus_beta2: f32,
    /// The update's RMS bound (`clip_threshold`).
    pub clip_threshold: f32,
}

impl SecondMomentStep {
    /// The step with these values (`beta2` in f64, as the optimizers' configs hold it).
    pub fn new(eps1: f64, beta2: f64, clip_threshold: f64) -> Self {
        Self {
            eps1: eps1 as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            clip_threshold: clip_threshold as f32,
        }
    }
}

/// The per-element math of one step of a factored-second-moment optimizer.
///
/// A parameter of two or more dims `[..., n, m]` keeps per leading index a row statistic of `n`
/// values and a column statistic of `m`; a parameter of fewer dims keeps one statistic per
/// element. Both give the clipped update `u` of each element (see [`SecondMomentStep`]); the
/// kernels then call [`FactoredRule::apply`] with it. A rule with a
/// [`confidence`](FactoredRule::confidence) step (CAME) instead advances the momentum first,
/// averages the residuals it returns into row and column statistics, and steps the parameter
/// by the momentum weighted by them; its parameters of fewer than two dims take
/// [`FactoredRule::apply`].
pub trait FactoredRule: Sync + Send + Clone {
    /// The second-moment statistics' step.
    fn second_moment(&self) -> SecondMomentStep;

    /// Whether the parameter keeps a momentum (one signed value per element).
    fn has_momentum(&self) -> bool;

    /// The confidence step of CAME; `None` for rules without one.
    fn confidence(&self) -> Option<CameRule> {
        None
    }

    /// Whether [`FactoredRule::with_param_rms`] needs the parameter's RMS (before the step).
    fn uses_param_rms(&self) -> bool {
        false
    }

    /// This rule for a parameter whose RMS (`‖p‖ / √n`, before the step) is `rms`.
    fn with_param_rms(&self, rms: f32) -> Self {
        let _ = rms;
        self.clone()
    }

    /// What every gradient element is multiplied by before the step (gradient clipping); 1
    /// unless wrapped in [`ScaledGrad`].
    fn grad_scale(&self) -> f32 {
        1.0
    }

    /// Updates one element from its clipped update `update`: returns the new parameter value
    /// and advances `momentum` (left alone without one).
    fn apply(&self, param: f32, update: f32, momentum: &mut f32) -> f32;
}

impl<R: FactoredRule> FactoredRule for ScaledGrad<R> {
    fn second_moment(&self) -> SecondMomentStep {
        self.rule.second_moment()
    }

    fn has_momentum(&self) -> bool {
        self.rule.has_momentum()
    }

    fn confidence(&self) -> Option<CameRule> {
        self.rule.confidence()
    }

    fn uses_param_rms(&self) -> bool {
        self.rule.uses_param_rms()
    }

    fn with_param_rms(&self, rms: f32) -> Self {
        Self {
            rule: self.rule.with_param_rms(rms),
            scale: self.scale,
        }
    }

    fn grad_scale(&self) -> f32 {
        self.rule.grad_scale() * self.scale
    }

    #[inline(always)]
    fn apply(&self, param: f32, update: f32, momentum: &mut f32) -> f32 {
        self.rule.apply(param, update, momentum)
    }
}
