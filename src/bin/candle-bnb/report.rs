//! A plan's report: one row per optimizer, as an aligned table or JSON, ranked against a budget.

use candle_bnb::optim::plan::{MemoryPlan, StatePlan, TensorSpec, TrainingSetup};
use candle_core::{bail, Result};
use serde_json::json;

/// One optimizer's plan.
pub struct Row {
    /// The optimizer's name.
    pub name: &'static str,
    /// Planned with LoRA adapters when the run asked for full fine-tuning (the advisor's
    /// alternative).
    pub lora_alternative: bool,
    /// The memory, per part.
    pub plan: MemoryPlan,
    /// Parameters kept in 8-bit state.
    pub quantized_params: u64,
    /// Trainable parameters.
    pub trainable_params: u64,
}

impl Row {
    /// The row of optimizer `name` with state `state` over `tensors` under `setup`.
    pub fn new(
        name: &'static str,
        tensors: &[TensorSpec],
        state: &[StatePlan],
        setup: &TrainingSetup,
    ) -> Self {
        Self {
            name,
            lora_alternative: false,
            plan: MemoryPlan::new(tensors, state, setup),
            quantized_params: state
                .iter()
                .filter(|s| s.quantized)
                .map(|s| s.elements as u64)
                .sum(),
            trainable_params: state.iter().map(|s| s.elements as u64).sum(),
        }
    }
}

/// Everything `plan` prints.
pub struct Report {
    /// The model.
    pub model: String,
    /// Its parameters.
    pub parameters: u64,
    /// The trainable ones.
    pub trainable: u64,
    /// The per-device budget in bytes, if given.
    pub budget: Option<u64>,
    /// One row per optimizer, in the order asked.
    pub rows: Vec<Row>,
    /// What to change when nothing fits (the setup's own options that would shrink it).
    pub hints: Vec<String>,
}

impl Row {
    /// The row's label: the optimizer, with `+lora` for the advisor's LoRA alternative.
    pub fn label(&self) -> String {
        if self.lora_alternative {
            format!("{}+lora", self.name)
        } else {
            self.name.to_string()
        }
    }
}

/// Bytes in GiB.
pub fn gib_of(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes as GiB with two decimals.
fn gib(bytes: u64) -> String {
    format!("{:.2}", gib_of(bytes))
}

impl Report {
    /// The rows to print: all of them, or with a budget those that fit, ranked by the advice
    /// (see [`crate::optimizers::advice`]), then by total.
    fn ranked(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        if let Some(budget) = self.budget {
            rows.retain(|r| r.plan.total() <= budget);
            // Full fine-tuning before LoRA when both fit, then the advice, then memory.
            rows.sort_by_key(|r| {
                let tier = crate::optimizers::advice(r.name).0;
                (r.lora_alternative, tier, r.plan.total())
            });
        }
        rows
    }

    /// The aligned table.
    pub fn table(&self) -> String {
        let mut out = format!(
            "model: {}\nparameters: {} ({} trainable)\n",
            self.model, self.parameters, self.trainable
        );
        out += &format!(
            "{:<19} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n",
            "optimizer",
            "frozen",
            "trainable",
            "master",
            "grads",
            "state",
            "activ.",
            "total",
            "B/param"
        );
        let ranked = self.ranked();
        for r in &ranked {
            let p = &r.plan;
            let per_param = if r.trainable_params == 0 {
                0.0
            } else {
                p.optimizer_state as f64 / r.trainable_params as f64
            };
            out += &format!(
                "{:<19} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10.3}\n",
                r.label(),
                gib(p.frozen_weights),
                gib(p.trainable_weights),
                gib(p.master_weights),
                gib(p.gradients),
                gib(p.optimizer_state),
                gib(p.activations),
                gib(p.total()),
                per_param
            );
            if self.budget.is_some() {
                out.truncate(out.len() - 1);
                out += &format!("  {}\n", crate::optimizers::advice(r.name).1);
            }
        }
        out += "(GiB; B/param: optimizer-state bytes per trainable parameter; activations are an estimate)\n";
        if let Some(budget) = self.budget {
            if ranked.is_empty() {
                let smallest = self.rows.iter().map(|r| r.plan.total()).min().unwrap_or(0);
                out += &format!(
                    "nothing fits in {} GiB (smallest: {} GiB); to shrink it: {}\n",
                    gib(budget),
                    gib(smallest),
                    self.hints.join(", ")
                );
            } else {
                out += &format!(
                    "{} of {} fit in {} GiB, best first (AdamW's quality first, then memory); recommended: {}\n",
                    ranked.len(),
                    self.rows.len(),
                    gib(budget),
                    ranked[0].label()
                );
            }
        }
        out
    }

    /// The JSON form: every row (with `fits` when a budget is given), bytes as integers.
    pub fn json(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                let p = &r.plan;
                json!({
                    "optimizer": r.name,
                    "lora_alternative": r.lora_alternative,
                    "frozen_weights": p.frozen_weights,
                    "trainable_weights": p.trainable_weights,
                    "master_weights": p.master_weights,
                    "gradients": p.gradients,
                    "optimizer_state": p.optimizer_state,
                    "activations": p.activations,
                    "total": p.total(),
                    "quantized_params": r.quantized_params,
                    "trainable_params": r.trainable_params,
                    "fits": self.budget.map(|b| p.total() <= b),
                    "advice": crate::optimizers::advice(r.name).1,
                })
            })
            .collect();
        json!({
            "model": self.model,
            "parameters": self.parameters,
            "trainable": self.trainable,
            "budget": self.budget,
            "rows": rows,
        })
        .to_string()
    }
}

/// `24GiB`, `80GB`, `512MiB`, `1.5TB` or a plain byte count.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), &t[split..]);
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        _ => bail!("--budget {text:?}: unknown unit {unit:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)"),
    };
    match number.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok((v * scale).round() as u64),
        _ => bail!("--budget {text:?}: expected a size such as 24GiB or 80GB"),
    }
}
