//! `candle-bnb`: the command-line tool of candle-bnb. `candle-bnb plan` answers, before training,
//! how much memory a model takes with each optimizer (exactly, for the optimizer state: the same
//! code lays it out as the optimizers allocate it), and with `--budget` which setups fit.

mod model;
mod optimizers;
mod plot;
mod report;

use std::path::PathBuf;

use candle_bnb::optim::plan::{TrainingSetup, TransformerShape};
use candle_core::Result;
use clap::{Parser, Subcommand};

/// candle-bnb's command-line tool.
#[derive(Parser, Debug)]
#[command(name = "candle-bnb", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Plan the memory of training a model: weights, master copy, gradients, optimizer state
    /// (exact) and activations (an estimate), per optimizer.
    Plan(PlanArgs),
}

/// The model, the setup and the optimizers of a plan.
#[derive(clap::Args, Debug, Clone)]
pub struct PlanArgs {
    /// Folder with `config.json` (a LLaMA-family config) and, when present,
    /// `model.safetensors` or `model.safetensors.index.json` with its shards: the tensors come
    /// from the safetensors headers (no weights are read), else from the config.
    #[arg(long, conflicts_with = "params")]
    pub model_dir: Option<PathBuf>,
    /// Hugging Face hub model id: only its `config.json` is fetched (into the standard cache;
    /// `HF_HUB_OFFLINE=1` reads the cache only), the tensors derived from it.
    #[arg(long, conflicts_with_all = ["model_dir", "params"])]
    pub model_id: Option<String>,
    /// Hub revision (branch, tag or commit) for `--model-id`.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// A LLaMA-shaped model of about this many parameters, e.g. `7B`, `1.3B`, `350M`.
    #[arg(long)]
    pub params: Option<String>,
    /// Full fine-tuning, or LoRA adapters on the target modules (the base frozen).
    #[arg(long, default_value = "full", value_parser = ["full", "lora"])]
    pub mode: String,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub lora_rank: usize,
    /// LoRA target modules, comma-separated projection names (`q_proj`, ..., or `q`, ...).
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub target_modules: String,
    /// Dtype of the model's weights: bf16, f16 or f32 (LoRA adapters are f32).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Keep an f32 master copy of 16-bit trainable weights.
    #[arg(long)]
    pub master_weights: bool,
    /// Sequence length, for the activation estimate (0: activations not counted).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Micro-batch size, for the activation estimate.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Full activation recomputation (each layer keeps only its input).
    #[arg(long)]
    pub recompute: bool,
    /// One optimizer (`adamw8bit`, `adamw32`, ..., `candle-adamw`) or `all`.
    #[arg(long, default_value = "all")]
    pub optimizer: String,
    /// Memory per device, e.g. `24GiB`, `80GB`, `512MiB`: rank the setups that fit.
    #[arg(long)]
    pub budget: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the plan as a stacked bar chart into this PNG (every optimizer asked, the
    /// budget as a line).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan(&args),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

/// `candle-bnb plan`.
fn plan(args: &PlanArgs) -> Result<()> {
    let model = model::load(args)?;
    let setup = TrainingSetup {
        master_weights: args.master_weights,
        activations: (args.seq_len > 0).then_some(TransformerShape {
            layers: model.shape.num_hidden_layers,
            hidden_size: model.shape.hidden_size,
            heads: model.shape.num_attention_heads,
            seq_len: args.seq_len,
            batch_size: args.batch_size,
            recompute: args.recompute,
        }),
    };
    let names = optimizers::selected(&args.optimizer)?;
    let budget = args
        .budget
        .as_deref()
        .map(report::parse_bytes)
        .transpose()?;
    let mut rows = Vec::with_capacity(2 * names.len());
    for name in &names {
        let state = optimizers::plan(name, &model.tensors)?;
        rows.push(report::Row::new(name, &model.tensors, &state, &setup));
    }
    // The advisor weighs LoRA against full fine-tuning: with a budget, a full run's plan also
    // gets the LoRA rows (the run's --lora-rank and --target-modules).
    if budget.is_some() && args.mode == "full" {
        let lora = model::load(&PlanArgs {
            mode: "lora".to_string(),
            ..args.clone()
        })?;
        for name in &names {
            let state = optimizers::plan(name, &lora.tensors)?;
            let mut row = report::Row::new(name, &lora.tensors, &state, &setup);
            row.lora_alternative = true;
            rows.push(row);
        }
    }
    let report = report::Report {
        model: model.description,
        parameters: model.tensors.iter().map(|t| t.elem_count() as u64).sum(),
        trainable: model
            .tensors
            .iter()
            .filter(|t| t.trainable)
            .map(|t| t.elem_count() as u64)
            .sum(),
        budget,
        rows,
        hints: hints(args),
    };
    if let Some(path) = &args.plot {
        plot::draw(&report, path)?;
    }
    if args.json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// The options of `args` that would shrink a plan, for the advisor.
fn hints(args: &PlanArgs) -> Vec<String> {
    let mut hints = Vec::new();
    if args.mode != "lora" {
        hints.push(
            "--mode lora (the base weights frozen: no gradients, master copy or state for them)"
                .to_string(),
        );
    }
    if args.seq_len > 0 && !args.recompute {
        hints.push("--recompute (activations: each layer keeps only its input)".to_string());
    }
    if args.batch_size > 1 {
        hints.push(format!("a --batch-size below {}", args.batch_size));
    }
    if args.seq_len > 512 {
        hints.push(format!("a --seq-len below {}", args.seq_len));
    }
    if args.dtype == "f32" {
        hints.push("--dtype bf16".to_string());
    }
    if args.master_weights {
        hints.push("no --master-weights".to_string());
    }
    if hints.is_empty() {
        hints.push("a larger budget or a smaller model".to_string());
    }
    hints
}
