//! RMSprop and Adagrad, with 8-bit or 32-bit state.

use candle_bnb_kernels::{AdagradRule, RmspropRule};

use crate::define::{check, define_optimizer};

define_optimizer! {
    doc: "RMSprop as `torch.optim.RMSprop` defines it, momentum and centered variants included
(bitsandbytes accepts both and ignores them; here they do what they say). States: the squared-
gradient average (unsigned), the momentum buffer (signed, when `momentum != 0`) and the gradient
average (signed, when centered). Weight decay is L2 (added to the gradient) on both paths.",
    kind: "RMSprop",
    optimizers: [(RMSprop, RMSpropConfig, 32, "32-bit"), (RMSprop8bit, RMSprop8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-2,
        /// Decay rate of the squared-gradient average, in `[0, 1)`.
        alpha: f64 = 0.99,
        /// Added to the root of the average for numerical stability; must be > 0.
        eps: f64 = 1e-8,
        /// L2 weight decay, added to the gradient as `weight_decay * param`.
        weight_decay: f64 = 0.0,
        /// Momentum factor; 0 keeps no momentum buffer.
        momentum: f64 = 0.0,
        /// Normalise by the gradient's variance (average of squares minus squared average)
        /// instead of its raw second moment.
        centered: bool = false,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::unit_interval("alpha", c.alpha)?;
        check::positive_eps(c.eps)?;
        check::non_negative("weight_decay", c.weight_decay)?;
        check::non_negative("momentum", c.momentum)?;
    },
    rule: |c, _t| RmspropRule::new(c.lr, c.alpha, c.eps, c.weight_decay, c.momentum, c.centered),
}

define_optimizer! {
    doc: "Adagrad as `torch.optim.Adagrad` defines it, with `lr_decay` and
`initial_accumulator_value` (bitsandbytes refuses both). One state, the sum of squared gradients
(unsigned). Weight decay is L2 (added to the gradient) on both paths.",
    kind: "Adagrad",
    optimizers: [(Adagrad, AdagradConfig, 32, "32-bit"), (Adagrad8bit, Adagrad8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate (before `lr_decay`).
        lr: f64 = 1e-2,
        /// The step-`t` learning rate is `lr / (1 + (t - 1) * lr_decay)`.
        lr_decay: f64 = 0.0,
        /// L2 weight decay, added to the gradient as `weight_decay * param`.
        weight_decay: f64 = 0.0,
        /// Starting value of the sum of squared gradients.
        initial_accumulator_value: f64 = 0.0,
        /// Added to the root of the sum for numerical stability; must be > 0.
        eps: f64 = 1e-10,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::non_negative("lr_decay", c.lr_decay)?;
        check::non_negative("weight_decay", c.weight_decay)?;
        check::non_negative("initial_accumulator_value", c.initial_accumulator_value)?;
        check::positive_eps(c.eps)?;
    },
    rule: |c, t| AdagradRule::new(t, c.lr, c.lr_decay, c.weight_decay, c.initial_accumulator_value, c.eps),
}
