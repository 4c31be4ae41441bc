//! Adam with L2 weight decay.

use candle_bnb_kernels::AdamRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// Adam with L2 weight decay added to the gradient (`torch.optim.Adam`, `bnb.optim.Adam`).
/// States: first moment (signed), second moment (unsigned). Checkpoints have kind `Adam`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the first-moment average, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the second-moment average, in `[0, 1)`.
    pub beta2: f64,
    /// Added to the root of the second moment for numerical stability; must be > 0.
    pub eps: f64,
    /// L2 weight decay, added to the gradient as `weight_decay * param`.
    pub weight_decay: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            settings: Settings::default(),
        }
    }
}

/// [`AdamConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type Adam = Optim<AdamConfig>;
/// [`AdamConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type Adam8bit = Optim<AdamConfig, 8>;
/// The config of [`Adam8bit`]: [`AdamConfig`] (the state precision is the optimizer's).
pub type Adam8bitConfig = AdamConfig;

impl OptimizerConfig for AdamConfig {
    const KIND: &'static str = "Adam";

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

impl Sealed for AdamConfig {
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
            false,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
