//! CAME, as its authors' `came_pytorch` implements it.

use super::factored::{FactoredRule, SecondMomentStep};

/// CAME (Luo et al. 2023, "Confidence-guided Adaptive Memory Efficient Optimization") with the
/// semantics of `came_pytorch` 0.1.3: the clipped update `u` (see
/// [`SecondMomentStep`]) drives the momentum `m ← β1·m + (1-β1)·u`; for parameters of two or
/// more dims the residuals `(u - m)² + ε2` (with the new `m`) are averaged per row and column
/// with decay `β3`, and the step is `m` divided by their factored root; for the others it is
/// `m`. Then `p ← p - weight_decay·lr·p` and `p ← p - lr·step`. The step count does not enter.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the layout of kernels/rules/*.cuh (FactoredCudaRule)
pub struct CameRule {
    eps1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    clip_threshold: f32,
    eps2: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta3: f32,
    one_minus_beta3: f32,
    lr: f32,
    /// `-weight_decay·lr`.
    neg_decay: f32,
}

impl CameRule {
    /// The rule: `eps = (ε1, ε2)`, `betas = (β1, β2, β3)`.
    pub fn new(
        lr: f64,
        eps: (f64, f64),
        clip_threshold: f64,
        betas: (f64, f64, f64),
        weight_decay: f64,
    ) -> Self {
        let (beta1, beta2, beta3) = betas;
        Self {
            eps1: eps.0 as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            clip_threshold: clip_threshold as f32,
            eps2: eps.1 as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta3: beta3 as f32,
            one_minus_beta3: (1.0 - beta3) as f32,
            lr: lr as f32,
            neg_decay: -(weight_decay * lr) as f32,
        }
    }

    /// The residual statistics' decay `β3` and `1 - β3`.
    pub fn beta3(&self) -> (f32, f32) {
        (self.beta3, self.one_minus_beta3)
    }

    /// Advances the momentum by the clipped update and returns the residual
    /// `(update - m)² + ε2` with the new `m`.
    #[inline(always)]
    pub fn residual(&self, update: f32, momentum: &mut f32) -> f32 {
        let m = self.beta1 * *momentum + self.one_minus_beta1 * update;
        *momentum = m;
        let r = update - m;
        r * r + self.eps2
    }

    /// The new parameter value from the confidence-weighted momentum `direction`.
    #[inline(always)]
    pub fn apply_confident(&self, param: f32, direction: f32) -> f32 {
        let decayed = param + self.neg_decay * param;
        decayed - self.lr * direction
    }
}

impl FactoredRule for CameRule {
    fn second_moment(&self) -> SecondMomentStep {
        SecondMomentStep {
            eps1: self.eps1,
            beta2: self.beta2,
            one_minus_beta2: self.one_minus_beta2,
            clip_threshold: self.clip_threshold,
        }
    }

    fn has_momentum(&self) -> bool {
        true
    }

    fn confidence(&self) -> Option<CameRule> {
        Some(*self)
    }

    #[inline(always)]
    fn apply(&self, param: f32, update: f32, momentum: &mut f32) -> f32 {
        let m = self.beta1 * *momentum + self.one_minus_beta1 * update;
        *momentum = m;
        self.apply_confident(param, m)
    }
}
