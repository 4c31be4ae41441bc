//! Per-parameter overrides: every kind of target, the precedence order, the behaviour they cause,
//! parameter groups, learning-rate ratios, checkpoints and typos.

use candle_bnb::optim::{AdamW8bit, AdamW8bitConfig, OptimizerConfig, Overrides};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use crate::common::{randn, rng, TestRng};

const PARAMS: [(&str, &[usize]); 6] = [
    ("lm_head.weight", &[100, 64]),
    ("model.embed_tokens.weight", &[100, 64]),
    ("model.layers.0.attn.q_proj.bias", &[64]),
    ("model.layers.0.attn.q_proj.weight", &[64, 64]),
    ("model.layers.0.norm.weight", &[64]),
    ("model.layers.1.attn.q_proj.weight", &[64, 64]),
];

fn varmap(rng: &mut TestRng) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (name, shape) in PARAMS {
            let n = shape.iter().product();
            let t = Tensor::from_vec(randn(rng, n, 1.0), shape, &Device::Cpu).unwrap();
            data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
        }
    }
    vm
}

fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

/// The resolved value of `field` for every parameter, in `PARAMS` order.
fn resolved(opt: &AdamW8bit, field: &str) -> Vec<String> {
    let names = opt.param_names();
    PARAMS
        .iter()
        .map(|(name, _)| {
            let i = names.iter().position(|n| n == name).unwrap();
            let fields = opt.param_configs()[i].fields();
            fields.into_iter().find(|(f, _)| *f == field).unwrap().1
        })
        .collect()
}

#[test]
fn every_kind_of_override_resolves_in_precedence_order() {
    let mut rng = rng("overrides_table");
    let vm = varmap(&mut rng);
    let embed = var(&vm, "model.embed_tokens.weight");
    // (overrides, field, expected value per parameter in PARAMS order)
    let cases: Vec<(Overrides, &str, [&str; 6])> = vec![
        (
            Overrides::new().pattern("*.bias", "weight_decay", 0.0),
            "weight_decay",
            ["0.01", "0.01", "0", "0.01", "0.01", "0.01"],
        ),
        (
            // The longest module prefix wins.
            Overrides::new()
                .module("model.layers.0.attn", "beta1", 0.7)
                .module("model.layers.0", "beta1", 0.8),
            "beta1",
            ["0.9", "0.9", "0.7", "0.7", "0.8", "0.9"],
        ),
        (
            // Name > module > pattern, whatever the order they were added in.
            Overrides::new()
                .name("model.layers.0.attn.q_proj.weight", "beta2", 0.95)
                .module("model.layers.0", "beta2", 0.98)
                .pattern("*q_proj*", "beta2", 0.97),
            "beta2",
            ["0.999", "0.999", "0.98", "0.95", "0.98", "0.97"],
        ),
        (
            // Var > name.
            Overrides::new().var(&embed, "optim_bits", 32).name(
                "model.embed_tokens.weight",
                "optim_bits",
                8,
            ),
            "optim_bits",
            ["8", "32", "8", "8", "8", "8"],
        ),
        (
            // Among equals the last added wins.
            Overrides::new()
                .pattern("*", "eps", 1e-6)
                .pattern("*.weight", "eps", 1e-7),
            "eps",
            [
                "0.0000001",
                "0.0000001",
                "0.000001",
                "0.0000001",
                "0.0000001",
                "0.0000001",
            ],
        ),
        (
            Overrides::new().no_weight_decay_for_biases_and_norms(),
            "weight_decay",
            ["0.01", "0.01", "0", "0.01", "0", "0.01"],
        ),
        (
            Overrides::new().module("model.layers.1", "percentile_clipping", 5),
            "percentile_clipping",
            ["100", "100", "100", "100", "100", "5"],
        ),
    ];
    for (k, (overrides, field, want)) in cases.into_iter().enumerate() {
        let opt =
            AdamW8bit::from_varmap_with_overrides(&vm, AdamW8bitConfig::default(), &overrides)
                .unwrap();
        let got = resolved(&opt, field);
        let want: Vec<String> = want
            .iter()
            .map(|v| v.parse::<f64>().unwrap().to_string())
            .collect();
        assert_eq!(got, want, "case {k}: {field}");
    }
}

#[test]
fn overrides_change_what_the_optimizer_does() {
    let mut rng = rng("overrides_behaviour");
    let vm = varmap(&mut rng);
    let embed = var(&vm, "model.embed_tokens.weight");
    let overrides = Overrides::new()
        .var(&embed, "optim_bits", 32)
        .no_weight_decay_for_biases_and_norms();
    let config = AdamW8bitConfig {
        lr: 0.1,
        weight_decay: 0.5,
        ..Default::default()
    };
    let mut opt = AdamW8bit::from_varmap_with_overrides(&vm, config, &overrides).unwrap();
    // 32-bit embedding (8 B/param), 8-bit lm_head and q_proj weights (~2 B/param), small tensors
    // (< min_8bit_size) 32-bit.
    let bytes_8bit = |n: usize| 2 * (n + 4 * n.div_ceil(256));
    let want = 8 * 6400 + bytes_8bit(6400) + 2 * bytes_8bit(4096) + 8 * 64 * 2;
    assert_eq!(opt.state_bytes(), want);

    // A zero gradient: Adam's direction is 0, so only weight decay moves a parameter.
    let (bias, norm, q) = (
        var(&vm, "model.layers.0.attn.q_proj.bias"),
        var(&vm, "model.layers.0.norm.weight"),
        var(&vm, "model.layers.0.attn.q_proj.weight"),
    );
    let before: Vec<Vec<f32>> = [&bias, &norm, &q]
        .iter()
        .map(|v| v.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let loss = [&bias, &norm, &q]
        .iter()
        .map(|v| {
            let zeros = v.as_tensor().zeros_like().unwrap();
            (v.as_tensor() * zeros).unwrap().sum_all().unwrap()
        })
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    opt.backward_step(&loss).unwrap();
    assert_eq!(bias.to_vec1::<f32>().unwrap(), before[0], "bias: no decay");
    assert_eq!(norm.to_vec1::<f32>().unwrap(), before[1], "norm: no decay");
    let after = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let factor = (1.0 - 0.1f64 * 0.5) as f32;
    for (a, b) in after.iter().zip(&before[2]) {
        assert_eq!(*a, b * factor, "q_proj: decay only");
    }
}

#[test]
fn set_learning_rate_keeps_the_ratio_of_overridden_rates() {
    let mut rng = rng("overrides_lr");
    let vm = varmap(&mut rng);
    let overrides = Overrides::new().name("lm_head.weight", "lr", 1e-4);
    let mut opt =
        AdamW8bit::from_varmap_with_overrides(&vm, AdamW8bitConfig::default(), &overrides).unwrap();
    let lrs = |opt: &AdamW8bit| resolved(opt, "lr");
    assert_eq!(lrs(&opt)[0], "0.0001");
    assert_eq!(lrs(&opt)[1], "0.001");
    opt.set_learning_rate(5e-4);
    assert_eq!(opt.learning_rate(), 5e-4);
    let scaled: Vec<f64> = lrs(&opt).iter().map(|v| v.parse().unwrap()).collect();
    assert!((scaled[0] - 5e-5).abs() < 1e-15, "{scaled:?}");
    assert_eq!(scaled[1], 5e-4);
    // A base equal to the override value still scales the override (1e-4 * 1e-4 / 1e-3).
    opt.set_learning_rate(1e-4);
    let scaled: Vec<f64> = lrs(&opt).iter().map(|v| v.parse().unwrap()).collect();
    assert!((scaled[0] - 1e-5).abs() < 1e-15, "{scaled:?}");
    assert_eq!(scaled[1], 1e-4);
}

#[test]
fn typos_and_misplaced_overrides_are_errors() {
    let mut rng = rng("overrides_errors");
    let vm = varmap(&mut rng);
    let err = |o: Overrides| {
        AdamW8bit::from_varmap_with_overrides(&vm, AdamW8bitConfig::default(), &o)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = err(Overrides::new().module("model.embd_tokens", "optim_bits", 32));
    assert!(e.contains("model.embed_tokens.weight"), "{e}");
    let e = err(Overrides::new().name("lm_haed.weight", "lr", 1e-4));
    assert!(e.contains("lm_head.weight"), "{e}");
    let e = err(Overrides::new().pattern("*.baias", "weight_decay", 0.0));
    assert!(e.contains("matches no parameter"), "{e}");
    let stranger = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let e = err(Overrides::new().var(&stranger, "lr", 1e-4));
    assert!(e.contains("a Var of shape [3]"), "{e}");
    let e = err(Overrides::new().pattern("*.bias", "wieght_decay", 0.0));
    assert!(
        e.contains("no field \"wieght_decay\"") && e.contains("weight_decay"),
        "{e}"
    );
    let e = err(Overrides::new().name("lm_head.weight", "beta1", 1.5));
    assert!(e.contains("lm_head.weight") && e.contains("beta1"), "{e}");
    let e = err(Overrides::new().name("lm_head.weight", "max_grad_norm", 1.0));
    assert!(e.contains("whole step"), "{e}");
}

#[test]
fn checkpoints_refuse_other_overrides() {
    let mut rng = rng("overrides_checkpoint");
    let vm = varmap(&mut rng);
    let dir = std::env::temp_dir().join(format!("candle-bnb-overrides-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("opt.safetensors");
    let overrides = Overrides::new().no_weight_decay_for_biases_and_norms();
    let saved =
        AdamW8bit::from_varmap_with_overrides(&vm, AdamW8bitConfig::default(), &overrides).unwrap();
    saved.save(&path).unwrap();
    let mut same =
        AdamW8bit::from_varmap_with_overrides(&vm, AdamW8bitConfig::default(), &overrides).unwrap();
    same.load(&path).unwrap();
    let mut other = AdamW8bit::from_varmap(&vm, AdamW8bitConfig::default()).unwrap();
    let e = other.load(&path).unwrap_err().to_string();
    assert!(
        e.contains("model.layers.0.attn.q_proj.bias") && e.contains("weight_decay=0"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The typed settings are the text ones under another spelling: the same resolved configs, and
/// the same refusals, naming the parameter.
#[test]
fn typed_overrides_resolve_as_the_text_ones() {
    let mut rng = rng("typed_overrides_resolve_as_the_text_ones");
    let vm = varmap(&mut rng);
    let w = var(&vm, "model.layers.0.attn.q_proj.weight");
    let typed = Overrides::new()
        .for_module("model.embed_tokens")
        .optim_bits(32)
        .for_name("model.layers.0.attn.q_proj.weight")
        .lr(3e-4)
        .for_var(&w)
        .percentile_clipping(95)
        .for_pattern("*.bias")
        .weight_decay(0.0)
        .for_pattern("*layers.1*")
        .block_size(64)
        .for_module("model")
        .min_8bit_size(100)
        .for_name("model.layers.0.attn.q_proj.bias")
        .field("beta2", 0.99);
    let text = Overrides::new()
        .module("model.embed_tokens", "optim_bits", 32)
        .name("model.layers.0.attn.q_proj.weight", "lr", 3e-4)
        .var(&w, "percentile_clipping", 95)
        .pattern("*.bias", "weight_decay", 0.0)
        .pattern("*layers.1*", "block_size", 64)
        .module("model", "min_8bit_size", 100)
        .name("model.layers.0.attn.q_proj.bias", "beta2", 0.99);
    assert_eq!(typed.len(), text.len());
    let base = AdamW8bitConfig {
        weight_decay: 0.05,
        ..Default::default()
    };
    let a = AdamW8bit::from_varmap_with_overrides(&vm, base.clone(), &typed).unwrap();
    let b = AdamW8bit::from_varmap_with_overrides(&vm, base.clone(), &text).unwrap();
    assert_eq!(a.param_configs(), b.param_configs());
    // Each typed setting took effect where it was aimed (and only there).
    let configs: Vec<_> = a.param_names().into_iter().zip(a.param_configs()).collect();
    for (name, c) in &configs {
        let q0 = *name == "model.layers.0.attn.q_proj.weight";
        assert_eq!(
            c.settings.optim_bits == Some(32),
            name.starts_with("model.embed_tokens"),
            "{name}"
        );
        assert_eq!(
            c.settings.block_size == 64,
            name.contains("layers.1"),
            "{name}"
        );
        assert_eq!(c.weight_decay == 0.0, name.ends_with(".bias"), "{name}");
        assert_eq!(c.beta2 == 0.99, name.ends_with(".bias"), "{name}");
        assert_eq!(c.lr == 3e-4, q0, "{name}");
        assert_eq!(c.settings.percentile_clipping == 95, q0, "{name}");
        assert_eq!(
            c.settings.min_8bit_size == 100,
            name.starts_with("model."),
            "{name}"
        );
    }
    // An invalid typed value is refused when the optimizer is built, naming the parameter.
    let bad = Overrides::new()
        .for_name("model.layers.0.attn.q_proj.weight")
        .optim_bits(16);
    let err = AdamW8bit::from_varmap_with_overrides(&vm, base, &bad)
        .err()
        .expect("optim_bits 16 must be refused")
        .to_string();
    assert!(
        err.contains("optim_bits") && err.contains("model.layers.0.attn.q_proj.weight"),
        "{err}"
    );
}
