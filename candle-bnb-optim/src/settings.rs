//! [`Settings`]: what every optimizer of the family shares besides its algorithm, the state
//! storage (precision, block size) and the gradient handling (clipping, non-finite policy).

use candle_core::{bail, Result};

use crate::field::FieldText;

/// What a step does when some gradient holds NaN or ±inf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum NonFinitePolicy {
    /// Skip the whole step: every parameter and state stays bit-identical, and the step is
    /// counted in `skipped_steps()` instead of the step count.
    #[default]
    Skip,
    /// Return an error naming the first offending parameter (nothing is changed).
    Error,
}

/// Squared gradient norms kept per parameter for percentile clipping (as bitsandbytes does).
pub const GRAD_NORM_HISTORY: usize = 100;

/// The settings every config of the family has, next to its algorithm's hyper-parameters:
/// how the state is stored and how gradients are handled before the update. `Default` gives
/// bitsandbytes' defaults with the optimizer's own state precision.
///
/// ```
/// use candle_bnb_optim::{AdamW8bitConfig, Settings};
///
/// let config = AdamW8bitConfig {
///     lr: 1e-3,
///     settings: Settings { max_grad_norm: Some(1.0), block_size: 128, ..Default::default() },
///     ..Default::default()
/// };
/// # let _ = config;
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// State precision: `Some(8)` (blockwise-quantized state) or `Some(32)` (f32 state);
    /// anything else is an error. `None`: the optimizer's own, 8 for the `...8bit` names
    /// (`AdamW8bit`), 32 for the others (`AdamW`). An optimizer's configs always hold
    /// `Some` (it fills in its own).
    pub optim_bits: Option<u32>,
    /// Parameters with fewer elements keep 32-bit state even when the precision is 8.
    pub min_8bit_size: usize,
    /// Elements per quantization block of 8-bit state (one of
    /// [`SUPPORTED_BLOCK_SIZES`](candle_bnb_kernels::SUPPORTED_BLOCK_SIZES)).
    pub block_size: usize,
    /// What a step does when a gradient holds NaN or ±inf.
    pub non_finite: NonFinitePolicy,
    /// Global gradient-norm clipping: when the L2 norm of all gradients together exceeds it,
    /// every gradient is scaled by `max_grad_norm / (norm + 1e-6)` (as
    /// `torch.nn.utils.clip_grad_norm_`). `None`: off.
    pub max_grad_norm: Option<f64>,
    /// Percentile clipping (bitsandbytes ≤ 0.49), in `1..=100`, 100 = off: each gradient whose
    /// norm exceeds this percentile of its own last [`GRAD_NORM_HISTORY`] norms is scaled down
    /// to it.
    pub percentile_clipping: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            optim_bits: None,
            min_8bit_size: 4096,
            block_size: 256,
            non_finite: NonFinitePolicy::Skip,
            max_grad_norm: None,
            percentile_clipping: 100,
        }
    }
}

impl Settings {
    /// Checks every setting's range; errors name the setting and its value.
    ///
    /// # Errors
    /// `optim_bits` other than 8 or 32, an unsupported `block_size`, a `max_grad_norm` that is
    /// not finite and > 0, a `percentile_clipping` outside 1..=100.
    pub fn validate(&self) -> Result<()> {
        if let Some(bits) = self.optim_bits.filter(|b| *b != 8 && *b != 32) {
            bail!("optim_bits must be 8 or 32, got {bits}")
        }
        if !candle_bnb_kernels::SUPPORTED_BLOCK_SIZES.contains(&self.block_size) {
            bail!(
                "block_size {} is not supported; use one of {:?}",
                self.block_size,
                candle_bnb_kernels::SUPPORTED_BLOCK_SIZES
            )
        }
        if let Some(max) = self.max_grad_norm {
            if !(max.is_finite() && max > 0.0) {
                bail!("max_grad_norm must be finite and > 0, got {max}")
            }
        }
        if !(1..=100).contains(&self.percentile_clipping) {
            bail!(
                "percentile_clipping must be in 1..=100 (100: off), got {}",
                self.percentile_clipping
            )
        }
        Ok(())
    }

    /// How the state is stored, `optim_bits` resolved with `default_bits` when `None`.
    pub(crate) fn layout(&self, default_bits: u32) -> StateLayout {
        StateLayout {
            optim_bits: self.optim_bits.unwrap_or(default_bits),
            min_8bit_size: self.min_8bit_size,
            block_size: self.block_size,
        }
    }

    /// Each setting by name, as the text form of configs lists them (after the algorithm's
    /// hyper-parameters).
    pub(crate) fn fields_mut(&mut self) -> [(&'static str, &mut dyn FieldText); 6] {
        [
            ("optim_bits", &mut self.optim_bits),
            ("min_8bit_size", &mut self.min_8bit_size),
            ("block_size", &mut self.block_size),
            ("non_finite", &mut self.non_finite),
            ("max_grad_norm", &mut self.max_grad_norm),
            ("percentile_clipping", &mut self.percentile_clipping),
        ]
    }
}

/// How a parameter's state is stored, with the precision resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateLayout {
    pub(crate) optim_bits: u32,
    pub(crate) min_8bit_size: usize,
    pub(crate) block_size: usize,
}

impl StateLayout {
    /// Whether a parameter of `n` elements gets 8-bit (blockwise) state: 8-bit precision and at
    /// least `min_8bit_size` elements. The optimizers allocate by it and plans count by it.
    pub(crate) fn quantizes(&self, n: usize) -> bool {
        self.optim_bits == 8 && n >= self.min_8bit_size
    }

    /// Bytes of `n_states` states of a parameter of `n` elements, as `ParamState::bytes` counts
    /// them: per state one code and per block one f32 scale when quantized, else one f32 per
    /// element (the 256-entry maps are shared and not counted).
    pub(crate) fn state_bytes(&self, n: usize, n_states: usize) -> usize {
        if self.quantizes(n) {
            n_states * (n + 4 * n.div_ceil(self.block_size))
        } else {
            n_states * 4 * n
        }
    }
}

/// `skip` or `error`.
impl FieldText for NonFinitePolicy {
    fn to_text(&self) -> String {
        match self {
            Self::Skip => "skip",
            Self::Error => "error",
        }
        .to_string()
    }

    fn set_text(&mut self, name: &str, value: &str) -> Result<()> {
        *self = match value.trim() {
            "skip" => Self::Skip,
            "error" => Self::Error,
            v => bail!("field {name}: expected \"skip\" or \"error\", got {v:?}"),
        };
        Ok(())
    }
}
