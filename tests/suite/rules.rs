//! Every update rule through the fused kernels: the 8-bit step equals the scalar composition
//! (dequantize, apply the rule, re-quantize) and the 32-bit step equals the rule applied element
//! by element, for f32/f16/bf16 parameters and sizes that are not block multiples, 0 and 1.

use candle_bnb::kernels::{
    fused_update, AdEMAMixRule, AdagradRule, AdamRule, LambRule, LarsRule, LionRule, ParamState,
    RmspropRule, SgdRule, UpdateRule, MAX_STATES,
};
use candle_bnb::QuantMap;
use candle_core::{DType, Device, Tensor};
use rand::Rng;

use crate::common::{randn, rng, TestRng};

const SIZES: [usize; 7] = [0, 1, 255, 256, 257, 1000, 70_001];

fn tensor(values: Vec<f32>, dtype: DType) -> Tensor {
    let n = values.len();
    Tensor::from_vec(values, n, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// The rule the kernel applies to a parameter: layer-wise rules get their trust ratio from the
/// norms of the parameter and of the direction, measured here in f64 from the same inputs.
fn effective_rule<R: UpdateRule>(rule: &R, p: &[f32], g: &[f32], states: &[Vec<f32>]) -> R {
    if !R::LAYERWISE {
        return rule.clone();
    }
    let (mut pp, mut dd) = (0f64, 0f64);
    for i in 0..p.len() {
        let mut s = [0f32; MAX_STATES];
        for (k, st) in states.iter().enumerate() {
            s[k] = st[i];
        }
        let d = rule.direction(p[i], g[i], &mut s) as f64;
        pp += p[i] as f64 * p[i] as f64;
        dd += d * d;
    }
    rule.with_norms(pp.sqrt() as f32, dd.sqrt() as f32)
}

/// The scalar composition: returns the new params (f32) and the new state values.
fn compose<R: UpdateRule>(
    rule: &R,
    p: &[f32],
    g: &[f32],
    states: &[Vec<f32>],
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let rule = effective_rule(rule, p, g, states);
    let mut out_states = states.to_vec();
    let params = (0..p.len())
        .map(|i| {
            let mut s = [0f32; MAX_STATES];
            for (k, st) in states.iter().enumerate() {
                s[k] = st[i];
            }
            let np = rule.apply(p[i], g[i], &mut s);
            for (k, st) in out_states.iter_mut().enumerate() {
                st[i] = s[k];
            }
            np
        })
        .collect();
    (params, out_states)
}

/// The spacing of `dtype`'s values in the binade of `x`.
fn ulp(x: f32, dtype: DType) -> f32 {
    let (mantissa_bits, min_exponent) = match dtype {
        DType::F16 => (10, -14),
        DType::BF16 => (7, -126),
        _ => (23, -126),
    };
    let exponent = (x.abs().max(f32::MIN_POSITIVE).log2().floor() as i32).max(min_exponent);
    2f32.powi(exponent - mantissa_bits)
}

/// Checks the params `got` (in `dtype`, as f32) of a layer-wise rule against `want`, the f32
/// params of the scalar composition before rounding to `dtype`. The kernel sums the norms in
/// f64 chunk by chunk, this file in one pass: the sums differ in the last f64 bits, so now and
/// then (roughly 1 norm in 1e6) `sqrt(sum) as f32` lands one ulp apart, and the trust ratio r
/// differs by up to 3 f32 ulps (3.6e-7 relative). A param then moves by lr·r·|d| times that
/// plus its own rounding: at most 0.043 (LAMB: lr 1e-2, |d| < 4.3 two steps into these betas,
/// bias-corrected or not; LARS's clipped step is smaller) × 3.6e-7 = 1.6e-8, 1.6e-5 relative
/// to the 1e-3 floor,
/// against a bound of 1e-4. Rounded to f16/bf16 such a param can also fall on the other side of
/// a midpoint and differ by one ulp of the dtype: allowed on top.
fn check_layerwise(got: &[f32], want: &[f32], dtype: DType, what: &str) {
    for (i, (x, y)) in got.iter().zip(want).enumerate() {
        let tol = 1e-4 * y.abs().max(1e-3) + ulp(*y, dtype);
        assert!((x - y).abs() <= tol, "{what}: param {i}: {x} vs {y}");
    }
}

fn check_rule<R: UpdateRule>(rng: &mut TestRng, name: &str, make: impl Fn(u64) -> R) {
    for n in SIZES {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let rule = make(rng.random_range(2..40));
            let p = tensor(randn(rng, n, 1.0), dtype);
            let g = tensor(randn(rng, n, 0.3), dtype);
            // Non-trivial states: one step from the initial state first.
            let mut s8 = ParamState::new_blockwise(&rule, n, 256).unwrap();
            let mut s32 = ParamState::new_f32(&rule, n);
            fused_update(&rule, &p.copy().unwrap(), &g, &mut s8).unwrap();
            fused_update(&rule, &p.copy().unwrap(), &g, &mut s32).unwrap();
            let g = tensor(randn(rng, n, 0.3), dtype);
            let (p0, g0) = (to_f32(&p), to_f32(&g));

            // 32-bit: element by element.
            let ParamState::F32(before32) = s32.clone() else {
                unreachable!()
            };
            let p32 = p.copy().unwrap();
            fused_update(&rule, &p32, &g, &mut s32).unwrap();
            let (want_p_f32, want_s) = compose(&rule, &p0, &g0, &before32);
            let want_p = to_f32(&tensor(want_p_f32.clone(), dtype));
            let ParamState::F32(after32) = &s32 else {
                unreachable!()
            };
            if R::LAYERWISE {
                let what = format!("{name} 32-bit n {n} {dtype:?}");
                check_layerwise(&to_f32(&p32), &want_p_f32, dtype, &what);
            } else {
                assert_eq!(to_f32(&p32), want_p, "{name} 32-bit params n {n} {dtype:?}");
                assert_eq!(after32, &want_s, "{name} 32-bit state n {n} {dtype:?}");
            }

            // 8-bit: dequantize, apply, quantize.
            let ParamState::Blockwise(before8) = s8.clone() else {
                unreachable!()
            };
            let deq: Vec<Vec<f32>> = before8.iter().map(|s| s.dequantize()).collect();
            fused_update(&rule, &p, &g, &mut s8).unwrap();
            let (want_p_f32, want_s) = compose(&rule, &p0, &g0, &deq);
            let want_p = to_f32(&tensor(want_p_f32.clone(), dtype));
            let ParamState::Blockwise(after8) = &s8 else {
                unreachable!()
            };
            if R::LAYERWISE {
                let what = format!("{name} 8-bit n {n} {dtype:?}");
                check_layerwise(&to_f32(&p), &want_p_f32, dtype, &what);
            } else {
                assert_eq!(to_f32(&p), want_p, "{name} 8-bit params n {n} {dtype:?}");
            }
            for (k, (want, state)) in want_s.into_iter().zip(after8).enumerate() {
                let map = if rule.signed_states()[k] {
                    QuantMap::dynamic_signed()
                } else {
                    QuantMap::dynamic_unsigned()
                };
                let q = candle_bnb::quantize_blockwise(
                    &Tensor::from_vec(want, n, &Device::Cpu).unwrap(),
                    &map,
                    256,
                )
                .unwrap();
                let codes = q.codes.to_vec1::<u8>().unwrap();
                let same = codes
                    .iter()
                    .zip(state.codes())
                    .filter(|(a, b)| a == b)
                    .count();
                if R::LAYERWISE {
                    // The state does not depend on the trust ratio: identical too.
                    assert_eq!(same, n, "{name} state {k} codes n {n} {dtype:?}");
                } else {
                    assert_eq!(
                        state.codes(),
                        codes,
                        "{name} state {k} codes n {n} {dtype:?}"
                    );
                }
                assert_eq!(
                    state.absmax(),
                    q.absmax.to_vec1::<f32>().unwrap(),
                    "{name} state {k} absmax n {n} {dtype:?}"
                );
            }
        }
    }
}

#[test]
fn every_rule_fused_equals_its_scalar_composition() {
    let mut rng = rng("rules_composition");
    check_rule(&mut rng, "adamw", |t| {
        AdamRule::new(t, 1e-2, 0.9, 0.999, 1e-8, 0.1, true)
    });
    check_rule(&mut rng, "adam", |t| {
        AdamRule::new(t, 1e-2, 0.9, 0.999, 1e-8, 0.1, false)
    });
    check_rule(&mut rng, "lion", |_| LionRule::new(1e-3, 0.9, 0.99, 0.1));
    check_rule(&mut rng, "sgd", |t| {
        SgdRule::new(t, 1e-2, 0.9, 0.1, 0.01, false)
    });
    check_rule(&mut rng, "sgd-nesterov", |t| {
        SgdRule::new(t, 1e-2, 0.9, 0.0, 0.0, true)
    });
    check_rule(&mut rng, "rmsprop", |_| {
        RmspropRule::new(1e-2, 0.99, 1e-8, 0.01, 0.0, false)
    });
    check_rule(&mut rng, "rmsprop-momentum-centered", |_| {
        RmspropRule::new(1e-2, 0.9, 1e-8, 0.0, 0.8, true)
    });
    check_rule(&mut rng, "rmsprop-centered", |_| {
        RmspropRule::new(1e-2, 0.9, 1e-8, 0.0, 0.0, true)
    });
    check_rule(&mut rng, "adagrad", |t| {
        AdagradRule::new(t, 1e-2, 0.01, 0.01, 0.1, 1e-10)
    });
    check_rule(&mut rng, "ademamix", |t| {
        AdEMAMixRule::new(
            t,
            1e-3,
            0.9,
            0.999,
            0.9999,
            5.0,
            Some(30),
            Some(30),
            1e-8,
            0.01,
        )
    });
    check_rule(&mut rng, "lamb", |t| {
        LambRule::new(t, 1e-2, 0.9, 0.999, 1e-6, 0.01, true, true, 0.5)
    });
    check_rule(&mut rng, "lars", |t| {
        LarsRule::new(t, 1e-1, 0.9, 0.0, 1e-3, false, 0.02)
    });
}
