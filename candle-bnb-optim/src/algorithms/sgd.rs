//! SGD with momentum, dampening and Nesterov momentum.

use candle_bnb_kernels::SgdRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// Stochastic gradient descent as `torch.optim.SGD` defines it: L2 weight decay, momentum with
/// dampening, optionally Nesterov. One state (the momentum buffer, signed) when `momentum != 0`,
/// none otherwise. bitsandbytes ignores `dampening` and `nesterov`; here both do what they say.
/// Checkpoints have kind `SGD`.
#[derive(Clone, Debug, PartialEq)]
pub struct SGDConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor; 0 keeps no state.
    pub momentum: f64,
    /// Dampening of the gradient's contribution to the momentum, in `[0, 1]`.
    pub dampening: f64,
    /// L2 weight decay, added to the gradient as `weight_decay * param`.
    pub weight_decay: f64,
    /// Nesterov momentum (needs `momentum > 0` and `dampening == 0`, as in torch).
    pub nesterov: bool,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for SGDConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            settings: Settings::default(),
        }
    }
}

/// [`SGDConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type SGD = Optim<SGDConfig>;
/// [`SGDConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type SGD8bit = Optim<SGDConfig, 8>;
/// The config of [`SGD8bit`]: [`SGDConfig`] (the state precision is the optimizer's).
pub type SGD8bitConfig = SGDConfig;

impl OptimizerConfig for SGDConfig {
    const KIND: &'static str = "SGD";

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

impl Sealed for SGDConfig {
    type Rule = Elementwise<SgdRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("momentum", &mut self.momentum),
            ("dampening", &mut self.dampening),
            ("weight_decay", &mut self.weight_decay),
            ("nesterov", &mut self.nesterov),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::momentum(self.momentum, self.dampening, self.nesterov)?;
        check::non_negative("weight_decay", self.weight_decay)
    }

    fn rule(&self, step: u64) -> Elementwise<SgdRule> {
        let c = self;
        Elementwise(SgdRule::new(
            step,
            c.lr,
            c.momentum,
            c.dampening,
            c.weight_decay,
            c.nesterov,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
