//! Optimizer update rules: the per-element math of one step, written once and shared by the
//! 8-bit (blockwise-quantized state) and 32-bit (f32 state) paths.

/// Most state values a rule keeps per parameter element.
pub const MAX_STATES: usize = 3;

/// The per-element math of one optimizer step.
///
/// The fused kernels load a parameter element, its gradient and its state values as f32
/// (dequantizing 8-bit state first), call [`UpdateRule::apply`], and store the results back
/// (re-quantizing 8-bit state). Step-dependent scalars (bias corrections, schedules) are computed
/// once per step when the rule value is built, so `apply` is plain arithmetic the compiler can
/// vectorise. Adding an optimizer is one rule plus one config.
pub trait UpdateRule: Sync {
    /// One entry per state value kept per parameter element (at most [`MAX_STATES`]): whether it
    /// takes negative values (stored with the signed dynamic map) or not (the unsigned map).
    fn signed_states(&self) -> &'static [bool];

    /// The value each state starts from (zero unless the rule says otherwise).
    fn initial_state(&self) -> [f32; MAX_STATES] {
        [0.0; MAX_STATES]
    }

    /// Updates one element: returns the new parameter value and updates the first
    /// `signed_states().len()` entries of `state`.
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32;
}

/// Adam (Kingma & Ba) for one step, with either decoupled weight decay (AdamW, Loshchilov &
/// Hutter) or L2 weight decay added to the gradient (Adam).
///
/// State 0 is the first moment `m` (signed), state 1 the second moment `v` (unsigned). The
/// arithmetic is f32 in the order `candle_nn::AdamW` uses, so the 32-bit path reproduces it:
/// `m = m*b1 + g*(1-b1)`, `v = v*b2 + g²*(1-b2)`, `p = p*(1 - lr*wd)` (decoupled), then
/// `p - (m*c1) / (sqrt(v*c2) + eps) * lr` with `c1 = 1/(1-b1^t)` and `c2 = 1/(1-b2^t)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamRule {
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    /// `1 - lr * weight_decay` when decoupled, else 1.
    decay_factor: f32,
    /// `weight_decay` when added to the gradient (L2), else 0.
    l2: f32,
}

impl AdamRule {
    /// The rule for step `step` (1-based) with hyper-parameters as `candle_nn::ParamsAdamW`
    /// names them; `decoupled` selects AdamW's decay over Adam's L2 decay. Scalars are derived in
    /// f64 and rounded to f32 once, as candle-nn does.
    pub fn new(
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decoupled: bool,
    ) -> Self {
        let t = step.min(i32::MAX as u64) as i32;
        Self {
            lr: lr as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: eps as f32,
            bias_correction1: (1.0 / (1.0 - beta1.powi(t))) as f32,
            bias_correction2: (1.0 / (1.0 - beta2.powi(t))) as f32,
            decay_factor: if decoupled {
                (1.0 - lr * weight_decay) as f32
            } else {
                1.0
            },
            l2: if decoupled { 0.0 } else { weight_decay as f32 },
        }
    }
}

impl UpdateRule for AdamRule {
    fn signed_states(&self) -> &'static [bool] {
        &[true, false]
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let g = grad + self.l2 * param;
        let m = state[0] * self.beta1 + g * self.one_minus_beta1;
        let v = state[1] * self.beta2 + (g * g) * self.one_minus_beta2;
        state[0] = m;
        state[1] = v;
        let m_hat = m * self.bias_correction1;
        let v_hat = v * self.bias_correction2;
        param * self.decay_factor - m_hat / (v_hat.sqrt() + self.eps) * self.lr
    }
}

/// Lion (Chen et al., "Symbolic Discovery of Optimization Algorithms"), with decoupled weight
/// decay as in the paper: `c = b1*m + (1-b1)*g`, `p = p*(1 - lr*wd) - lr*sign(c)` (sign(0) = 0),
/// `m = b2*m + (1-b2)*g`. One state, the momentum `m` (signed).
#[derive(Clone, Copy, Debug, PartialEq)]
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
        let sign = if c > 0.0 {
            1.0
        } else if c < 0.0 {
            -1.0
        } else {
            0.0
        };
        state[0] = m * self.beta2 + grad * self.one_minus_beta2;
        param * self.decay_factor - self.lr * sign
    }
}

/// Stochastic gradient descent as `torch.optim.SGD` defines it: `g += wd*p`; with momentum,
/// `buf = g` on the first step and `buf = momentum*buf + (1-dampening)*g` after, then
/// `g = g + momentum*buf` (Nesterov) or `g = buf`; finally `p -= lr*g`. One state (the momentum
/// buffer, signed) when `momentum != 0`, none otherwise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdRule {
    lr: f32,
    momentum: f32,
    one_minus_dampening: f32,
    weight_decay: f32,
    nesterov: bool,
    first_step: bool,
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
        let mut g = grad + self.weight_decay * param;
        if self.momentum != 0.0 {
            let buf = if self.first_step {
                g
            } else {
                self.momentum * state[0] + self.one_minus_dampening * g
            };
            state[0] = buf;
            g = if self.nesterov {
                g + self.momentum * buf
            } else {
                buf
            };
        }
        param - self.lr * g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adam from the paper's formulas in f64.
    #[test]
    fn adam_follows_the_paper_in_f64_within_f32_rounding() {
        let (lr, b1, b2, eps, wd) = (1e-3, 0.9, 0.999, 1e-8, 0.01);
        for decoupled in [true, false] {
            let (mut p, mut m, mut v) = (0.7f64, 0.0f64, 0.0f64);
            let mut p32 = p as f32;
            let mut state = [0f32; MAX_STATES];
            for t in 1..=50u64 {
                let g = ((t as f64) * 0.37).sin();
                let rule = AdamRule::new(t, lr, b1, b2, eps, wd, decoupled);
                p32 = rule.apply(p32, g as f32, &mut state);
                let g = if decoupled { g } else { g + wd * p };
                m = b1 * m + (1.0 - b1) * g;
                v = b2 * v + (1.0 - b2) * g * g;
                let m_hat = m / (1.0 - b1.powi(t as i32));
                let v_hat = v / (1.0 - b2.powi(t as i32));
                if decoupled {
                    p *= 1.0 - lr * wd;
                }
                p -= lr * m_hat / (v_hat.sqrt() + eps);
            }
            assert!(
                (p32 as f64 - p).abs() < 1e-6,
                "decoupled {decoupled}: {p32} vs {p}"
            );
            assert!((state[0] as f64 - m).abs() < 1e-6 && (state[1] as f64 - v).abs() < 1e-6);
        }
    }
}
