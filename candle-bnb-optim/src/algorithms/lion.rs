//! Lion: the sign of an interpolated momentum.

use candle_bnb_kernels::LionRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// Lion (Chen et al. 2023): the sign of an interpolated momentum, with decoupled weight decay as
/// in the paper. One state, the momentum (signed): 8-bit state takes about 1 byte per parameter.
/// Checkpoints have kind `Lion`.
#[derive(Clone, Debug, PartialEq)]
pub struct LionConfig {
    /// Learning rate.
    pub lr: f64,
    /// Interpolation between momentum and gradient for the update's sign, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the momentum, in `[0, 1)`.
    pub beta2: f64,
    /// Decoupled weight decay: parameters are scaled by `1 - lr * weight_decay` each step.
    pub weight_decay: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.0,
            settings: Settings::default(),
        }
    }
}

/// [`LionConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type Lion = Optim<LionConfig>;
/// [`LionConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type Lion8bit = Optim<LionConfig, 8>;
/// The config of [`Lion8bit`]: [`LionConfig`] (the state precision is the optimizer's).
pub type Lion8bitConfig = LionConfig;

impl OptimizerConfig for LionConfig {
    const KIND: &'static str = "Lion";

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

impl Sealed for LionConfig {
    type Rule = Elementwise<LionRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("beta1", &mut self.beta1),
            ("beta2", &mut self.beta2),
            ("weight_decay", &mut self.weight_decay),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::unit_interval("beta1", self.beta1)?;
        check::unit_interval("beta2", self.beta2)?;
        check::non_negative("weight_decay", self.weight_decay)
    }

    fn rule(&self, _step: u64) -> Elementwise<LionRule> {
        Elementwise(LionRule::new(
            self.lr,
            self.beta1,
            self.beta2,
            self.weight_decay,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
