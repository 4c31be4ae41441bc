//! The tensors of the model to plan: from a folder (`config.json`, safetensors headers) or a
//! parameter count, and the LoRA adapters of `--mode lora`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use candle_bnb::optim::plan::{LlamaShape, TensorSpec};
use candle_core::{bail, DType, Result};
use serde_json::Value;

use crate::PlanArgs;

/// The model of a plan.
pub struct Model {
    /// Its tensors, with the setup applied (dtype, frozen base and adapters under LoRA).
    pub tensors: Vec<TensorSpec>,
    /// Its shape (for the activation estimate).
    pub shape: LlamaShape,
    /// What it is, for the report.
    pub description: String,
}

/// The model `args` name, set up for training as they say.
pub fn load(args: &PlanArgs) -> Result<Model> {
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => bail!("--dtype {other:?}: expected bf16, f16 or f32"),
    };
    let (shape, mut tensors, description) = match (&args.model_dir, &args.params) {
        _ if args.model_id.is_some() => {
            let id = args.model_id.as_deref().unwrap_or_default();
            let model = candle_bnb::hub::HubModel::new(id, &args.revision)?;
            let shape = read_config(&model.get("config.json")?)?;
            let tensors = shape.tensors(dtype);
            (
                shape,
                tensors,
                format!("{id}@{} (config.json)", args.revision),
            )
        }
        (Some(dir), _) => {
            let shape = read_config(&dir.join("config.json"))?;
            let (tensors, source) = match read_headers(dir)? {
                Some(tensors) => (tensors, "safetensors headers"),
                None => (shape.tensors(dtype), "config.json"),
            };
            (shape, tensors, format!("{} ({source})", dir.display()))
        }
        (None, Some(params)) => {
            // LLaMA-2's own sizes are its real configs; any other size a LLaMA-shaped model.
            let (shape, description) = match params.trim().to_ascii_uppercase().as_str() {
                "7B" => (LlamaShape::llama2_7b(), "LLaMA-2-7B's config".to_string()),
                "13B" => (LlamaShape::llama2_13b(), "LLaMA-2-13B's config".to_string()),
                "70B" => (LlamaShape::llama2_70b(), "LLaMA-2-70B's config".to_string()),
                _ => (
                    LlamaShape::with_params(parse_count(params)?),
                    format!("LLaMA-shaped, {params}"),
                ),
            };
            let tensors = shape.tensors(dtype);
            (shape, tensors, description)
        }
        (None, None) => {
            bail!("give the model: --model-dir DIR, --model-id ORG/NAME or --params 7B")
        }
    };
    for t in &mut tensors {
        if t.dtype.is_float() {
            t.dtype = dtype;
        }
        // As if the model were built with candle-bnb's embedding layer.
        t.keep_32bit = t.name.ends_with("embed_tokens.weight");
    }
    if args.mode == "lora" {
        tensors = with_lora(tensors, args.lora_rank, &args.target_modules)?;
    }
    Ok(Model {
        tensors,
        shape,
        description,
    })
}

/// `7B`, `1.3B`, `350M`, `125k` or a plain count.
fn parse_count(text: &str) -> Result<usize> {
    let t = text.trim();
    let (number, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('B') => (&t[..t.len() - 1], 1e9),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('K') => (&t[..t.len() - 1], 1e3),
        _ => (t, 1.0),
    };
    match number.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v * scale < 1e15 => Ok((v * scale).round() as usize),
        _ => bail!("--params {text:?}: expected a count such as 7B, 1.3B or 350M"),
    }
}

/// The LLaMA shape `config.json` describes.
fn read_config(path: &Path) -> Result<LlamaShape> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("{}: not JSON: {e}", path.display())))?;
    let count = |key: &str| -> Result<usize> {
        match json.get(key) {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => bail!(
                    "{}: {key} must be a positive integer, got {v}",
                    path.display()
                ),
            },
            None => bail!("{}: {key} is missing", path.display()),
        }
    };
    let heads = count("num_attention_heads")?;
    let hidden = count("hidden_size")?;
    if hidden % heads != 0 {
        bail!(
            "{}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
            path.display()
        )
    }
    Ok(LlamaShape {
        vocab_size: count("vocab_size")?,
        hidden_size: hidden,
        intermediate_size: count("intermediate_size")?,
        num_hidden_layers: count("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: if json.get("num_key_value_heads").is_some() {
            count("num_key_value_heads")?
        } else {
            heads
        },
        tie_word_embeddings: json
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// The tensors of `dir`'s safetensors files from their headers (`None`: no weights there).
fn read_headers(dir: &Path) -> Result<Option<Vec<TensorSpec>>> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        candle_bnb::hub::shard_names(&index)?
            .into_iter()
            .map(|s| dir.join(s))
            .collect()
    } else {
        return Ok(None);
    };
    let mut tensors = BTreeMap::new();
    for file in files {
        for t in read_header(&file)? {
            tensors.insert(t.name.clone(), t);
        }
    }
    Ok(Some(tensors.into_values().collect()))
}

/// The tensors one safetensors file declares: its 8-byte header length and JSON header only.
fn read_header(path: &Path) -> Result<Vec<TensorSpec>> {
    let fail = |msg: String| candle_core::Error::Msg(format!("{}: {msg}", path.display()));
    let mut file = File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|e| fail(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(fail(format!(
            "header of {len} bytes: not a safetensors file"
        )));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header)
        .map_err(|e| fail(format!("header cut short: {e}")))?;
    let json: Value =
        serde_json::from_slice(&header).map_err(|e| fail(format!("header is not JSON: {e}")))?;
    let Some(entries) = json.as_object() else {
        return Err(fail("header is not a JSON object".into()));
    };
    let mut tensors = Vec::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let dtype = match entry.get("dtype").and_then(Value::as_str) {
            Some("F32") => DType::F32,
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            Some("F64") => DType::F64,
            Some("I64") => DType::I64,
            Some("U32") => DType::U32,
            Some("U8") => DType::U8,
            other => {
                return Err(fail(format!(
                    "tensor {name:?}: unsupported dtype {other:?}"
                )))
            }
        };
        let Some(shape) = entry.get("shape").and_then(Value::as_array) else {
            return Err(fail(format!("tensor {name:?}: no shape")));
        };
        let shape = shape
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| {
                fail(format!(
                    "tensor {name:?}: shape {shape:?} is not a list of sizes"
                ))
            })?;
        tensors.push(TensorSpec::new(name.clone(), &shape, dtype));
    }
    Ok(tensors)
}

/// `tensors` frozen, with f32 LoRA adapters of rank `rank` (`lora_A` `[rank, in]`, `lora_B`
/// `[out, rank]`) on every 2-D weight whose projection is in `targets`.
fn with_lora(tensors: Vec<TensorSpec>, rank: usize, targets: &str) -> Result<Vec<TensorSpec>> {
    if rank == 0 {
        bail!("--lora-rank must be > 0")
    }
    let targets: Vec<String> = targets
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.ends_with("_proj") {
                t.to_string()
            } else {
                format!("{t}_proj")
            }
        })
        .collect();
    let mut out = Vec::with_capacity(tensors.len() * 2);
    let mut adapted = 0;
    for t in tensors {
        let module = t.name.strip_suffix(".weight").unwrap_or(&t.name);
        let projection = module.rsplit('.').next().unwrap_or(module);
        if t.shape.len() == 2 && targets.iter().any(|p| p == projection) {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            out.push(TensorSpec::new(
                format!("{module}.lora_A.weight"),
                &[rank, cols],
                DType::F32,
            ));
            out.push(TensorSpec::new(
                format!("{module}.lora_B.weight"),
                &[rows, rank],
                DType::F32,
            ));
            adapted += 1;
        }
        out.push(TensorSpec {
            trainable: false,
            ..t
        });
    }
    if adapted == 0 {
        bail!("--target-modules {targets:?} matches no 2-D weight of the model")
    }
    Ok(out)
}
