//! A LLaMA forward pass built only from differentiable tensor ops (candle-transformers' llama
//! uses fused softmax / rms-norm / rope kernels without backward), with LoRA on chosen
//! projections. Base weights are frozen tensors; only the LoRA matrices are `Var`s.

use candle_core::{bail, DType, Device, Result, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::llama::{Llama3RopeConfig, Llama3RopeType, LlamaConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::f32::consts::PI;
use std::path::Path;

/// The projections LoRA can adapt, by their Hugging Face names.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Rope frequency scaling from `config.json`'s `rope_scaling`.
#[derive(Clone, Debug)]
pub enum RopeScaling {
    /// Llama 2 style: positions divided by `factor`.
    Linear(f32),
    /// Llama 3.1 style wavelength-dependent scaling (candle-transformers' config type).
    Llama3(Llama3RopeConfig),
}

/// The model shape, from a LLaMA-family `config.json`.
#[derive(Clone, Debug)]
pub struct Spec {
    pub hidden: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_positions: usize,
    pub tie_embeddings: bool,
    pub bos: Option<u32>,
    pub eos: Vec<u32>,
}

/// The rope theta and scaling of a `config.json`, from either spelling.
///
/// transformers < 5 writes a top-level `rope_theta` and an optional `rope_scaling` object;
/// transformers >= 5 writes only `rope_parameters`, one object with `rope_theta`, `rope_type` and
/// the scaling fields. A config may carry both (a tool that keeps the old keys, a hand edit), so
/// they are read together and must agree: silently preferring one would train with positions the
/// other file reader does not use. `rope_parameters` is checked strictly (an unknown type or key is
/// an error naming it), since a key this model ignores would otherwise change nothing without a
/// word; `rope_scaling` keeps its old leniency towards extra keys so existing configs still load.
/// Without any theta the value is transformers' default, 10000.
fn rope_settings(
    top_theta: Option<&serde_json::Value>,
    old: Option<&serde_json::Value>,
    new: Option<&serde_json::Value>,
    max_positions: usize,
    origin: &str,
) -> Result<(f32, Option<RopeScaling>)> {
    let top_theta = match top_theta {
        Some(v) => Some(as_number(v, "rope_theta", origin)?),
        None => None,
    };
    let old = match old {
        Some(v) => Some(parse_rope_object(
            v,
            "rope_scaling",
            false,
            max_positions,
            origin,
        )?),
        None => None,
    };
    let new = match new {
        Some(v) => Some(parse_rope_object(
            v,
            "rope_parameters",
            true,
            max_positions,
            origin,
        )?),
        None => None,
    };
    let thetas = [
        ("rope_theta", top_theta),
        ("rope_parameters.rope_theta", new.as_ref().and_then(|n| n.0)),
        ("rope_scaling.rope_theta", old.as_ref().and_then(|o| o.0)),
    ];
    let mut theta: Option<(&str, f64)> = None;
    for (name, value) in thetas {
        let Some(value) = value else { continue };
        match theta {
            Some((first, seen)) if seen != value => {
                bail!("{origin}: {first} {seen} disagrees with {name} {value}")
            }
            Some(_) => {}
            None => theta = Some((name, value)),
        }
    }
    let theta = match theta {
        None => 10_000.0,
        Some((name, t)) if t <= 0.0 => bail!("{origin}: {name} = {t} must be positive"),
        Some((_, t)) => t,
    };
    let scaling = match (old, new) {
        (Some((_, old)), Some((_, new))) => {
            // Llama3RopeConfig has no PartialEq; the Debug text holds every field exactly.
            if format!("{old:?}") != format!("{new:?}") {
                bail!(
                    "{origin}: rope_scaling {} disagrees with rope_parameters {}",
                    describe_scaling(&old),
                    describe_scaling(&new)
                )
            }
            new
        }
        (Some((_, s)), None) | (None, Some((_, s))) => s,
        (None, None) => None,
    };
    Ok((theta as f32, scaling))
}

/// `v` as a finite number, or an error naming `name` and the value.
fn as_number(v: &serde_json::Value, name: &str, origin: &str) -> Result<f64> {
    match v.as_f64().filter(|x| x.is_finite()) {
        Some(x) => Ok(x),
        None => bail!("{origin}: {name} = {v} is not a number"),
    }
}

/// The type and fields of a scaling, for error messages.
fn describe_scaling(s: &Option<RopeScaling>) -> String {
    match s {
        None => "(type default, no scaling)".to_string(),
        Some(RopeScaling::Linear(f)) => format!("(type linear, factor {f})"),
        Some(RopeScaling::Llama3(c)) => format!(
            "(type llama3, factor {}, low_freq_factor {}, high_freq_factor {}, original_max_position_embeddings {})",
            c.factor, c.low_freq_factor, c.high_freq_factor, c.original_max_position_embeddings
        ),
    }
}

/// Reads one rope object (`rope_scaling` or `rope_parameters`, named `name`): its theta if it
/// has one, and its scaling. `strict`: keys the type does not use are errors.
fn parse_rope_object(
    v: &serde_json::Value,
    name: &str,
    strict: bool,
    max_positions: usize,
    origin: &str,
) -> Result<(Option<f64>, Option<RopeScaling>)> {
    let Some(obj) = v.as_object() else {
        bail!("{origin}: {name} must be an object, not {v}")
    };
    // transformers >= 5 nests one object per attention layer type (`full_attention`,
    // `sliding_attention`) only for models that declare `layer_types` (Gemma 3, ModernBERT);
    // LLaMA has one rope for every layer, so such a config is not a LLaMA config.
    let nested: Vec<&str> = obj
        .iter()
        .filter(|(_, v)| v.is_object())
        .map(|(k, _)| k.as_str())
        .collect();
    if !nested.is_empty() {
        bail!(
            "{origin}: {name} holds per-layer-type entries ({}); a LLaMA config has one set of rope parameters for every layer",
            nested.join(", ")
        )
    }
    let text = |key: &str| -> Result<Option<&str>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => bail!("{origin}: {name}.{key} = {other} is not a string"),
        }
    };
    // Older configs (and transformers' own back-compatibility) spell the type `type`.
    let kind = match (text("rope_type")?, text("type")?) {
        (Some(a), Some(b)) if a != b => {
            bail!("{origin}: {name} has rope_type {a:?} but type {b:?}")
        }
        (a, b) => a.or(b).unwrap_or("default").to_string(),
    };
    let number = |key: &str| -> Result<Option<f64>> {
        match obj.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => as_number(v, &format!("{name}.{key}"), origin).map(Some),
        }
    };
    let required = |key: &str| -> Result<f64> {
        match number(key)? {
            Some(x) => Ok(x),
            None => bail!("{origin}: {name} of type {kind} needs a numeric {key}"),
        }
    };
    let fields: &[&str] = match kind.as_str() {
        "default" => &[],
        "linear" => &["factor"],
        "llama3" => &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
        other => bail!(
            "{origin}: {name} has rope_type {other:?}, which is not supported (default, linear, llama3)"
        ),
    };
    if strict {
        let common = ["rope_type", "type", "rope_theta", "partial_rotary_factor"];
        if let Some(key) = obj
            .keys()
            .find(|k| !common.contains(&k.as_str()) && !fields.contains(&k.as_str()))
        {
            bail!(
                "{origin}: {name} has the key {key:?}, which rope_type {kind:?} does not use (known: {})",
                common.iter().chain(fields).copied().collect::<Vec<_>>().join(", ")
            )
        }
    }
    // A partial rotary embedding would rotate only part of each head; this model rotates all of
    // it, so only the no-op value is accepted.
    if let Some(p) = number("partial_rotary_factor")?.filter(|&p| p != 1.0) {
        bail!("{origin}: {name}.partial_rotary_factor = {p} is not supported (1.0: the whole head is rotated)")
    }
    let theta = number("rope_theta")?;
    let factor = || -> Result<f32> {
        let f = required("factor")?;
        if f <= 0.0 {
            bail!("{origin}: {name}.factor = {f} must be positive")
        }
        Ok(f as f32)
    };
    let scaling = match kind.as_str() {
        "linear" => Some(RopeScaling::Linear(factor()?)),
        "llama3" => {
            // transformers fills a missing pre-scaling context length with
            // max_position_embeddings when it loads a config.
            let original = match number("original_max_position_embeddings")? {
                None => max_positions,
                Some(n) if n >= 1.0 && n.fract() == 0.0 => n as usize,
                Some(n) => bail!(
                    "{origin}: {name}.original_max_position_embeddings = {n} is not a positive integer"
                ),
            };
            Some(RopeScaling::Llama3(Llama3RopeConfig {
                factor: factor()?,
                low_freq_factor: required("low_freq_factor")? as f32,
                high_freq_factor: required("high_freq_factor")? as f32,
                original_max_position_embeddings: original,
                rope_type: Llama3RopeType::Llama3,
            }))
        }
        _ => None,
    };
    Ok((theta, scaling))
}

impl Spec {
    /// Parses a `config.json` text. Rope settings are read from transformers < 5's top-level
    /// `rope_theta` / `rope_scaling` or transformers >= 5's `rope_parameters` (see
    /// [`rope_settings`]); types `default`, `linear` and `llama3` are supported. Other types, a
    /// `head_dim` other than hidden / heads, and inconsistent head counts are errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let mut value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| candle_core::Error::msg(format!("{origin}: malformed JSON: {e}")))?;
        let text_field = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
        if let Some(kind) = text_field("model_type").filter(|k| k != "llama") {
            bail!("{origin}: model_type {kind:?} is not a LLaMA-family model (\"llama\")")
        }
        if let Some(act) = text_field("hidden_act").filter(|a| a != "silu") {
            bail!("{origin}: hidden_act {act:?} is not supported (silu)")
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if value.get(flag).and_then(|v| v.as_bool()) == Some(true) {
                bail!("{origin}: {flag} = true is not supported (projections without bias)")
            }
        }
        // Both rope spellings leave the object before candle's parser sees it: it knows neither
        // `rope_parameters` nor a `linear` `rope_scaling`.
        let taken = |value: &mut serde_json::Value, key: &str| {
            value
                .as_object_mut()
                .and_then(|o| o.remove(key))
                .filter(|v| !v.is_null())
        };
        let old_scaling = taken(&mut value, "rope_scaling");
        let rope_parameters = taken(&mut value, "rope_parameters");
        let top_theta = value.get("rope_theta").cloned();
        let head_dim_field = value.get("head_dim").and_then(|h| h.as_u64());
        let c: LlamaConfig = serde_json::from_value(value)
            .map_err(|e| candle_core::Error::msg(format!("{origin}: {e}")))?;
        let kv_heads = c.num_key_value_heads();
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            bail!(
                "{origin}: hidden_size {} is not a multiple of num_attention_heads {}",
                c.hidden_size,
                c.num_attention_heads
            )
        }
        if kv_heads == 0 || !c.num_attention_heads.is_multiple_of(kv_heads) {
            bail!(
                "{origin}: num_attention_heads {} is not a multiple of num_key_value_heads {kv_heads}",
                c.num_attention_heads
            )
        }
        let (rope_theta, rope_scaling) = rope_settings(
            top_theta.as_ref(),
            old_scaling.as_ref(),
            rope_parameters.as_ref(),
            c.max_position_embeddings,
            origin,
        )?;
        let head_dim = c.hidden_size / c.num_attention_heads;
        if let Some(h) = head_dim_field.filter(|&h| h as usize != head_dim) {
            bail!("{origin}: head_dim {h} differs from hidden_size / num_attention_heads = {head_dim}; not supported")
        }
        if !head_dim.is_multiple_of(2) {
            bail!("{origin}: head_dim {head_dim} must be even for rotary embeddings")
        }
        use candle_transformers::models::llama::LlamaEosToks;
        Ok(Self {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            vocab: c.vocab_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads,
            head_dim,
            rms_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_positions: c.max_position_embeddings,
            tie_embeddings: c.tie_word_embeddings.unwrap_or(false),
            bos: c.bos_token_id,
            eos: match c.eos_token_id {
                None => vec![],
                Some(LlamaEosToks::Single(t)) => vec![t],
                Some(LlamaEosToks::Multiple(t)) => t,
            },
        })
    }

    /// Reads and parses `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            candle_core::Error::msg(format!("cannot read model config {}: {e}", path.display()))
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// The tiny default: `layers` blocks of width `hidden`, 4 heads over 2 KV heads (GQA).
    pub fn tiny(vocab: usize, hidden: usize, layers: usize, bos: u32, eos: u32) -> Self {
        Self {
            hidden,
            intermediate: hidden * 8 / 3,
            vocab,
            layers,
            heads: 4,
            kv_heads: 2,
            head_dim: hidden / 4,
            rms_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_positions: 512,
            tie_embeddings: false,
            bos: Some(bos),
            eos: vec![eos],
        }
    }

    /// The `config.json` of this spec, as Hugging Face writes it (tests write checkpoints with it).
    #[allow(dead_code)]
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos.first(),
            "hidden_act": "silu",
        })
    }

    /// Shapes of every base tensor, by Hugging Face name.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, hd) = (self.hidden, self.intermediate, self.head_dim);
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            for (name, shape) in [
                ("self_attn.q_proj", vec![self.heads * hd, h]),
                ("self_attn.k_proj", vec![self.kv_heads * hd, h]),
                ("self_attn.v_proj", vec![self.kv_heads * hd, h]),
                ("self_attn.o_proj", vec![h, self.heads * hd]),
                ("mlp.gate_proj", vec![i, h]),
                ("mlp.up_proj", vec![i, h]),
                ("mlp.down_proj", vec![h, i]),
                ("input_layernorm", vec![h]),
                ("post_attention_layernorm", vec![h]),
            ] {
                shapes.push((format!("{p}.{name}.weight"), shape));
            }
        }
        shapes.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_embeddings {
            shapes.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        shapes
    }

    /// Rotary inverse frequencies, with the configured scaling.
    fn inv_freq(&self) -> Vec<f32> {
        let base: Vec<f32> = (0..self.head_dim)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f32 / self.head_dim as f32))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear(factor)) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3(c)) if matches!(c.rope_type, Llama3RopeType::Default) => base,
            Some(RopeScaling::Llama3(c)) => {
                let old = c.original_max_position_embeddings as f32;
                let (low, high) = (old / c.low_freq_factor, old / c.high_freq_factor);
                base.iter()
                    .map(|&freq| {
                        let wavelen = 2.0 * PI / freq;
                        if wavelen < high {
                            freq
                        } else if wavelen > low {
                            freq / c.factor
                        } else {
                            let smooth = (old / wavelen - c.low_freq_factor)
                                / (c.high_freq_factor - c.low_freq_factor);
                            (1.0 - smooth) * freq / c.factor + smooth * freq
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Random base weights for the tiny default, seeded: N(0, 0.02²) matrices (Hugging Face's
/// `initializer_range`), norm weights 1.
pub fn random_weights(
    spec: &Spec,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<Vec<(String, Tensor)>> {
    let mut rng = StdRng::seed_from_u64(seed);
    spec.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|_| {
                        let z: f32 = rng.sample(rand_distr::StandardNormal);
                        0.02 * z
                    })
                    .collect()
            };
            let t = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
            Ok((name, t))
        })
        .collect()
}

/// LoRA hyper-parameters.
#[derive(Clone, Debug)]
pub struct LoraSettings {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Hugging Face projection names (`q_proj`, ...).
    pub targets: Vec<String>,
}

impl LoraSettings {
    /// Parses `--target-modules` (`q,k,v` or `q_proj,k_proj`); an unknown name is an error
    /// listing the valid ones.
    pub fn parse_targets(list: &str) -> Result<Vec<String>> {
        let mut targets = Vec::new();
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let name = if raw.ends_with("_proj") {
                raw.to_string()
            } else {
                format!("{raw}_proj")
            };
            if !PROJECTIONS.contains(&name.as_str()) {
                bail!("target module {raw:?} does not exist; valid: q, k, v, o, gate, up, down (or their _proj names)")
            }
            if !targets.contains(&name) {
                targets.push(name);
            }
        }
        if targets.is_empty() {
            bail!("--target-modules is empty; give at least one of q, k, v, o, gate, up, down")
        }
        Ok(targets)
    }
}

/// The LoRA pair of one projection: `A` `[r, in]` (Kaiming-uniform, as PEFT) and `B` `[out, r]`
/// (zero), output `(alpha / r) · B · A · x`.
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

/// A frozen linear projection `[out, in]` with an optional LoRA pair.
#[derive(Clone, Debug)]
pub struct Proj {
    pub weight: Tensor,
    pub lora: Option<Lora>,
}

/// Per-forward dropout randomness: masks come from a seeded generator so runs (and resumed runs)
/// repeat exactly. `None`: evaluation, no dropout.
pub type DropoutRng = Option<StdRng>;

impl Proj {
    /// `x` `[n, in]` to `[n, out]`.
    fn forward(&self, x: &Tensor, rng: &mut DropoutRng) -> Result<Tensor> {
        let base = x.matmul(&self.weight.t()?)?;
        let Some(lora) = &self.lora else {
            return Ok(base);
        };
        let mut x32 = x.to_dtype(DType::F32)?;
        if let (Some(rng), true) = (rng.as_mut(), lora.dropout > 0.0) {
            let keep = 1.0 - lora.dropout;
            let mask: Vec<f32> = (0..x32.elem_count())
                .map(|_| {
                    if rng.random::<f32>() < keep {
                        1.0 / keep
                    } else {
                        0.0
                    }
                })
                .collect();
            x32 = (x32 * Tensor::from_vec(mask, x.shape(), x.device())?)?;
        }
        let delta = x32.matmul(&lora.a.t()?)?.matmul(&lora.b.t()?)?;
        let dtype = base.dtype();
        base + (delta * lora.scale)?.to_dtype(dtype)?
    }
}

struct Block {
    attn_norm: Tensor,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    mlp_norm: Tensor,
    gate: Proj,
    up: Proj,
    down: Proj,
}

/// The model: frozen base weights plus LoRA `Var`s, held in [`Llama::lora_vars`] under PEFT's
/// module names (`model.layers.0.self_attn.q_proj.lora_A.weight`).
pub struct Llama {
    pub spec: Spec,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// The trainable LoRA matrices, named as in the adapter file without PEFT's
    /// `base_model.model.` prefix.
    pub lora_vars: VarMap,
    pub dtype: DType,
}

impl Llama {
    /// Builds the model from base weights in `vb` (errors name a missing tensor or a wrong
    /// shape), adding LoRA pairs initialised from `seed`.
    pub fn load(spec: Spec, vb: VarBuilder, lora: &LoraSettings, seed: u64) -> Result<Self> {
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let lora_vars = VarMap::new();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x10_4a);
        let (h, i, hd) = (spec.hidden, spec.intermediate, spec.head_dim);
        let mut proj = |prefix: &str, name: &str, out: usize, inp: usize| -> Result<Proj> {
            let weight = vb.get((out, inp), &format!("{prefix}.{name}.weight"))?;
            let lora = if lora.targets.iter().any(|t| t == name) {
                // PEFT: kaiming_uniform_(A, a=sqrt(5)) has bound 1/sqrt(in).
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..lora.rank * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (lora.rank, inp), &device)?)?;
                let b = Var::zeros((out, lora.rank), DType::F32, &device)?;
                let mut data = lora_vars.data().lock().unwrap();
                data.insert(format!("{prefix}.{name}.lora_A.weight"), a.clone());
                data.insert(format!("{prefix}.{name}.lora_B.weight"), b.clone());
                Some(Lora {
                    a,
                    b,
                    scale: lora.alpha / lora.rank as f64,
                    dropout: lora.dropout,
                })
            } else {
                None
            };
            Ok(Proj { weight, lora })
        };
        let mut blocks = Vec::with_capacity(spec.layers);
        for l in 0..spec.layers {
            let (attn, mlp) = (
                format!("model.layers.{l}.self_attn"),
                format!("model.layers.{l}.mlp"),
            );
            blocks.push(Block {
                q: proj(&attn, "q_proj", spec.heads * hd, h)?,
                k: proj(&attn, "k_proj", spec.kv_heads * hd, h)?,
                v: proj(&attn, "v_proj", spec.kv_heads * hd, h)?,
                o: proj(&attn, "o_proj", h, spec.heads * hd)?,
                gate: proj(&mlp, "gate_proj", i, h)?,
                up: proj(&mlp, "up_proj", i, h)?,
                down: proj(&mlp, "down_proj", h, i)?,
                attn_norm: vb.get(h, &format!("model.layers.{l}.input_layernorm.weight"))?,
                mlp_norm: vb.get(
                    h,
                    &format!("model.layers.{l}.post_attention_layernorm.weight"),
                )?,
            });
        }
        let embed = vb.get((spec.vocab, h), "model.embed_tokens.weight")?;
        let lm_head = if spec.tie_embeddings {
            embed.clone()
        } else {
            vb.get((spec.vocab, h), "lm_head.weight")?
        };
        let inv_freq = Tensor::new(spec.inv_freq(), &device)?;
        let positions =
            Tensor::arange(0u32, spec.max_positions as u32, &device)?.to_dtype(DType::F32)?;
        let angles = positions
            .unsqueeze(1)?
            .broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let angles = Tensor::cat(&[&angles, &angles], 1)?;
        Ok(Self {
            norm: vb.get(h, "model.norm.weight")?,
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
            spec,
            embed,
            blocks,
            lm_head,
            lora_vars,
            dtype,
        })
    }

    /// Number of frozen base parameters.
    pub fn base_params(&self) -> usize {
        self.spec
            .tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The LoRA variables, sorted by name.
    pub fn named_lora_vars(&self) -> Vec<(String, Var)> {
        let mut vars: Vec<(String, Var)> = self
            .lora_vars
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let x32 = x.to_dtype(DType::F32)?;
        let scale = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.spec.rms_eps)?
            .sqrt()?
            .recip()?;
        x32.broadcast_mul(&scale)?
            .to_dtype(self.dtype)?
            .broadcast_mul(weight)
    }

    /// Rotary embedding on `[b, heads, t, hd]` (Hugging Face's half-split layout).
    fn rope(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let half = self.spec.head_dim / 2;
        let (cos, sin) = (self.cos.narrow(0, 0, t)?, self.sin.narrow(0, 0, t)?);
        let rotated = Tensor::cat(
            &[
                &x.narrow(D::Minus1, half, half)?.neg()?,
                &x.narrow(D::Minus1, 0, half)?,
            ],
            D::Minus1,
        )?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }

    /// Logits `[b, t, vocab]` (f32) for token ids `[b, t]` (u32). `rng` drives LoRA dropout
    /// (`None`: no dropout).
    pub fn forward(&self, ids: &Tensor, rng: &mut DropoutRng) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.spec.max_positions {
            bail!(
                "sequence of {t} tokens exceeds max_position_embeddings {}",
                self.spec.max_positions
            )
        }
        let (hd, nh, nkv) = (self.spec.head_dim, self.spec.heads, self.spec.kv_heads);
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?; // [b*t, h]
        let mask: Vec<f32> = (0..t * t)
            .map(|k| {
                if k % t > k / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), ids.device())?;
        for block in &self.blocks {
            let hs = self.rms_norm(&x, &block.attn_norm)?;
            let heads = |p: &Proj, n: usize, rng: &mut DropoutRng| -> Result<Tensor> {
                p.forward(&hs, rng)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let q = self.rope(&heads(&block.q, nh, rng)?, t)?;
            let k = self.rope(&heads(&block.k, nkv, rng)?, t)?;
            let v = heads(&block.v, nkv, rng)?;
            let group = nh / nkv;
            let repeat = |x: Tensor| -> Result<Tensor> {
                if group == 1 {
                    return Ok(x);
                }
                x.unsqueeze(2)?
                    .broadcast_as((b, nkv, group, t, hd))?
                    .reshape((b, nh, t, hd))
            };
            let (k, v) = (repeat(k)?, repeat(v)?);
            let scores = (q
                .to_dtype(DType::F32)?
                .matmul(&k.to_dtype(DType::F32)?.t()?)?
                / (hd as f64).sqrt())?
            .broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
            let att = probs
                .matmul(&v.to_dtype(DType::F32)?)?
                .to_dtype(self.dtype)?;
            let att = att.transpose(1, 2)?.reshape((b * t, nh * hd))?;
            x = (x + block.o.forward(&att, rng)?)?;
            let hs = self.rms_norm(&x, &block.mlp_norm)?;
            let gate = block.gate.forward(&hs, rng)?.silu()?;
            let up = block.up.forward(&hs, rng)?;
            x = (x + block.down.forward(&(gate * up)?, rng)?)?;
        }
        let x = self.rms_norm(&x, &self.norm)?;
        x.matmul(&self.lm_head.t()?)?
            .to_dtype(DType::F32)?
            .reshape((b, t, self.spec.vocab))
    }
}

/// Mean cross-entropy of `logits` `[b, t, v]` against `targets` `[b, t]` (u32) over positions
/// where `weights` `[b, t]` (f32, 0 or 1) is 1.
pub fn masked_cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = log_probs
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let count = weights.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        bail!("a batch with no target tokens")
    }
    (picked * weights)?.sum_all()? / -(count as f64)
}
