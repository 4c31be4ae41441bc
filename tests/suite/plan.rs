//! Memory plans: the planned optimizer state equals what the optimizers allocate, to the byte, for
//! every optimizer, both precisions, with and without overrides; the other parts of a plan follow
//! their formulas.

use candle_bnb::optim::plan::{
    LlamaShape, MemoryPlan, TensorSpec, TrainingSetup, TransformerShape,
};
use candle_bnb::optim::{
    keep_32bit_state, AdEMAMixConfig, Adafactor, AdafactorConfig, AdagradConfig, AdamConfig, AdamW,
    AdamW8bit, AdamW8bitConfig, AdamWConfig, CAME8bit, CAMEConfig, LAMBConfig, LARSConfig,
    LionConfig, Optim, OptimizerConfig, Overrides, RMSpropConfig, SGDConfig, SGD,
};
use candle_core::{DType, Device, Var};
use candle_nn::VarMap;
use std::collections::HashMap;

/// A tiny LLaMA whose tensors fall on both sides of `min_8bit_size` (4096) and whose block counts
/// are not whole (vocab 301, MLP width 181), with grouped-query attention.
fn tiny_llama() -> LlamaShape {
    LlamaShape {
        vocab_size: 301,
        hidden_size: 64,
        intermediate_size: 181,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: false,
    }
}

/// A VarMap holding `tensors` (zeros, in their dtype), the marked ones marked as an embedding
/// module marks its weight.
fn varmap(tensors: &[TensorSpec]) -> VarMap {
    let vm = VarMap::new();
    let mut data = vm.data().lock().unwrap();
    for t in tensors {
        let var = Var::zeros(t.shape.as_slice(), t.dtype, &Device::Cpu).unwrap();
        if t.keep_32bit {
            keep_32bit_state(&var);
        }
        data.insert(t.name.clone(), var);
    }
    drop(data);
    vm
}

/// Per tensor name, the bytes of the state the optimizer allocated.
fn allocated<C: OptimizerConfig, const B: u32>(opt: &Optim<C, B>) -> HashMap<String, usize> {
    let states = opt.states().unwrap();
    opt.param_names()
        .into_iter()
        .zip(states)
        .map(|(name, (_, state))| (name.to_string(), state.bytes()))
        .collect()
}

/// The plan of `Optim<C, B>` over `tensors` equals the state the optimizer allocates over them,
/// tensor by tensor.
fn check_plan<C: OptimizerConfig, const B: u32>(
    tensors: &[TensorSpec],
    vm: &VarMap,
    config: C,
    overrides: &Overrides,
) {
    let what = format!("{} ({B}-bit default)", C::KIND);
    let plan = Optim::<C, B>::plan(tensors, config.clone(), overrides).unwrap();
    let opt = Optim::<C, B>::from_varmap_with_overrides(vm, config, overrides).unwrap();
    let real = allocated(&opt);
    assert_eq!(plan.len(), real.len(), "{what}");
    for p in &plan {
        assert_eq!(Some(&p.bytes), real.get(&p.name), "{what}: {}", p.name);
    }
    let total: usize = plan.iter().map(|p| p.bytes).sum();
    assert_eq!(total, opt.state_bytes(), "{what}");
}

/// [`check_plan`] for `C`'s 32-bit and 8-bit optimizers (`AdamW` and `AdamW8bit`, ...).
fn both<C: OptimizerConfig>(tensors: &[TensorSpec], vm: &VarMap, config: C, overrides: &Overrides) {
    check_plan::<C, 32>(tensors, vm, config.clone(), overrides);
    check_plan::<C, 8>(tensors, vm, config, overrides);
}

/// Every optimizer of the family, both default precisions, every state count (0 to 3).
fn check_every_optimizer(tensors: &[TensorSpec], vm: &VarMap, overrides: &Overrides) {
    both(tensors, vm, AdamConfig::default(), overrides);
    both(tensors, vm, AdamWConfig::default(), overrides);
    both(tensors, vm, LionConfig::default(), overrides);
    let centered = RMSpropConfig {
        momentum: 0.9,
        centered: true,
        ..Default::default()
    };
    both(tensors, vm, centered, overrides);
    both(tensors, vm, AdagradConfig::default(), overrides);
    both(tensors, vm, LAMBConfig::default(), overrides);
    let lars = LARSConfig {
        momentum: 0.9,
        ..Default::default()
    };
    both(tensors, vm, lars, overrides);
    both(tensors, vm, AdEMAMixConfig::default(), overrides);
    let sgd = SGDConfig {
        momentum: 0.9,
        ..Default::default()
    };
    both(tensors, vm, sgd, overrides);
    both(tensors, vm, SGDConfig::default(), overrides);
}

/// Overrides touching every layout decision: precision both ways, block size, fallback size,
/// and a pattern over norms.
fn layout_overrides() -> Overrides {
    Overrides::new()
        .for_module("lm_head")
        .optim_bits(32)
        .for_module("model.layers.1")
        .block_size(64)
        .for_pattern("*k_proj*")
        .min_8bit_size(1000)
        .for_name("model.embed_tokens.weight")
        .optim_bits(8)
        .for_pattern("*norm*")
        .min_8bit_size(1)
}

#[test]
fn planned_state_equals_allocated_state_for_every_optimizer() {
    for dtype in [DType::F32, DType::BF16] {
        let mut tensors = tiny_llama().tensors(dtype);
        // A frozen tensor and an integer one: neither gets state.
        tensors.push(TensorSpec {
            trainable: false,
            ..TensorSpec::new("frozen.weight", &[64, 64], dtype)
        });
        tensors.push(TensorSpec::new("token_ids", &[16], DType::U32));
        let vm = varmap(&tensors[..tensors.len() - 2]);
        let trainable = tensors[..tensors.len() - 2].to_vec();
        check_every_optimizer(&trainable, &vm, &Overrides::new());
        check_every_optimizer(&trainable, &vm, &layout_overrides());
        // The frozen and integer tensors are left out of the plan.
        let plan = AdamW8bit::plan(&tensors, AdamW8bitConfig::default(), &Overrides::new());
        assert_eq!(plan.unwrap().len(), trainable.len());
    }
}

#[test]
fn planned_state_equals_allocated_state_for_a_100m_llama() {
    // 134 M parameters (GPT-2-small-sized LLaMA); BF16 weights keep the test's memory low.
    let llama = LlamaShape {
        vocab_size: 32000,
        hidden_size: 768,
        intermediate_size: 2048,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        num_key_value_heads: 4,
        tie_word_embeddings: false,
    };
    let tensors = llama.tensors(DType::BF16);
    let n: usize = tensors.iter().map(|t| t.elem_count()).sum();
    assert_eq!(
        n,
        2 * 32000 * 768 + 12 * (2 * 768 * 768 + 2 * 256 * 768 + 3 * 768 * 2048 + 2 * 768) + 768
    );
    let vm = varmap(&tensors);
    check_every_optimizer(&tensors, &vm, &Overrides::new());
    check_every_optimizer(&tensors, &vm, &layout_overrides());
}

#[test]
fn planned_state_equals_allocated_state_for_the_lora_example() {
    // The LoRA example's tiny default (hidden 256, 2 layers, 4 heads over 2, a 512-token
    // vocabulary) with its default adapters: rank 16 on all seven projections, f32, the base
    // frozen. The optimizer sees the adapters only.
    let base = LlamaShape {
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 256 * 8 / 3,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        tie_word_embeddings: false,
    };
    let mut tensors = Vec::new();
    for t in base.tensors(DType::F32) {
        let module = t.name.trim_end_matches(".weight").to_string();
        if t.shape.len() == 2 && module.ends_with("_proj") {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let a = format!("{module}.lora_A.weight");
            let b = format!("{module}.lora_B.weight");
            tensors.push(TensorSpec::new(a, &[16, cols], DType::F32));
            tensors.push(TensorSpec::new(b, &[rows, 16], DType::F32));
        }
        tensors.push(TensorSpec {
            trainable: false,
            ..t
        });
    }
    let adapters: Vec<TensorSpec> = tensors.iter().filter(|t| t.trainable).cloned().collect();
    assert_eq!(adapters.len(), 2 * 7 * 2);
    let vm = varmap(&adapters);
    check_every_optimizer(&adapters, &vm, &Overrides::new());
    // The plan over every tensor leaves the frozen base out.
    let with_base = AdamW8bit::plan(&tensors, AdamW8bitConfig::default(), &Overrides::new());
    let without = AdamW8bit::plan(&adapters, AdamW8bitConfig::default(), &Overrides::new());
    assert_eq!(with_base.unwrap(), without.unwrap());
    let overrides = Overrides::new()
        .for_pattern("*lora_B*")
        .optim_bits(8)
        .for_pattern("*lora_B*")
        .min_8bit_size(1024);
    check_every_optimizer(&adapters, &vm, &overrides);
}

/// The bytes of 8-bit AdamW state the formula gives for one tensor: f32 moments for an embedding
/// or a tensor under 4096 elements, else one code per element and one f32 scale per 256.
fn adamw_8bit_formula(t: &TensorSpec) -> usize {
    let n = t.elem_count();
    if t.keep_32bit || n < 4096 {
        2 * 4 * n
    } else {
        2 * (n + 4 * n.div_ceil(256))
    }
}

#[test]
fn llama2_7b_plans_follow_the_formulas() {
    let tensors = LlamaShape::llama2_7b().tensors(DType::BF16);
    let n: u64 = tensors.iter().map(|t| t.elem_count() as u64).sum();
    assert_eq!(n, 6_738_415_616);
    let setup = TrainingSetup {
        master_weights: true,
        activations: None,
    };
    // Mixed precision with 32-bit AdamW: 2 + 4 + 2 + 8 = 16 bytes per parameter.
    let state = AdamW::plan(&tensors, AdamWConfig::default(), &Overrides::new()).unwrap();
    let plan = MemoryPlan::new(&tensors, &state, &setup);
    assert_eq!(
        (
            plan.trainable_weights,
            plan.master_weights,
            plan.gradients,
            plan.optimizer_state
        ),
        (2 * n, 4 * n, 2 * n, 8 * n)
    );
    assert_eq!((plan.frozen_weights, plan.activations), (0, 0));
    assert_eq!(plan.total(), 16 * n);
    // 8-bit AdamW, per tensor against the formula.
    let state = AdamW8bit::plan(&tensors, AdamW8bitConfig::default(), &Overrides::new()).unwrap();
    for (t, s) in tensors.iter().zip(&state) {
        assert_eq!(s.bytes, adamw_8bit_formula(t), "{}", t.name);
    }
    // SGD with momentum: one f32 state.
    let sgd = SGDConfig {
        momentum: 0.9,
        ..Default::default()
    };
    let state = SGD::plan(&tensors, sgd, &Overrides::new()).unwrap();
    assert_eq!(state.iter().map(|s| s.bytes as u64).sum::<u64>(), 4 * n);
}

#[test]
fn activations_follow_korthikanti_et_al() {
    let shape = TransformerShape {
        layers: 32,
        hidden_size: 4096,
        heads: 32,
        seq_len: 2048,
        batch_size: 1,
        recompute: false,
    };
    // s·b·h·(34 + 5·a·s/h) per layer: 2048·4096·(34 + 5·32·2048/4096) = 2048·4096·114.
    assert_eq!(shape.activation_bytes(), 32 * 2048 * 4096 * 114);
    let recompute = TransformerShape {
        recompute: true,
        ..shape
    };
    assert_eq!(recompute.activation_bytes(), 32 * 2 * 2048 * 4096);
}

#[test]
fn bad_plans_are_refused_naming_the_value() {
    let tensors = tiny_llama().tensors(DType::F32);
    let err = |tensors: &[TensorSpec], overrides: &Overrides| {
        AdamW8bit::plan(tensors, AdamW8bitConfig::default(), overrides)
            .unwrap_err()
            .to_string()
    };
    let var = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let msg = err(&tensors, &Overrides::new().for_var(&var).lr(0.1));
    assert!(msg.contains("by name only"), "{msg}");
    let msg = err(&tensors, &Overrides::new().for_module("lm_heda").lr(0.1));
    assert!(msg.contains("lm_heda") && msg.contains("lm_head"), "{msg}");
    let mut twice = tensors.clone();
    twice.push(tensors[3].clone());
    let msg = err(&twice, &Overrides::new());
    assert!(
        msg.contains(&tensors[3].name) && msg.contains("twice"),
        "{msg}"
    );
    let f64_tensor = vec![TensorSpec::new("w", &[8], DType::F64)];
    let msg = err(&f64_tensor, &Overrides::new());
    assert!(msg.contains("\"w\"") && msg.contains("F64"), "{msg}");
    let msg = err(
        &tensors,
        &Overrides::new()
            .for_name("model.norm.weight")
            .field("max_grad_norm", 1.0),
    );
    assert!(
        msg.contains("max_grad_norm") && msg.contains("model.norm.weight"),
        "{msg}"
    );
}

#[test]
fn llama2_sizes_have_their_published_counts() {
    let count = |shape: LlamaShape| -> u64 {
        shape
            .tensors(DType::BF16)
            .iter()
            .map(|t| t.elem_count() as u64)
            .sum()
    };
    assert_eq!(count(LlamaShape::llama2_13b()), 13_015_864_320);
    assert_eq!(count(LlamaShape::llama2_70b()), 68_976_648_192);
    // A shape by size alone lands within one layer of the size asked for.
    for params in [
        350_000_000u64,
        1_300_000_000,
        30_000_000_000,
        175_000_000_000,
    ] {
        let shape = LlamaShape::with_params(params as usize);
        let h = shape.hidden_size as u64;
        let layer = 4 * h * h + 3 * h * shape.intermediate_size as u64 + 2 * h;
        let n = count(shape);
        assert!(n.abs_diff(params) <= layer / 2 + 1, "{params}: {n}");
    }
}

/// Runs `candle-bnb plan` with `args`; its exit status, stdout and stderr.
fn cli(args: &[&str]) -> (i32, String, String) {
    cli_with_env(args, &[])
}

/// [`cli`] with environment variables set for the command.
fn cli_with_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_candle-bnb"));
    command.arg("plan").args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A model folder of the tiny LLaMA: `config.json` and `model.safetensors` (zeros).
fn tiny_model_dir(test: &str) -> std::path::PathBuf {
    let dir = crate::common::temp_dir(test);
    let shape = tiny_llama();
    let config = serde_json::json!({
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "tie_word_embeddings": shape.tie_word_embeddings,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tensors: Vec<(String, candle_core::Tensor)> = shape
        .tensors(DType::F32)
        .iter()
        .map(|t| {
            let zeros = candle_core::Tensor::zeros(t.shape.as_slice(), DType::F32, &Device::Cpu);
            (t.name.clone(), zeros.unwrap())
        })
        .collect();
    candle_core::safetensors::save(
        &tensors.into_iter().collect::<HashMap<_, _>>(),
        dir.join("model.safetensors"),
    )
    .unwrap();
    dir
}

/// The JSON report of the tiny model printed as `out`, checked to count its parameters and name
/// `source`; with the parameter count.
fn tiny_report(out: &str, source: &str) -> (serde_json::Value, usize) {
    let json: serde_json::Value = serde_json::from_str(out).unwrap();
    let tensors = tiny_llama().tensors(DType::F32);
    let n: usize = tensors.iter().map(|t| t.elem_count()).sum();
    assert_eq!(json["parameters"], n as u64);
    let model = json["model"].as_str().unwrap();
    assert!(model.contains(source), "{model}");
    (json, n)
}

/// CAME needs an lr; the state does not depend on it.
fn came_config() -> CAMEConfig {
    CAMEConfig {
        lr: 1e-4,
        ..Default::default()
    }
}

#[test]
fn the_plan_command_reports_the_library_plan() {
    let dir = tiny_model_dir("plan_cli");
    let dir_arg = dir.to_str().unwrap();
    let (code, out, err) = cli(&[
        "--model-dir",
        dir_arg,
        "--dtype",
        "f32",
        "--seq-len",
        "0",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let (json, n) = tiny_report(&out, "safetensors headers");
    let tensors = tiny_llama().tensors(DType::F32);
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), candle_bnb::OPTIMIZER_NAMES.len());
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["optimizer"] == name)
            .unwrap()
            .clone()
    };
    let planned = |plan: Vec<candle_bnb::optim::plan::StatePlan>| {
        plan.iter().map(|p| p.bytes as u64).sum::<u64>()
    };
    let adamw8 = AdamW8bit::plan(&tensors, AdamW8bitConfig::default(), &Overrides::new());
    assert_eq!(
        row("adamw8bit")["optimizer_state"],
        planned(adamw8.unwrap())
    );
    let adamw32 = AdamW::plan(&tensors, AdamWConfig::default(), &Overrides::new());
    assert_eq!(row("adamw32")["optimizer_state"], planned(adamw32.unwrap()));
    assert_eq!(row("candle-adamw")["optimizer_state"], 8 * n as u64);
    let came8 = CAME8bit::plan(&tensors, came_config(), &Overrides::new());
    assert_eq!(row("came8bit")["optimizer_state"], planned(came8.unwrap()));
    let adafactor = Adafactor::plan(&tensors, AdafactorConfig::default(), &Overrides::new());
    assert_eq!(
        row("adafactor")["optimizer_state"],
        planned(adafactor.unwrap())
    );
    let r = row("lion8bit");
    assert_eq!(
        r["total"],
        r["trainable_weights"].as_u64().unwrap()
            + r["gradients"].as_u64().unwrap()
            + r["optimizer_state"].as_u64().unwrap()
    );

    // LoRA on q and v (rank 4): the base is frozen, the adapters are the trainable parameters.
    let (code, out, err) = cli(&[
        "--model-dir",
        dir_arg,
        "--dtype",
        "bf16",
        "--mode",
        "lora",
        "--lora-rank",
        "4",
        "--target-modules",
        "q,v",
        "--optimizer",
        "adamw8bit",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (h, kv) = (64, 32);
    let per_layer = (4 * h + h * 4) + (4 * h + kv * 4);
    assert_eq!(json["trainable"], (2 * per_layer) as u64);
    let r = &json["rows"][0];
    assert_eq!(r["frozen_weights"], (2 * n) as u64);
    assert_eq!(r["trainable_weights"], (4 * 2 * per_layer) as u64);
    // The adapters are under 4096 elements: 32-bit moments.
    assert_eq!(r["optimizer_state"], (8 * 2 * per_layer) as u64);
    assert!(r["activations"].as_u64().unwrap() > 0);

    // A budget: the table lists what fits, smallest first.
    let (code, out, err) = cli(&["--params", "7B", "--budget", "60GiB", "--seq-len", "0"]);
    assert_eq!(code, 0, "{err}");
    // 32-bit AdamW does not fit 60 GiB in full; its LoRA alternative does.
    let starts = |prefix: &str| out.lines().any(|l| l.starts_with(prefix));
    assert!(
        starts("adamw8bit ") && !starts("adamw32 ") && starts("adamw32+lora "),
        "{out}"
    );
    assert!(out.contains("fit in 60.00 GiB"), "{out}");
    assert!(out.contains("recommended: adamw8bit"), "{out}");
    // With a master copy 8-bit AdamW no longer fits 58 GiB: the advisor's first pick is CAME8bit
    // (near-Adam quality in half of its state), with what it is said.
    let args = [
        "--params",
        "7B",
        "--master-weights",
        "--seq-len",
        "0",
        "--budget",
        "58GiB",
    ];
    let (_, out, _) = cli(&args);
    let first = out.lines().nth(3).unwrap_or_default();
    assert!(
        first.starts_with("came8bit") && first.contains("factored second moment"),
        "{out}"
    );
    assert!(out.contains("recommended: came8bit"), "{out}");
    let lion = out
        .lines()
        .find(|l| l.starts_with("lion8bit"))
        .unwrap_or_default();
    assert!(lion.contains("retune"), "{out}");
    // 24 GiB: no full fine-tune of 7B fits; the advisor's LoRA alternative does.
    let args = ["--params", "7B", "--seq-len", "512", "--budget", "24GiB"];
    let (_, out, _) = cli(&args);
    let first = out.lines().nth(3).unwrap_or_default();
    assert!(first.starts_with("adamw8bit+lora"), "{out}");
    assert!(
        out.contains("23 of 46 fit") && out.contains("recommended: adamw8bit+lora"),
        "{out}"
    );

    // The plot: a PNG one bar wide per row.
    let png = crate::common::temp_dir("plan_cli_plot").join("plan.png");
    let (code, _, err) = cli(&[
        "--params",
        "7B",
        "--budget",
        "60GiB",
        "--plot",
        png.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let dim = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    // Every optimizer in full and, with a budget, as a LoRA alternative.
    let bars = 2 * candle_bnb::OPTIMIZER_NAMES.len() as u32;
    assert_eq!((dim(16), dim(20)), (160 + 84 * bars, 480));
}

#[test]
fn the_plan_command_names_what_is_wrong() {
    let dir = crate::common::temp_dir("plan_cli_errors");
    let missing = dir.join("nothing");
    let (code, _, err) = cli(&["--model-dir", missing.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"vocab_size": 10, "hidden_size": 8, "num_attention_heads": 2}"#,
    )
    .unwrap();
    let (code, _, err) = cli(&["--model-dir", dir.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("intermediate_size is missing"), "{err}");
    let (_, _, err) = cli(&["--params", "7B", "--budget", "24 parsecs"]);
    assert!(
        err.contains("24 parsecs") && err.contains("unknown unit"),
        "{err}"
    );
    let (_, _, err) = cli(&["--params", "seven"]);
    assert!(err.contains("\"seven\""), "{err}");
    let (_, _, err) = cli(&["--params", "7B", "--optimizer", "adamw9bit"]);
    assert!(
        err.contains("adamw9bit") && err.contains("adamw8bit"),
        "{err}"
    );
}

#[test]
fn the_plan_command_reads_a_hub_config_from_the_cache() {
    // The tiny model's config in the hub cache layout; offline, so nothing is downloaded.
    let dir = tiny_model_dir("plan_cli_hub_files");
    let cache = crate::common::temp_dir("plan_cli_hub_cache");
    let repo = cache.join("models--tiny-org--tiny-llama");
    let snapshot = repo.join("snapshots").join("0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();
    std::fs::copy(dir.join("config.json"), snapshot.join("config.json")).unwrap();
    let offline = std::path::Path::new("1");
    let env = [
        ("HF_HUB_CACHE", cache.as_path()),
        ("HF_HUB_OFFLINE", offline),
    ];
    let args = [
        "--model-id",
        "tiny-org/tiny-llama",
        "--dtype",
        "f32",
        "--json",
    ];
    let (code, out, err) = cli_with_env(&args, &env);
    assert_eq!(code, 0, "{err}");
    tiny_report(&out, "tiny-org/tiny-llama@main");
    // A model that is not cached is an error naming the file, the model and the offline mode.
    let args = ["--model-id", "tiny-org/absent"];
    let (code, _, err) = cli_with_env(&args, &env);
    assert_eq!(code, 2);
    assert!(
        err.contains("config.json")
            && err.contains("tiny-org/absent")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn the_article_tables_come_out_of_params() {
    // (size, parameters): LLaMA-2's configs for 7B/13B/70B, LLaMA-shaped models otherwise.
    for (size, n) in [
        ("1B", 1_004_607_488u64),
        ("7B", 6_738_415_616),
        ("13B", 13_015_864_320),
        ("70B", 68_976_648_192),
        ("175B", 174_734_979_072),
    ] {
        let args = [
            "--params",
            size,
            "--master-weights",
            "--seq-len",
            "0",
            "--optimizer",
            "adamw32",
            "--json",
        ];
        let (code, out, err) = cli(&args);
        assert_eq!(code, 0, "{err}");
        let json: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(json["parameters"], n, "{size}");
        let r = &json["rows"][0];
        let parts = [
            "trainable_weights",
            "master_weights",
            "gradients",
            "optimizer_state",
        ];
        let bytes: Vec<u64> = parts.iter().map(|p| r[*p].as_u64().unwrap()).collect();
        assert_eq!(bytes, [2 * n, 4 * n, 2 * n, 8 * n], "{size}");
        assert_eq!(r["total"], 16 * n, "{size}");
    }
}
