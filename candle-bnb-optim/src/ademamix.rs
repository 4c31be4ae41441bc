//! AdEMAMix, with 8-bit or 32-bit state.

use candle_bnb_kernels::AdEMAMixRule;

use crate::define::{check, define_optimizer};

define_optimizer! {
    doc: "AdEMAMix (Pagliardini et al. 2024): Adam with a slow second momentum mixed into the
numerator, with the paper's `alpha` and `beta3` warm-up schedules (`t_alpha`, `t_beta3`; bitsandbytes
accepts and ignores them). States: fast momentum (signed), slow momentum (signed), second moment
(unsigned), each quantized with its own per-block scales.",
    kind: "AdEMAMix",
    optimizers: [(AdEMAMix, AdEMAMixConfig, 32, "32-bit"), (AdEMAMix8bit, AdEMAMix8bitConfig, 8, "8-bit")],
    fields: {
        /// Learning rate.
        lr: f64 = 1e-3,
        /// Decay rate of the fast momentum, in `[0, 1)`.
        beta1: f64 = 0.9,
        /// Decay rate of the second moment, in `[0, 1)`.
        beta2: f64 = 0.999,
        /// Decay rate of the slow momentum, in `[0, 1)`.
        beta3: f64 = 0.9999,
        /// Weight of the slow momentum.
        alpha: f64 = 5.0,
        /// Steps over which `alpha` warms up linearly from 0 (`None`: no warm-up).
        t_alpha: Option<u64> = None,
        /// Steps over which `beta3` warms up from `beta1` (`None`: no warm-up).
        t_beta3: Option<u64> = None,
        /// Added to the root of the second moment for numerical stability; must be > 0.
        eps: f64 = 1e-8,
        /// Decoupled weight decay: `p -= lr * weight_decay * p`.
        weight_decay: f64 = 1e-2,
    },
    validate: |c| {
        check::non_negative("lr", c.lr)?;
        check::unit_interval("beta1", c.beta1)?;
        check::unit_interval("beta2", c.beta2)?;
        check::unit_interval("beta3", c.beta3)?;
        check::non_negative("alpha", c.alpha)?;
        check::positive_eps(c.eps)?;
        check::non_negative("weight_decay", c.weight_decay)?;
    },
    rule: |c, t| AdEMAMixRule::new(
        t, c.lr, c.beta1, c.beta2, c.beta3, c.alpha, c.t_alpha, c.t_beta3, c.eps, c.weight_decay,
    ),
}
