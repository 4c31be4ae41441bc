//! AdEMAMix: Adam with a second, slow momentum mixed into the numerator.

use super::{bias_correction, UpdateRule, MAX_STATES};

/// AdEMAMix (Pagliardini et al., "The AdEMAMix Optimizer: Better, Faster, Older"):
/// `m1 = b1*m1 + (1-b1)*g`, `m2 = b3(t)*m2 + (1-b3(t))*g`, `nu = b2*nu + (1-b2)*g²`, then
/// `p -= lr * ((m1*c1 + alpha(t)*m2) / (sqrt(nu*c2) + eps) + wd*p)` with Adam's bias corrections
/// `c1 = 1/(1-b1^t)`, `c2 = 1/(1-b2^t)`.
///
/// The paper's warm-up schedules (bitsandbytes accepts and ignores them): with `t_alpha`,
/// `alpha(t) = min(t*alpha/t_alpha, alpha)`; with `t_beta3`,
/// `b3(t) = min(exp(ln(b1)*ln(b3) / ((1-t/T)*ln(b3) + (t/T)*ln(b1))), b3)`, `T = t_beta3`.
/// States: `m1` (signed), `m2` (signed), `nu` (unsigned).
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C)] // the CUDA kernels read this layout (kernels/rules/)
pub struct AdEMAMixRule {
    lr: f32,
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    beta3: f32,
    one_minus_beta3: f32,
    alpha: f32,
    eps: f32,
    weight_decay: f32,
    bias_correction1: f32,
    bias_correction2: f32,
}

impl AdEMAMixRule {
    /// The rule for step `step` (1-based); `t_alpha` and `t_beta3` are the optional schedule
    /// lengths in steps (`None` or 0: no schedule).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        step: u64,
        lr: f64,
        beta1: f64,
        beta2: f64,
        beta3: f64,
        alpha: f64,
        t_alpha: Option<u64>,
        t_beta3: Option<u64>,
        eps: f64,
        weight_decay: f64,
    ) -> Self {
        let t = step.max(1) as f64;
        let alpha_t = match t_alpha {
            Some(t_alpha) if t_alpha > 0 => (t * alpha / t_alpha as f64).min(alpha),
            _ => alpha,
        };
        let beta3_t = match t_beta3 {
            Some(t_beta3) if t_beta3 > 0 && beta1 > 0.0 && beta3 > 0.0 => {
                let f = (t / t_beta3 as f64).min(1.0);
                let (l1, l3) = (beta1.ln(), beta3.ln());
                let b = (l1 * l3 / ((1.0 - f) * l3 + f * l1)).exp();
                if b.is_nan() {
                    beta3
                } else {
                    b.min(beta3)
                }
            }
            _ => beta3,
        };
        Self {
            lr: lr as f32,
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            beta3: beta3_t as f32,
            one_minus_beta3: (1.0 - beta3_t) as f32,
            alpha: alpha_t as f32,
            eps: eps as f32,
            weight_decay: weight_decay as f32,
            bias_correction1: bias_correction(beta1, step),
            bias_correction2: bias_correction(beta2, step),
        }
    }

    /// `alpha(t)` and `b3(t)` for this step.
    pub fn schedules(&self) -> (f32, f32) {
        (self.alpha, self.beta3)
    }
}

impl UpdateRule for AdEMAMixRule {
    fn signed_states(&self) -> &'static [bool] {
        &[true, true, false]
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let m1 = self.beta1 * state[0] + self.one_minus_beta1 * grad;
        let m2 = self.beta3 * state[1] + self.one_minus_beta3 * grad;
        let nu = self.beta2 * state[2] + self.one_minus_beta2 * (grad * grad);
        *state = [m1, m2, nu];
        let numerator = m1 * self.bias_correction1 + self.alpha * m2;
        let denominator = (nu * self.bias_correction2).sqrt() + self.eps;
        param - self.lr * (numerator / denominator + self.weight_decay * param)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_to_their_final_values() {
        let at = |t| {
            AdEMAMixRule::new(
                t,
                1e-3,
                0.9,
                0.999,
                0.9999,
                5.0,
                Some(100),
                Some(100),
                1e-8,
                0.0,
            )
        };
        let (a1, b1) = at(1).schedules();
        assert!((a1 - 0.05).abs() < 1e-6, "alpha(1) = {a1}");
        // At t = 0 the beta3 schedule starts from beta1; it rises monotonically to beta3.
        assert!(b1 > 0.9 && b1 < 0.9999, "beta3(1) = {b1}");
        let (a50, b50) = at(50).schedules();
        assert!((a50 - 2.5).abs() < 1e-6 && b50 > b1 && b50 < 0.9999);
        assert_eq!(at(100).schedules(), (5.0, 0.9999));
        assert_eq!(at(1000).schedules(), (5.0, 0.9999));
        let plain = AdEMAMixRule::new(1, 1e-3, 0.9, 0.999, 0.9999, 5.0, None, None, 1e-8, 0.0);
        assert_eq!(plain.schedules(), (5.0, 0.9999));
    }
}
