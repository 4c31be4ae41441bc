//! The run: set-up (model, tokenizer, data), the training loop, checkpoints, the summary.

use super::args::{
    Args, DEFAULT_LORA_ALPHA, DEFAULT_LORA_DROPOUT, DEFAULT_LORA_RANK, DEFAULT_TARGET_MODULES,
};
use super::data::{self, Dataset, Example};
use super::hub;
use super::model::{masked_cross_entropy, random_weights, Llama, LoraSettings, Spec};
use super::output::{self, LogRow};
use candle_bnb::optim as bnb;
use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tokenizers::Tokenizer;

/// Every `--optimizer` value.
pub const OPTIMIZERS: [&str; 23] = candle_bnb::OPTIMIZER_NAMES;

/// What the training loop needs from an optimizer.
pub trait TrainOptimizer {
    fn step(&mut self, grads: &GradStore) -> Result<()>;
    fn set_lr(&mut self, lr: f64);
    fn state_bytes(&self) -> usize;
    fn save(&self, path: &Path) -> Result<()>;
    fn load(&mut self, path: &Path) -> Result<()>;
}

/// Every optimizer of candle-bnb is `Optim<ItsConfig>` (its state precision a setting): one impl
/// serves them all.
impl<C: bnb::OptimizerConfig> TrainOptimizer for bnb::Optim<C> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        Optimizer::step(self, grads)
    }
    fn set_lr(&mut self, lr: f64) {
        self.set_learning_rate(lr)
    }
    fn state_bytes(&self) -> usize {
        bnb::Optim::state_bytes(self)
    }
    fn save(&self, path: &Path) -> Result<()> {
        bnb::Optim::save(self, path)
    }
    fn load(&mut self, path: &Path) -> Result<()> {
        bnb::Optim::load(self, path)
    }
}

/// candle-bnb's optimizer with config `C` (its defaults, then `bits` of state, `lr`,
/// `weight_decay` and, when positive, global-norm clipping at `max_grad_norm`) over the named
/// variables.
fn build<C: bnb::OptimizerConfig>(
    bits: u32,
    vars: Vec<(String, Var)>,
    lr: f64,
    weight_decay: f64,
    max_grad_norm: f64,
) -> Result<Box<dyn TrainOptimizer>> {
    let mut c = C::default();
    c.set_lr(lr);
    // Every algorithm of the family has a weight decay; the shared settings are typed.
    c.set_field("weight_decay", &weight_decay.to_string())?;
    let settings = c.settings_mut();
    settings.optim_bits = Some(bits);
    settings.max_grad_norm = (max_grad_norm > 0.0).then_some(max_grad_norm);
    Ok(Box::new(bnb::Optim::<C>::new_named(vars, c)?))
}

/// Adafactor as Hugging Face's Trainer runs it with a schedule: a fixed `lr` (the schedule sets
/// it), no relative step and no parameter scale; the 8-bit form with its momentum (beta1 0.9).
fn build_adafactor(
    bits: u32,
    vars: Vec<(String, Var)>,
    lr: f64,
    weight_decay: f64,
    max_grad_norm: f64,
) -> Result<Box<dyn TrainOptimizer>> {
    let c = bnb::AdafactorConfig {
        lr: Some(lr),
        relative_step: false,
        scale_parameter: false,
        weight_decay,
        settings: bnb::Settings {
            optim_bits: Some(bits),
            max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
            ..Default::default()
        },
        ..Default::default()
    };
    Ok(Box::new(bnb::Optim::<bnb::AdafactorConfig>::new_named(
        vars, c,
    )?))
}

/// candle_nn::AdamW, with the same global-norm clipping as ours (torch's formula) done here.
struct CandleAdamW {
    opt: candle_nn::AdamW,
    vars: Vec<Var>,
    max_grad_norm: f64,
}

impl TrainOptimizer for CandleAdamW {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        if self.max_grad_norm <= 0.0 {
            return self.opt.step(grads);
        }
        // The same f64 sum of squares as our optimizers' gradient pre-pass.
        let mut sum = 0f64;
        for v in &self.vars {
            if let Some(g) = grads.get(v) {
                sum += candle_bnb::kernels::sum_squares(g)?;
            }
        }
        let scale = self.max_grad_norm / (sum.sqrt() + 1e-6);
        if scale >= 1.0 {
            return self.opt.step(grads);
        }
        let mut clipped = GradStore::default();
        for v in &self.vars {
            if let Some(g) = grads.get(v) {
                clipped.insert(v, (g * scale)?);
            }
        }
        self.opt.step(&clipped)
    }
    fn set_lr(&mut self, lr: f64) {
        self.opt.set_learning_rate(lr)
    }
    fn state_bytes(&self) -> usize {
        // Two f32 moments per parameter, allocated at construction.
        8 * self.vars.iter().map(|v| v.elem_count()).sum::<usize>()
    }
    fn save(&self, _: &Path) -> Result<()> {
        Ok(()) // candle_nn::AdamW exposes no state to save; resuming it is refused.
    }
    fn load(&mut self, _: &Path) -> Result<()> {
        bail!("candle-adamw cannot be resumed: candle_nn::AdamW has no checkpoint; use one of candle-bnb's optimizers")
    }
}

/// Builds optimizer `name` over the named LoRA variables.
///
/// # Errors
/// An unknown name (listing the valid ones) or an invalid setting.
pub fn make_optimizer(
    name: &str,
    vars: Vec<(String, Var)>,
    lr: f64,
    weight_decay: f64,
    max_grad_norm: f64,
) -> Result<Box<dyn TrainOptimizer>> {
    let (wd, clip) = (weight_decay, max_grad_norm);
    Ok(match name {
        "adamw8bit" => build::<bnb::AdamWConfig>(8, vars, lr, wd, clip)?,
        "adamw32" => build::<bnb::AdamWConfig>(32, vars, lr, wd, clip)?,
        "adam8bit" => build::<bnb::AdamConfig>(8, vars, lr, wd, clip)?,
        "adam32" => build::<bnb::AdamConfig>(32, vars, lr, wd, clip)?,
        "lion8bit" => build::<bnb::LionConfig>(8, vars, lr, wd, clip)?,
        "lion32" => build::<bnb::LionConfig>(32, vars, lr, wd, clip)?,
        "sgd8bit" => build::<bnb::SGDConfig>(8, vars, lr, wd, clip)?,
        "sgd32" => build::<bnb::SGDConfig>(32, vars, lr, wd, clip)?,
        "rmsprop8bit" => build::<bnb::RMSpropConfig>(8, vars, lr, wd, clip)?,
        "rmsprop32" => build::<bnb::RMSpropConfig>(32, vars, lr, wd, clip)?,
        "adagrad8bit" => build::<bnb::AdagradConfig>(8, vars, lr, wd, clip)?,
        "adagrad32" => build::<bnb::AdagradConfig>(32, vars, lr, wd, clip)?,
        "lamb8bit" => build::<bnb::LAMBConfig>(8, vars, lr, wd, clip)?,
        "lamb32" => build::<bnb::LAMBConfig>(32, vars, lr, wd, clip)?,
        "lars8bit" => build::<bnb::LARSConfig>(8, vars, lr, wd, clip)?,
        "lars32" => build::<bnb::LARSConfig>(32, vars, lr, wd, clip)?,
        "ademamix8bit" => build::<bnb::AdEMAMixConfig>(8, vars, lr, wd, clip)?,
        "ademamix32" => build::<bnb::AdEMAMixConfig>(32, vars, lr, wd, clip)?,
        "adafactor8bit" => build_adafactor(8, vars, lr, wd, clip)?,
        "adafactor" => build_adafactor(32, vars, lr, wd, clip)?,
        "came8bit" => build::<bnb::CAMEConfig>(8, vars, lr, wd, clip)?,
        "came" => build::<bnb::CAMEConfig>(32, vars, lr, wd, clip)?,
        "candle-adamw" => {
            let vars: Vec<Var> = vars.into_iter().map(|(_, v)| v).collect();
            let params = candle_nn::ParamsAdamW {
                lr,
                weight_decay,
                ..Default::default()
            };
            Box::new(CandleAdamW {
                opt: candle_nn::AdamW::new(vars.clone(), params)?,
                vars,
                max_grad_norm,
            })
        }
        other => bail!(
            "unknown --optimizer {other:?}; one of: {}",
            OPTIMIZERS.join(", ")
        ),
    })
}

/// `--lr`, or the peak learning rate that suits `optimizer` on the tiny default (README: 200-step
/// sweeps): CAME's first steps are scaled up by its confidence statistics (`1/sqrt(1 - beta3)`
/// before they warm up), so it takes a smaller rate than AdamW, Adafactor and the others.
pub fn peak_learning_rate(args: &Args, optimizer: &str) -> f64 {
    args.lr.unwrap_or(match optimizer {
        "came" | "came8bit" => 1e-4,
        _ => 3e-3,
    })
}

/// Linear warm-up to `peak` at step `warmup`, then cosine decay towards 0 after step `total`
/// (steps count from 1; with `warmup >= total` the rate stays at the peak after warm-up).
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    if total <= warmup {
        return peak;
    }
    // Step `warmup` has the peak; the decay reaches 0 one step after the last.
    let progress = (step - warmup) as f64 / (total - warmup + 1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// The run's LoRA settings: each from its flag, else from the `--adapter`'s
/// `adapter_config.json`, else the default. A PEFT-made adapter thus loads without repeating
/// its rank, alpha and targets by hand.
///
/// # Errors
/// A flag that disagrees with the adapter (naming both values and the file), an adapter whose
/// `target_modules` this example cannot read with no `--target-modules` given, or an invalid
/// setting.
pub fn lora_settings(args: &Args) -> Result<LoraSettings> {
    let saved = match &args.adapter {
        Some(dir) => Some(output::read_adapter_config(dir)?),
        None => None,
    };
    let path = saved
        .as_ref()
        .map(|s| s.path.display().to_string())
        .unwrap_or_default();
    fn pick<T: PartialEq + std::fmt::Display + Copy>(
        flag: &str,
        given: Option<T>,
        saved: Option<(&str, T)>,
        path: &str,
        default: T,
    ) -> Result<T> {
        match (given, saved) {
            (Some(g), Some((key, s))) if g != s => {
                bail!("{flag} {g} conflicts with {key} = {s} in {path}")
            }
            (Some(g), _) => Ok(g),
            (None, Some((_, s))) => Ok(s),
            (None, None) => Ok(default),
        }
    }
    let rank = pick(
        "--lora-rank",
        args.lora_rank,
        saved.as_ref().map(|s| ("r", s.rank)),
        &path,
        DEFAULT_LORA_RANK,
    )?;
    let alpha = pick(
        "--lora-alpha",
        args.lora_alpha,
        saved.as_ref().map(|s| ("lora_alpha", s.alpha)),
        &path,
        DEFAULT_LORA_ALPHA,
    )?;
    let dropout = pick(
        "--lora-dropout",
        args.lora_dropout,
        saved.as_ref().map(|s| ("lora_dropout", s.dropout)),
        &path,
        DEFAULT_LORA_DROPOUT,
    )?;
    let given = match &args.target_modules {
        Some(list) => Some(LoraSettings::parse_targets(list)?),
        None => None,
    };
    let targets = match (given, &saved) {
        (Some(g), Some(s)) => {
            if let Some(t) = &s.targets {
                // Order carries no meaning: PEFT writes its target set in any order.
                let sorted = |v: &[String]| {
                    let mut v = v.to_vec();
                    v.sort();
                    v
                };
                if sorted(&g) != sorted(t) {
                    bail!(
                        "--target-modules {} conflicts with target_modules = {} in {path}",
                        args.target_modules.as_deref().unwrap_or_default(),
                        s.targets_text.as_deref().unwrap_or_default()
                    )
                }
            }
            g
        }
        (Some(g), None) => g,
        (None, Some(s)) => match &s.targets {
            Some(t) => t.clone(),
            None => match &s.targets_text {
                Some(text) => bail!(
                    "{path}: target_modules {text} is not a list of module names this example can read; give --target-modules"
                ),
                None => bail!("{path}: has no target_modules; give --target-modules"),
            },
        },
        (None, None) => LoraSettings::parse_targets(DEFAULT_TARGET_MODULES)?,
    };
    if rank == 0 {
        bail!("--lora-rank must be at least 1")
    }
    if !(0.0..1.0).contains(&dropout) {
        bail!("--lora-dropout {dropout} is not in [0, 1)")
    }
    Ok(LoraSettings {
        rank,
        alpha,
        dropout,
        targets,
    })
}

/// Everything checked and loaded before training starts.
pub struct Setup {
    pub spec: Spec,
    pub tokenizer: Tokenizer,
    pub dataset: Dataset,
    pub lora: LoraSettings,
    pub device: Device,
    pub dtype: DType,
    pub bos: Option<u32>,
    /// Where the base model came from (for `adapter_config.json`).
    pub source: String,
    /// The frozen base weights by Hugging Face name, read once (from the mmapped files or the
    /// tiny default's seeded random init); every model of the run shares them.
    base: HashMap<String, Tensor>,
    seed: u64,
}

impl Setup {
    /// Validates the arguments and loads config, tokenizer and data; errors come before any
    /// training.
    pub fn new(args: &Args) -> Result<Self> {
        if !OPTIMIZERS.contains(&args.optimizer.as_str()) {
            bail!(
                "unknown --optimizer {:?}; one of: {}",
                args.optimizer,
                OPTIMIZERS.join(", ")
            )
        }
        let dtype = match args.dtype.as_str() {
            "f32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => bail!("--dtype {other:?} is not one of f32, bf16, f16"),
        };
        if args.batch_size == 0 || args.grad_accum == 0 {
            bail!(
                "--batch-size {} and --grad-accum {} must be at least 1",
                args.batch_size,
                args.grad_accum
            )
        }
        if args.compare && args.resume.is_some() {
            bail!("--compare trains both optimizers from the start; it cannot be combined with --resume")
        }
        if args.save_every == Some(0) {
            bail!("--save-every must be at least 1")
        }
        let lora = lora_settings(args)?;
        let device = if args.cpu {
            Device::Cpu
        } else {
            Device::cuda_if_available(0)?
        };
        let examples: Vec<Example> = match &args.data {
            Some(path) => data::read_jsonl(path)?,
            None => data::builtin_dataset(2000, args.seed),
        };
        let files = match (&args.model_id, &args.model_dir) {
            (Some(id), _) => Some((hub::hub(id, &args.revision)?, id.clone())),
            (None, Some(dir)) => Some((hub::local(dir)?, dir.display().to_string())),
            (None, None) => None,
        };
        let (spec, tokenizer, base, source) = match files {
            Some((files, source)) => {
                let spec = Spec::from_file(&files.config)?;
                let tokenizer = Tokenizer::from_file(&files.tokenizer).map_err(|e| {
                    candle_core::Error::msg(format!("{}: {e}", files.tokenizer.display()))
                })?;
                // SAFETY: the files are mapped read-only while the tensors are read; changing
                // them meanwhile is the caller's problem, as with every mmapped checkpoint.
                let vb =
                    unsafe { VarBuilder::from_mmaped_safetensors(&files.weights, dtype, &device)? };
                // Every tensor the model needs, checked by name and shape before training.
                let base = spec
                    .tensor_shapes()
                    .into_iter()
                    .map(|(name, shape)| Ok((name.clone(), vb.get(shape, &name)?)))
                    .collect::<Result<HashMap<_, _>>>()?;
                (spec, tokenizer, base, source)
            }
            None => {
                let tokenizer = data::train_tokenizer(&examples, 512)?;
                let id = |t: &str| tokenizer.token_to_id(t).expect("special tokens are added");
                let spec = Spec::tiny(
                    tokenizer.get_vocab_size(true),
                    args.tiny_hidden,
                    args.tiny_layers,
                    id(data::BOS),
                    id(data::EOS),
                );
                let weights = random_weights(&spec, args.seed, dtype, &device)?;
                (
                    spec,
                    tokenizer,
                    weights.into_iter().collect(),
                    "tiny-random-llama".to_string(),
                )
            }
        };
        let (bos, eos) = (spec.bos, spec.eos.first().copied());
        let dataset = Dataset::new(
            &examples,
            &tokenizer,
            bos,
            eos,
            args.seq_len.min(spec.max_positions),
        )?;
        Ok(Self {
            spec,
            tokenizer,
            dataset,
            lora,
            device,
            dtype,
            bos,
            source,
            base,
            seed: args.seed,
        })
    }

    /// A fresh model: the base weights with newly initialised LoRA pairs (same seed, same init).
    pub fn model(&self) -> Result<Llama> {
        let vb = VarBuilder::from_tensors(self.base.clone(), self.dtype, &self.device);
        Llama::load(self.spec.clone(), vb, &self.lora, self.seed)
    }

    /// Mean loss over the first 64 examples (no dropout), weighted by target tokens.
    pub fn eval_loss(&self, model: &Llama, batch_size: usize) -> Result<f64> {
        let n = self.dataset.examples.len().min(64);
        let (mut total, mut count) = (0f64, 0f64);
        for start in (0..n).step_by(batch_size) {
            let idx: Vec<usize> = (start..(start + batch_size).min(n)).collect();
            let (x, y, w) = self.dataset.batch(&idx, &self.device)?;
            let tokens = w.sum_all()?.to_scalar::<f32>()? as f64;
            let loss = masked_cross_entropy(&model.forward(&x, &mut None)?, &y, &w)?;
            total += loss.to_scalar::<f32>()? as f64 * tokens;
            count += tokens;
        }
        Ok(total / count)
    }
}

/// The result of training one optimizer.
pub struct RunResult {
    pub optimizer: String,
    pub model: Llama,
    pub first_eval_loss: f64,
    pub final_eval_loss: f64,
    pub state_bytes: usize,
    pub log: Vec<LogRow>,
}

/// Saved with every checkpoint: where training stopped and its log so far.
#[derive(serde::Serialize, serde::Deserialize)]
struct TrainerState {
    step: usize,
    optimizer: String,
    seed: u64,
    log: Vec<LogRow>,
}

/// Writes adapter, optimizer state, trainer state (and the log) into `dir`.
fn save_checkpoint(
    setup: &Setup,
    model: &Llama,
    opt: &dyn TrainOptimizer,
    state: &TrainerState,
    dir: &Path,
) -> Result<()> {
    output::save_adapter(model, &setup.lora, &setup.source, dir)?;
    opt.save(&dir.join("optimizer.safetensors"))?;
    let path = dir.join("trainer_state.json");
    std::fs::write(&path, serde_json::to_string_pretty(state).unwrap())
        .map_err(|e| candle_core::Error::msg(format!("cannot write {}: {e}", path.display())))
}

/// Trains `optimizer` from a fresh model (or from `--resume`), writing checkpoints into `out`
/// when given.
pub fn train(setup: &Setup, args: &Args, optimizer: &str, out: Option<&Path>) -> Result<RunResult> {
    let model = setup.model()?;
    if let Some(dir) = &args.adapter {
        output::load_adapter(&model, &setup.lora, dir)?;
    }
    let vars = model.named_lora_vars();
    let peak_lr = peak_learning_rate(args, optimizer);
    let mut opt = make_optimizer(
        optimizer,
        vars.clone(),
        peak_lr,
        args.weight_decay,
        args.max_grad_norm,
    )?;
    let mut state = TrainerState {
        step: 0,
        optimizer: optimizer.to_string(),
        seed: args.seed,
        log: Vec::new(),
    };
    if let Some(dir) = &args.resume {
        let path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", path.display())))?;
        let saved: TrainerState = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        if saved.optimizer != optimizer || saved.seed != args.seed {
            bail!(
                "{} was written by --optimizer {} --seed {}, this run has --optimizer {optimizer} --seed {}",
                path.display(), saved.optimizer, saved.seed, args.seed
            )
        }
        output::load_adapter(&model, &setup.lora, dir)?;
        opt.load(&dir.join("optimizer.safetensors"))?;
        state = saved;
    }
    let first_eval_loss = setup.eval_loss(&model, args.batch_size)?;
    let warmup = args.warmup_steps.unwrap_or(args.steps / 10);
    let bar = if args.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(args.steps as u64)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_prefix(optimizer.to_string());
    bar.set_position(state.step as u64);
    for step in state.step + 1..=args.steps {
        let started = Instant::now();
        let lr = learning_rate(step, args.steps, warmup, peak_lr);
        opt.set_lr(lr);
        let mut grads: Option<GradStore> = None;
        let (mut loss_sum, mut tokens) = (0f64, 0usize);
        for micro in 0..args.grad_accum {
            let idx = setup.dataset.draw(args.seed, step, micro, args.batch_size);
            let (x, y, w) = setup.dataset.batch(&idx, &setup.device)?;
            tokens += x.elem_count();
            let mut rng: Option<StdRng> = Some(StdRng::seed_from_u64(
                args.seed ^ ((step as u64) << 24) ^ ((micro as u64) << 8) ^ 0xd709,
            ));
            let loss = masked_cross_entropy(&model.forward(&x, &mut rng)?, &y, &w)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = (loss / args.grad_accum as f64)?.backward()?;
            grads = Some(match grads {
                None => g,
                Some(mut acc) => {
                    for (_, v) in &vars {
                        if let (Some(a), Some(b)) = (acc.get(v), g.get(v)) {
                            let sum = (a + b)?;
                            acc.insert(v, sum);
                        }
                    }
                    acc
                }
            });
        }
        let loss = loss_sum / args.grad_accum as f64;
        if !loss.is_finite() {
            bail!("the loss became {loss} at step {step}; lower --lr")
        }
        opt.step(grads.as_ref().expect("grad_accum >= 1"))?;
        let tokens_per_s = tokens as f64 / started.elapsed().as_secs_f64();
        state.step = step;
        state.log.push(LogRow {
            optimizer: optimizer.to_string(),
            step,
            lr,
            loss,
            tokens_per_s,
            state_bytes: opt.state_bytes(),
        });
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {loss:.3} | {tokens_per_s:.0} tok/s | optimizer state {}",
            output::human(opt.state_bytes())
        ));
        if let (Some(out), Some(every)) = (out, args.save_every) {
            if every > 0 && step % every == 0 && step < args.steps {
                save_checkpoint(
                    setup,
                    &model,
                    opt.as_ref(),
                    &state,
                    &out.join(format!("checkpoint-{step}")),
                )?;
            }
        }
    }
    bar.finish();
    if let Some(out) = out {
        save_checkpoint(setup, &model, opt.as_ref(), &state, out)?;
    }
    Ok(RunResult {
        optimizer: optimizer.to_string(),
        final_eval_loss: setup.eval_loss(&model, args.batch_size)?,
        first_eval_loss,
        state_bytes: opt.state_bytes(),
        log: state.log,
        model,
    })
}

/// Samples up to `max_new` tokens after `prompt` (in the training template), greedy when
/// `temperature` is 0.
pub fn generate(
    setup: &Setup,
    model: &Llama,
    prompt: &str,
    max_new: usize,
    temperature: f64,
    seed: u64,
) -> Result<String> {
    let mut ids: Vec<u32> = setup.bos.into_iter().collect();
    ids.extend(data::encode(
        &setup.tokenizer,
        &data::format_prompt(prompt),
    )?);
    let start = ids.len();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..max_new {
        if ids.len() >= model.spec.max_positions {
            break;
        }
        let x = Tensor::new(ids.as_slice(), &setup.device)?.unsqueeze(0)?;
        let logits = model.forward(&x, &mut None)?.squeeze(0)?;
        let last: Vec<f32> = logits.get(ids.len() - 1)?.to_vec1()?;
        let next = if temperature <= 0.0 {
            last.iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                    if l > best.1 {
                        (i, l)
                    } else {
                        best
                    }
                })
                .0 as u32
        } else {
            let max = last.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f64> = last
                .iter()
                .map(|&l| (((l - max) as f64) / temperature).exp())
                .collect();
            let mut pick = rng.random::<f64>() * weights.iter().sum::<f64>();
            let mut chosen = weights.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                if pick < *w {
                    chosen = i;
                    break;
                }
                pick -= w;
            }
            chosen as u32
        };
        if setup.spec.eos.contains(&next) {
            break;
        }
        ids.push(next);
    }
    setup
        .tokenizer
        .decode(&ids[start..], true)
        .map_err(|e| candle_core::Error::msg(format!("decoding: {e}")))
}

/// The whole command: train (and the `--compare` baseline), write outputs, generate, report.
pub fn run(args: &Args) -> Result<Vec<RunResult>> {
    let setup = Setup::new(args)?;
    let out = args.out.as_path();
    std::fs::create_dir_all(out)
        .map_err(|e| candle_core::Error::msg(format!("cannot create {}: {e}", out.display())))?;
    let mut runs = vec![train(&setup, args, &args.optimizer, Some(out))?];
    if args.compare && args.optimizer != "candle-adamw" {
        runs.push(train(&setup, args, "candle-adamw", None)?);
    }
    let log: Vec<LogRow> = runs.iter().flat_map(|r| r.log.clone()).collect();
    output::write_csv(&log, &out.join("training_log.csv"))?;
    if !log.is_empty() {
        output::plot_losses(&log, &out.join("loss_curve.png"))?;
    }
    setup
        .tokenizer
        .save(out.join("tokenizer.json"), false)
        .map_err(|e| candle_core::Error::msg(format!("saving tokenizer: {e}")))?;
    if !args.quiet {
        let trainable: usize = runs[0]
            .model
            .named_lora_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        let states: Vec<(String, usize)> = runs
            .iter()
            .map(|r| (r.optimizer.clone(), r.state_bytes))
            .collect();
        println!(
            "\n{}",
            output::memory_table(&runs[0].model, trainable, &states)
        );
        for r in &runs {
            println!(
                "{:<14} eval loss {:.4} -> {:.4}, optimizer state {}",
                r.optimizer,
                r.first_eval_loss,
                r.final_eval_loss,
                output::human(r.state_bytes)
            );
        }
        println!("adapter, log and loss curve written to {}", out.display());
    }
    if let Some(prompt) = &args.generate {
        let text = generate(
            &setup,
            &runs[0].model,
            prompt,
            args.max_new_tokens,
            args.temperature,
            args.seed,
        )?;
        println!("\n### Instruction:\n{prompt}\n### Response:\n{text}");
    }
    Ok(runs)
}
