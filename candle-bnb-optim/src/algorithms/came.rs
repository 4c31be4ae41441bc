//! CAME: confidence-guided factored moments, as its authors' `came_pytorch` implements it.

use candle_bnb_kernels::CameRule;
use candle_core::backprop::GradStore;
use candle_core::{bail, Result};

use crate::config::sealed::Sealed;
use crate::engine::{Factored, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// CAME (Luo et al. 2023) with the semantics of `came_pytorch` 0.1.3, whose field names it
/// keeps: Adafactor's factored second moment, a momentum, and for parameters of two or more
/// dims the momentum divided by the factored root of its residuals' average (the confidence).
/// State: a row and a column statistic per matrix for each of the two averages
/// (`8·(rows + cols)` bytes per matrix; a full second moment, `4·n` bytes, for the others) and
/// the momentum (f32, or 8-bit in [`CAME8bit`]: about 1.02 bytes per parameter on LLaMA's
/// shapes, 1.08 with the embedding's momentum kept in 32 bits). See [`CameRule`] for the step. Checkpoints have kind `CAME`.
///
/// `came_pytorch` has no default learning rate and neither has this config: `lr` is 0 in
/// `Default` and must be set (> 0); its authors train with 1e-4 to 2e-4. A parameter of an F16
/// or BF16 dtype is decayed and stepped in f32 and rounded once (`came_pytorch` rounds after
/// each of the two).
#[derive(Clone, Debug, PartialEq)]
pub struct CAMEConfig {
    /// Learning rate, > 0 (required).
    pub lr: f64,
    /// `(ε1, ε2)`: added to the squared gradients and to the squared residuals; each finite
    /// and > 0.
    pub eps: (f64, f64),
    /// The update's RMS bound, > 0.
    pub clip_threshold: f64,
    /// `(β1, β2, β3)`: the momentum's, the second moment's and the residuals' decay, each in
    /// `[0, 1]` (as `came_pytorch` checks them).
    pub betas: (f64, f64, f64),
    /// Decoupled weight decay: `p ← p - weight_decay·lr·p`.
    pub weight_decay: f64,
    /// State storage and gradient handling (`optim_bits` applies to the momentum; the
    /// statistics are always f32).
    pub settings: Settings,
}

impl Default for CAMEConfig {
    fn default() -> Self {
        Self {
            lr: 0.0,
            eps: (1e-30, 1e-16),
            clip_threshold: 1.0,
            betas: (0.9, 0.999, 0.9999),
            weight_decay: 0.0,
            settings: Settings::default(),
        }
    }
}

/// [`CAMEConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says otherwise.
pub type CAME = Optim<CAMEConfig>;
/// [`CAMEConfig`]'s optimizer with an 8-bit momentum unless `settings.optim_bits` says
/// otherwise.
pub type CAME8bit = Optim<CAMEConfig, 8>;
/// The config of [`CAME8bit`]: [`CAMEConfig`] (the state precision is the optimizer's).
pub type CAME8bitConfig = CAMEConfig;

impl OptimizerConfig for CAMEConfig {
    const KIND: &'static str = "CAME";

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

impl Sealed for CAMEConfig {
    type Rule = Factored<CameRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("eps", &mut self.eps),
            ("clip_threshold", &mut self.clip_threshold),
            ("betas", &mut self.betas),
            ("weight_decay", &mut self.weight_decay),
        ]
    }

    fn check(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!(
                "CAME needs an lr > 0 (it has no default; its authors use 1e-4 to 2e-4), got {}",
                self.lr
            )
        }
        check::positive("eps.0", self.eps.0)?;
        check::positive("eps.1", self.eps.1)?;
        if !(self.clip_threshold.is_finite() && self.clip_threshold > 0.0) {
            bail!(
                "clip_threshold must be finite and > 0, got {}",
                self.clip_threshold
            )
        }
        check::closed_unit_interval("betas.0", self.betas.0)?;
        check::closed_unit_interval("betas.1", self.betas.1)?;
        check::closed_unit_interval("betas.2", self.betas.2)?;
        check::non_negative("weight_decay", self.weight_decay)
    }

    fn rule(&self, _step: u64) -> Factored<CameRule> {
        let c = self;
        Factored(CameRule::new(
            c.lr,
            c.eps,
            c.clip_threshold,
            c.betas,
            c.weight_decay,
        ))
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
