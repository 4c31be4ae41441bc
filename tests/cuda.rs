//! CUDA kernels against the CPU kernels (the reference), on random inputs of sizes that are not
//! block multiples, every input dtype and block size. Built with `--features cuda`; on a machine
//! without a GPU every test says it was skipped and passes.
//!
//! Codes must be identical except where the input sits within an ulp of a midpoint between two
//! map values (at least 99.99 % identical, every difference one code step); dequantized values
//! must equal the CPU's bit for bit for identical codes.
#![cfg(feature = "cuda")]

use candle_bnb::kernels::{
    dequantize_blockwise, dequantize_blockwise_into, quantize_blockwise, QuantMap,
    SUPPORTED_BLOCK_SIZES,
};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

mod common;
use common::{randn, rng};

/// The first CUDA device, or `None` (and a note saying the test was skipped).
fn gpu(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("{test}: skipped, no CUDA device ({e})");
            None
        }
    }
}

/// Sizes around block boundaries plus a random one, for `block_size`.
fn sizes(rng: &mut impl Rng, block_size: usize) -> Vec<usize> {
    vec![
        0,
        1,
        block_size - 1,
        block_size,
        block_size + 1,
        7 * block_size + 13,
        rng.random_range(1..300_000),
    ]
}

/// Compares CUDA codes with CPU codes: returns the number of differing codes, after checking
/// that each differs by one step and that its block's absmax is identical.
fn compare_codes(cpu: &[u8], gpu: &[u8], what: &str) -> usize {
    assert_eq!(cpu.len(), gpu.len(), "{what}: code count");
    let mut differ = 0;
    for (i, (&c, &g)) in cpu.iter().zip(gpu).enumerate() {
        if c != g {
            assert_eq!(
                (c as i32 - g as i32).abs(),
                1,
                "{what}: code {g} on CUDA vs {c} on CPU at {i}"
            );
            differ += 1;
        }
    }
    differ
}

#[test]
fn quantize_matches_the_cpu_kernels() {
    let Some(dev) = gpu("quantize_matches_the_cpu_kernels") else {
        return;
    };
    let mut rng = rng("quantize_matches_the_cpu_kernels");
    let maps = [
        ("signed", QuantMap::dynamic_signed()),
        ("unsigned", QuantMap::dynamic_unsigned()),
        ("linear", QuantMap::linear_signed()),
    ];
    let (mut total, mut differ) = (0usize, 0usize);
    for (name, map) in &maps {
        for &bs in &SUPPORTED_BLOCK_SIZES {
            for n in sizes(&mut rng, bs) {
                let mut values = randn(&mut rng, n, 1.0);
                if *name == "unsigned" {
                    values.iter_mut().for_each(|v| *v = v.abs());
                }
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let what = format!("{name} map, block {bs}, n {n}, {dtype:?}");
                    let x = Tensor::from_vec(values.clone(), n, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let want = quantize_blockwise(&x, map, bs).unwrap();
                    let got = quantize_blockwise(&x.to_device(&dev).unwrap(), map, bs).unwrap();
                    assert!(got.codes.device().is_cuda() && got.absmax.device().is_cuda());
                    let want_absmax = want.absmax.to_vec1::<f32>().unwrap();
                    let got_absmax = got.absmax.to_vec1::<f32>().unwrap();
                    assert_eq!(got_absmax, want_absmax, "{what}: absmax");
                    let want_codes = want.codes.to_vec1::<u8>().unwrap();
                    let got_codes = got.codes.to_vec1::<u8>().unwrap();
                    differ += compare_codes(&want_codes, &got_codes, &what);
                    total += n;

                    // Dequantize the CUDA codes on both devices: identical bits.
                    let codes_cpu = got.codes.to_device(&Device::Cpu).unwrap();
                    let absmax_cpu = got.absmax.to_device(&Device::Cpu).unwrap();
                    for out in [DType::F32, DType::F16, DType::BF16] {
                        let on_gpu = got.dequantize(out).unwrap();
                        let on_cpu =
                            dequantize_blockwise(&codes_cpu, &absmax_cpu, map, bs, out).unwrap();
                        // Cast on the host: Candle's CUDA cast launches an empty grid for 0
                        // elements, which the driver refuses.
                        let (a, b) = (
                            on_gpu
                                .to_device(&Device::Cpu)
                                .unwrap()
                                .to_dtype(DType::F32)
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap(),
                            on_cpu
                                .to_dtype(DType::F32)
                                .unwrap()
                                .to_vec1::<f32>()
                                .unwrap(),
                        );
                        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{what}: dequantize to {out:?} differs from the CPU");
                    }
                }
            }
        }
    }
    let identical = 1.0 - differ as f64 / total.max(1) as f64;
    eprintln!("codes identical: {:.6} % of {total}", identical * 100.0);
    assert!(
        identical >= 0.9999,
        "only {identical} of the codes identical"
    );
}

#[test]
fn dequantize_into_writes_a_preallocated_cuda_tensor() {
    let Some(dev) = gpu("dequantize_into_writes_a_preallocated_cuda_tensor") else {
        return;
    };
    let mut rng = rng("dequantize_into_writes_a_preallocated_cuda_tensor");
    let map = QuantMap::dynamic_signed();
    let n = 4096 * 3 + 77;
    let x = Tensor::from_vec(randn(&mut rng, n, 2.0), n, &dev).unwrap();
    let q = quantize_blockwise(&x, &map, 256).unwrap();
    let out = Tensor::zeros(n, DType::BF16, &dev).unwrap();
    dequantize_blockwise_into(&q.codes, &q.absmax, &map, 256, &out).unwrap();
    let want = q.dequantize(DType::BF16).unwrap();
    let diff = (out.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(diff, 0.0);
    let err = (x - q.dequantize(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err < 0.011 * 2.0, "mean |err| {err} for N(0, 4) input");
}

#[test]
fn bad_cuda_input_is_refused_and_names_the_value() {
    let Some(dev) = gpu("bad_cuda_input_is_refused_and_names_the_value") else {
        return;
    };
    let map = QuantMap::dynamic_signed();
    let mut values = vec![0.5f32; 70_000];
    values[65_537] = f32::NAN;
    let x = Tensor::from_vec(values, 70_000, &dev).unwrap();
    let err = quantize_blockwise(&x, &map, 256).unwrap_err().to_string();
    assert!(err.contains("65537"), "{err}");
    let ok = Tensor::ones(1000, DType::F32, &dev).unwrap();
    let q = quantize_blockwise(&ok, &map, 256).unwrap();
    let cpu_absmax = q.absmax.to_device(&Device::Cpu).unwrap();
    let err = dequantize_blockwise(&q.codes, &cpu_absmax, &map, 256, DType::F32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("Cpu") || err.contains("Cuda"), "{err}");
    // Empty tensors: zero blocks, no launch.
    let empty = Tensor::zeros(0, DType::F32, &dev).unwrap();
    let q = quantize_blockwise(&empty, &map, 64).unwrap();
    assert_eq!(q.absmax.elem_count(), 0);
    assert_eq!(q.dequantize(DType::F16).unwrap().elem_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Optimizers: the multi-tensor CUDA step against the CPU step.

use candle_bnb::kernels::ParamState;
use candle_bnb::optim::{
    AdEMAMix8bit, Adagrad8bit, AdamW, AdamW8bit, LAMB8bit, LARS8bit, Lion8bit, NonFinitePolicy,
    RMSprop8bit, SGD8bit,
};
use candle_core::Var;
use candle_nn::Optimizer;

/// Parameter sizes of every optimizer test: empty, a single element, 32-bit-state sizes (under
/// `min_8bit_size`), and 8-bit sizes that are not block multiples.
const PARAM_SIZES: [usize; 6] = [0, 1, 300, 4099, 70_001, 5 * 4096 + 77];

/// The same random parameters on the CPU and on `dev`, in `dtype`.
fn twin_params(rng: &mut common::TestRng, dev: &Device, dtype: DType) -> (Vec<Var>, Vec<Var>) {
    PARAM_SIZES
        .iter()
        .map(|&n| {
            let cpu = Tensor::from_vec(randn(rng, n, 1.0), n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let gpu = cpu.to_device(dev).unwrap();
            (
                Var::from_tensor(&cpu).unwrap(),
                Var::from_tensor(&gpu).unwrap(),
            )
        })
        .unzip()
}

/// Gradients `g` for `vars` (the loss Σ w·g), on the vars' device; parameter `skip` gets none.
fn grads_for(vars: &[Var], g: &[Tensor], skip: Option<usize>) -> candle_core::backprop::GradStore {
    let mut loss: Option<Tensor> = None;
    for (i, (v, g)) in vars.iter().zip(g).enumerate() {
        if Some(i) == skip || v.elem_count() == 0 {
            continue;
        }
        let g = g.to_device(v.device()).unwrap();
        let term = (v.as_tensor() * g)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term).unwrap(),
        });
    }
    loss.expect("some parameter has elements")
        .backward()
        .unwrap()
}

/// Every var's values as f32, cast on the host (Candle's CUDA cast fails on 0 elements).
fn values_f32(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter()
        .map(|v| {
            v.as_tensor()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        })
        .collect()
}

/// Largest |a - b| / max(|b|, 1e-3) over every parameter element.
fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(&x, &y)| ((x - y).abs() / y.abs().max(1e-3)) as f64)
        .fold(0.0, f64::max)
}

/// (differing codes, total codes) between two optimizers' 8-bit states; 32-bit states must be
/// within `tol` relative.
fn compare_states(a: &[ParamState], b: &[ParamState], tol: f32, what: &str) -> (usize, usize) {
    let (mut differ, mut total) = (0, 0);
    for (i, (a, b)) in a.iter().zip(b).enumerate() {
        match (a, b) {
            (ParamState::Blockwise(a), ParamState::Blockwise(b)) => {
                for (k, (a, b)) in a.iter().zip(b).enumerate() {
                    total += a.len();
                    differ += a
                        .codes()
                        .iter()
                        .zip(b.codes())
                        .filter(|(x, y)| x != y)
                        .count();
                    for (x, y) in a.absmax().iter().zip(b.absmax()) {
                        assert!(
                            (x - y).abs() <= tol.max(1e-6) * y.abs().max(1e-6),
                            "{what}: param {i} state {k} absmax {x} vs {y}"
                        );
                    }
                }
            }
            (ParamState::F32(a), ParamState::F32(b)) => {
                for (k, (a, b)) in a.iter().zip(b).enumerate() {
                    for (j, (x, y)) in a.iter().zip(b).enumerate() {
                        assert!(
                            (x - y).abs() <= tol * y.abs().max(1e-3),
                            "{what}: param {i} state {k} element {j}: {x} vs {y}"
                        );
                    }
                }
            }
            _ => panic!("{what}: param {i}: state kinds differ"),
        }
    }
    (differ, total)
}

fn host_states(states: Vec<(&Var, std::borrow::Cow<'_, ParamState>)>) -> Vec<ParamState> {
    states.into_iter().map(|(_, s)| s.into_owned()).collect()
}

/// 20 steps of the same optimizer on the CPU and on CUDA from the same parameters and with the
/// same gradients (one parameter without a gradient every third step), with global and
/// percentile clipping on; then params within `tol` relative (f32: 1e-6) and >= 99.9 % of the
/// state codes identical.
macro_rules! cuda_matches_cpu {
    ($ty:ty, $cfg:expr, $dev:expr, $rng:expr) => {{
        let cfg: <$ty as Optimizer>::Config = $cfg;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let what = format!("{} {dtype:?}", stringify!($ty));
            let (cpu_vars, gpu_vars) = twin_params($rng, $dev, dtype);
            let mut cpu = <$ty>::new(cpu_vars.clone(), cfg.clone()).unwrap();
            let mut gpu = <$ty>::new(gpu_vars.clone(), cfg.clone()).unwrap();
            for step in 0..20 {
                let g: Vec<Tensor> = PARAM_SIZES
                    .iter()
                    .map(|&n| {
                        Tensor::from_vec(randn($rng, n, 0.1), n, &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap()
                    })
                    .collect();
                let skip = (step % 3 == 2).then_some(3);
                cpu.step(&grads_for(&cpu_vars, &g, skip)).unwrap();
                gpu.step(&grads_for(&gpu_vars, &g, skip)).unwrap();
            }
            assert_eq!(gpu.step_count(), cpu.step_count(), "{what}: steps");
            let (a, b) = (values_f32(&gpu_vars), values_f32(&cpu_vars));
            let tol = match dtype {
                DType::F32 => 1e-6,
                DType::F16 => 2e-3,
                _ => 1.6e-2,
            };
            let rel = max_rel_diff(&a, &b);
            assert!(rel <= tol, "{what}: params differ by {rel} relative");
            let sa = host_states(gpu.states().unwrap());
            let sb = host_states(cpu.states().unwrap());
            let (differ, total) = compare_states(
                &sa,
                &sb,
                if dtype == DType::F32 { 1e-5 } else { 5e-2 },
                &what,
            );
            let identical = 1.0 - differ as f64 / total.max(1) as f64;
            eprintln!(
                "{what}: params max rel diff {rel:.3e}, codes identical {:.4} %",
                identical * 100.0
            );
            assert!(
                identical >= 0.999,
                "{what}: only {identical} of the codes identical"
            );
        }
    }};
}

#[test]
fn every_optimizer_steps_on_cuda_as_on_the_cpu() {
    let Some(dev) = gpu("every_optimizer_steps_on_cuda_as_on_the_cpu") else {
        return;
    };
    let mut rng = rng("every_optimizer_steps_on_cuda_as_on_the_cpu");
    let rng = &mut rng;
    let mut adamw = candle_bnb::optim::AdamW8bitConfig {
        max_grad_norm: Some(5.0),
        percentile_clipping: 90,
        ..Default::default()
    };
    cuda_matches_cpu!(AdamW8bit, adamw.clone(), &dev, rng);
    adamw.block_size = 64;
    cuda_matches_cpu!(AdamW8bit, adamw, &dev, rng);
    cuda_matches_cpu!(AdamW, candle_bnb::optim::AdamWConfig::default(), &dev, rng);
    cuda_matches_cpu!(Lion8bit, Default::default(), &dev, rng);
    cuda_matches_cpu!(LAMB8bit, Default::default(), &dev, rng);
    cuda_matches_cpu!(LARS8bit, Default::default(), &dev, rng);
    let mut sgd = candle_bnb::optim::SGD8bitConfig::default();
    sgd.set_field("momentum", "0.9").unwrap();
    cuda_matches_cpu!(SGD8bit, sgd, &dev, rng);
    let mut rms = candle_bnb::optim::RMSprop8bitConfig::default();
    rms.set_field("momentum", "0.9").unwrap();
    rms.set_field("centered", "true").unwrap();
    cuda_matches_cpu!(RMSprop8bit, rms, &dev, rng);
    cuda_matches_cpu!(Adagrad8bit, Default::default(), &dev, rng);
    let ademamix = candle_bnb::optim::AdEMAMix8bitConfig {
        block_size: 4096,
        ..Default::default()
    };
    cuda_matches_cpu!(AdEMAMix8bit, ademamix, &dev, rng);
}

#[test]
fn a_non_finite_gradient_on_cuda_skips_or_fails_the_whole_step() {
    let Some(dev) = gpu("a_non_finite_gradient_on_cuda_skips_or_fails_the_whole_step") else {
        return;
    };
    let mut rng = rng("a_non_finite_gradient_on_cuda_skips_or_fails_the_whole_step");
    for policy in [NonFinitePolicy::Skip, NonFinitePolicy::Error] {
        let (_, vars) = twin_params(&mut rng, &dev, DType::F32);
        let cfg = candle_bnb::optim::AdamW8bitConfig {
            non_finite: policy,
            ..Default::default()
        };
        let mut opt = AdamW8bit::new(vars.clone(), cfg).unwrap();
        let good: Vec<Tensor> = PARAM_SIZES
            .iter()
            .map(|&n| Tensor::from_vec(randn(&mut rng, n, 0.1), n, &Device::Cpu).unwrap())
            .collect();
        opt.step(&grads_for(&vars, &good, None)).unwrap();
        let before = (values_f32(&vars), format!("{:?}", opt.states().unwrap()));
        let mut bad = good.clone();
        let mut v = randn(&mut rng, PARAM_SIZES[4], 0.1);
        v[70_000] = f32::INFINITY;
        bad[4] = Tensor::from_vec(v, PARAM_SIZES[4], &Device::Cpu).unwrap();
        let result = opt.step(&grads_for(&vars, &bad, None));
        match policy {
            NonFinitePolicy::Skip => {
                result.unwrap();
                assert_eq!((opt.step_count(), opt.skipped_steps()), (1, 1));
            }
            NonFinitePolicy::Error => {
                let err = result.unwrap_err().to_string();
                assert!(err.contains("parameter 4"), "{err}");
                assert_eq!((opt.step_count(), opt.skipped_steps()), (1, 0));
            }
        }
        let after = (values_f32(&vars), format!("{:?}", opt.states().unwrap()));
        assert!(
            before == after,
            "{policy:?}: the refused step changed something"
        );
        opt.step(&grads_for(&vars, &good, None)).unwrap();
        assert_eq!(opt.step_count(), 2);
    }
}

#[test]
fn checkpoints_move_between_cuda_and_the_cpu() {
    let Some(dev) = gpu("checkpoints_move_between_cuda_and_the_cpu") else {
        return;
    };
    let mut rng = rng("checkpoints_move_between_cuda_and_the_cpu");
    let dir = std::env::temp_dir().join(format!("candle-bnb-cuda-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = candle_bnb::optim::AdamW8bitConfig {
        percentile_clipping: 80,
        ..Default::default()
    };
    let (cpu_vars, gpu_vars) = twin_params(&mut rng, &dev, DType::BF16);
    let grads: Vec<Vec<Tensor>> = (0..10)
        .map(|_| {
            PARAM_SIZES
                .iter()
                .map(|&n| {
                    Tensor::from_vec(randn(&mut rng, n, 0.1), n, &Device::Cpu)
                        .unwrap()
                        .to_dtype(DType::BF16)
                        .unwrap()
                })
                .collect()
        })
        .collect();
    // Uninterrupted on CUDA: 10 steps.
    let mut reference = AdamW8bit::new(gpu_vars.clone(), cfg.clone()).unwrap();
    let start = values_f32(&gpu_vars);
    for g in &grads[..5] {
        reference.step(&grads_for(&gpu_vars, g, None)).unwrap();
    }
    let on_cuda = dir.join("cuda.safetensors");
    reference.save(&on_cuda).unwrap();
    let halfway = values_f32(&gpu_vars);
    for g in &grads[5..] {
        reference.step(&grads_for(&gpu_vars, g, None)).unwrap();
    }
    // Saved on CUDA, resumed on the CPU from the same parameters.
    for (v, h) in cpu_vars.iter().zip(&halfway) {
        let t = Tensor::from_vec(h.clone(), h.len(), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        v.set(&t).unwrap();
    }
    let mut cpu = AdamW8bit::new(cpu_vars.clone(), cfg.clone()).unwrap();
    cpu.load(&on_cuda).unwrap();
    assert_eq!(cpu.step_count(), 5);
    for g in &grads[5..] {
        cpu.step(&grads_for(&cpu_vars, g, None)).unwrap();
    }
    let rel = max_rel_diff(&values_f32(&cpu_vars), &values_f32(&gpu_vars));
    assert!(rel <= 1.6e-2, "resumed on the CPU: params differ by {rel}");
    // Saved on the CPU, loaded back on CUDA: the state is the same bytes.
    let on_cpu = dir.join("cpu.safetensors");
    cpu.save(&on_cpu).unwrap();
    let fresh: Vec<Var> = start
        .iter()
        .map(|s| {
            let t = Tensor::from_vec(s.clone(), s.len(), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
                .to_device(&dev)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect();
    let mut back = AdamW8bit::new(fresh, cfg).unwrap();
    back.load(&on_cpu).unwrap();
    assert_eq!(back.step_count(), 10);
    assert_eq!(
        format!("{:?}", host_states(back.states().unwrap())),
        format!("{:?}", host_states(cpu.states().unwrap()))
    );
    let _ = (start, std::fs::remove_dir_all(&dir));
}

#[test]
fn parameters_on_two_devices_are_refused() {
    let Some(dev) = gpu("parameters_on_two_devices_are_refused") else {
        return;
    };
    let a = Var::zeros(10, DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros(10, DType::F32, &dev).unwrap();
    let err = AdamW8bit::new(vec![a, b], Default::default())
        .err()
        .expect("mixed devices must be refused")
        .to_string();
    assert!(err.contains("one device"), "{err}");
}
