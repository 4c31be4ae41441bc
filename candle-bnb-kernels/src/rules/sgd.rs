//! SGD with momentum, and LARS: the SGD direction, stepped directly or scaled by a trust ratio.

use super::{trust_ratio, UpdateRule, MAX_STATES};

/// Stochastic gradient descent as `torch.optim.SGD` defines it: `g += wd*p`; with momentum,
/// `buf = g` on the first step and `buf = momentum*buf + (1-dampening)*g` after, then
/// `g = g + momentum*buf` (Nesterov) or `g = buf`; finally `p -= lr*g`. One state (the momentum
/// buffer, signed) when `momentum != 0`, none otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct SgdRule {
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
    nesterov: bool,
    first_step: bool,
    /// Explicit padding, so that every byte of the struct is initialised (the CUDA host copies
    /// rules as bytes).
    pad: [u8; 2],
}

impl SgdRule {
    /// The rule for step `step` (1-based: step 1 initialises the momentum buffer to the gradient).
    pub fn new(
        step: u64,
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
    ) -> Self {
        Self {
            lr: lr as f32,
            momentum: momentum as f32,
            one_minus_dampening: (1.0 - dampening) as f32,
            weight_decay: weight_decay as f32,
            nesterov,
            first_step: step <= 1,
            pad: [0; 2],
        }
    }
}

impl UpdateRule for SgdRule {
    fn signed_states(&self) -> &'static [bool] {
        if self.momentum != 0.0 {
            &[true]
        } else {
            &[]
        }
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        param - self.lr * self.direction(param, grad, state)
    }

    #[inline(always)]
    fn direction(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let g = grad + self.weight_decay * param;
        if self.momentum == 0.0 {
            return g;
        }
        let buf = if self.first_step {
            g
        } else {
            self.momentum * state[0] + self.one_minus_dampening * g
        };
        state[0] = buf;
        if self.nesterov {
            g + self.momentum * buf
        } else {
            buf
        }
    }
}

/// LARS (You et al., "Large Batch Training of Convolutional Networks") as bitsandbytes defines
/// it: the SGD direction `d` of [`SgdRule`] (L2 decay, momentum, dampening, Nesterov) and the
/// layer-wise step `p -= lr * r * d`, with the trust ratio `r = min(1, max_unorm*‖p‖/‖d‖)`
/// (1 when `max_unorm` is 0 or either norm is 0). States as SGD's.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct LarsRule {
    sgd: SgdRule,
    max_unorm: f32,
    trust: f32,
}

impl LarsRule {
    /// The rule for step `step` (1-based); the trust ratio is 1 until
    /// [`UpdateRule::with_norms`] sets it.
    pub fn new(
        step: u64,
        lr: f64,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
        max_unorm: f64,
    ) -> Self {
        Self {
            sgd: SgdRule::new(step, lr, momentum, dampening, weight_decay, nesterov),
            max_unorm: max_unorm as f32,
            trust: 1.0,
        }
    }

    /// The trust ratio this rule applies.
    pub fn trust(&self) -> f32 {
        self.trust
    }
}

impl UpdateRule for LarsRule {
    const LAYERWISE: bool = true;

    fn signed_states(&self) -> &'static [bool] {
        self.sgd.signed_states()
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        param - self.sgd.lr * self.trust * self.sgd.direction(param, grad, state)
    }

    #[inline(always)]
    fn direction(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        self.sgd.direction(param, grad, state)
    }

    fn with_norms(&self, param_norm: f32, direction_norm: f32) -> Self {
        Self {
            trust: trust_ratio(self.max_unorm, param_norm, direction_norm),
            ..*self
        }
    }
}
