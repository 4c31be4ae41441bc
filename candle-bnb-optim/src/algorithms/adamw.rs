//! AdamW: Adam with decoupled weight decay.

use candle_bnb_kernels::AdamRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// AdamW: Adam with decoupled weight decay, in `candle_nn::AdamW`'s order (decay, then the Adam
/// step), so its 32-bit form reproduces candle-nn. The first five fields are named as in
/// `candle_nn::ParamsAdamW`. States: first moment (signed), second moment (unsigned); 8-bit state
/// takes about 2 bytes per parameter instead of 8. Checkpoints have kind `AdamW`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the first-moment average, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the second-moment average, in `[0, 1)`.
    pub beta2: f64,
    /// Added to the root of the second moment for numerical stability; must be > 0.
    pub eps: f64,
    /// Decoupled weight decay: parameters are scaled by `1 - lr * weight_decay` each step.
    pub weight_decay: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            settings: Settings::default(),
        }
    }
}

/// [`AdamWConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type AdamW = Optim<AdamWConfig>;
/// [`AdamWConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type AdamW8bit = Optim<AdamWConfig, 8>;
/// The config of [`AdamW8bit`]: [`AdamWConfig`] (the state precision is the optimizer's).
pub type AdamW8bitConfig = AdamWConfig;

impl OptimizerConfig for AdamWConfig {
    const KIND: &'static str = "AdamW";

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

impl Sealed for AdamWConfig {
    type Rule = Elementwise<AdamRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("beta1", &mut self.beta1),
            ("beta2", &mut self.beta2),
            ("eps", &mut self.eps),
            ("weight_decay", &mut self.weight_decay),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::moments(self.beta1, self.beta2, self.eps)?;
        check::non_negative("weight_decay", self.weight_decay)
    }

    fn rule(&self, step: u64) -> Elementwise<AdamRule> {
        let c = self;
        Elementwise(AdamRule::new(
            step,
            c.lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            true,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
