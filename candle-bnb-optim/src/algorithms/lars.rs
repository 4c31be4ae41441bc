//! LARS: the SGD direction scaled by a layer-wise trust ratio.

use candle_bnb_kernels::LarsRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// LARS (You et al. 2017) as bitsandbytes defines it: the SGD direction (L2 weight decay,
/// momentum with dampening, optionally Nesterov) scaled per parameter by the trust ratio
/// `min(1, max_unorm * ‖p‖ / ‖d‖)` (1 when `max_unorm` is 0 or either norm is 0). Each step
/// measures both norms in a first read-only pass, then updates. States as SGD's. Checkpoints
/// have kind `LARS`.
#[derive(Clone, Debug, PartialEq)]
pub struct LARSConfig {
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
    /// The trust coefficient: the update norm is at most `max_unorm` times the parameter norm;
    /// 0: no trust ratio.
    pub max_unorm: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for LARSConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            max_unorm: 0.02,
            settings: Settings::default(),
        }
    }
}

/// [`LARSConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type LARS = Optim<LARSConfig>;
/// [`LARSConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type LARS8bit = Optim<LARSConfig, 8>;
/// The config of [`LARS8bit`]: [`LARSConfig`] (the state precision is the optimizer's).
pub type LARS8bitConfig = LARSConfig;

impl OptimizerConfig for LARSConfig {
    const KIND: &'static str = "LARS";

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

impl Sealed for LARSConfig {
    type Rule = Elementwise<LarsRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("momentum", &mut self.momentum),
            ("dampening", &mut self.dampening),
            ("weight_decay", &mut self.weight_decay),
            ("nesterov", &mut self.nesterov),
            ("max_unorm", &mut self.max_unorm),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::momentum(self.momentum, self.dampening, self.nesterov)?;
        check::non_negative("weight_decay", self.weight_decay)?;
        check::non_negative("max_unorm", self.max_unorm)
    }

    fn rule(&self, step: u64) -> Elementwise<LarsRule> {
        let c = self;
        Elementwise(LarsRule::new(
            step,
            c.lr,
            c.momentum,
            c.dampening,
            c.weight_decay,
            c.nesterov,
            c.max_unorm,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
