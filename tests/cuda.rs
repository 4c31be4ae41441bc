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
                        let (a, b) = (
                            on_gpu
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
