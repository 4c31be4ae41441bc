//! Adafactor, as Hugging Face transformers implements it.

use super::factored::{FactoredRule, SecondMomentStep};

/// Adafactor (Shazeer & Stern 2018) with the semantics of Hugging Face transformers'
/// `Adafactor`: per parameter and step `t` (1-based), the step size `ρ` is the learning rate or,
/// with the relative step, `min(warmup_init ? 1e-6·t : 1e-2, 1/√t)`; `α = ρ·max(ε2, RMS(p))`
/// with `scale_parameter` (else `ρ`); the statistics decay by `1 - t^decay_rate`; the clipped
/// update `u` becomes `α·u`, with momentum `m ← β1·m + (1-β1)·α·u` and the step `m`; then
/// `p ← p - weight_decay·α·p` and `p ← p - step`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the layout of kernels/rules/*.cuh (FactoredCudaRule)
pub struct AdafactorRule {
    eps1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    clip_threshold: f32,
    /// `ρ` of this step.
    rho: f32,
    /// `ε2`, the floor of the parameter scale.
    eps2: f32,
    beta1: f32,
    one_minus_beta1: f32,
    weight_decay: f32,
    /// `α` once the parameter's RMS is known (`ρ` until then, or without the parameter scale).
    alpha: f32,
    /// `-weight_decay·α`.
    neg_decay: f32,
    /// 1 when `scale_parameter`.
    scale_parameter: u32,
    /// 1 when the parameter keeps a momentum (`beta1` given).
    momentum: u32,
}

/// Adafactor's step size: a fixed learning rate, or the relative step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AdafactorStepSize {
    /// `ρ = lr`.
    Fixed(f64),
    /// `ρ = min(warmup_init ? 1e-6·t : 1e-2, 1/√t)`.
    Relative {
        /// Warm up linearly from `1e-6`.
        warmup_init: bool,
    },
}

impl AdafactorStepSize {
    /// `ρ` at step `step` (1-based).
    pub fn rho(self, step: u64) -> f64 {
        match self {
            Self::Fixed(lr) => lr,
            Self::Relative { warmup_init } => {
                let t = step.max(1) as f64;
                let min_step = if warmup_init { 1e-6 * t } else { 1e-2 };
                min_step.min(1.0 / t.sqrt())
            }
        }
    }
}

impl AdafactorRule {
    /// The rule of step `step` (1-based): `eps = (ε1, ε2)`, `beta1: None` for no momentum.
    #[allow(clippy::too_many_arguments)] // Adafactor's own hyper-parameters, named as in transformers
    pub fn new(
        step: u64,
        step_size: AdafactorStepSize,
        eps: (f64, f64),
        clip_threshold: f64,
        decay_rate: f64,
        beta1: Option<f64>,
        weight_decay: f64,
        scale_parameter: bool,
    ) -> Self {
        let t = step.max(1) as f64;
        let beta2 = 1.0 - t.powf(decay_rate);
        let rho = step_size.rho(step);
        let b1 = beta1.unwrap_or(0.0);
        Self {
            eps1: eps.0 as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            clip_threshold: clip_threshold as f32,
            rho: rho as f32,
            eps2: eps.1 as f32,
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            weight_decay: weight_decay as f32,
            alpha: rho as f32,
            neg_decay: -(weight_decay as f32 * rho as f32),
            scale_parameter: scale_parameter as u32,
            momentum: beta1.is_some() as u32,
        }
    }

    /// `α`, the step's scale of the update (`ρ` until [`FactoredRule::with_param_rms`] gave the
    /// parameter's RMS, when `scale_parameter`).
    pub fn alpha(&self) -> f32 {
        self.alpha
    }
}

impl FactoredRule for AdafactorRule {
    fn second_moment(&self) -> SecondMomentStep {
        SecondMomentStep {
            eps1: self.eps1,
            beta2: self.beta2,
            one_minus_beta2: self.one_minus_beta2,
            clip_threshold: self.clip_threshold,
        }
    }

    fn has_momentum(&self) -> bool {
        self.momentum != 0
    }

    fn uses_param_rms(&self) -> bool {
        self.scale_parameter != 0
    }

    fn with_param_rms(&self, rms: f32) -> Self {
        if self.scale_parameter == 0 {
            return *self;
        }
        // `max` as Python's: a NaN RMS gives eps2.
        let scale = if rms > self.eps2 { rms } else { self.eps2 };
        let alpha = scale * self.rho;
        Self {
            alpha,
            neg_decay: -(self.weight_decay * alpha),
            ..*self
        }
    }

    #[inline(always)]
    fn apply(&self, param: f32, update: f32, momentum: &mut f32) -> f32 {
        let mut step = self.alpha * update;
        if self.momentum != 0 {
            *momentum = self.beta1 * *momentum + self.one_minus_beta1 * step;
            step = *momentum;
        }
        let decayed = param + self.neg_decay * param;
        decayed - step
    }
}
