//! Lion, with 8-bit or 32-bit state.

use candle_bnb_kernels::LionRule;

use crate::define::{check, define_optimizer};

define_optimizer! {
    doc: "Lion (Chen et al. 2023): the sign of an interpolated momentum, with decoupled weight decay
as in the paper. One state, the momentum (signed): 8-bit state takes about 1 byte per parameter.",
    kind: "Lion",
    optimizers: [(Lion, LionConfig, 32, "32-bit"), (Lion8bit, Lion8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-4,
        /// Interpolation between momentum and gradient for the update's sign, in `[0, 1)`.
        beta1: f64 = 0.9,
        /// Decay rate of the momentum, in `[0, 1)`.
        beta2: f64 = 0.99,
        /// Decoupled weight decay: parameters are scaled by `1 - lr * weight_decay` each step.
        weight_decay: f64 = 0.0,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::unit_interval("beta1", c.beta1)?;
        check::unit_interval("beta2", c.beta2)?;
        check::non_negative("weight_decay", c.weight_decay)?;
    },
    rule: |c, _t| LionRule::new(c.lr, c.beta1, c.beta2, c.weight_decay),
}
