//! LAMB: the Adam direction scaled by a layer-wise trust ratio.

use candle_bnb_kernels::LambRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// LAMB (You et al. 2019): the Adam direction plus weight decay, scaled per parameter by the
/// trust ratio `min(1, max_unorm * ‖p‖ / ‖d‖)` (bitsandbytes' form; 1 when `max_unorm` is 0 or
/// either norm is 0). Each step measures both norms in a first read-only pass, then updates
/// (bitsandbytes has no 8-bit LAMB kernel; here the 8-bit path exists). States as Adam's.
/// Checkpoints have kind `LAMB`.
#[derive(Clone, Debug, PartialEq)]
pub struct LAMBConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the first-moment average, in `[0, 1)`.
    pub beta1: f64,
    /// Decay rate of the second-moment average, in `[0, 1)`.
    pub beta2: f64,
    /// Added to the root of the second moment for numerical stability; must be > 0.
    pub eps: f64,
    /// Weight decay, inside the trust-ratio direction (`adam_w_mode`) or added to the gradient
    /// as L2.
    pub weight_decay: f64,
    /// Divide the moments by `1 - beta^t` (Adam's bias correction).
    pub bias_correction: bool,
    /// Decoupled weight decay (`d += weight_decay * p`) rather than L2.
    pub adam_w_mode: bool,
    /// The update norm is at most `max_unorm` times the parameter norm; 0: no trust ratio.
    pub max_unorm: f64,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for LAMBConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            bias_correction: true,
            adam_w_mode: true,
            max_unorm: 1.0,
            settings: Settings::default(),
        }
    }
}

/// [`LAMBConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type LAMB = Optim<LAMBConfig>;
/// [`LAMBConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type LAMB8bit = Optim<LAMBConfig, 8>;
/// The config of [`LAMB8bit`]: [`LAMBConfig`] (the state precision is the optimizer's).
pub type LAMB8bitConfig = LAMBConfig;

impl OptimizerConfig for LAMBConfig {
    const KIND: &'static str = "LAMB";

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

impl Sealed for LAMBConfig {
    type Rule = Elementwise<LambRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("beta1", &mut self.beta1),
            ("beta2", &mut self.beta2),
            ("eps", &mut self.eps),
            ("weight_decay", &mut self.weight_decay),
            ("bias_correction", &mut self.bias_correction),
            ("adam_w_mode", &mut self.adam_w_mode),
            ("max_unorm", &mut self.max_unorm),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::moments(self.beta1, self.beta2, self.eps)?;
        check::non_negative("weight_decay", self.weight_decay)?;
        check::non_negative("max_unorm", self.max_unorm)
    }

    fn rule(&self, step: u64) -> Elementwise<LambRule> {
        let c = self;
        Elementwise(LambRule::new(
            step,
            c.lr,
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            c.bias_correction,
            c.adam_w_mode,
            c.max_unorm,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
