//! Every optimizer's 32-bit path against a scalar f64 reference written from its paper's (or
//! torch's) formulas, and its 8-bit path against its 32-bit path.

use candle_bnb::kernels::{LionRule, SgdRule};
use candle_bnb::optim::{
    Lion, Lion8bit, Lion8bitConfig, LionConfig, SGD8bit, SGD8bitConfig, SGDConfig, SGD,
};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use rand::Rng;

mod common;
use common::{eight_bit_vs_32_bit, randn, rng, TestRng};

/// Runs `opt` for `steps` steps on fresh random gradients; the reference `step(t, p, g, state)`
/// follows each element in f64. Returns the max relative difference (f32 rounding accumulated
/// over the steps stays near 1e-5; a wrong formula is off by far more).
fn run_against_reference<O: Optimizer>(
    rng: &mut TestRng,
    config: O::Config,
    steps: u64,
    mut reference: impl FnMut(u64, &mut f64, f64, &mut Vec<f64>),
) -> f64 {
    let n = rng.random_range(1..3000);
    let init = randn(rng, n, 1.0);
    let w = Var::from_tensor(&Tensor::from_vec(init.clone(), n, &Device::Cpu).unwrap()).unwrap();
    let mut opt = O::new(vec![w.clone()], config).unwrap();
    let mut p: Vec<f64> = init.iter().map(|&x| x as f64).collect();
    let mut states: Vec<Vec<f64>> = vec![Vec::new(); n];
    for t in 1..=steps {
        let g = randn(rng, n, 0.5);
        let gt = Tensor::from_vec(g.clone(), n, &Device::Cpu).unwrap();
        opt.backward_step(&(w.as_tensor() * &gt).unwrap().sum_all().unwrap())
            .unwrap();
        for i in 0..n {
            reference(t, &mut p[i], g[i] as f64, &mut states[i]);
        }
    }
    let got = w.to_vec1::<f32>().unwrap();
    got.iter()
        .zip(&p)
        .map(|(&a, &b)| (a as f64 - b).abs() / b.abs().max(1e-2))
        .fold(0.0, f64::max)
}

#[test]
fn lion_32bit_follows_the_paper() {
    let mut rng = rng("lion_32bit");
    let (lr, b1, b2, wd) = (1e-3, 0.9, 0.99, 0.1);
    let config = LionConfig {
        lr,
        beta1: b1,
        beta2: b2,
        weight_decay: wd,
        ..Default::default()
    };
    let err = run_against_reference::<Lion>(&mut rng, config, 30, |_, p, g, s| {
        if s.is_empty() {
            s.push(0.0);
        }
        let c = b1 * s[0] + (1.0 - b1) * g;
        *p = *p * (1.0 - lr * wd)
            - lr * if c > 0.0 {
                1.0
            } else if c < 0.0 {
                -1.0
            } else {
                0.0
            };
        s[0] = b2 * s[0] + (1.0 - b2) * g;
    });
    assert!(err < 1e-4, "max relative error {err}");
}

#[test]
fn sgd_32bit_follows_torch_for_every_momentum_variant() {
    let mut rng = rng("sgd_32bit");
    for (momentum, dampening, nesterov, wd) in [
        (0.0, 0.0, false, 0.0),
        (0.9, 0.0, false, 1e-2),
        (0.9, 0.3, false, 0.0),
        (0.8, 0.0, true, 1e-3),
    ] {
        let lr = 0.05;
        let config = SGDConfig {
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay: wd,
            ..Default::default()
        };
        let err = run_against_reference::<SGD>(&mut rng, config, 25, |t, p, g, s| {
            let mut g = g + wd * *p;
            if momentum != 0.0 {
                if t == 1 {
                    s.push(g);
                } else {
                    s[0] = momentum * s[0] + (1.0 - dampening) * g;
                }
                g = if nesterov { g + momentum * s[0] } else { s[0] };
            }
            *p -= lr * g;
        });
        assert!(
            err < 1e-4,
            "momentum {momentum} dampening {dampening} nesterov {nesterov}: {err}"
        );
    }
    let w = Var::zeros(5000, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        SGD::new(vec![w], SGDConfig::default())
            .unwrap()
            .state_bytes(),
        0
    );
}

#[test]
fn eight_bit_paths_stay_near_their_32_bit_paths() {
    const N: usize = 4096 * 5 + 77;
    let mut rng = rng("eight_bit_vs_32_bit");
    let (abs, rel) = eight_bit_vs_32_bit(
        &mut rng,
        |_| LionRule::new(1e-4, 0.9, 0.99, 0.0),
        N,
        256,
        40,
        0.1,
    );
    eprintln!("lion: mean |err| {abs:.2e}, rel {rel:.2e}");
    assert!(abs > 0.0 && abs < 6e-5 && rel < 6e-4, "lion: {abs} {rel}");
    let (abs, rel) = eight_bit_vs_32_bit(
        &mut rng,
        |t| SgdRule::new(t, 1e-3, 0.9, 0.0, 0.0, false),
        N,
        256,
        40,
        0.1,
    );
    eprintln!("sgd: mean |err| {abs:.2e}, rel {rel:.2e}");
    assert!(abs > 0.0 && abs < 6e-5 && rel < 6e-4, "sgd: {abs} {rel}");
}

#[test]
fn eight_bit_forms_default_to_8_bit_state() {
    let w = || vec![Var::zeros(1 << 16, DType::F32, &Device::Cpu).unwrap()];
    let lion = Lion8bit::new(w(), Lion8bitConfig::default()).unwrap();
    assert_eq!(lion.state_bytes(), (1 << 16) + 4 * (1 << 8));
    let sgd = SGD8bit::new(
        w(),
        SGD8bitConfig {
            momentum: 0.9,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(sgd.state_bytes(), (1 << 16) + 4 * (1 << 8));
    let err = SGD::new(
        w(),
        SGDConfig {
            nesterov: true,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("nesterov needs momentum > 0"), "{err}");
}
