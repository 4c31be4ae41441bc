//! The gradient pre-pass: global-norm clipping, percentile clipping, non-finite gradients and
//! parameters without a gradient, for every optimizer of the family.

use candle_bnb::optim::*;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::Rng;

use crate::common::{randn, rng, TestRng};

fn var(rng: &mut TestRng, n: usize) -> Var {
    Var::from_tensor(&Tensor::from_vec(randn(rng, n, 1.0), n, &Device::Cpu).unwrap()).unwrap()
}

/// A loss whose gradient with respect to each `vars[i]` is exactly `grads[i]`.
fn loss(vars: &[&Var], grads: &[Vec<f32>]) -> Tensor {
    let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (v, g) in vars.iter().zip(grads) {
        let g = Tensor::from_vec(g.clone(), g.len(), &Device::Cpu).unwrap();
        total = (total + (v.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    total
}

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
}

#[test]
fn global_norm_clipping_scales_every_gradient_like_torch() {
    let mut rng = rng("global_clipping");
    let (a, b) = (var(&mut rng, 5000), var(&mut rng, 300));
    let max = 3.0;
    let config = SGDConfig {
        lr: 1.0,
        settings: Settings {
            max_grad_norm: Some(max),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = SGD::new(vec![a.clone(), b.clone()], config).unwrap();
    for scale in [1.0f32, 0.01] {
        let grads = vec![randn(&mut rng, 5000, scale), randn(&mut rng, 300, scale)];
        let total = (norm(&grads[0]).powi(2) + norm(&grads[1]).powi(2)).sqrt();
        let want_scale = (max / (total + 1e-6)).min(1.0);
        let before = [a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap()];
        opt.backward_step(&loss(&[&a, &b], &grads)).unwrap();
        let mut worst = 0f64;
        for (k, v) in [&a, &b].iter().enumerate() {
            let after = v.to_vec1::<f32>().unwrap();
            for i in 0..after.len() {
                let want = before[k][i] as f64 - want_scale * grads[k][i] as f64;
                worst = worst.max((after[i] as f64 - want).abs() / want.abs().max(1.0));
                // The f32 step rounds p once (6e-8 of |p|) and the library's f32 partial sums
                // move the norm, so the update (|scale·g| < 1), by ~1e-7 relative: over 2000
                // seeds the largest error was 7.5e-8 of max(|want|, 1).
                assert!(
                    (after[i] as f64 - want).abs() < 1e-6 * want.abs().max(1.0),
                    "norm {total}: {} vs {want}",
                    after[i]
                );
            }
        }
        eprintln!("scale {scale}: max error {worst:.3e} (relative, floor 1)");
        if scale < 0.1 {
            assert_eq!(want_scale, 1.0, "small gradients are not clipped");
        } else {
            assert!(want_scale < 0.1, "large gradients are clipped");
        }
    }
}

#[test]
fn percentile_clipping_follows_the_history_of_each_parameter() {
    let mut rng = rng("percentile_clipping");
    let n = 1000;
    let w = var(&mut rng, n);
    let percentile = 80;
    let config = SGDConfig {
        lr: 1.0,
        settings: Settings {
            percentile_clipping: percentile,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = SGD::new(vec![w.clone()], config).unwrap();
    let mut history: Vec<f64> = Vec::new();
    let (mut clipped, mut worst) = (0, 0f64);
    for step in 0..130 {
        // Mostly ordinary gradients, now and then a spike 50x larger.
        let scale = if step % 17 == 16 {
            50.0
        } else {
            rng.random_range(0.5..1.5)
        };
        let g = randn(&mut rng, n, scale);
        let before = w.to_vec1::<f32>().unwrap();
        opt.backward_step(&loss(&[&w], std::slice::from_ref(&g)))
            .unwrap();
        let after = w.to_vec1::<f32>().unwrap();
        let delta: Vec<f32> = before.iter().zip(&after).map(|(x, y)| x - y).collect();

        let sq = norm(&g).powi(2);
        if history.len() == 100 {
            history.remove(0);
        }
        history.push(sq);
        let mut sorted = history.clone();
        sorted.sort_by(f64::total_cmp);
        let clip = sorted[(percentile as usize * sorted.len() / 100).min(sorted.len() - 1)].sqrt();
        let want = norm(&g).min(clip);
        if want < norm(&g) * 0.999 {
            clipped += 1;
        }
        worst = worst.max((norm(&delta) - want).abs() / want.max(1.0));
        // The update measured from f32 params: each element is off by its two roundings, an
        // ulp of |p| (< 50) or < 4e-6, so the norm by < sqrt(1000)·4e-6 = 1.3e-4 at the very
        // worst, against a bound of 1e-4 times an update norm of at least ~15 (0.5·sqrt(1000));
        // over 1000 seeds the largest error was 2.9e-7 of the update norm.
        assert!(
            (norm(&delta) - want).abs() < 1e-4 * want.max(1.0),
            "step {step}: update norm {} vs {want}",
            norm(&delta)
        );
    }
    eprintln!("max update-norm error {worst:.3e} (relative, floor 1)");
    assert!(clipped >= 7, "every spike is clipped ({clipped})");
}

/// A step with NaN or ±inf in one gradient leaves every parameter and state bit-identical and
/// is counted; a parameter without a gradient is left alone; the Error policy errors.
macro_rules! check_non_finite {
    ($rng:expr, $($ty:ident: $config:expr),+ $(,)?) => {$({
        let rng: &mut TestRng = $rng;
        let (a, b, idle) = (var(rng, 5000), var(rng, 300), var(rng, 4096));
        let mut opt = $ty::new(vec![a.clone(), b.clone(), idle.clone()], $config).unwrap();
        let grads = vec![randn(rng, 5000, 1.0), randn(rng, 300, 1.0)];
        let idle_before = idle.to_vec1::<f32>().unwrap();
        let idle_state = format!("{:?}", opt.states().unwrap()[2].1);
        opt.backward_step(&loss(&[&a, &b], &grads)).unwrap();
        assert_eq!(idle.to_vec1::<f32>().unwrap(), idle_before, "{}: idle param", stringify!($ty));
        assert_eq!(format!("{:?}", opt.states().unwrap()[2].1), idle_state);
        let snapshot = |opt: &$ty| {
            (
                a.to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
                opt.states().unwrap().into_iter().map(|(_, s)| format!("{s:?}")).collect::<Vec<_>>(),
            )
        };
        let before = snapshot(&opt);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut g = grads.clone();
            let i = rng.random_range(0..300);
            g[1][i] = bad;
            opt.backward_step(&loss(&[&a, &b], &g)).unwrap();
            assert!(snapshot(&opt) == before, "{}: {bad} changed something", stringify!($ty));
        }
        assert_eq!((opt.step_count(), opt.skipped_steps()), (1, 3), "{}", stringify!($ty));
        type Config = <$ty as Optimizer>::Config;
        let base: Config = $config;
        let strict_config = Config {
            settings: Settings {
                non_finite: NonFinitePolicy::Error,
                ..base.settings.clone()
            },
            ..base
        };
        let mut strict = $ty::new(vec![b.clone()], strict_config).unwrap();
        let mut g = vec![grads[1].clone()];
        g[0][7] = f32::NAN;
        let err = strict.backward_step(&loss(&[&b], &g)).unwrap_err().to_string();
        assert!(err.contains("parameter 0") && err.contains("not finite"), "{err}");
        assert!(snapshot(&opt) == before);
    })+};
}

#[test]
fn non_finite_gradients_change_nothing_in_any_optimizer() {
    let mut rng = rng("non_finite_all");
    check_non_finite!(
        &mut rng,
        Adam8bit: Adam8bitConfig::default(),
        AdamW: AdamWConfig::default(),
        AdamW8bit: AdamW8bitConfig { settings: Settings { max_grad_norm: Some(1.0), percentile_clipping: 50, ..Default::default() }, ..Default::default() },
        SGD8bit: SGD8bitConfig { momentum: 0.9, ..Default::default() },
        Lion8bit: Lion8bitConfig::default(),
        RMSprop8bit: RMSprop8bitConfig { momentum: 0.5, centered: true, ..Default::default() },
        Adagrad8bit: Adagrad8bitConfig::default(),
        LAMB8bit: LAMB8bitConfig::default(),
        LARS8bit: LARS8bitConfig { momentum: 0.9, ..Default::default() },
        AdEMAMix8bit: AdEMAMix8bitConfig::default(),
        AdEMAMix: AdEMAMixConfig::default(),
    );
}

/// Each parameter counts its own steps (as torch does): one that first gets a gradient at step 4
/// is bias-corrected as at its step 1, exactly like a fresh optimizer over it alone.
#[test]
fn a_parameter_joining_late_starts_its_own_step_count() {
    let mut rng = rng("late_parameter");
    let (a, b) = (var(&mut rng, 700), var(&mut rng, 500));
    let b_alone = Var::from_tensor(&b.as_tensor().copy().unwrap()).unwrap();
    let config = AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut both = AdamW::new(vec![a.clone(), b.clone()], config.clone()).unwrap();
    let mut alone = AdamW::new(vec![b_alone.clone()], config).unwrap();
    for step in 0..8 {
        let ga = randn(&mut rng, 700, 1.0);
        let gb = randn(&mut rng, 500, 1.0);
        if step < 3 {
            both.backward_step(&loss(&[&a], &[ga])).unwrap();
        } else {
            both.backward_step(&loss(&[&a, &b], &[ga, gb.clone()]))
                .unwrap();
            alone.backward_step(&loss(&[&b_alone], &[gb])).unwrap();
        }
    }
    assert_eq!(
        b.to_vec1::<f32>().unwrap(),
        b_alone.to_vec1::<f32>().unwrap()
    );
    assert_eq!(both.step_count(), 8);
}
