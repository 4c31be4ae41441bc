//! Adafactor: factored second moments, as Hugging Face transformers implements it.

use candle_bnb_kernels::{AdafactorRule, AdafactorStepSize};
use candle_core::backprop::GradStore;
use candle_core::{bail, Result};

use crate::config::sealed::Sealed;
use crate::engine::{Factored, TrackedParams};
use crate::field::FieldText;
use crate::{check, Optim, OptimizerConfig, Settings};

/// Adafactor (Shazeer & Stern 2018) with the semantics and defaults of Hugging Face
/// transformers' `Adafactor`, whose field names it keeps. A parameter of two or more dims keeps
/// a row and a column statistic per matrix (its last two dims; `4·(rows + cols)` bytes per
/// matrix), one of fewer dims a full second moment (`4·n` bytes); with `beta1` a momentum (f32,
/// or 8-bit in [`Adafactor8bit`]). See [`AdafactorRule`] for the step.
///
/// The step size is `lr` (`relative_step: false`), or with the relative step
/// `min(warmup_init ? 1e-6·t : 1e-2, 1/√t)` at a parameter's step `t`; with `scale_parameter` it
/// is multiplied by the parameter's RMS (at least `eps.1`). Under the relative step there is no
/// base learning rate: `learning_rate()` reports 0 and `set_learning_rate` changes nothing
/// (`try_set_learning_rate` says why), as transformers ignores the group lr then; set
/// `relative_step: false` and `lr` to schedule it. Checkpoints have kind `Adafactor`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdafactorConfig {
    /// The fixed step size; `None` with the relative step (an `lr` with `relative_step` is an
    /// error, as in transformers).
    pub lr: Option<f64>,
    /// `(ε1, ε2)`: added to the squared gradients (finite and > 0), and the floor of the
    /// parameter scale (finite and >= 0).
    pub eps: (f64, f64),
    /// The update's RMS bound, > 0.
    pub clip_threshold: f64,
    /// The statistics decay by `1 - t^decay_rate` at step `t`; finite and <= 0.
    pub decay_rate: f64,
    /// The momentum's decay, in `[0, 1)`; `None`: no momentum when the optimizer's precision
    /// is 32 bits, 0.9 when it is 8 (the momentum is what [`Adafactor8bit`] quantizes). The
    /// optimizer's precision decides, not a per-parameter `optim_bits` override: set `beta1`
    /// to have a momentum in a 32-bit Adafactor.
    pub beta1: Option<f64>,
    /// Decoupled weight decay scaled by the step's `α`: `p ← p - weight_decay·α·p`.
    pub weight_decay: f64,
    /// Multiply the step size by the parameter's RMS.
    pub scale_parameter: bool,
    /// The step size from the step count instead of `lr`.
    pub relative_step: bool,
    /// With the relative step, warm up linearly from `1e-6`.
    pub warmup_init: bool,
    /// State storage and gradient handling (`optim_bits` applies to the momentum; the
    /// statistics are always f32).
    pub settings: Settings,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            lr: None,
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
            settings: Settings::default(),
        }
    }
}

/// [`AdafactorConfig`]'s optimizer with 32-bit state unless `settings.optim_bits` says
/// otherwise.
pub type Adafactor = Optim<AdafactorConfig>;
/// [`AdafactorConfig`]'s optimizer with an 8-bit momentum (`beta1` 0.9 unless set) unless
/// `settings.optim_bits` says otherwise.
pub type Adafactor8bit = Optim<AdafactorConfig, 8>;
/// The config of [`Adafactor8bit`]: [`AdafactorConfig`] (the state precision is the
/// optimizer's).
pub type Adafactor8bitConfig = AdafactorConfig;

/// The momentum decay `beta1: None` takes at 8 bits.
const DEFAULT_8BIT_BETA1: f64 = 0.9;

impl OptimizerConfig for AdafactorConfig {
    const KIND: &'static str = "Adafactor";

    /// The fixed step size; 0 under the relative step (which has none).
    fn lr(&self) -> f64 {
        self.lr.unwrap_or(0.0)
    }

    /// Sets the fixed step size (an error at validation under the relative step).
    fn set_lr(&mut self, lr: f64) {
        self.lr = Some(lr);
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn settings_mut(&mut self) -> &mut Settings {
        &mut self.settings
    }
}

impl Sealed for AdafactorConfig {
    type Rule = Factored<AdafactorRule>;

    fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)> {
        vec![
            ("lr", &mut self.lr),
            ("eps", &mut self.eps),
            ("clip_threshold", &mut self.clip_threshold),
            ("decay_rate", &mut self.decay_rate),
            ("beta1", &mut self.beta1),
            ("weight_decay", &mut self.weight_decay),
            ("scale_parameter", &mut self.scale_parameter),
            ("relative_step", &mut self.relative_step),
            ("warmup_init", &mut self.warmup_init),
        ]
    }

    fn check(&self) -> Result<()> {
        match (self.lr, self.relative_step) {
            (Some(lr), true) => bail!(
                "Adafactor: lr = {lr} with relative_step = true; a fixed lr needs relative_step = false (as transformers refuses the combination)"
            ),
            (None, false) => bail!("Adafactor: relative_step = false needs an lr"),
            (Some(lr), false) => check::non_negative("lr", lr)?,
            (None, true) => {}
        }
        if self.warmup_init && !self.relative_step {
            bail!("Adafactor: warmup_init = true needs relative_step = true")
        }
        check::positive("eps.0", self.eps.0)?;
        check::non_negative("eps.1", self.eps.1)?;
        if !(self.clip_threshold.is_finite() && self.clip_threshold > 0.0) {
            bail!(
                "clip_threshold must be finite and > 0, got {}",
                self.clip_threshold
            )
        }
        if !(self.decay_rate.is_finite() && self.decay_rate <= 0.0) {
            bail!(
                "decay_rate must be finite and <= 0, got {}",
                self.decay_rate
            )
        }
        if let Some(beta1) = self.beta1 {
            check::unit_interval("beta1", beta1)?;
        }
        check::non_negative("weight_decay", self.weight_decay)
    }

    fn rule(&self, step: u64) -> Factored<AdafactorRule> {
        let c = self;
        let step_size = match c.lr {
            Some(lr) if !c.relative_step => AdafactorStepSize::Fixed(lr),
            _ => AdafactorStepSize::Relative {
                warmup_init: c.warmup_init,
            },
        };
        Factored(AdafactorRule::new(
            step,
            step_size,
            c.eps,
            c.clip_threshold,
            c.decay_rate,
            c.beta1,
            c.weight_decay,
            c.scale_parameter,
        ))
    }

    fn resolve_for_bits(&mut self, bits: u32) {
        if bits == 8 {
            self.beta1.get_or_insert(DEFAULT_8BIT_BETA1);
        }
    }

    fn step(t: &mut TrackedParams, g: &GradStore, base: &Self, params: &[Self]) -> Result<()> {
        t.step(g, base, params)
    }
}
