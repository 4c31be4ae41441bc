//! LAMB and LARS: layer-wise trust ratios, with 8-bit or 32-bit state.

use candle_bnb_kernels::{LambRule, LarsRule};
use candle_core::bail;

use crate::define::{check, define_optimizer};

define_optimizer! {
    doc: "LAMB (You et al. 2019): the Adam direction plus weight decay, scaled per parameter by the
trust ratio `min(1, max_unorm * ‖p‖ / ‖d‖)` (bitsandbytes' form; 1 when `max_unorm` is 0 or either
norm is 0). Each step measures both norms in a first read-only pass, then updates (bitsandbytes
has no 8-bit LAMB kernel; here the 8-bit path exists). States as Adam's.",
    kind: "LAMB",
    optimizers: [(LAMB, LAMBConfig, 32, "32-bit"), (LAMB8bit, LAMB8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rate of the first-moment average, in `[0, 1)`.
        beta1: f64 = 0.9,
        /// Decay rate of the second-moment average, in `[0, 1)`.
        beta2: f64 = 0.999,
        /// Added to the root of the second moment for numerical stability; must be > 0.
        eps: f64 = 1e-8,
        /// Weight decay, inside the trust-ratio direction (`adam_w_mode`) or added to the
        /// gradient as L2.
        weight_decay: f64 = 0.0,
        /// Divide the moments by `1 - beta^t` (Adam's bias correction).
        bias_correction: bool = true,
        /// Decoupled weight decay (`d += weight_decay * p`) rather than L2.
        adam_w_mode: bool = true,
        /// The update norm is at most `max_unorm` times the parameter norm; 0: no trust ratio.
        max_unorm: f64 = 1.0,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::unit_interval("beta1", c.beta1)?;
        check::unit_interval("beta2", c.beta2)?;
        check::positive_eps(c.eps)?;
        check::non_negative("weight_decay", c.weight_decay)?;
        check::non_negative("max_unorm", c.max_unorm)?;
    },
    rule: |c, t| LambRule::new(
        t, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.bias_correction, c.adam_w_mode, c.max_unorm,
    ),
}

define_optimizer! {
    doc: "LARS (You et al. 2017) as bitsandbytes defines it: the SGD direction (L2 weight decay,
momentum with dampening, optionally Nesterov) scaled per parameter by the trust ratio
`min(1, max_unorm * ‖p‖ / ‖d‖)` (1 when `max_unorm` is 0 or either norm is 0). Each step measures
both norms in a first read-only pass, then updates. States as SGD's.",
    kind: "LARS",
    optimizers: [(LARS, LARSConfig, 32, "32-bit"), (LARS8bit, LARS8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Momentum factor; 0 keeps no state.
        momentum: f64 = 0.0,
        /// Dampening of the gradient's contribution to the momentum, in `[0, 1]`.
        dampening: f64 = 0.0,
        /// L2 weight decay, added to the gradient as `weight_decay * param`.
        weight_decay: f64 = 0.0,
        /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`, as in torch).
        nesterov: bool = false,
        /// The trust coefficient: the update norm is at most `max_unorm` times the parameter
        /// norm; 0: no trust ratio.
        max_unorm: f64 = 0.02,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::non_negative("momentum", c.momentum)?;
        check::closed_unit_interval("dampening", c.dampening)?;
        check::non_negative("weight_decay", c.weight_decay)?;
        check::non_negative("max_unorm", c.max_unorm)?;
        if c.nesterov && (c.momentum == 0.0 || c.dampening != 0.0) {
            bail!(
                "nesterov needs momentum > 0 and dampening == 0, got momentum {} and dampening {}",
                c.momentum,
                c.dampening
            )
        }
    },
    rule: |c, t| LarsRule::new(
        t, c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov, c.max_unorm,
    ),
}
