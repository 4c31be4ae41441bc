//! RMSprop, with momentum and the centered variant.

use candle_bnb_kernels::RmspropRule;
use candle_core::backprop::GradStore;
use candle_core::Result;

use crate::config::sealed::Sealed;
use crate::engine::{Elementwise, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// RMSprop as `torch.optim.RMSprop` defines it, momentum and centered variants included
/// (bitsandbytes accepts both and ignores them; here they do what they say). States: the
/// squared-gradient average (unsigned), the momentum buffer (signed, when `momentum != 0`) and
/// the gradient average (signed, when centered). Weight decay is L2 (added to the gradient) on
/// both paths. Checkpoints have kind `RMSprop`.
#[derive(Clone, Debug, PartialEq)]
pub struct RMSpropConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the squared-gradient average, in `[0, 1)`.
    pub alpha: f64,
    /// Added to the root of the average for numerical stability; must be > 0.
    pub eps: f64,
    /// L2 weight decay, added to the gradient as `weight_decay * param`.
    pub weight_decay: f64,
    /// Momentum factor; 0 keeps no momentum buffer.
    pub momentum: f64,
    /// Normalise by the gradient's variance (average of squares minus squared average)
    /// instead of its raw second moment.
    pub centered: bool,
    /// State storage and gradient handling.
    pub settings: Settings,
}

impl Default for RMSpropConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            alpha: 0.99,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.0,
            centered: false,
            settings: Settings::default(),
        }
    }
}

/// [`RMSpropConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type RMSprop = Optim<RMSpropConfig>;
/// [`RMSpropConfig`]'s optimizer with 8-bit state unless `settings.optim_bits` says otherwise.
pub type RMSprop8bit = Optim<RMSpropConfig, 8>;
/// The config of [`RMSprop8bit`]: [`RMSpropConfig`] (the state precision is the optimizer's).
pub type RMSprop8bitConfig = RMSpropConfig;

impl OptimizerConfig for RMSpropConfig {
    const KIND: &'static str = "RMSprop";

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

impl Sealed for RMSpropConfig {
    type Rule = Elementwise<RmspropRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("alpha", &mut self.alpha),
            ("eps", &mut self.eps),
            ("weight_decay", &mut self.weight_decay),
            ("momentum", &mut self.momentum),
            ("centered", &mut self.centered),
        ]
    }

    fn check(&self) -> Result<()> {
        check::non_negative("lr", self.lr)?;
        check::unit_interval("alpha", self.alpha)?;
        check::positive_eps(self.eps)?;
        check::non_negative("weight_decay", self.weight_decay)?;
        check::non_negative("momentum", self.momentum)
    }

    fn rule(&self, _step: u64) -> Elementwise<RmspropRule> {
        let c = self;
        Elementwise(RmspropRule::new(
            c.lr,
            c.alpha,
            c.eps,
            c.weight_decay,
            c.momentum,
            c.centered,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
