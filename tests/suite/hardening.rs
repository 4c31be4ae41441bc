//! Promises the README makes about bad input, each attacked through the public API: a step
//! updates every parameter or none (item 2), a checkpoint load restores exactly what was saved
//! or refuses (item 3), settings that cannot be right are refused (item 4), and embedding ids
//! are checked (item 5). Test names carry the item of the hardening issue they cover.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_bnb::kernels::{dequantize_blockwise_into, quantize_blockwise, QuantMap};
use candle_bnb::optim::nn::{Embedding, StableEmbedding};
use candle_bnb::optim::{
    AdEMAMix, AdEMAMixConfig, Adagrad, AdagradConfig, Adam, Adam8bit, Adam8bitConfig, AdamConfig,
    AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig, LAMB8bit, LAMB8bitConfig, LAMBConfig, Lion,
    LionConfig, Overrides, RMSprop8bit, RMSprop8bitConfig, RMSpropConfig, SGD8bit, SGD8bitConfig,
    Settings, LAMB,
};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::Rng;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::common::{assert_load_refused, optimizer_snapshot as snapshot, randn, rng, TestRng};

fn var(rng: &mut TestRng, shape: &[usize]) -> Var {
    let n = shape.iter().product();
    Var::from_tensor(&Tensor::from_vec(randn(rng, n, 1.0), shape, &Device::Cpu).unwrap()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// A `GradStore` with no gradient (`GradStore::new` is private to Candle).
fn empty_grads() -> GradStore {
    let v = Var::zeros((), DType::F32, &Device::Cpu).unwrap();
    let mut store = v.as_tensor().backward().unwrap();
    store.remove(v.as_tensor());
    store
}

/// A gradient for every var: fresh N(0, 1) values of its shape and dtype.
fn grads(rng: &mut TestRng, vars: &[(String, Var)]) -> GradStore {
    let mut store = empty_grads();
    for (_, v) in vars {
        let g = Tensor::from_vec(randn(rng, v.elem_count(), 1.0), v.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        store.insert(v.as_tensor(), g);
    }
    store
}

/// A fresh empty folder under the system temp dir (unique per process and call, nothing drawn).
fn temp_dir(test: &str) -> PathBuf {
    crate::common::temp_dir(&format!("hardening-{test}"))
}

// ---------------------------------------------------------------------------------------------
// Item 2: a step updates everything or changes nothing.

/// Parameters with a zero-sized dimension (a rank-0 LoRA B `(out, 0)`, `[3, 0]`, `[0]`) next to
/// ordinary ones: the step updates the ordinary ones exactly as without the empty ones, and
/// leaves the empty ones alone, for 8-bit, 32-bit, layer-wise and f16 state.
#[test]
fn item2_zero_element_params_are_a_no_op_in_every_step() {
    let mut rng = rng("item2_zero_element_params");
    macro_rules! check {
        ($ty:ty, $config:expr, $dtype:expr) => {{
            let dtype: DType = $dtype;
            let full = var(&mut rng, &[40, 130]);
            let full = Var::from_tensor(&full.to_dtype(dtype).unwrap()).unwrap();
            let small = Var::from_tensor(&var(&mut rng, &[33]).to_dtype(dtype).unwrap()).unwrap();
            let empties: Vec<Var> = [&[64usize, 0][..], &[3, 0], &[0], &[0, 5, 2]]
                .iter()
                .map(|s| Var::zeros(*s, dtype, &Device::Cpu).unwrap())
                .collect();
            let with_empty: Vec<(String, Var)> = vec![
                ("a".into(), full.clone()),
                ("b".into(), empties[0].clone()),
                ("c".into(), empties[1].clone()),
                ("d".into(), small.clone()),
                ("e".into(), empties[2].clone()),
                ("f".into(), empties[3].clone()),
            ];
            let copies: Vec<(String, Var)> = [("a", &full), ("d", &small)]
                .iter()
                .map(|(n, v)| (n.to_string(), Var::from_tensor(&v.copy().unwrap()).unwrap()))
                .collect();
            let mut opt = <$ty>::new_named(with_empty.clone(), $config).unwrap();
            let mut reference = <$ty>::new_named(copies.clone(), $config).unwrap();
            for _ in 0..3 {
                let g = grads(&mut rng, &with_empty);
                let mut g_ref = empty_grads();
                for ((_, v), (_, c)) in [&with_empty[0], &with_empty[3]].iter().zip(&copies) {
                    g_ref.insert(c.as_tensor(), g.get(v.as_tensor()).unwrap().copy().unwrap());
                }
                opt.step(&g).unwrap();
                reference.step(&g_ref).unwrap();
            }
            assert_eq!(opt.step_count(), 3, "{}", stringify!($ty));
            for ((_, v), (_, c)) in [&with_empty[0], &with_empty[3]].iter().zip(&copies) {
                let (a, b) = (
                    v.to_dtype(DType::F32).unwrap(),
                    c.to_dtype(DType::F32).unwrap(),
                );
                assert_eq!(flat(&a), flat(&b), "{}", stringify!($ty));
            }
            for e in &empties {
                assert_eq!(e.elem_count(), 0);
            }
            // Their checkpoint round-trips.
            let dir = temp_dir("item2");
            let path = dir.join("opt.safetensors");
            opt.save(&path).unwrap();
            let mut loaded = <$ty>::new_named(with_empty, $config).unwrap();
            loaded.load(&path).unwrap();
            assert_eq!(loaded.step_count(), 3);
            std::fs::remove_dir_all(&dir).unwrap();
        }};
    }
    let small_blocks = AdamW8bitConfig {
        settings: Settings {
            min_8bit_size: 64,
            block_size: 64,
            ..Default::default()
        },
        ..Default::default()
    };
    check!(AdamW8bit, small_blocks.clone(), DType::F32);
    check!(AdamW8bit, small_blocks.clone(), DType::BF16);
    check!(AdamW, AdamWConfig::default(), DType::F16);
    check!(LAMB8bit, LAMB8bitConfig::default(), DType::F32);
    check!(SGD8bit, SGD8bitConfig::default(), DType::F32);
    check!(Lion, LionConfig::default(), DType::F32);
}

/// A gradient that is (a view of) its own parameter's storage steps exactly as a copy of it
/// does; nothing fails half-way.
#[test]
fn item2_a_gradient_aliasing_its_parameter_steps_like_a_copy() {
    let mut rng = rng("item2_aliasing_gradient");
    let p = var(&mut rng, &[70, 90]);
    let other = var(&mut rng, &[300]);
    let (p_ref, other_ref) = (
        Var::from_tensor(&p.copy().unwrap()).unwrap(),
        Var::from_tensor(&other.copy().unwrap()).unwrap(),
    );
    let config = AdamW8bitConfig {
        settings: Settings {
            min_8bit_size: 64,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = AdamW8bit::new(vec![other.clone(), p.clone()], config.clone()).unwrap();
    let mut reference =
        AdamW8bit::new(vec![other_ref.clone(), p_ref.clone()], config.clone()).unwrap();
    for _ in 0..3 {
        let g_other = Tensor::from_vec(randn(&mut rng, 300, 1.0), 300, &Device::Cpu).unwrap();
        let mut g = empty_grads();
        g.insert(other.as_tensor(), g_other.clone());
        // The gradient is the parameter itself (a loss of |p|² / 2), and a reshaped view of it.
        g.insert(
            p.as_tensor(),
            p.as_tensor()
                .reshape(6300)
                .unwrap()
                .reshape((70, 90))
                .unwrap(),
        );
        let mut g_ref = empty_grads();
        g_ref.insert(other_ref.as_tensor(), g_other);
        g_ref.insert(p_ref.as_tensor(), p_ref.as_tensor().copy().unwrap());
        opt.step(&g).unwrap();
        reference.step(&g_ref).unwrap();
    }
    assert_eq!(opt.step_count(), 3);
    assert_eq!(flat(p.as_tensor()), flat(p_ref.as_tensor()));
    assert_eq!(flat(other.as_tensor()), flat(other_ref.as_tensor()));
}

/// `dequantize_into` an empty output of any shape is a no-op, not an error.
#[test]
fn item2_dequantize_into_an_empty_output_is_a_no_op() {
    for shape in [&[5usize, 0][..], &[0, 3], &[0], &[2, 0, 7]] {
        let x = Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let q = quantize_blockwise(&x, &QuantMap::dynamic_signed(), 64).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let out = Tensor::zeros(shape, dtype, &Device::Cpu).unwrap();
            q.dequantize_into(&out).unwrap();
            dequantize_blockwise_into(&q.codes, &q.absmax, &QuantMap::dynamic_signed(), 64, &out)
                .unwrap();
            assert_eq!(out.dims(), shape);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Item 3: a checkpoint load restores exactly what was saved or refuses.

/// A small optimizer with 8-bit state (two blocks, the last one partial), 32-bit state, an
/// empty parameter and a percentile-clipping history, after a few steps.
fn small_trained(rng: &mut TestRng) -> (Vec<(String, Var)>, AdamW8bit) {
    let vars: Vec<(String, Var)> = vec![
        ("w".into(), var(rng, &[10, 9])),
        ("b".into(), var(rng, &[7])),
        (
            "e".into(),
            Var::zeros((3, 0), DType::F32, &Device::Cpu).unwrap(),
        ),
    ];
    let config = AdamW8bitConfig {
        settings: Settings {
            min_8bit_size: 64,
            block_size: 64,
            percentile_clipping: 90,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = AdamW8bit::new_named(vars.clone(), config).unwrap();
    for _ in 0..3 {
        opt.step(&grads(rng, &vars)).unwrap();
    }
    (vars, opt)
}

/// Every byte of a small checkpoint, header and data, flipped three ways: the load is an error
/// (the optimizer unchanged) or restores exactly the saved state (a byte no checksum covers,
/// such as the header's padding) — never a different state, never a panic.
#[test]
fn item3a_every_flipped_byte_is_refused_or_harmless() {
    let mut rng = rng("item3a_flipped_bytes");
    let dir = temp_dir("item3a");
    let (vars, saved) = small_trained(&mut rng);
    let path = dir.join("opt.safetensors");
    saved.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let expected = snapshot(&saved);

    let mut target = AdamW8bit::new_named(vars.clone(), saved.config().clone()).unwrap();
    target.step(&grads(&mut rng, &vars)).unwrap();
    let mut before = snapshot(&target);
    assert_ne!(before, expected);
    let flipped = dir.join("flipped.safetensors");
    std::fs::write(&flipped, &bytes).unwrap();
    // One byte is rewritten in place each time: truncating and rewriting the whole file makes
    // some file systems flush it on close, which costs more than the load.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&flipped)
        .unwrap();
    let mut put = |at: usize, byte: u8| {
        use std::io::{Seek, SeekFrom, Write};
        file.seek(SeekFrom::Start(at as u64)).unwrap();
        file.write_all(&[byte]).unwrap();
    };
    let (mut refused, mut harmless) = (0, 0);
    for (at, &original) in bytes.iter().enumerate() {
        let random: u8 = rng.random_range(1..=255);
        for mask in [0x01u8, 0x80, random] {
            put(at, original ^ mask);
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let outcome = target.load(&flipped);
                (outcome.map_err(|e| e.to_string()), snapshot(&target))
            }));
            let Ok((outcome, after)) = result else {
                panic!("byte {at} ^ {mask:#04x}: load panicked")
            };
            match outcome {
                Err(e) => {
                    assert!(e.contains("flipped.safetensors"), "byte {at}: {e}");
                    assert_eq!(
                        after, before,
                        "byte {at} ^ {mask:#04x}: changed on error: {e}"
                    );
                    refused += 1;
                }
                Ok(()) => {
                    assert_eq!(
                        after, expected,
                        "byte {at} ^ {mask:#04x}: a different state"
                    );
                    harmless += 1;
                    // A fresh target, so that the next corruption is seen to change nothing.
                    target = AdamW8bit::new_named(vars.clone(), saved.config().clone()).unwrap();
                    target.step(&grads(&mut rng, &vars)).unwrap();
                    before = snapshot(&target);
                    assert_ne!(before, expected);
                }
            }
        }
        put(at, original);
    }
    eprintln!(
        "{} bytes: {refused} corruptions refused, {harmless} harmless",
        bytes.len()
    );
    // Only the header's padding and JSON whitespace can be harmless: nearly every flip is caught.
    assert!(
        refused > 9 * harmless,
        "{refused} refused, {harmless} harmless"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A change to a checkpoint's metadata and tensors (see [`rewrite`]).
type Edit = dyn Fn(&mut HashMap<String, String>, &mut HashMap<String, Raw>);

/// One tensor of a checkpoint, owned.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Writes the checkpoint at `from` to `to` with `edit` applied to its metadata and tensors and
/// every checksum recomputed as `candle_bnb::optim::checkpoint` documents them: what a writer
/// that knows the format (and means harm, or has a bug) could produce.
fn rewrite(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut HashMap<String, String>, &mut HashMap<String, Raw>),
) {
    let bytes = std::fs::read(from).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    let mut tensors: HashMap<String, Raw> = file
        .tensors()
        .into_iter()
        .map(|(name, t): (String, TensorView<'_>)| {
            let raw = Raw {
                dtype: t.dtype(),
                shape: t.shape().to_vec(),
                data: t.data().to_vec(),
            };
            (name, raw)
        })
        .collect();
    edit(&mut meta, &mut tensors);
    meta.retain(|k, _| !k.starts_with("checksum."));
    for (name, t) in &tensors {
        meta.insert(format!("checksum.{name}"), xxh3_hex(&t.data));
    }
    let mut text = Vec::new();
    let mut entries: Vec<_> = meta.iter().collect();
    entries.sort();
    for (k, v) in entries {
        text.extend_from_slice(k.as_bytes());
        text.push(0);
        text.extend_from_slice(v.as_bytes());
        text.push(0);
    }
    text.push(0);
    let mut table: Vec<_> = tensors.iter().collect();
    table.sort_by(|a, b| a.0.cmp(b.0));
    for (name, t) in table {
        text.extend_from_slice(name.as_bytes());
        text.push(0);
        text.extend_from_slice(format!("{:?}{:?}", t.dtype, t.shape).as_bytes());
        text.push(0);
    }
    meta.insert("checksum.metadata".into(), xxh3_hex(&text));
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.clone(), v)), Some(meta), to)
        .unwrap();
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Each poisoned checkpoint (every checksum recomputed, so only the value checks can catch it)
/// is refused with a message naming what is wrong, and the optimizer is unchanged.
#[test]
fn item3_poisoned_checkpoints_are_refused_naming_what_is_wrong() {
    let mut rng = rng("item3_poisoned_checkpoints");
    let dir = temp_dir("item3");
    let (vars, saved) = small_trained(&mut rng);
    let path = dir.join("opt.safetensors");
    saved.save(&path).unwrap();
    let mut target = AdamW8bit::new_named(vars.clone(), saved.config().clone()).unwrap();
    target.step(&grads(&mut rng, &vars)).unwrap();
    let before = snapshot(&target);
    // Parameter 0 ("w", 90 elements) has 8-bit state, parameter 1 ("b", 7) 32-bit state.
    let mut expect = |name: &str, needle: &str, edit: &Edit| {
        let p = dir.join(name);
        rewrite(&path, &p, edit);
        assert_load_refused(&mut target, &p, needle, &before);
    };
    let set_f32 = |k: usize, j: usize, v: f32| {
        move |_: &mut HashMap<String, String>, t: &mut HashMap<String, Raw>| {
            let raw = t.get_mut(&format!("param.1.state{k}")).unwrap();
            raw.data[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
        }
    };
    // (b) 32-bit state values.
    expect(
        "nan_m.safetensors",
        "param.1.state0[3] is NaN",
        &set_f32(0, 3, f32::NAN),
    );
    expect(
        "inf_m.safetensors",
        "param.1.state0[0] is inf",
        &set_f32(0, 0, f32::INFINITY),
    );
    expect(
        "negative_v.safetensors",
        "param.1.state1[6] is -0.5",
        &set_f32(1, 6, -0.5),
    );
    // (c) the signed map where the unsigned second moment's map belongs.
    expect("map.safetensors", "param.0.state1.map", &|_, t| {
        t.get_mut("param.0.state1.map").unwrap().data =
            f32_bytes(QuantMap::dynamic_signed().values());
    });
    // (d) a config field missing.
    expect(
        "config.safetensors",
        "config field \"lr\" is missing",
        &|m, _| {
            m.remove("config.lr");
        },
    );
    // (f) step counts that cannot be.
    expect("steps.safetensors", "beyond any plausible", &|m, _| {
        m.insert("steps".into(), u64::MAX.to_string());
    });
    expect(
        "param_steps.safetensors",
        "more than the optimizer's",
        &|m, _| {
            m.insert("param.0.steps".into(), "4".into());
        },
    );
    // A tensor no parameter owns.
    expect("extra.safetensors", "belongs to no parameter", &|_, t| {
        let raw = Raw {
            dtype: Dtype::F32,
            shape: vec![1],
            data: f32_bytes(&[1.0]),
        };
        t.insert("param.7.state0".into(), raw);
    });
    // The same rewrite without an edit loads: the refusals above come from the edits.
    let p = dir.join("unchanged.safetensors");
    rewrite(&path, &p, |_, _| {});
    target.load(&p).unwrap();
    assert_eq!(snapshot(&target), snapshot(&saved));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// (a) A flipped byte in the data of a tensor is an error naming that tensor; a flipped byte in
/// a metadata value is an error about the metadata.
#[test]
fn item3a_corrupted_data_is_refused_naming_the_tensor() {
    let mut rng = rng("item3a_corrupted_data");
    let dir = temp_dir("item3a_data");
    let (vars, saved) = small_trained(&mut rng);
    let path = dir.join("opt.safetensors");
    saved.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (header_len, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let mut target = AdamW8bit::new_named(vars, saved.config().clone()).unwrap();
    for name in [
        "param.0.state0.codes",
        "param.0.state1.absmax",
        "param.1.state1",
    ] {
        let (start, end) = header.info(name).unwrap().data_offsets;
        let at = 8 + header_len + rng.random_range(start..end);
        let mut corrupt = bytes.clone();
        corrupt[at] ^= 0x10;
        let p = dir.join("corrupt.safetensors");
        std::fs::write(&p, &corrupt).unwrap();
        let err = target.load(&p).unwrap_err().to_string();
        assert!(
            err.contains(&format!("tensor {name:?} is corrupted")),
            "{name}: {err}"
        );
    }
    let text = String::from_utf8_lossy(&bytes[8..8 + header_len]).to_string();
    let at = 8 + text.find("\"param.1.steps\":\"").unwrap() + "\"param.1.steps\":\"".len();
    let mut corrupt = bytes.clone();
    corrupt[at] = if corrupt[at] == b'1' { b'2' } else { b'1' };
    let p = dir.join("corrupt.safetensors");
    std::fs::write(&p, &corrupt).unwrap();
    let err = target.load(&p).unwrap_err().to_string();
    assert!(err.contains("metadata is corrupted"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// (e) Parameter names are values, never keys: names that look like config entries, metadata
/// keys or tensor keys save and load.
#[test]
fn item3e_any_parameter_name_round_trips() {
    let mut rng = rng("item3e_parameter_names");
    let dir = temp_dir("item3e");
    let names = [
        "config",
        "config.lr",
        "format",
        "param.0.name",
        "checksum.metadata",
        "w.state0",
    ];
    let vars: Vec<(String, Var)> = names
        .iter()
        .map(|n| (n.to_string(), var(&mut rng, &[80])))
        .collect();
    let config = AdamW8bitConfig {
        settings: Settings {
            min_8bit_size: 64,
            block_size: 64,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = AdamW8bit::new_named(vars.clone(), config.clone()).unwrap();
    for _ in 0..2 {
        opt.step(&grads(&mut rng, &vars)).unwrap();
    }
    let path = dir.join("opt.safetensors");
    opt.save(&path).unwrap();
    let mut loaded = AdamW8bit::new_named(vars, config).unwrap();
    loaded.load(&path).unwrap();
    assert_eq!(snapshot(&loaded), snapshot(&opt));
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Item 4: settings that cannot be right.

/// An invalid base learning rate is refused even when nothing would use it: with no parameters,
/// and when every parameter overrides `lr`. `set_learning_rate` leaves the optimizer as it was
/// (the trait returns nothing), `try_set_learning_rate` says why, and a checkpoint saved
/// afterwards still loads.
#[test]
fn item4_invalid_learning_rates_are_refused_everywhere() {
    let mut rng = rng("item4_learning_rate");
    let dir = temp_dir("item4");
    let w = var(&mut rng, &[100]);
    let every_lr = Overrides::new().pattern("*", "lr", 0.01);
    let mut empty = AdamW8bit::new_named(Vec::new(), AdamW8bitConfig::default()).unwrap();
    let mut overridden = AdamW8bit::new_with_overrides(
        vec![("w".into(), w.clone())],
        AdamW8bitConfig::default(),
        &every_lr,
    )
    .unwrap();
    for bad in [f64::NAN, f64::INFINITY, -1e-3] {
        for opt in [&mut empty, &mut overridden] {
            opt.set_learning_rate(bad);
            assert_eq!(opt.learning_rate(), 1e-3, "{bad}");
            let err = opt.try_set_learning_rate(bad).unwrap_err().to_string();
            assert!(
                err.contains("lr") && err.contains(&bad.to_string()),
                "{err}"
            );
            assert_eq!(opt.learning_rate(), 1e-3);
        }
    }
    overridden.try_set_learning_rate(2e-3).unwrap();
    assert_eq!(overridden.param_configs()[0].lr, 0.02);
    let path = dir.join("opt.safetensors");
    overridden.save(&path).unwrap();
    let mut loaded =
        AdamW8bit::new_with_overrides(vec![("w".into(), w)], AdamW8bitConfig::default(), &every_lr)
            .unwrap();
    loaded.load(&path).unwrap();
    assert_eq!(loaded.learning_rate(), 2e-3);
    empty.save(&path).unwrap();
    AdamW8bit::new_named(Vec::new(), AdamW8bitConfig::default())
        .unwrap()
        .load(&path)
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// One `Var` under two names would be stepped twice with two states: refused, naming both.
#[test]
fn item4_one_var_under_two_names_is_refused() {
    let mut rng = rng("item4_var_twice");
    let w = var(&mut rng, &[10]);
    let b = var(&mut rng, &[3]);
    let err = AdamW8bit::new_named(
        vec![
            ("w".into(), w.clone()),
            ("b".into(), b),
            ("w_again".into(), w.clone()),
        ],
        AdamW8bitConfig::default(),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(
        err.contains("\"w\"") && err.contains("\"w_again\""),
        "{err}"
    );
    let err = Lion::new(vec![w.clone(), w], LionConfig::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("\"0\"") && err.contains("\"1\""), "{err}");
}

/// F64 and F8 parameters are refused when the optimizer is built (every step would fail),
/// naming the parameter and dtype; integer vars are ignored, as in candle-nn.
#[test]
fn item4_unsupported_float_dtypes_are_refused_at_construction() {
    let mut rng = rng("item4_dtypes");
    for dtype in [DType::F64, DType::F8E4M3] {
        let w = var(&mut rng, &[10]);
        let odd = Var::from_tensor(&var(&mut rng, &[4]).to_dtype(dtype).unwrap()).unwrap();
        let err = AdamW8bit::new_named(
            vec![("w".into(), w), ("odd".into(), odd)],
            AdamW8bitConfig::default(),
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(
            err.contains("\"odd\"") && err.contains(&format!("{dtype:?}")),
            "{err}"
        );
    }
    let ids = Var::from_tensor(&Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap()).unwrap();
    let opt = AdamW8bit::new_named(vec![("ids".into(), ids)], AdamW8bitConfig::default()).unwrap();
    assert!(opt.param_names().is_empty());
}

/// `eps <= 0` is refused by every optimizer whose update divides by `sqrt(v) + eps`: with 0, a
/// zero gradient gives 0 / 0.
#[test]
fn item4_non_positive_eps_is_refused() {
    let w = || Var::zeros(100, DType::F32, &Device::Cpu).unwrap();
    macro_rules! refused {
        ($ty:ty, $config:ty) => {
            for eps in [0.0, -1e-8, f64::NAN] {
                let mut config = <$config>::default();
                config.eps = eps;
                let err = <$ty>::new(vec![w()], config)
                    .err()
                    .unwrap_or_else(|| panic!("{} accepted eps {eps}", stringify!($ty)))
                    .to_string();
                assert!(
                    err.contains("eps") && err.contains(&eps.to_string()),
                    "{err}"
                );
            }
        };
    }
    refused!(Adam, AdamConfig);
    refused!(Adam8bit, Adam8bitConfig);
    refused!(AdamW, AdamWConfig);
    refused!(AdamW8bit, AdamW8bitConfig);
    refused!(RMSprop8bit, RMSprop8bitConfig);
    refused!(candle_bnb::optim::RMSprop, RMSpropConfig);
    refused!(Adagrad, AdagradConfig);
    refused!(AdEMAMix, AdEMAMixConfig);
    refused!(LAMB, LAMBConfig);
    refused!(LAMB8bit, LAMB8bitConfig);
    // A positive eps keeps a zero gradient's update finite.
    let p = w();
    let mut opt = Adam8bit::new(vec![p.clone()], Adam8bitConfig::default()).unwrap();
    let mut g = empty_grads();
    g.insert(
        p.as_tensor(),
        Tensor::zeros(100, DType::F32, &Device::Cpu).unwrap(),
    );
    opt.step(&g).unwrap();
    assert!(flat(p.as_tensor()).iter().all(|v| *v == 0.0));
}

// ---------------------------------------------------------------------------------------------
// Item 5: embedding ids.

/// u8 id 255 on a table of 256 rows or more is row 255 (Candle's lookup reads the id type's
/// largest value as padding), and ids out of range, `u32::MAX` and `i64::MAX` included, are
/// errors naming the id, for both embedding layers.
#[test]
fn item5_embedding_ids_are_checked_and_u8_255_is_a_row() {
    let mut rng = rng("item5_embedding_ids");
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let emb = Embedding::new(300, 8, vb.pp("plain")).unwrap();
    let stable = StableEmbedding::new(300, 8, vb.pp("stable")).unwrap();
    let rows = emb.weight().to_vec2::<f32>().unwrap();
    let picks: Vec<u8> = (0..20)
        .map(|_| rng.random_range(0..=255u8))
        .chain([255, 0])
        .collect();
    let ids = Tensor::new(picks.as_slice(), &Device::Cpu).unwrap();
    let out = emb.forward(&ids).unwrap().to_vec2::<f32>().unwrap();
    for (id, row) in picks.iter().zip(&out) {
        assert_eq!(row, &rows[*id as usize], "id {id}");
    }
    for id in [255u32, 299] {
        let out = emb
            .forward(&Tensor::new(&[id], &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(out.to_vec2::<f32>().unwrap()[0], rows[id as usize]);
    }
    let stable_out = stable.forward(&ids).unwrap().to_vec2::<f32>().unwrap();
    assert!(stable_out[picks.len() - 2].iter().any(|v| *v != 0.0));

    let bad: Vec<(Tensor, String)> = vec![
        (
            Tensor::new(&[3u32, 300], &Device::Cpu).unwrap(),
            "300".into(),
        ),
        (
            Tensor::new(&[u32::MAX], &Device::Cpu).unwrap(),
            u32::MAX.to_string(),
        ),
        (
            Tensor::new(&[i64::MAX], &Device::Cpu).unwrap(),
            i64::MAX.to_string(),
        ),
        (Tensor::new(&[2i64, -1], &Device::Cpu).unwrap(), "-1".into()),
    ];
    for (ids, needle) in &bad {
        for layer in [&emb as &dyn Module, &stable] {
            let err = layer.forward(ids).unwrap_err().to_string();
            assert!(
                err.contains(needle.as_str()) && err.contains("300 rows"),
                "{err}"
            );
        }
    }
    // An empty id tensor gives an empty output of the right shape.
    let none = Tensor::zeros((2, 0), DType::U8, &Device::Cpu).unwrap();
    assert_eq!(emb.forward(&none).unwrap().dims(), &[2, 0, 8]);
}

// ---------------------------------------------------------------------------------------------
// Item 7: LAMB's documented formula.

/// 32-bit LAMB with its defaults against the formula the README documents, in f64: the Adam
/// direction `d = m̂ / (sqrt(v̂) + eps)` (bias-corrected moments, the paper's Algorithm 2 and
/// bitsandbytes' CUDA kernel), `r = min(1, max_unorm·‖p‖ / ‖d‖)` with both norms of this step
/// (‖p‖ before the update), `p -= lr·r·d`. At step 1, `m̂ = g` and `v̂ = g²`, so
/// `d = g / (|g| + eps)`; bitsandbytes 0.50's CPU backend measures the uncorrected direction,
/// whose norm is `(1 - b1) / sqrt(1 - b2) = 3.16` times larger, and would step 3.16 times less.
#[test]
fn item7_lamb_follows_its_documented_formula_from_step_one() {
    let mut rng = rng("item7_lamb");
    let n = rng.random_range(500..3000);
    // Small weights, as a freshly initialised layer has: the trust ratio binds (r ≈ 0.01).
    let init = randn(&mut rng, n, 0.01);
    let w = Var::from_tensor(&Tensor::from_vec(init.clone(), n, &Device::Cpu).unwrap()).unwrap();
    let config = LAMBConfig::default();
    let (lr, b1, b2, eps, max_unorm) = (
        config.lr,
        config.beta1,
        config.beta2,
        config.eps,
        config.max_unorm,
    );
    assert_eq!((lr, b1, b2, eps, max_unorm), (1e-3, 0.9, 0.999, 1e-8, 1.0));
    let mut opt = LAMB::new(vec![w.clone()], config).unwrap();
    let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
    let (mut m, mut v) = (vec![0f64; n], vec![0f64; n]);
    let norm = |x: &[f64]| x.iter().map(|v| v * v).sum::<f64>().sqrt();
    for t in 1..=40 {
        let g = randn(&mut rng, n, 1.0);
        let mut store = empty_grads();
        store.insert(
            w.as_tensor(),
            Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap(),
        );
        let before: Vec<f32> = flat(w.as_tensor());
        opt.step(&store).unwrap();
        let after: Vec<f32> = flat(w.as_tensor());

        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let d: Vec<f64> = (0..n)
            .map(|i| {
                let g = g[i] as f64;
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                (m[i] / c1) / ((v[i] / c2).sqrt() + eps)
            })
            .collect();
        if t == 1 {
            for (i, d) in d.iter().enumerate() {
                let g = g[i] as f64;
                assert!(
                    (d - g / (g.abs() + eps)).abs() < 1e-12,
                    "step 1: d = g / (|g| + eps)"
                );
            }
        }
        let r = (max_unorm * norm(&p) / norm(&d)).min(1.0);
        assert!(r < 0.1, "step {t}: the trust ratio binds ({r})");
        // Compare this step's change from the same f32 start, so that errors do not accumulate.
        // The f32 step's error: its direction carries the moments' rounding, below 1e-5 of
        // their scale (|g| ~ 1, so absolutely; a few f32 ulps per step), its scalars ~1e-6
        // relative, and its result is rounded once to f32 (half an ulp of the larger of the
        // two values). A 3.16 times smaller step (bitsandbytes' CPU backend) is off by 68 % of
        // it, ~0.3·lr·r for a typical |d| ~ 0.5, far outside.
        for i in 0..n {
            let start = before[i] as f64;
            let want = -lr * r * d[i];
            let got = after[i] as f64 - start;
            let tol = 1e-4 * want.abs()
                + lr * r * 1e-5
                + f32::EPSILON as f64 * start.abs().max((after[i] as f64).abs());
            assert!(
                (got - want).abs() <= tol,
                "step {t}, element {i}: changed by {got:e}, the formula says {want:e}"
            );
        }
        // Follow the f32 trajectory: the reference's norms use the parameters the optimizer saw.
        p = after.iter().map(|&x| x as f64).collect();
    }
}
