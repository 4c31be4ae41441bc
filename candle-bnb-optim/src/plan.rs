//! Memory planning: what training a model takes, per part (frozen and trainable weights, an f32
//! master copy, gradients, optimizer state, activations), before anything is allocated.
//!
//! The optimizer state is exact: [`Optim::plan`](crate::Optim::plan) lays it out with the code the
//! optimizers allocate by (precision, `min_8bit_size` fallback, one f32 scale per block, overrides,
//! 32-bit embeddings), so a plan and `state_bytes()` of the optimizer cannot drift apart. The
//! activations are an estimate (see [`TransformerShape::activation_bytes`]).
//!
//! ```
//! use candle_bnb_optim::plan::{LlamaShape, MemoryPlan, TrainingSetup};
//! use candle_bnb_optim::{AdamW8bit, AdamW8bitConfig, Overrides};
//! use candle_core::DType;
//!
//! let llama = LlamaShape::llama2_7b();
//! let tensors = llama.tensors(DType::BF16);
//! assert_eq!(tensors.iter().map(|t| t.elem_count()).sum::<usize>(), 6_738_415_616);
//! let state = AdamW8bit::plan(&tensors, AdamW8bitConfig::default(), &Overrides::new())?;
//! let plan = MemoryPlan::new(&tensors, &state, &TrainingSetup::default());
//! // 2.03 bytes of 8-bit AdamW state per parameter (two codes, two f32 scales per 256), but 8 for
//! // the embedding's 131 M, which keeps 32-bit state: 14.47 GB, where 32-bit AdamW takes 53.9 GB.
//! assert_eq!(plan.optimizer_state, 14_469_742_720);
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Result};

/// One tensor of a model being planned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// Its name (as in the `VarMap` or the safetensors file); overrides match it.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype.
    pub dtype: DType,
    /// Trained (it has a gradient and optimizer state), or frozen.
    pub trainable: bool,
    /// Keeps 32-bit optimizer state whatever the precision, as a weight of
    /// [`nn::Embedding`](crate::nn::Embedding) or [`nn::StableEmbedding`](crate::nn::StableEmbedding)
    /// does (an override of `optim_bits` still wins).
    pub keep_32bit: bool,
}

impl TensorSpec {
    /// A trainable tensor without the embedding mark.
    pub fn new(name: impl Into<String>, shape: &[usize], dtype: DType) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            trainable: true,
            keep_32bit: false,
        }
    }

    /// Elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of the tensor itself.
    pub fn bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
}

/// One tensor's optimizer state in a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePlan {
    /// The tensor's name.
    pub name: String,
    /// Its elements.
    pub elements: usize,
    /// 8-bit (blockwise) state, else f32.
    pub quantized: bool,
    /// States per element the algorithm keeps (0 for SGD without momentum).
    pub states: usize,
    /// Bytes, as `ParamState::bytes` counts them.
    pub bytes: usize,
}

/// The tensors an optimizer steps: the trainable float ones, checked as construction checks
/// parameters (unique names; F32, F16 or BF16).
///
/// # Errors
/// A name given twice; a trainable float tensor of another dtype (naming it).
pub(crate) fn trainable_float(tensors: &[TensorSpec]) -> Result<Vec<&TensorSpec>> {
    crate::engine::unique_names("tensor", tensors.iter().map(|t| t.name.as_str()))?;
    let trainable: Vec<&TensorSpec> = tensors
        .iter()
        .filter(|t| t.trainable && t.dtype.is_float())
        .collect();
    crate::engine::steppable_dtypes(
        "tensor",
        trainable.iter().map(|t| (t.name.as_str(), t.dtype)),
    )?;
    Ok(trainable)
}

/// The shapes of a LLaMA-family decoder (LLaMA 1–3, Mistral without sliding-window specifics,
/// TinyLlama...): what `config.json` says of its tensors. Names follow Hugging Face's
/// `LlamaForCausalLM`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlamaShape {
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (the SwiGLU MLP's width).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (grouped-query attention; equal to the heads without it).
    pub num_key_value_heads: usize,
    /// `tie_word_embeddings`: the output projection is the embedding (no `lm_head.weight`).
    pub tie_word_embeddings: bool,
}

impl LlamaShape {
    /// LLaMA-2-7B (`meta-llama/Llama-2-7b-hf`): 6,738,415,616 parameters.
    pub fn llama2_7b() -> Self {
        Self {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: 32,
            tie_word_embeddings: false,
        }
    }

    /// LLaMA-2-13B (`meta-llama/Llama-2-13b-hf`): 13,015,864,320 parameters.
    pub fn llama2_13b() -> Self {
        Self {
            hidden_size: 5120,
            intermediate_size: 13824,
            num_hidden_layers: 40,
            num_attention_heads: 40,
            num_key_value_heads: 40,
            ..Self::llama2_7b()
        }
    }

    /// LLaMA-2-70B (`meta-llama/Llama-2-70b-hf`, grouped-query attention with 8 key-value
    /// heads): 68,976,648,192 parameters.
    pub fn llama2_70b() -> Self {
        Self {
            hidden_size: 8192,
            intermediate_size: 28672,
            num_hidden_layers: 80,
            num_attention_heads: 64,
            num_key_value_heads: 8,
            ..Self::llama2_7b()
        }
    }

    /// A LLaMA-shaped model of about `params` parameters, for planning by size alone: the
    /// hidden size of the LLaMA of that class (2048 up to 2 B, 4096 up to 10 B, 5120 up to 20 B,
    /// 8192 up to 100 B, 12288 beyond), a SwiGLU width of 8/3 of it rounded up to a multiple of
    /// 256, heads of 128, a 32000-token vocabulary, untied embeddings, and as many layers as
    /// bring the count nearest `params` (at least one). [`Self::tensors`] gives the exact count.
    pub fn with_params(params: usize) -> Self {
        let hidden: usize = match params {
            0..=2_000_000_000 => 2048,
            2_000_000_001..=10_000_000_000 => 4096,
            10_000_000_001..=20_000_000_000 => 5120,
            20_000_000_001..=100_000_000_000 => 8192,
            _ => 12288,
        };
        let intermediate = (8 * hidden / 3).div_ceil(256) * 256;
        let vocab = 32000;
        let per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden;
        let fixed = 2 * vocab * hidden + hidden;
        let layers = (params.saturating_sub(fixed) as f64 / per_layer as f64).round();
        Self {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: (layers as usize).max(1),
            num_attention_heads: hidden / 128,
            num_key_value_heads: hidden / 128,
            tie_word_embeddings: false,
        }
    }

    /// Every tensor, trainable, in `dtype`, named as in Hugging Face checkpoints; the embedding
    /// is marked to keep 32-bit state (what [`nn::Embedding`](crate::nn::Embedding) does).
    ///
    /// # Panics
    /// `num_attention_heads` is 0 or does not divide `hidden_size`.
    pub fn tensors(&self, dtype: DType) -> Vec<TensorSpec> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        assert!(
            self.num_attention_heads > 0 && h % self.num_attention_heads == 0,
            "hidden_size {h} is not a multiple of num_attention_heads {}",
            self.num_attention_heads
        );
        let kv = self.num_key_value_heads * (h / self.num_attention_heads);
        let mut tensors = vec![TensorSpec {
            keep_32bit: true,
            ..TensorSpec::new("model.embed_tokens.weight", &[self.vocab_size, h], dtype)
        }];
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj.weight", [h, h]),
                ("self_attn.k_proj.weight", [kv, h]),
                ("self_attn.v_proj.weight", [kv, h]),
                ("self_attn.o_proj.weight", [h, h]),
                ("mlp.gate_proj.weight", [i, h]),
                ("mlp.up_proj.weight", [i, h]),
                ("mlp.down_proj.weight", [h, i]),
            ] {
                tensors.push(TensorSpec::new(format!("{p}.{name}"), &shape, dtype));
            }
            for norm in ["input_layernorm.weight", "post_attention_layernorm.weight"] {
                tensors.push(TensorSpec::new(format!("{p}.{norm}"), &[h], dtype));
            }
        }
        tensors.push(TensorSpec::new("model.norm.weight", &[h], dtype));
        if !self.tie_word_embeddings {
            tensors.push(TensorSpec::new(
                "lm_head.weight",
                &[self.vocab_size, h],
                dtype,
            ));
        }
        tensors
    }
}

/// The activations of a transformer's training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerShape {
    /// Layers.
    pub layers: usize,
    /// Hidden size `h`.
    pub hidden_size: usize,
    /// Attention heads `a`.
    pub heads: usize,
    /// Sequence length `s`.
    pub seq_len: usize,
    /// Micro-batch size `b`.
    pub batch_size: usize,
    /// Full activation recomputation (each layer keeps only its input).
    pub recompute: bool,
}

impl TransformerShape {
    /// Activation bytes of one step with 16-bit activations, after Korthikanti et al. 2022,
    /// "Reducing Activation Recomputation in Large Transformer Models" (arXiv:2205.05198), §4.1
    /// with no tensor or sequence parallelism: `s·b·h·(34 + 5·a·s/h)` bytes per layer, or
    /// `2·s·b·h` per layer with full recomputation. The paper counts a GPT layer (a 4h MLP); a
    /// LLaMA layer's SwiGLU MLP of width `intermediate_size` keeps somewhat more, so this is an
    /// estimate, not a measurement. Embeddings and the output logits are not counted.
    pub fn activation_bytes(&self) -> u64 {
        let (s, b, h, a) = (
            self.seq_len as u64,
            self.batch_size as u64,
            self.hidden_size as u64,
            self.heads as u64,
        );
        let per_layer = if self.recompute {
            2 * s * b * h
        } else {
            // s·b·h·34 + 5·a·s²·b, exact in integers.
            34 * s * b * h + 5 * a * s * s * b
        };
        per_layer * self.layers as u64
    }
}

/// How a model is trained, besides its tensors and optimizer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrainingSetup {
    /// Keep an f32 master copy of each trainable F16/BF16 tensor (mixed-precision training).
    pub master_weights: bool,
    /// The activations to estimate (`None`: not counted).
    pub activations: Option<TransformerShape>,
}

/// Bytes of one training setup, per part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Weights that are not trained.
    pub frozen_weights: u64,
    /// Weights that are trained.
    pub trainable_weights: u64,
    /// The f32 master copy of trainable F16/BF16 weights ([`TrainingSetup::master_weights`]).
    pub master_weights: u64,
    /// One gradient per trainable weight, in its dtype.
    pub gradients: u64,
    /// Optimizer state (exact; from [`Optim::plan`](crate::Optim::plan)).
    pub optimizer_state: u64,
    /// Activations (an estimate; 0 when not asked for).
    pub activations: u64,
}

impl MemoryPlan {
    /// The plan of training `tensors` with optimizer state `state` (from `Optim::plan` over the
    /// same tensors) under `setup`.
    pub fn new(tensors: &[TensorSpec], state: &[StatePlan], setup: &TrainingSetup) -> Self {
        let mut plan = Self::default();
        for t in tensors {
            let bytes = t.bytes() as u64;
            if t.trainable && t.dtype.is_float() {
                plan.trainable_weights += bytes;
                plan.gradients += bytes;
                if setup.master_weights && matches!(t.dtype, DType::F16 | DType::BF16) {
                    plan.master_weights += 4 * t.elem_count() as u64;
                }
            } else {
                plan.frozen_weights += bytes;
            }
        }
        plan.optimizer_state = state.iter().map(|s| s.bytes as u64).sum();
        plan.activations = setup.activations.map_or(0, |a| a.activation_bytes());
        plan
    }

    /// Every part together.
    pub fn total(&self) -> u64 {
        self.frozen_weights
            + self.trainable_weights
            + self.master_weights
            + self.gradients
            + self.optimizer_state
            + self.activations
    }
}
