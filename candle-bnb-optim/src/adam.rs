//! Adam and AdamW, with 8-bit or 32-bit state.

use candle_bnb_kernels::{AdamRule, ParamState};
use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Var};
use candle_nn::Optimizer;

use crate::engine::{NonFinitePolicy, Slots, StateLayout};

macro_rules! adam_optimizer {
    (
        $(#[$doc:meta])*
        $name:ident, $config:ident, decoupled: $decoupled:expr, weight_decay: $wd:expr, optim_bits: $bits:expr
    ) => {
        #[doc = concat!("Configuration of [`", stringify!($name), "`]; `Default` gives bitsandbytes' defaults.")]
        ///
        /// The first five fields are named as in `candle_nn::ParamsAdamW`.
        #[derive(Clone, Debug, PartialEq)]
        pub struct $config {
            /// Learning rate.
            pub lr: f64,
            /// Decay rate of the first-moment average, in `[0, 1)`.
            pub beta1: f64,
            /// Decay rate of the second-moment average, in `[0, 1)`.
            pub beta2: f64,
            /// Added to the root of the second moment for numerical stability.
            pub eps: f64,
            /// Weight decay (decoupled for AdamW, L2 added to the gradient for Adam).
            pub weight_decay: f64,
            /// 8 (blockwise-quantized state) or 32 (f32 state); anything else is an error.
            pub optim_bits: u32,
            /// Parameters with fewer elements keep 32-bit state even when `optim_bits` is 8.
            pub min_8bit_size: usize,
            /// Elements per quantization block of 8-bit state.
            pub block_size: usize,
            /// What a step does when a gradient holds NaN or ±inf.
            pub non_finite: NonFinitePolicy,
        }

        impl Default for $config {
            fn default() -> Self {
                Self {
                    lr: 1e-3,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    weight_decay: $wd,
                    optim_bits: $bits,
                    min_8bit_size: 4096,
                    block_size: 256,
                    non_finite: NonFinitePolicy::Skip,
                }
            }
        }

        impl $config {
            fn validate(&self) -> Result<()> {
                check_hyper_parameters(self.lr, self.beta1, self.beta2, self.eps, self.weight_decay)
            }

            fn layout(&self) -> StateLayout {
                StateLayout {
                    optim_bits: self.optim_bits,
                    min_8bit_size: self.min_8bit_size,
                    block_size: self.block_size,
                }
            }
        }

        $(#[$doc])*
        pub struct $name {
            slots: Slots,
            config: $config,
        }

        impl Optimizer for $name {
            type Config = $config;

            fn new(vars: Vec<Var>, config: $config) -> Result<Self> {
                config.validate()?;
                let c = &config;
                let first = AdamRule::new(1, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, $decoupled);
                let slots = Slots::new(vars, config.layout(), &first)?;
                Ok(Self { slots, config })
            }

            fn step(&mut self, grads: &GradStore) -> Result<()> {
                let c = &self.config;
                self.slots.step(grads, c.non_finite, |t| {
                    AdamRule::new(t, c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, $decoupled)
                })
            }

            fn learning_rate(&self) -> f64 {
                self.config.lr
            }

            fn set_learning_rate(&mut self, lr: f64) {
                self.config.lr = lr
            }
        }

        impl $name {
            /// The configuration in use.
            pub fn config(&self) -> &$config {
                &self.config
            }

            /// Steps taken (skipped steps not included).
            pub fn step_count(&self) -> u64 {
                self.slots.steps()
            }

            /// Steps skipped because a gradient was not finite ([`NonFinitePolicy::Skip`]).
            pub fn skipped_steps(&self) -> u64 {
                self.slots.skipped()
            }

            /// Bytes held by the optimizer state (codes, scales and f32 state).
            pub fn state_bytes(&self) -> usize {
                self.slots.state_bytes()
            }

            /// Each parameter with its state (first moment, then second moment).
            pub fn states(&self) -> impl Iterator<Item = (&Var, &ParamState)> {
                self.slots.states()
            }
        }
    };
}

fn check_hyper_parameters(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        bail!("lr must be finite and >= 0, got {lr}")
    }
    for (name, beta) in [("beta1", beta1), ("beta2", beta2)] {
        if !(0.0..1.0).contains(&beta) {
            bail!("{name} must be in [0, 1), got {beta}")
        }
    }
    if !(eps.is_finite() && eps >= 0.0) {
        bail!("eps must be finite and >= 0, got {eps}")
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        bail!("weight_decay must be finite and >= 0, got {weight_decay}")
    }
    Ok(())
}

adam_optimizer!(
    /// Adam with L2 weight decay added to the gradient (`torch.optim.Adam`, `bnb.optim.Adam`);
    /// 32-bit state by default.
    Adam, AdamConfig, decoupled: false, weight_decay: 0.0, optim_bits: 32
);
adam_optimizer!(
    /// AdamW: Adam with decoupled weight decay, in `candle_nn::AdamW`'s order (decay, then the
    /// Adam step), so its 32-bit form reproduces candle-nn; 32-bit state by default.
    AdamW, AdamWConfig, decoupled: true, weight_decay: 1e-2, optim_bits: 32
);
adam_optimizer!(
    /// [`Adam`] with 8-bit blockwise state by default (`bnb.optim.Adam8bit`).
    Adam8bit, Adam8bitConfig, decoupled: false, weight_decay: 0.0, optim_bits: 8
);
adam_optimizer!(
    /// [`AdamW`] with 8-bit blockwise state by default (`bnb.optim.AdamW8bit`): about 2 bytes of
    /// state per parameter instead of 8.
    AdamW8bit, AdamW8bitConfig, decoupled: true, weight_decay: 1e-2, optim_bits: 8
);
