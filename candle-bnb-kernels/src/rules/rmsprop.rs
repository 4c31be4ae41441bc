//! RMSprop and Adagrad: steps divided by a running root-mean-square of the gradients.

use super::{UpdateRule, MAX_STATES};

/// RMSprop as `torch.optim.RMSprop` defines it: `g += wd*p`, `v = alpha*v + (1-alpha)*g²`;
/// centered: `ḡ = alpha*ḡ + (1-alpha)*g` and `avg = sqrt(max(v - ḡ², 0)) + eps`, else
/// `avg = sqrt(v) + eps`; with momentum `buf = momentum*buf + g/avg` and `p -= lr*buf`, else
/// `p -= lr*g/avg`.
///
/// States: `v` (unsigned), then the momentum buffer (signed) when `momentum != 0`, then `ḡ`
/// (signed) when centered. The `max(.., 0)` guards the centered variance against rounding (and
/// 8-bit quantization) pushing it below zero, where torch would take the root of a negative.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct RmspropRule {
    lr: f32,
    alpha: f32,
    one_minus_alpha: f32,
    eps: f32,
    weight_decay: f32,
    momentum: f32,
    centered: bool,
    /// Explicit padding, so that every byte of the struct is initialised (the CUDA host copies
    /// rules as bytes).
    pad: [u8; 3],
}

impl RmspropRule {
    /// The rule with these hyper-parameters (the step count does not enter RMSprop).
    pub fn new(
        lr: f64,
        alpha: f64,
        eps: f64,
        weight_decay: f64,
        momentum: f64,
        centered: bool,
    ) -> Self {
        Self {
            lr: lr as f32,
            alpha: alpha as f32,
            one_minus_alpha: (1.0 - alpha) as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            momentum: momentum as f32,
            centered,
            pad: [0; 3],
        }
    }
}

impl UpdateRule for RmspropRule {
    fn signed_states(&self) -> &'static [bool] {
        match (self.momentum != 0.0, self.centered) {
            (false, false) => &[false],
            (true, false) | (false, true) => &[false, true],
            (true, true) => &[false, true, true],
        }
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let g = grad + self.weight_decay * param;
        let v = self.alpha * state[0] + self.one_minus_alpha * (g * g);
        state[0] = v;
        let has_momentum = self.momentum != 0.0;
        let variance = if self.centered {
            let k = if has_momentum { 2 } else { 1 };
            let mean = self.alpha * state[k] + self.one_minus_alpha * g;
            state[k] = mean;
            (v - mean * mean).max(0.0)
        } else {
            v
        };
        let step = g / (variance.sqrt() + self.eps);
        if has_momentum {
            let buf = self.momentum * state[1] + step;
            state[1] = buf;
            param - self.lr * buf
        } else {
            param - self.lr * step
        }
    }
}

/// Adagrad as `torch.optim.Adagrad` defines it: `clr = lr / (1 + (t-1)*lr_decay)`, `g += wd*p`,
/// `s += g²`, `p -= clr * g / (sqrt(s) + eps)`. One state, the sum `s` (unsigned), starting at
/// `initial_accumulator_value`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct AdagradRule {
    clr: f32,
    eps: f32,
    weight_decay: f32,
    initial_accumulator_value: f32,
}

impl AdagradRule {
    /// The rule for step `step` (1-based).
    pub fn new(
        step: u64,
        lr: f64,
        lr_decay: f64,
        weight_decay: f64,
        initial_accumulator_value: f64,
        eps: f64,
    ) -> Self {
        let t = step.max(1) as f64;
        Self {
            clr: (lr / (1.0 + (t - 1.0) * lr_decay)) as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            initial_accumulator_value: initial_accumulator_value as f32,
        }
    }
}

impl UpdateRule for AdagradRule {
    fn signed_states(&self) -> &'static [bool] {
        &[false]
    }

    fn initial_state(&self) -> [f32; MAX_STATES] {
        [self.initial_accumulator_value, 0.0, 0.0]
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let g = grad + self.weight_decay * param;
        let s = state[0] + g * g;
        state[0] = s;
        param - self.clr * g / (s.sqrt() + self.eps)
    }
}
