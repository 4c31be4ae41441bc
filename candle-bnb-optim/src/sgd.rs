//! SGD with momentum, dampening and Nesterov momentum, with 8-bit or 32-bit state.

use candle_bnb_kernels::SgdRule;
use candle_core::bail;

use crate::define::{check, define_optimizer};

define_optimizer! {
    doc: "Stochastic gradient descent as `torch.optim.SGD` defines it: L2 weight decay, momentum with
dampening, optionally Nesterov. One state (the momentum buffer, signed) when `momentum != 0`, none
otherwise. bitsandbytes ignores `dampening` and `nesterov`; here both do what they say.",
    kind: "SGD",
    optimizers: [(SGD, SGDConfig, 32, "32-bit"), (SGD8bit, SGD8bitConfig, 8, "8-bit")],
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
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::non_negative("momentum", c.momentum)?;
        check::closed_unit_interval("dampening", c.dampening)?;
        check::non_negative("weight_decay", c.weight_decay)?;
        if c.nesterov && (c.momentum == 0.0 || c.dampening != 0.0) {
            bail!(
                "nesterov needs momentum > 0 and dampening == 0, got momentum {} and dampening {}",
                c.momentum,
                c.dampening
            )
        }
    },
    rule: |c, t| SgdRule::new(t, c.lr, c.momentum, c.dampening, c.weight_decay, c.nesterov),
}
