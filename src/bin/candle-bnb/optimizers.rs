//! The optimizers a plan can name, and their planned state.

use candle_bnb::optim::plan::{StatePlan, TensorSpec};
use candle_bnb::optim::{
    AdEMAMixConfig, AdagradConfig, AdamConfig, AdamWConfig, LAMBConfig, LARSConfig, LionConfig,
    Optim, OptimizerConfig, Overrides, RMSpropConfig, SGDConfig,
};
use candle_core::{bail, Result};

/// Every optimizer `--optimizer` takes, as the LoRA example names them: the family's 8-bit and
/// 32-bit forms (SGD and LARS with momentum 0.9) and `candle_nn::AdamW`.
pub const NAMES: [&str; 19] = [
    "adamw8bit",
    "adamw32",
    "adam8bit",
    "adam32",
    "lion8bit",
    "lion32",
    "sgd8bit",
    "sgd32",
    "rmsprop8bit",
    "rmsprop32",
    "adagrad8bit",
    "adagrad32",
    "lamb8bit",
    "lamb32",
    "lars8bit",
    "lars32",
    "ademamix8bit",
    "ademamix32",
    "candle-adamw",
];

/// The optimizers `--optimizer` names (one, or `all`).
pub fn selected(name: &str) -> Result<Vec<&'static str>> {
    if name == "all" {
        return Ok(NAMES.to_vec());
    }
    match NAMES.iter().find(|n| **n == name) {
        Some(n) => Ok(vec![*n]),
        None => bail!(
            "--optimizer {name:?} is not one of: all, {}",
            NAMES.join(", ")
        ),
    }
}

/// The state optimizer `name` (one of [`NAMES`]) allocates for `tensors`.
pub fn plan(name: &str, tensors: &[TensorSpec]) -> Result<Vec<StatePlan>> {
    let (algorithm, bits) = match name.strip_suffix("8bit") {
        Some(a) => (a, 8),
        None => (name.strip_suffix("32").unwrap_or(name), 32),
    };
    match algorithm {
        "adamw" => with_bits(bits, tensors, AdamWConfig::default()),
        "adam" => with_bits(bits, tensors, AdamConfig::default()),
        "lion" => with_bits(bits, tensors, LionConfig::default()),
        "sgd" => with_bits(
            bits,
            tensors,
            SGDConfig {
                momentum: 0.9,
                ..Default::default()
            },
        ),
        "rmsprop" => with_bits(bits, tensors, RMSpropConfig::default()),
        "adagrad" => with_bits(bits, tensors, AdagradConfig::default()),
        "lamb" => with_bits(bits, tensors, LAMBConfig::default()),
        "lars" => with_bits(
            bits,
            tensors,
            LARSConfig {
                momentum: 0.9,
                ..Default::default()
            },
        ),
        "ademamix" => with_bits(bits, tensors, AdEMAMixConfig::default()),
        // Two f32 moments per trainable float parameter, allocated at construction.
        "candle-adamw" => Ok(tensors
            .iter()
            .filter(|t| t.trainable && t.dtype.is_float())
            .map(|t| StatePlan {
                name: t.name.clone(),
                elements: t.elem_count(),
                quantized: false,
                states: 2,
                bytes: 8 * t.elem_count(),
            })
            .collect()),
        _ => bail!("--optimizer {name:?} is not one of {}", NAMES.join(", ")),
    }
}

/// `Optim::plan` of `config` with `bits` of state.
fn with_bits<C: OptimizerConfig>(
    bits: u32,
    tensors: &[TensorSpec],
    mut config: C,
) -> Result<Vec<StatePlan>> {
    config.settings_mut().optim_bits = Some(bits);
    Optim::<C>::plan(tensors, config, &Overrides::new())
}
