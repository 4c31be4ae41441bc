//! Lion.

use super::{sign, UpdateRule, MAX_STATES};

/// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms"), with decoupled weight
/// decay as in the paper: `c = b1*m + (1-b1)*g`, `p = p*(1 - lr*wd) - lr*sign(c)` (sign(0) = 0),
/// `m = b2*m + (1-b2)*g`. One state, the momentum `m` (signed).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct LionRule {
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    decay_factor: f32,
}

impl LionRule {
    /// The rule with these hyper-parameters (the step count does not enter Lion).
    pub fn new(lr: f64, beta1: f64, beta2: f64, weight_decay: f64) -> Self {
        Self {
            lr: lr as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            decay_factor: (1.0 - lr * weight_decay) as f32,
        }
    }
}

impl UpdateRule for LionRule {
    fn signed_states(&self) -> &'static [bool] {
        &[true]
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let m = state[0];
        let c = m * self.beta1 + grad * self.one_minus_beta1;
        state[0] = m * self.beta2 + grad * self.one_minus_beta2;
        param * self.decay_factor - self.lr * sign(c)
    }
}
