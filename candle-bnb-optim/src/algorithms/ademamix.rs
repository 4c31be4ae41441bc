//! AdEMAMix: Adam with a slow second momentum.

use candle_bnb_kernels::AdEMAMixRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// AdEMAMix (Pagliardini et al. 2024): Adam with a slow second momentum mixed into the
/// numerator, with the paper's `alpha` and `beta3` warm-up schedules (`t_alpha`, `t_beta3`;
/// bitsandbytes accepts and ignores them). States: fast momentum (signed), slow momentum
/// (signed), second moment (unsigned), each quantized with its own per-block scales.
/// Checkpoints have kind `AdEMAMix`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdEMAMixConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the fast momentum, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the second moment, in `[0, 1)`.
    pub beta2: f64,
    /// Decay rate of the slow momentum, in `[0, 1)`.
    pub beta3: f64,
    /// Weight of the slow momentum.
    pub alpha: f64,
    /// Steps over which `alpha` warms up linearly from 0 (`None`: no warm-up).
    pub t_alpha: Option<u64>,
    /// Steps over which `beta3` warms up from `beta1` (`None`: no warm-up).
    pub t_beta3: Option<u64>,
    /// Added to the root of the second moment for numerical stability; must be > 0.
    pub eps: f64,
    /// Decoupled weight decay: `p -= lr * weight_decay * p`.
    pub weight_decay: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for AdEMAMixConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            beta3: 0.9999,
            alpha: 5.0,
            t_alpha: None,
            t_beta3: None,
            eps: 1e-8,
            weight_decay: 1e-2,
            settings: Settings::default(),
        }
    }
}

/// [`AdEMAMixConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type AdEMAMix = Optim<AdEMAMixConfig>;
/// [`AdEMAMixConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type AdEMAMix8bit = Optim<AdEMAMixConfig, 8>;
/// The config of [`AdEMAMix8bit`]: [`AdEMAMixConfig`] (the state precision is the optimizer's).
pub type AdEMAMix8bitConfig = AdEMAMixConfig;

impl OptimizerConfig for AdEMAMixConfig {
    const KIND: &'static str = "AdEMAMix";

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }
}

impl Sealed for AdEMAMixConfig {
    type Rule = Elementwise<AdEMAMixRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("beta1", &mut self.beta1),
            ("beta2", &mut self.beta2),
            ("beta3", &mut self.beta3),
            ("alpha", &mut self.alpha),
            ("t_alpha", &mut self.t_alpha),
            ("t_beta3", &mut self.t_beta3),
            ("eps", &mut self.eps),
            ("weight_decay", &mut self.weight_decay),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::unit_interval("beta1", self.beta1)?;
        check::unit_interval("beta2", self.beta2)?;
        check::unit_interval("beta3", self.beta3)?;
        check::non_negative("alpha", self.alpha)?;
        check::positive_eps(self.eps)?;
        check::non_negative("weight_decay", self.weight_decay)
    }

    fn rule(&self, step: u64) -> Elementwise<AdEMAMixRule> {
        let c = self;
        Elementwise(AdEMAMixRule::new(
            step,
            c.lr,
            c.beta1,
            c.beta2,
            c.beta3,
            c.alpha,
            c.t_alpha,
            c.t_beta3,
            c.eps,
            c.weight_decay,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
