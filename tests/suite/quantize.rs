//! Blockwise quantization against independent references: bitsandbytes' maps from files, an
//! exact brute-force nearest-value search, and bitsandbytes' own round-trip error thresholds.

use candle_bnb::kernels::{
    dequantize_blockwise, dequantize_blockwise_into, quantize_blockwise, QuantMap, Quantized,
    SUPPORTED_BLOCK_SIZES,
};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use num_bigint::BigInt;
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::common::{rng, TestRng};

fn reference_map(name: &str) -> [f32; 256] {
    let path = format!(
        "{}/tests/data/qmap_{name}_fma.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut values = [f32::NAN; 256];
    let mut count = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        let index: usize = fields[0].parse().unwrap();
        let bits = u32::from_str_radix(fields[1].trim_start_matches("0x"), 16).unwrap();
        values[index] = f32::from_bits(bits);
        count += 1;
    }
    assert_eq!(count, 256, "{path}");
    values
}

#[test]
fn dynamic_maps_equal_bitsandbytes_bit_for_bit() {
    for (name, map) in [
        ("signed", QuantMap::dynamic_signed()),
        ("unsigned", QuantMap::dynamic_unsigned()),
    ] {
        let want = reference_map(name);
        for (i, (got, want)) in map.values().iter().zip(want.iter()).enumerate() {
            assert_eq!(
                got.to_bits(),
                want.to_bits(),
                "{name} map index {i}: {got:e} vs {want:e}"
            );
        }
    }
    let signed = QuantMap::dynamic_signed();
    assert_eq!(signed.values()[127], 0.0);
    assert_eq!(signed.values()[255], 1.0);
    assert_eq!(
        QuantMap::from_values(&reference_map("unsigned")).unwrap(),
        QuantMap::dynamic_unsigned()
    );
}

/// `v` exactly, as an integer multiple of 2^-149 (every f32 is one).
fn exact(v: f32) -> BigInt {
    let bits = v.to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32;
    let mantissa = (bits & 0x7F_FFFF) as i64;
    let (m, shift) = if exponent == 0 {
        (mantissa, 0)
    } else {
        (mantissa | 0x80_0000, exponent - 1)
    };
    let magnitude = BigInt::from(m) << shift as usize;
    if bits >> 31 == 1 {
        -magnitude
    } else {
        magnitude
    }
}

/// Brute-force nearest map index to `y`, exact, ties to the lowest even index. f64 distances
/// screen the candidates (their relative error is far below 1e-9); exact integers decide.
fn brute_force_code(values: &[f32; 256], y: f32) -> u8 {
    let d: Vec<f64> = values
        .iter()
        .map(|&v| (y as f64 - v as f64).abs())
        .collect();
    let min = d.iter().cloned().fold(f64::INFINITY, f64::min);
    let candidates: Vec<usize> = (0..256).filter(|&k| d[k] <= min * (1.0 + 1e-9)).collect();
    if candidates.len() == 1 {
        return candidates[0] as u8;
    }
    let ey = exact(y);
    let dist: Vec<BigInt> = candidates
        .iter()
        .map(|&k| (&ey - exact(values[k])).magnitude().clone().into())
        .collect();
    let best = dist.iter().min().unwrap();
    let tied: Vec<usize> = candidates
        .iter()
        .zip(&dist)
        .filter(|(_, d)| *d == best)
        .map(|(&k, _)| k)
        .collect();
    *tied.iter().find(|k| *k % 2 == 0).unwrap_or(&tied[0]) as u8
}

/// Expected `(codes, absmax)` for row-major `x`.
fn reference_quantize(x: &[f32], map: &QuantMap, block_size: usize) -> (Vec<u8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::new();
    for block in x.chunks(block_size) {
        let a = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(a);
        codes.extend(
            block
                .iter()
                .map(|&v| brute_force_code(map.values(), if a == 0.0 { 0.0 } else { v / a })),
        );
    }
    (codes, absmax)
}

fn random_values(rng: &mut TestRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.random_range(0..20) {
            0 => 0.0,
            1 => rng.random_range(-1.0f32..1.0) * 1e-30,
            2 => rng.random_range(-1.0f32..1.0) * 1e4,
            _ => StandardNormal.sample(rng),
        })
        .collect()
}

fn check_codes(q: &Quantized, want: &(Vec<u8>, Vec<f32>), what: &str) {
    assert_eq!(q.codes.dtype(), DType::U8, "{what}");
    assert_eq!(q.absmax.dtype(), DType::F32, "{what}");
    let codes = q.codes.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    let absmax = q.absmax.to_vec1::<f32>().unwrap();
    assert_eq!(absmax, want.1, "{what}: absmax");
    if let Some(i) = (0..codes.len()).find(|&i| codes[i] != want.0[i]) {
        panic!(
            "{what}: code {} != brute force {} at flat index {i}",
            codes[i], want.0[i]
        );
    }
}

#[test]
fn codes_equal_brute_force_search_for_random_sizes_dtypes_and_block_sizes() {
    let mut rng = rng("codes_equal_brute_force");
    let maps = [
        QuantMap::dynamic_signed(),
        QuantMap::dynamic_unsigned(),
        QuantMap::linear_signed(),
    ];
    for &block_size in &SUPPORTED_BLOCK_SIZES {
        let mut sizes = vec![0, 1, block_size - 1, block_size, block_size + 1];
        sizes.extend((0..3).map(|_| rng.random_range(2..5 * block_size)));
        for n in sizes {
            let x = random_values(&mut rng, n);
            let map = &maps[rng.random_range(0..maps.len())];
            let t = Tensor::from_vec(x.clone(), n, &Device::Cpu).unwrap();
            let what = format!("f32 n={n} block={block_size} map={map:?}");
            check_codes(
                &quantize_blockwise(&t, map, block_size).unwrap(),
                &reference_quantize(&x, map, block_size),
                &what,
            );

            // Half-precision inputs quantize their own (rounded) values.
            let h: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
            let hx: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
            let t = Tensor::from_vec(h, n, &Device::Cpu).unwrap();
            check_codes(
                &quantize_blockwise(&t, map, block_size).unwrap(),
                &reference_quantize(&hx, map, block_size),
                "f16",
            );
            let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
            let bx: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            let t = Tensor::from_vec(b, n, &Device::Cpu).unwrap();
            check_codes(
                &quantize_blockwise(&t, map, block_size).unwrap(),
                &reference_quantize(&bx, map, block_size),
                "bf16",
            );
        }
    }
}

#[test]
fn non_contiguous_input_is_quantized_in_row_major_order() {
    let mut rng = rng("non_contiguous");
    let (rows, cols) = (rng.random_range(2..40), rng.random_range(2..300));
    let x = random_values(&mut rng, rows * cols);
    let t = Tensor::from_vec(x, (rows, cols), &Device::Cpu)
        .unwrap()
        .t()
        .unwrap();
    assert!(!t.is_contiguous());
    let row_major = t
        .contiguous()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let map = QuantMap::dynamic_signed();
    let q = quantize_blockwise(&t, &map, 64).unwrap();
    assert_eq!(q.codes.dims(), &[cols, rows]);
    check_codes(&q, &reference_quantize(&row_major, &map, 64), "transposed");
    // A narrowed view starts at an offset into its storage.
    let view = t.narrow(0, 1, cols - 1).unwrap();
    let q = quantize_blockwise(&view, &map, 64).unwrap();
    check_codes(
        &q,
        &reference_quantize(&row_major[rows..], &map, 64),
        "narrowed",
    );
}

/// Mean |err| and mean relative error (bitsandbytes' definition) of a round trip.
fn roundtrip_errors(x: &[f32], y: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let abs: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs() as f64)
        .sum::<f64>()
        / n;
    let rel: f64 = x
        .iter()
        .zip(y)
        .map(|(a, b)| ((a - b).abs() / (a.abs() + 1e-8)) as f64)
        .sum::<f64>()
        / n;
    (abs, rel)
}

#[test]
fn roundtrip_error_within_bitsandbytes_thresholds() {
    let mut rng = rng("roundtrip_error");
    let n = 1 << 20;
    let normal: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    let uniform: Vec<f32> = (0..n).map(|_| rng.random_range(0.0f32..1.0)).collect();
    // bitsandbytes' thresholds. Over 279 seeds the means of these 1M values were: randn/signed
    // |err| 0.00853 (bf16 0.00860), sd 1.4e-5, rel 0.0154, sd 2e-5; rand/unsigned |err| 0.00160
    // (bf16 0.00171), sd 4e-6. Every bound is over 120 sd from its mean.
    let cases = [
        (
            "randn/signed",
            normal,
            QuantMap::dynamic_signed(),
            0.011,
            Some(0.018),
        ),
        (
            "rand/unsigned",
            uniform,
            QuantMap::dynamic_unsigned(),
            0.0023,
            None,
        ),
    ];
    for (name, x, map, max_abs, max_rel) in cases {
        let f32_input = Tensor::from_vec(x.clone(), (1024, 1024), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let input = f32_input.to_dtype(dtype).unwrap();
            // The input's own rounding is allowed on top of the quantization error.
            let rounded = input
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (rounding_abs, rounding_rel) = roundtrip_errors(&x, &rounded);
            let q = quantize_blockwise(&input, &map, 256).unwrap();
            let back = q
                .dequantize(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let (abs, rel) = roundtrip_errors(&x, &back);
            eprintln!("{name} {dtype:?}: mean |err| {abs:.5}, mean rel err {rel:.5}");
            assert!(
                abs < max_abs + rounding_abs,
                "{name} {dtype:?}: mean |err| {abs} >= {max_abs} + {rounding_abs}"
            );
            if let Some(max_rel) = max_rel {
                assert!(
                    rel < max_rel + rounding_rel,
                    "{name} {dtype:?}: mean rel err {rel} >= {max_rel} + {rounding_rel}"
                );
            }
        }
    }
}

#[test]
fn dequantize_rounds_each_value_into_the_requested_dtype() {
    let mut rng = rng("dequantize_dtypes");
    let n = rng.random_range(1000..5000);
    let x = random_values(&mut rng, n);
    let map = QuantMap::dynamic_signed();
    let q =
        quantize_blockwise(&Tensor::from_vec(x, (n,), &Device::Cpu).unwrap(), &map, 128).unwrap();
    let codes = q.codes.to_vec1::<u8>().unwrap();
    let absmax = q.absmax.to_vec1::<f32>().unwrap();
    let want: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map.values()[c as usize] * absmax[i / 128])
        .collect();
    assert_eq!(
        q.dequantize(DType::F32).unwrap().to_vec1::<f32>().unwrap(),
        want
    );
    let h = q.dequantize(DType::F16).unwrap().to_vec1::<f16>().unwrap();
    assert_eq!(
        h,
        want.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>()
    );
    let b = q
        .dequantize(DType::BF16)
        .unwrap()
        .to_vec1::<bf16>()
        .unwrap();
    assert_eq!(
        b,
        want.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()
    );
}

#[test]
fn dequantize_into_writes_the_same_values_in_place() {
    let mut rng = rng("dequantize_into");
    let n = rng.random_range(300_000..400_000);
    let x = random_values(&mut rng, n);
    let q = quantize_blockwise(
        &Tensor::from_vec(x, n, &Device::Cpu).unwrap(),
        &QuantMap::dynamic_unsigned(),
        512,
    )
    .unwrap();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let want = q
            .dequantize(dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Any shape with the right element count; the shape is kept.
        let out = Tensor::full(7f32, (2, n / 2), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let out = if n % 2 == 0 {
            out
        } else {
            Tensor::full(7f32, n, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        q.dequantize_into(&out).unwrap();
        let got = out
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, want, "{dtype:?}");
    }

    // Bad outputs are refused and left untouched.
    let before = || Tensor::full(3f32, n + 1, &Device::Cpu).unwrap();
    let wrong_len = before();
    let msg = q.dequantize_into(&wrong_len).unwrap_err().to_string();
    assert!(msg.contains(&format!("{}", n + 1)), "{msg}");
    assert_eq!(
        wrong_len.to_vec1::<f32>().unwrap(),
        before().to_vec1::<f32>().unwrap()
    );
    let strided = Tensor::zeros((n, 2), DType::F32, &Device::Cpu)
        .unwrap()
        .narrow(1, 0, 1)
        .unwrap();
    assert!(q
        .dequantize_into(&strided)
        .unwrap_err()
        .to_string()
        .contains("contiguous"));
    let ints = Tensor::zeros(n, DType::U32, &Device::Cpu).unwrap();
    assert!(q
        .dequantize_into(&ints)
        .unwrap_err()
        .to_string()
        .contains("U32"));
    let nan = Tensor::full(f32::NAN, q.n_blocks(), &Device::Cpu).unwrap();
    let out = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    let msg = dequantize_blockwise_into(&q.codes, &nan, &q.map, 512, &out)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("block 0"), "{msg}");
    assert_eq!(out.sum_all().unwrap().to_scalar::<f32>().unwrap(), n as f32);
}

#[test]
fn zero_blocks_and_empty_tensors() {
    let map = QuantMap::dynamic_signed();
    let mut x = vec![0f32; 512];
    x[300] = 2.5;
    x[301] = -2.5;
    x[5] = -0.0;
    let q = quantize_blockwise(
        &Tensor::from_vec(x.clone(), 512, &Device::Cpu).unwrap(),
        &map,
        256,
    )
    .unwrap();
    assert_eq!(q.absmax.to_vec1::<f32>().unwrap(), vec![0.0, 2.5]);
    let back = q.dequantize(DType::F32).unwrap().to_vec1::<f32>().unwrap();
    assert!(back[..256].iter().all(|v| *v == 0.0));
    assert_eq!(back[300], 2.5); // 1.0 is in the signed map, -1.0 is not
    assert!((back[301] + 2.5).abs() < 0.02, "{}", back[301]);

    let empty = Tensor::zeros((0, 7), DType::BF16, &Device::Cpu).unwrap();
    let q = quantize_blockwise(&empty, &map, 64).unwrap();
    assert_eq!(q.codes.dims(), &[0, 7]);
    assert_eq!(q.absmax.dims(), &[0]);
    assert_eq!(q.n_blocks(), 0);
    assert_eq!(q.dequantize(DType::F16).unwrap().dims(), &[0, 7]);
}

#[test]
fn bad_input_is_a_clear_error() {
    let map = QuantMap::dynamic_signed();
    let dev = &Device::Cpu;
    let err = |r: candle_core::Result<Quantized>| r.unwrap_err().to_string();

    let ints = Tensor::new(&[1u32, 2, 3], dev).unwrap();
    assert!(err(quantize_blockwise(&ints, &map, 64)).contains("U32"));
    let x = Tensor::new(&[1f32, 2., 3.], dev).unwrap();
    assert!(err(quantize_blockwise(&x, &map, 100)).contains("block size 100"));
    let mut v = vec![0.5f32; 1000];
    v[777] = f32::NEG_INFINITY;
    let msg = err(quantize_blockwise(
        &Tensor::from_vec(v, 1000, dev).unwrap(),
        &map,
        256,
    ));
    assert!(msg.contains("777") && msg.contains("-inf"), "{msg}");

    let q = quantize_blockwise(&Tensor::ones(1000, DType::F32, dev).unwrap(), &map, 256).unwrap();
    let deq_err = |codes: &Tensor, absmax: &Tensor, bs, dtype| {
        dequantize_blockwise(codes, absmax, &map, bs, dtype)
            .unwrap_err()
            .to_string()
    };
    assert!(deq_err(
        &q.codes.to_dtype(DType::F32).unwrap(),
        &q.absmax,
        256,
        DType::F32
    )
    .contains("codes must be U8"));
    let short = q.absmax.narrow(0, 0, 3).unwrap();
    assert!(deq_err(&q.codes, &short, 256, DType::F32).contains("expected [4]"));
    assert!(deq_err(&q.codes, &q.absmax, 512, DType::F32).contains("expected [2]"));
    assert!(deq_err(&q.codes, &q.absmax, 256, DType::U8).contains("U8"));
    assert!(deq_err(
        &q.codes,
        &q.absmax.to_dtype(DType::F16).unwrap(),
        256,
        DType::F32
    )
    .contains("F16"));
    let nan_absmax = Tensor::new(&[1f32, f32::NAN, 1., 1.], dev).unwrap();
    assert!(deq_err(&q.codes, &nan_absmax, 256, DType::F32).contains("block 1"));

    let mut unsorted = *map.values();
    unsorted.swap(0, 255);
    let msg = QuantMap::from_values(&unsorted).unwrap_err().to_string();
    assert!(
        msg.contains("not sorted") && msg.contains("index 0"),
        "{msg}"
    );
}
