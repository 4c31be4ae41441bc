//! The optimizers a plan can name, and their planned state.

use candle_bnb::optim::plan::{StatePlan, TensorSpec};
use candle_bnb::optim::{
    AdEMAMixConfig, AdafactorConfig, AdagradConfig, AdamConfig, AdamWConfig, CAMEConfig,
    LAMBConfig, LARSConfig, LionConfig, Optim, OptimizerConfig, Overrides, RMSpropConfig,
    SGDConfig,
};
use candle_core::{bail, Result};

/// Every optimizer `--optimizer` takes (SGD and LARS with momentum 0.9).
pub const NAMES: [&str; 23] = candle_bnb::OPTIMIZER_NAMES;

/// Where an optimizer stands in the advisor's ranking (lower first among the setups that fit;
/// memory breaks ties) and why: the article's decision guide made concrete. AdamW is the default
/// of LLM fine-tuning; its 8-bit form trains as well (bitsandbytes' and our side-by-side
/// measurements) with a quarter of its state, so it comes first.
pub fn advice(name: &str) -> (u8, &'static str) {
    match name {
        "adamw8bit" => (0, "AdamW quality with a quarter of its state"),
        "adamw32" | "candle-adamw" => (1, "the reference: AdamW with f32 state"),
        "adam8bit" => (
            1,
            "Adam with L2 decay, 8-bit state; prefer AdamW for transformers",
        ),
        "adam32" => (
            1,
            "Adam with L2 decay, f32 state; prefer AdamW for transformers",
        ),
        "ademamix8bit" | "ademamix32" => (
            1,
            "AdamW plus a slow momentum: better on long runs, one more state",
        ),
        "lamb8bit" | "lamb32" => (2, "layer-wise trust ratios, for very large batches"),
        "lion8bit" => (
            2,
            "half of 8-bit AdamW's state; retune: lr 3-10x lower, decay higher",
        ),
        "lion32" => (2, "one f32 state; retune: lr 3-10x lower, decay higher"),
        "sgd8bit" | "sgd32" => (
            3,
            "least state; momentum SGD trains transformers worse than AdamW",
        ),
        "lars8bit" | "lars32" => (3, "SGD with trust ratios, for large-batch vision training"),
        "came8bit" => (
            1,
            "factored second moment, 8-bit momentum: half of 8-bit AdamW's state, near-Adam quality",
        ),
        "came" => (
            1,
            "factored second moment, f32 momentum: near-Adam quality in half of AdamW's state",
        ),
        "adafactor8bit" | "adafactor" => (
            2,
            "factored second moment: least adaptive state; trains T5-style models, needs its own lr",
        ),
        "rmsprop8bit" | "rmsprop32" | "adagrad8bit" | "adagrad32" => {
            (3, "rarely the choice for transformers")
        }
        _ => (4, ""),
    }
}

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
        // Adafactor8bit keeps a momentum (beta1 0.9), Adafactor none (transformers' default).
        "adafactor" => with_bits(bits, tensors, AdafactorConfig::default()),
        // The state does not depend on the lr, which CAME requires.
        "came" => with_bits(
            bits,
            tensors,
            CAMEConfig {
                lr: 1e-4,
                ..Default::default()
            },
        ),
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
