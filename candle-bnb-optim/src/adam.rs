//! Adam and AdamW, with 8-bit or 32-bit state.

use candle_bnb_kernels::AdamRule;

use crate::define::{check, define_optimizer};

define_optimizer! {
    doc: "Adam with L2 weight decay added to the gradient (`torch.optim.Adam`, `bnb.optim.Adam`).
States: first moment (signed), second moment (unsigned).",
    kind: "Adam",
    optimizers: [(Adam, AdamConfig, 32, "32-bit"), (Adam8bit, Adam8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rate of the first-moment average, in `[0, 1)`.
        beta1: f64 = 0.9,
        /// Decay rate of the second-moment average, in `[0, 1)`.
        beta2: f64 = 0.999,
        /// Added to the root of the second moment for numerical stability; must be > 0.
        eps: f64 = 1e-8,
        /// L2 weight decay, added to the gradient as `weight_decay * param`.
        weight_decay: f64 = 0.0,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::unit_interval("beta1", c.beta1)?;
        check::unit_interval("beta2", c.beta2)?;
        check::positive_eps(c.eps)?;
        check::non_negative("weight_decay", c.weight_decay)?;
    },
    rule: |c, t| AdamRule::new(t, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, false),
}

define_optimizer! {
    doc: "AdamW: Adam with decoupled weight decay, in `candle_nn::AdamW`'s order (decay, then the
Adam step), so its 32-bit form reproduces candle-nn. The first five config fields are named as in
`candle_nn::ParamsAdamW`. States: first moment (signed), second moment (unsigned); 8-bit state takes
about 2 bytes per parameter instead of 8.",
    kind: "AdamW",
    optimizers: [(AdamW, AdamWConfig, 32, "32-bit"), (AdamW8bit, AdamW8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rate of the first-moment average, in `[0, 1)`.
        beta1: f64 = 0.9,
        /// Decay rate of the second-moment average, in `[0, 1)`.
        beta2: f64 = 0.999,
        /// Added to the root of the second moment for numerical stability; must be > 0.
        eps: f64 = 1e-8,
        /// Decoupled weight decay: parameters are scaled by `1 - lr * weight_decay` each step.
        weight_decay: f64 = 1e-2,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::unit_interval("beta1", c.beta1)?;
        check::unit_interval("beta2", c.beta2)?;
        check::positive_eps(c.eps)?;
        check::non_negative("weight_decay", c.weight_decay)?;
    },
    rule: |c, t| AdamRule::new(t, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, true),
}
