//! What a run writes: the PEFT adapter, the training log, the loss curve, the memory table.

use super::model::{Llama, LoraSettings, PROJECTIONS};
use candle_core::{bail, DType, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// PEFT's prefix for a causal LM's adapter keys.
pub const PEFT_PREFIX: &str = "base_model.model.";

fn io(e: impl std::fmt::Display, what: &str, path: &Path) -> candle_core::Error {
    candle_core::Error::msg(format!("{what} {}: {e}", path.display()))
}

/// Writes `adapter_model.safetensors` (PEFT key names, f32, lora_A `[r, in]`, lora_B `[out, r]`)
/// and `adapter_config.json` into `dir`.
pub fn save_adapter(model: &Llama, lora: &LoraSettings, base: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io(e, "cannot create", dir))?;
    let tensors: Vec<(String, Tensor)> = model
        .named_lora_vars()
        .into_iter()
        .map(|(name, var)| (format!("{PEFT_PREFIX}{name}"), var.as_tensor().clone()))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let path = dir.join("adapter_model.safetensors");
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
        &path,
    )
    .map_err(|e| io(e, "cannot write", &path))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": lora.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "revision": null,
    });
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap())
        .map_err(|e| io(e, "cannot write", &path))
}

/// The LoRA settings an adapter folder was trained with, from its `adapter_config.json` (the
/// example's own or one written by PEFT).
#[derive(Clone, Debug)]
pub struct AdapterConfig {
    /// The file read; messages name it.
    pub path: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Hugging Face projection names (`q_proj`, ...). `None` when `target_modules` is absent or a
    /// regular expression, which this example does not evaluate: `--target-modules` must then
    /// give the list, and the adapter's tensor names check it when they are loaded.
    pub targets: Option<Vec<String>>,
    /// `target_modules` as the file has it, for messages; `None` when absent.
    pub targets_text: Option<String>,
}

/// Reads and checks `dir/adapter_config.json`.
///
/// # Errors
/// An unreadable or malformed file, a missing or invalid `r` / `lora_alpha` / `lora_dropout`, a
/// non-LoRA `peft_type`, a PEFT option this example does not implement (rsLoRA, DoRA,
/// `fan_in_fan_out`, per-module rank or alpha patterns, `layers_to_transform`), or a target
/// module that is not a LLaMA projection; each names the file and the value.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(e, "cannot read", &path))?;
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| io(e, "malformed JSON in", &path))?;
    let shown = path.display();
    let field = |key: &str| config.get(key).filter(|v| !v.is_null());
    if let Some(kind) = field("peft_type").filter(|k| k.as_str() != Some("LORA")) {
        bail!("{shown}: peft_type {kind} is not a LoRA adapter (\"LORA\")")
    }
    let rank = match field("r") {
        Some(v) => match v.as_u64().filter(|&r| r >= 1) {
            Some(r) => r as usize,
            None => bail!("{shown}: r = {v} is not a positive integer"),
        },
        None => bail!("{shown}: has no r (the LoRA rank)"),
    };
    let alpha = match field("lora_alpha") {
        Some(v) => match v.as_f64().filter(|a| a.is_finite()) {
            Some(a) => a,
            None => bail!("{shown}: lora_alpha = {v} is not a number"),
        },
        None => bail!("{shown}: has no lora_alpha"),
    };
    // PEFT's default when the field is absent.
    let dropout = match field("lora_dropout") {
        Some(v) => match v.as_f64().filter(|d| (0.0..1.0).contains(d)) {
            Some(d) => d as f32,
            None => bail!("{shown}: lora_dropout = {v} is not a number in [0, 1)"),
        },
        None => 0.0,
    };
    for (flag, plain) in [
        ("use_rslora", false),
        ("fan_in_fan_out", false),
        ("use_dora", false),
    ] {
        if config.get(flag).and_then(|v| v.as_bool()).unwrap_or(plain) != plain {
            bail!("{shown}: {flag} = {} is not supported", !plain)
        }
    }
    for map in ["rank_pattern", "alpha_pattern"] {
        if config
            .get(map)
            .and_then(|v| v.as_object())
            .is_some_and(|m| !m.is_empty())
        {
            bail!(
                "{shown}: a non-empty {map} is not supported (one rank and alpha for every module)"
            )
        }
    }
    if let Some(layers) = field("layers_to_transform") {
        bail!("{shown}: layers_to_transform = {layers} is not supported (every layer is adapted)")
    }
    let (targets, targets_text) = match field("target_modules") {
        None => (None, None),
        Some(v) => (peft_targets(v, &path)?, Some(v.to_string())),
    };
    Ok(AdapterConfig {
        path,
        rank,
        alpha,
        dropout,
        targets,
        targets_text,
    })
}

/// The projections PEFT's `target_modules` selects in a LLaMA, or `None` for a regular
/// expression. PEFT matches a list entry against a module's full name (`model.layers.3.mlp.
/// up_proj`) when the name equals it or ends with `.` and the entry, so `up_proj` and
/// `mlp.up_proj` both select every layer's up projection; `all-linear` selects every linear
/// layer but the output head, which in a LLaMA is the seven projections.
fn peft_targets(value: &serde_json::Value, path: &Path) -> Result<Option<Vec<String>>> {
    const PARENTS: [&str; 7] = [
        "self_attn",
        "self_attn",
        "self_attn",
        "self_attn",
        "mlp",
        "mlp",
        "mlp",
    ];
    let entries = match value {
        serde_json::Value::String(s) if s == "all-linear" => {
            return Ok(Some(PROJECTIONS.iter().map(|p| p.to_string()).collect()))
        }
        serde_json::Value::String(_) => return Ok(None),
        serde_json::Value::Array(entries) => entries,
        other => bail!(
            "{}: target_modules = {other} is neither a list of module names nor a string",
            path.display()
        ),
    };
    let mut targets = Vec::new();
    for entry in entries {
        let Some(entry) = entry.as_str() else {
            bail!(
                "{}: target_modules entry {entry} is not a module name",
                path.display()
            )
        };
        let mut matched = false;
        for (proj, parent) in PROJECTIONS.iter().zip(PARENTS) {
            // Two layers tell a layer-independent entry from one naming a single layer.
            let hits = [0, 1].map(|layer| {
                let name = format!("model.layers.{layer}.{parent}.{proj}");
                name == entry || name.ends_with(&format!(".{entry}"))
            });
            match hits {
                [true, true] => {
                    matched = true;
                    if !targets.iter().any(|t| t == proj) {
                        targets.push(proj.to_string());
                    }
                }
                [false, false] => {}
                _ => bail!(
                    "{}: target module {entry:?} adapts only some layers; this example adapts a projection in every layer",
                    path.display()
                ),
            }
        }
        if !matched {
            bail!(
                "{}: target module {entry:?} is not a LLaMA projection ({})",
                path.display(),
                PROJECTIONS.join(", ")
            )
        }
    }
    if targets.is_empty() {
        bail!("{}: target_modules is an empty list", path.display())
    }
    Ok(Some(targets))
}

/// Loads a saved adapter from `dir` into `model`'s LoRA variables.
///
/// # Errors
/// A rank or alpha other than `lora`'s, an adapter option [`read_adapter_config`] refuses, a
/// missing key or a shape mismatch (naming it); nothing is changed unless every tensor is present
/// and fits.
pub fn load_adapter(model: &Llama, lora: &LoraSettings, dir: &Path) -> Result<()> {
    let saved = read_adapter_config(dir)?;
    if saved.rank != lora.rank || saved.alpha != lora.alpha {
        bail!(
            "{}: adapter has r {} and lora_alpha {}, but this run has --lora-rank {} and --lora-alpha {}",
            saved.path.display(),
            saved.rank,
            saved.alpha,
            lora.rank,
            lora.alpha
        )
    }
    let path = dir.join("adapter_model.safetensors");
    let stored = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?;
    let vars = model.named_lora_vars();
    let mut values = Vec::with_capacity(vars.len());
    for (name, var) in &vars {
        let key = format!("{PEFT_PREFIX}{name}");
        let Some(t) = stored.get(&key) else {
            bail!("{}: missing tensor {key}", path.display())
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: {key} has shape {:?}, the model expects {:?}",
                path.display(),
                t.dims(),
                var.dims()
            )
        }
        values.push(t.to_dtype(DType::F32)?.to_device(var.device())?);
    }
    if stored.len() != vars.len() {
        bail!(
            "{}: the adapter has {} tensors but --target-modules gives {} LoRA matrices",
            path.display(),
            stored.len(),
            vars.len()
        )
    }
    for ((_, var), value) in vars.iter().zip(values) {
        var.set(&value)?;
    }
    Ok(())
}

/// One row of the training log.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct LogRow {
    pub optimizer: String,
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub tokens_per_s: f64,
    pub state_bytes: usize,
}

/// Writes the log as CSV.
pub fn write_csv(rows: &[LogRow], path: &Path) -> Result<()> {
    let mut text = String::from("optimizer,step,lr,loss,tokens_per_s,optimizer_state_bytes\n");
    for r in rows {
        text += &format!(
            "{},{},{:.6e},{:.6},{:.1},{}\n",
            r.optimizer, r.step, r.lr, r.loss, r.tokens_per_s, r.state_bytes
        );
    }
    std::fs::write(path, text).map_err(|e| io(e, "cannot write", path))
}

static FONT: &[u8] = include_bytes!("assets/DejaVuSansMono.ttf");

/// Draws the loss curve of every optimizer in `rows` into a PNG.
pub fn plot_losses(rows: &[LogRow], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| io(e, "cannot draw", path);
    // Registering twice is harmless; the font ships with the example so no system font is needed.
    plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| err(&"the bundled font"))?;
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.optimizer.as_str()) {
            names.push(&r.optimizer);
        }
    }
    let max_step = rows.iter().map(|r| r.step).max().unwrap_or(1).max(1);
    let max_loss = rows.iter().map(|r| r.loss).fold(0f64, f64::max).max(1e-3) * 1.05;
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("LoRA fine-tune: training loss", ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0..max_step, 0f64..max_loss)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()
        .map_err(|e| err(&e))?;
    for (i, name) in names.iter().enumerate() {
        let colour = Palette99::pick(i).to_rgba();
        let points: Vec<(usize, f64)> = rows
            .iter()
            .filter(|r| r.optimizer == *name)
            .map(|r| (r.step, r.loss))
            .collect();
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// Bytes in a human unit.
pub fn human(bytes: usize) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} kB", b / 1e3)
    }
}

/// The memory table: base and trainable parameters, gradients, and optimizer state for each
/// optimizer in `states` (name, bytes) next to 32-bit AdamW's 8 bytes per trainable parameter.
pub fn memory_table(model: &Llama, trainable: usize, states: &[(String, usize)]) -> String {
    let base_bytes = model.base_params() * model.dtype.size_in_bytes();
    let mut rows = vec![
        (
            "base parameters (frozen)".to_string(),
            model.base_params(),
            base_bytes,
        ),
        (
            "trainable parameters (LoRA, f32)".to_string(),
            trainable,
            4 * trainable,
        ),
        ("gradients (f32)".to_string(), trainable, 4 * trainable),
    ];
    let adamw32 = 8 * trainable;
    for (name, bytes) in states {
        rows.push((format!("optimizer state: {name}"), trainable, *bytes));
    }
    rows.push((
        "optimizer state: AdamW 32-bit (reference)".to_string(),
        trainable,
        adamw32,
    ));
    let mut out = format!("{:<44} {:>12} {:>12}\n", "memory", "elements", "bytes");
    for (what, n, bytes) in rows {
        out += &format!("{what:<44} {n:>12} {:>12}\n", human(bytes));
    }
    for (name, bytes) in states {
        out += &format!(
            "{name}: optimizer state is {:.1} % of 32-bit AdamW's ({:.1} % saved)\n",
            100.0 * *bytes as f64 / adamw32 as f64,
            100.0 * (1.0 - *bytes as f64 / adamw32 as f64)
        );
    }
    out
}
