//! `nn::StableEmbedding` and `nn::Embedding`: outputs against an f64 formula, initialisation,
//! the 32-bit state mark (and overrides winning over it), training, bad input.

use crate::common::{insert_var, randn, rng, seed_linear, temp_dir, uniform, TestRng};
use candle_bnb::optim::nn::{Embedding, StableEmbedding};
use candle_bnb::optim::{
    keep_32bit_state, keeps_32bit_state, AdamW8bit, AdamW8bitConfig, Overrides,
};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Linear, Optimizer, VarBuilder, VarMap};
use rand::Rng;

fn random_ids(rng: &mut TestRng, vocab: usize, shape: (usize, usize)) -> Tensor {
    let ids: Vec<u32> = (0..shape.0 * shape.1)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Tensor::from_vec(ids, shape, &Device::Cpu).unwrap()
}

fn set_random(vm: &mut VarMap, rng: &mut TestRng, name: &str, n: usize, offset: f32) {
    let values: Vec<f32> = randn(rng, n, 0.5).iter().map(|x| x + offset).collect();
    vm.set_one(name, Tensor::from_vec(values, n, &Device::Cpu).unwrap())
        .unwrap();
}

/// The Xavier-uniform bound of a `[vocab, dim]` table, as `nn::Embedding` computes it.
fn xavier_bound(vocab: usize, dim: usize) -> f64 {
    (6.0 / (vocab + dim) as f64).sqrt()
}

/// Bytes of AdamW's two 8-bit states for `n` elements with block size 256.
fn adamw_8bit_bytes(n: usize) -> usize {
    2 * (n + 4 * n.div_ceil(256))
}

#[test]
fn stable_embedding_equals_lookup_then_layer_norm_in_f64() {
    let mut rng = rng("stable_embedding_formula");
    let (vocab, dim) = (50 + rng.random_range(0..50), 16 + rng.random_range(0..48));
    let mut vm = VarMap::new();
    // A seeded table in place of the Xavier initialisation Candle would draw.
    let table = uniform(&mut rng, vocab * dim, xavier_bound(vocab, dim) as f32);
    insert_var(&vm, "emb.weight", table, (vocab, dim));
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let emb = StableEmbedding::new(vocab, dim, vb.pp("emb")).unwrap();
    // Random scale and shift so the affine part is checked too.
    set_random(&mut vm, &mut rng, "emb.norm.weight", dim, 1.0);
    set_random(&mut vm, &mut rng, "emb.norm.bias", dim, 0.0);
    let ids = random_ids(&mut rng, vocab, (3, 7));
    let out = emb.forward(&ids).unwrap();
    assert_eq!(out.dims(), &[3, 7, dim]);
    assert_eq!(out.dtype(), DType::F32);

    let w = emb.weight().to_vec2::<f32>().unwrap();
    let (g, b) = emb.norm();
    let (g, b) = (g.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    let got = out.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
    let mut worst = 0f64;
    for (row_out, &id) in got
        .iter()
        .zip(&ids.flatten_all().unwrap().to_vec1::<u32>().unwrap())
    {
        let row: Vec<f64> = w[id as usize].iter().map(|&x| x as f64).collect();
        let mean = row.iter().sum::<f64>() / dim as f64;
        let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / dim as f64;
        for j in 0..dim {
            let want = (row[j] - mean) / (var + 1e-5).sqrt() * g[j] as f64 + b[j] as f64;
            let diff = (row_out[j] as f64 - want).abs();
            worst = worst.max(diff);
            // The f32 layer norm of at most 100 values, outputs below ~4: a few f32 ulps of
            // them, ~1e-6 (over 2000 seeds the largest difference was 1.06e-6).
            assert!(diff <= 1e-5, "id {id} col {j}: {} vs {want}", row_out[j]);
        }
    }
    eprintln!("dim {dim}: max |f32 - f64| {worst:.3e}");
}

#[test]
fn half_precision_weights_normalise_in_f32_and_return_their_dtype() {
    let mut rng = rng("stable_embedding_bf16");
    let (vocab, dim) = (40, 24);
    for dtype in [DType::BF16, DType::F16] {
        let mut vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        let emb = StableEmbedding::new(vocab, dim, vb).unwrap();
        // Seeded weights in place of the ones Candle drew.
        let table = uniform(&mut rng, vocab * dim, xavier_bound(vocab, dim) as f32);
        let table = Tensor::from_vec(table, (vocab, dim), &Device::Cpu).unwrap();
        vm.set_one("weight", table.to_dtype(dtype).unwrap())
            .unwrap();
        let ids = random_ids(&mut rng, vocab, (2, 5));
        let out = emb.forward(&ids).unwrap();
        assert_eq!(out.dtype(), dtype);
        // The same weights upcast to f32 give the f32 result, rounded once to `dtype`.
        let vm32 = VarMap::new();
        let vb32 = VarBuilder::from_varmap(&vm32, DType::F32, &Device::Cpu);
        let emb32 = StableEmbedding::new(vocab, dim, vb32).unwrap();
        let mut vm32 = vm32;
        vm32.set_one("weight", emb.weight().to_dtype(DType::F32).unwrap())
            .unwrap();
        let want = emb32.forward(&ids).unwrap().to_dtype(dtype).unwrap();
        let (a, b) = (
            out.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
            want.to_dtype(DType::F32).unwrap().flatten_all().unwrap(),
        );
        assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    }
}

#[test]
fn weights_are_xavier_uniform_and_plain_embedding_is_a_lookup() {
    let mut rng = rng("embedding_init");
    let (vocab, dim) = (1000, 200);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let emb = Embedding::new(vocab, dim, vb.pp("tok")).unwrap();
    // The weights are the library's own draw from Candle's generator, which cannot be seeded:
    // both checks below hold for every draw.
    let w: Vec<f32> = emb.weight().flatten_all().unwrap().to_vec1().unwrap();
    let bound = xavier_bound(vocab, dim);
    // Candle draws f32 weights from rand's `Uniform::new(-bound as f32, bound as f32)`, whose
    // samples `u * scale + lo` (u in [0, 1)) lie in [lo, hi]: rand shrinks `scale` until the
    // largest one rounds to at most `hi`, and rounding is monotone. Rounding to f32 is symmetric,
    // so every |w| <= bound as f32 exactly. The f64 bound is no bound: `bound as f32` may lie up
    // to half an ulp above it, and a draw can land there.
    let bound32 = bound as f32;
    assert!(((bound32 as f64) - bound).abs() <= bound * f32::EPSILON as f64 / 2.0);
    if let Some(x) = w.iter().find(|x| x.abs() > bound32) {
        panic!("weight {x:e} outside ±{bound32:e}");
    }
    // Uniform(-a, a) has variance a²/3. Each x²/a² lies in [0, 1] with mean 1/3 and variance
    // 1/5 - 1/9 = 4/45, so the ratio below, a mean of 200k of them times 3, has sd
    // 3 * sqrt(4/45 / 200_000) = 2.0e-3: the 2 % bound is 10 sd, and Bernstein's inequality puts
    // the chance of crossing it below 1e-21. (a is bound32, not bound, to within 6e-8 relative.)
    let var = w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64;
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.02,
        "variance {var}"
    );

    let ids = random_ids(&mut rng, vocab, (4, 9));
    let out = emb.forward(&ids).unwrap();
    let want = candle_nn::Embedding::new(emb.weight().clone(), dim)
        .forward(&ids)
        .unwrap();
    assert_eq!(out.dims(), &[4, 9, dim]);
    assert_eq!(
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        vm.data().lock().unwrap().keys().collect::<Vec<_>>(),
        ["tok.weight"]
    );
}

/// An embedding (256 × 32 = 8192 ≥ min_8bit_size), a 32 → 256 head, and the head's bias, with
/// their usual initialisations drawn from `rng`.
fn model(vm: &VarMap, stable: bool, rng: &mut TestRng) -> (Box<dyn Module>, Linear) {
    let table = uniform(rng, 256 * 32, xavier_bound(256, 32) as f32);
    insert_var(vm, "emb.weight", table, (256, 32));
    seed_linear(vm, rng, "head", 32, 256);
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let emb: Box<dyn Module> = if stable {
        Box::new(StableEmbedding::new(256, 32, vb.pp("emb")).unwrap())
    } else {
        Box::new(Embedding::new(256, 32, vb.pp("emb")).unwrap())
    };
    (emb, candle_nn::linear(32, 256, vb.pp("head")).unwrap())
}

#[test]
fn embedding_weights_keep_32bit_state_unless_overridden() {
    let mut rng = rng("embedding_32bit_state");
    for stable in [true, false] {
        let vm = VarMap::new();
        let _model = model(&vm, stable, &mut rng);
        let weight = vm.data().lock().unwrap()["emb.weight"].clone();
        assert!(keeps_32bit_state(&weight));
        let opt = AdamW8bit::from_varmap(&vm, AdamW8bitConfig::default()).unwrap();
        let bits: Vec<(&str, Option<u32>)> = opt
            .param_names()
            .into_iter()
            .zip(opt.param_configs())
            .map(|(n, c)| (n, c.settings.optim_bits))
            .collect();
        let norms = if stable { 8 * 2 * 32 } else { 0 };
        // 32-bit embedding (8 B/param), 8-bit head weight, small bias (and norm) 32-bit.
        let want = 8 * 8192 + adamw_8bit_bytes(8192) + 8 * 256 + norms;
        assert_eq!(opt.state_bytes(), want, "stable {stable}: {bits:?}");

        // Any override wins over the mark, and the plain constructor sees the mark too.
        let overrides = Overrides::new().pattern("emb.*", "optim_bits", 8);
        let opt =
            AdamW8bit::from_varmap_with_overrides(&vm, AdamW8bitConfig::default(), &overrides)
                .unwrap();
        let want_8bit = 2 * adamw_8bit_bytes(8192) + 8 * 256 + norms;
        assert_eq!(opt.state_bytes(), want_8bit, "stable {stable}");
        let opt = <AdamW8bit as candle_nn::Optimizer>::new(
            vec![weight.clone()],
            AdamW8bitConfig::default(),
        )
        .unwrap();
        assert_eq!(opt.state_bytes(), 8 * 8192);
    }
    // A candle-nn embedding is not marked: the same model keeps 8-bit state for it. (Candle
    // draws its values; only the layout is checked.)
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    candle_nn::embedding(256, 32, vb.pp("emb")).unwrap();
    let opt = AdamW8bit::from_varmap(&vm, AdamW8bitConfig::default()).unwrap();
    assert_eq!(opt.state_bytes(), adamw_8bit_bytes(8192));
    // Any Var can be marked by hand.
    let v = Var::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(!keeps_32bit_state(&v));
    keep_32bit_state(&v);
    let opt = AdamW8bit::new_named(vec![("v".into(), v)], AdamW8bitConfig::default()).unwrap();
    assert_eq!(opt.state_bytes(), 8 * 4096);
}

#[test]
fn a_model_with_stable_embedding_trains() {
    let mut rng = rng("stable_embedding_trains");
    let vm = VarMap::new();
    let (emb, head) = model(&vm, true, &mut rng);
    let mut opt = AdamW8bit::from_varmap(
        &vm,
        AdamW8bitConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    // Learn the next token of t -> (7t + 3) mod 256.
    let loss_at = |ids: &Tensor| {
        let targets = ((ids.to_dtype(DType::F32).unwrap() * 7.0).unwrap() + 3.0)
            .unwrap()
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
            .into_iter()
            .map(|t| t % 256)
            .collect::<Vec<_>>();
        let targets = Tensor::new(targets, &Device::Cpu).unwrap();
        let logits = head.forward(&emb.forward(ids).unwrap()).unwrap();
        candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
    };
    let all = Tensor::arange(0u32, 256, &Device::Cpu).unwrap();
    let first = loss_at(&all).to_scalar::<f32>().unwrap();
    for _ in 0..150 {
        let ids = random_ids(&mut rng, 256, (1, 64)).flatten_all().unwrap();
        opt.backward_step(&loss_at(&ids)).unwrap();
    }
    let last = loss_at(&all).to_scalar::<f32>().unwrap();
    eprintln!("loss {first} -> {last} ({:.2e} of the first)", last / first);
    // Over 1000 seeds the loss fell to about 1e-3 of its first value (never above 1.5e-3): the
    // 0.5 bound is hundreds of times that.
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn bad_input_is_an_error_naming_the_value() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let err = StableEmbedding::new(0, 8, vb.pp("a"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_embeddings 0"), "{err}");
    let err = Embedding::new(8, 0, vb.pp("b")).unwrap_err().to_string();
    assert!(err.contains("embedding_dim 0"), "{err}");
    assert!(vm.all_vars().is_empty(), "nothing created on error");

    let emb = StableEmbedding::new(10, 4, vb.pp("c")).unwrap();
    let float_ids = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let err = emb.forward(&float_ids).unwrap_err().to_string();
    assert!(err.contains("F32"), "{err}");
    let out_of_range = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
    let err = emb.forward(&out_of_range).unwrap_err().to_string();
    assert!(err.contains("10"), "{err}");
    // A stored weight of another shape is refused.
    let err = Embedding::new(11, 4, vb.pp("c")).unwrap_err().to_string();
    assert!(err.contains("shape mismatch"), "{err}");
}

#[test]
fn checkpoints_carry_the_mark() {
    let mut rng = rng("embedding_checkpoint");
    let dir = temp_dir("embedding-checkpoint");
    let path = dir.join("opt.safetensors");
    let vm = VarMap::new();
    let (emb, head) = model(&vm, true, &mut rng);
    let mut opt = AdamW8bit::from_varmap(&vm, AdamW8bitConfig::default()).unwrap();
    let ids = random_ids(&mut rng, 256, (1, 32)).flatten_all().unwrap();
    let loss = head
        .forward(&emb.forward(&ids).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all();
    opt.backward_step(&loss.unwrap()).unwrap();
    opt.save(&path).unwrap();

    // The same model rebuilt (new variables, marked again) loads the checkpoint.
    let vm2 = VarMap::new();
    let _model = model(&vm2, true, &mut rng);
    let mut opt2 = AdamW8bit::from_varmap(&vm2, AdamW8bitConfig::default()).unwrap();
    opt2.load(&path).unwrap();
    assert_eq!(opt2.state_bytes(), opt.state_bytes());
    assert_eq!(opt2.step_count(), 1);

    // Without the mark the embedding's state layout differs: refused, naming the parameter.
    // (Candle draws these values; the load is refused before any is read.)
    let vm3 = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm3, DType::F32, &Device::Cpu);
    candle_nn::embedding(256, 32, vb.pp("emb")).unwrap();
    candle_nn::linear(32, 256, vb.pp("head")).unwrap();
    vb.pp("emb.norm").get(32, "weight").unwrap();
    vb.pp("emb.norm").get(32, "bias").unwrap();
    let mut opt3 = AdamW8bit::from_varmap(&vm3, AdamW8bitConfig::default()).unwrap();
    let err = opt3.load(&path).unwrap_err().to_string();
    assert!(err.contains("emb.weight"), "{err}");
    assert_eq!(opt3.step_count(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}
