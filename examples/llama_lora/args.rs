//! Command-line arguments.

use clap::Parser;
use std::path::PathBuf;

/// The LoRA settings used when neither a flag nor an `--adapter` gives them (the `--help` texts
/// repeat them, as clap can only print defaults it applies itself).
pub const DEFAULT_LORA_RANK: usize = 16;
pub const DEFAULT_LORA_ALPHA: f64 = 32.0;
pub const DEFAULT_LORA_DROPOUT: f32 = 0.05;
pub const DEFAULT_TARGET_MODULES: &str = "q,k,v,o,gate,up,down";

/// Fine-tune a LLaMA-family model with LoRA and an 8-bit optimizer.
///
/// With no arguments: a tiny seeded random LLaMA, a tokenizer trained at start-up and a generated
/// instruction dataset, all offline. `--model-id` (Hugging Face hub) or `--model-dir` (local
/// files) trains a real checkpoint through the same code.
#[derive(Parser, Debug, Clone)]
#[command(name = "llama_lora")]
pub struct Args {
    /// Hub model id (e.g. `HuggingFaceTB/SmolLM2-135M`), fetched with hf-hub into the standard
    /// cache (`HF_HOME`, `HF_HUB_CACHE`); `HF_HUB_OFFLINE=1` uses the cache only.
    #[arg(long, conflicts_with = "model_dir")]
    pub model_id: Option<String>,
    /// Hub revision (branch, tag or commit) for `--model-id`.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Folder with `config.json`, `tokenizer.json` and `model.safetensors` (or
    /// `model.safetensors.index.json` and its shards).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Dtype of the frozen base weights and activations: f32, bf16 or f16 (LoRA weights are f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,

    /// LoRA rank r [default: 16, or the `--adapter`'s `r`].
    #[arg(long)]
    pub lora_rank: Option<usize>,
    /// LoRA alpha: the update is scaled by alpha / r [default: 32, or the `--adapter`'s
    /// `lora_alpha`].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA input during training [default: 0.05, or the `--adapter`'s
    /// `lora_dropout`].
    #[arg(long)]
    pub lora_dropout: Option<f32>,
    /// Comma-separated projections to adapt: q,k,v,o,gate,up,down (or q_proj, ...) [default:
    /// q,k,v,o,gate,up,down, or the `--adapter`'s `target_modules`].
    #[arg(long)]
    pub target_modules: Option<String>,

    /// JSONL training data: `{"prompt", "response"}` lines (prompt tokens masked out of the loss)
    /// or `{"text"}` lines. Default: a generated instruction dataset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Tokens per sequence (longer examples are truncated).
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches accumulated per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps (the total, also when resuming).
    #[arg(long, default_value_t = 600)]
    pub steps: usize,
    /// Peak learning rate (default: 1e-4 for came and came8bit, whose confidence-scaled step
    /// is larger, 3e-3 for the others).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps before the cosine decay (default: a tenth of the steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Decoupled weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Global gradient-norm clipping (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed for the tiny model, LoRA init, data order and dropout.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,

    /// adamw8bit, adamw32, adam8bit, adam32, lion8bit, lion32, sgd8bit, sgd32, rmsprop8bit,
    /// rmsprop32, adagrad8bit, adagrad32, lamb8bit, lamb32, lars8bit, lars32, ademamix8bit,
    /// ademamix32, adafactor8bit, adafactor, came8bit, came, or candle-adamw (candle_nn::AdamW).
    /// Adafactor runs with a fixed lr (the schedule's) as transformers' Trainer does; the
    /// default lr suits AdamW, Adafactor and CAME alike on the tiny model (README).
    #[arg(long, default_value = "adamw8bit")]
    pub optimizer: String,
    /// Also train with candle_nn::AdamW from the same seed and report both side by side.
    #[arg(long)]
    pub compare: bool,

    /// Output folder: adapter, training log, loss curve, optimizer checkpoint.
    #[arg(long, default_value = "llama_lora_out")]
    pub out: PathBuf,
    /// Also save a resumable checkpoint to `<out>/checkpoint-<step>` every this many steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Resume from a checkpoint folder (an `--out` folder or one of its `checkpoint-<step>`).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Load a saved adapter before training (with `--steps 0`: only generate). Its
    /// `adapter_config.json` supplies r, alpha, dropout and target modules; a LoRA flag that
    /// disagrees with it is an error.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Sample a completion of this prompt from the tuned model.
    #[arg(long)]
    pub generate: Option<String>,
    /// Tokens to sample with `--generate`.
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Sampling temperature for `--generate` (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Run on the CPU even when built with `--features cuda` and a GPU is present.
    #[arg(long)]
    pub cpu: bool,
    /// No progress bar and no summary (logs and files are still written).
    #[arg(long)]
    pub quiet: bool,

    /// Tiny default model: hidden size (testing knob).
    #[arg(long, default_value_t = 256, hide = true)]
    pub tiny_hidden: usize,
    /// Tiny default model: layers (testing knob).
    #[arg(long, default_value_t = 2, hide = true)]
    pub tiny_layers: usize,
}
