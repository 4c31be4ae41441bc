//! Adam / AdamW and LAMB: the Adam direction, stepped directly or scaled by a trust ratio.

use super::{bias_correction, trust_ratio, UpdateRule, MAX_STATES};

/// The Adam moments and direction shared by [`AdamRule`] and [`LambRule`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
struct Moments {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    eps: f32,
    bias_correction1: f32,
    bias_correction2: f32,
}

impl Moments {
    fn new(step: u64, beta1: f64, beta2: f64, eps: f64, correct_bias: bool) -> Self {
        Self {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            eps: eps as f32,
            bias_correction1: if correct_bias {
                bias_correction(beta1, step)
            } else {
                1.0
            },
            bias_correction2: if correct_bias {
                bias_correction(beta2, step)
            } else {
                1.0
            },
        }
    }

    /// `m = m*b1 + g*(1-b1)`, `v = v*b2 + g²*(1-b2)`, then `(m*c1) / (sqrt(v*c2) + eps)`.
    #[inline(always)]
    fn direction(&self, g: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let m = state[0] * self.beta1 + g * self.one_minus_beta1;
        let v = state[1] * self.beta2 + (g * g) * self.one_minus_beta2;
        state[0] = m;
        state[1] = v;
        let m_hat = m * self.bias_correction1;
        let v_hat = v * self.bias_correction2;
        m_hat / (v_hat.sqrt() + self.eps)
    }
}

/// Adam (Kingma & Ba) for one step, with either decoupled weight decay (AdamW, Loshchilov &
/// Hutter) or L2 weight decay added to the gradient (Adam).
///
/// State 0 is the first moment `m` (signed), state 1 the second moment `v` (unsigned). The
/// arithmetic is f32 in the order `candle_nn::AdamW` uses, so the 32-bit path reproduces it:
/// `m = m*b1 + g*(1-b1)`, `v = v*b2 + g²*(1-b2)`, `p = p*(1 - lr*wd)` (decoupled), then
/// `p - (m*c1) / (sqrt(v*c2) + eps) * lr` with `c1 = 1/(1-b1^t)` and `c2 = 1/(1-b2^t)`.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct AdamRule {
    moments: Moments,
    lr: f32,
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
        Self {
            moments: Moments::new(step, beta1, beta2, eps, true),
            lr: lr as f32,
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
        let d = self.direction(param, grad, state);
        param * self.decay_factor - d * self.lr
    }

    #[inline(always)]
    fn direction(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        self.moments.direction(grad + self.l2 * param, state)
    }
}

/// LAMB (You et al., "Large Batch Optimization for Deep Learning"): the Adam direction plus
/// weight decay, `d = m̂ / (sqrt(v̂) + eps) + wd*p` (AdamW mode; otherwise `wd*p` is added to the
/// gradient as L2), and the layer-wise step `p -= lr * r * d`.
///
/// The trust ratio `r` follows bitsandbytes' `max_unorm`: `r = min(1, max_unorm*‖p‖/‖d‖)` (the
/// update norm never exceeds `max_unorm` times the parameter norm; the paper's clipped ratio
/// with the default 1.0), and `r = 1` when `max_unorm` is 0 or either norm is 0. States as Adam's.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct LambRule {
    moments: Moments,
    lr: f32,
    decoupled_decay: f32,
    l2: f32,
    max_unorm: f32,
    trust: f32,
}

impl LambRule {
    /// The rule for step `step` (1-based). `bias_correction` false leaves the moments
    /// uncorrected; `adam_w_mode` puts the weight decay into the direction (decoupled) rather
    /// than into the gradient. The trust ratio is 1 until [`UpdateRule::with_norms`] sets it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        bias_correction: bool,
        adam_w_mode: bool,
        max_unorm: f64,
    ) -> Self {
        Self {
            moments: Moments::new(step, beta1, beta2, eps, bias_correction),
            lr: lr as f32,
            decoupled_decay: if adam_w_mode {
                weight_decay as f32
            } else {
                0.0
            },
            l2: if adam_w_mode {
                0.0
            } else {
                weight_decay as f32
            },
            max_unorm: max_unorm as f32,
            trust: 1.0,
        }
    }

    /// The trust ratio this rule applies.
    pub fn trust(&self) -> f32 {
        self.trust
    }
}

impl UpdateRule for LambRule {
    const LAYERWISE: bool = true;

    fn signed_states(&self) -> &'static [bool] {
        &[true, false]
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        param - self.lr * self.trust * self.direction(param, grad, state)
    }

    #[inline(always)]
    fn direction(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        self.moments.direction(grad + self.l2 * param, state) + self.decoupled_decay * param
    }

    fn with_norms(&self, param_norm: f32, direction_norm: f32) -> Self {
        Self {
            trust: trust_ratio(self.max_unorm, param_norm, direction_norm),
            ..*self
        }
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

    #[test]
    fn trust_ratio_caps_the_update_norm_and_spares_zero_norms() {
        let rule = LambRule::new(1, 1e-3, 0.9, 0.999, 1e-8, 0.0, true, true, 1.0);
        assert_eq!(rule.with_norms(2.0, 8.0).trust(), 0.25);
        assert_eq!(rule.with_norms(8.0, 2.0).trust(), 1.0);
        assert_eq!(rule.with_norms(0.0, 2.0).trust(), 1.0);
        assert_eq!(rule.with_norms(2.0, 0.0).trust(), 1.0);
        let unlimited = LambRule::new(1, 1e-3, 0.9, 0.999, 1e-8, 0.0, true, true, 0.0);
        assert_eq!(unlimited.with_norms(2.0, 8.0).trust(), 1.0);
    }
}
