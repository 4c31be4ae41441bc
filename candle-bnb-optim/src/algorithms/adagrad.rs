//! Adagrad, with learning-rate decay and an initial accumulator.

use candle_bnb_kernels::AdagradRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// Adagrad as `torch.optim.Adagrad` defines it, with `lr_decay` and `initial_accumulator_value`
/// (bitsandbytes refuses both). One state, the sum of squared gradients (unsigned). Weight decay
/// is L2 (added to the gradient) on both paths. Checkpoints have kind `Adagrad`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdagradConfig {
    /// Learning rate (before `lr_decay`).
    pub lr: f64,
    /// The step-`t` learning rate is `lr / (1 + (t - 1) * lr_decay)`.
    pub lr_decay: f64,
    /// L2 weight decay, added to the gradient as `weight_decay * param`.
    pub weight_decay: f64,
    /// Starting value of the sum of squared gradients.
    pub initial_accumulator_value: f64,
    /// Added to the root of the sum for numerical stability; must be > 0.
    pub eps: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for AdagradConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            lr_decay: 0.0,
            weight_decay: 0.0,
            initial_accumulator_value: 0.0,
            eps: 1e-10,
            settings: Settings::default(),
        }
    }
}

/// [`AdagradConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type Adagrad = Optim<AdagradConfig>;
/// [`AdagradConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type Adagrad8bit = Optim<AdagradConfig, 8>;
/// The config of [`Adagrad8bit`]: [`AdagradConfig`] (the state precision is the optimizer's).
pub type Adagrad8bitConfig = AdagradConfig;

impl OptimizerConfig for AdagradConfig {
    const KIND: &'static str = "Adagrad";

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

impl Sealed for AdagradConfig {
    type Rule = Elementwise<AdagradRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("lr_decay", &mut self.lr_decay),
            ("weight_decay", &mut self.weight_decay),
            (
                "initial_accumulator_value",
                &mut self.initial_accumulator_value,
            ),
            ("eps", &mut self.eps),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::non_negative("lr_decay", self.lr_decay)?;
        check::non_negative("weight_decay", self.weight_decay)?;
        check::non_negative("initial_accumulator_value", self.initial_accumulator_value)?;
        check::positive_eps(self.eps)
    }

    fn rule(&self, step: u64) -> Elementwise<AdagradRule> {
        let c = self;
        Elementwise(AdagradRule::new(
            step,
            c.lr,
            c.lr_decay,
            c.weight_decay,
            c.initial_accumulator_value,
            c.eps,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
