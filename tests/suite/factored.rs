//! Adafactor and CAME (issue 16) against the f64 references of `factored_reference.rs`, their
//! 8-bit forms against their 32-bit ones, their state sizes, checks and checkpoints.

use candle_bnb::kernels::{Factoring, Momentum, ParamState};
use candle_bnb::optim::{
    Adafactor, Adafactor8bit, AdafactorConfig, CAME8bit, CAMEConfig, Optim, OptimizerConfig,
    Settings, CAME,
};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use half::{bf16, f16};

use crate::common::{randn, rng, temp_dir, TestRng};
use crate::factored_reference::{
    adafactor_step, came_step, AdafactorRef, CameRef, FactoredRefState,
};

/// The shapes the issue names: a vector, a matrix whose sides are not multiples of the lanes, a
/// batch of matrices, a single row, and zero-sized dims.
const SHAPES: [&[usize]; 6] = [
    &[7],
    &[33, 65],
    &[3, 17, 9],
    &[1, 4096],
    &[0, 5],
    &[4, 0, 3],
];

/// One algorithm under test: our config and the reference's.
#[derive(Clone, Debug)]
enum Case {
    Adafactor(AdafactorConfig, AdafactorRef),
    Came(CAMEConfig, CameRef),
}

impl Case {
    fn cases() -> Vec<(&'static str, Case)> {
        let adafactor_fixed = AdafactorConfig {
            lr: Some(0.05),
            relative_step: false,
            scale_parameter: false,
            beta1: Some(0.9),
            weight_decay: 0.1,
            clip_threshold: 0.5,
            ..Default::default()
        };
        let adafactor_warmup = AdafactorConfig {
            warmup_init: true,
            beta1: Some(0.8),
            weight_decay: 0.01,
            decay_rate: -0.5,
            ..Default::default()
        };
        let came = CAMEConfig {
            lr: 0.05,
            weight_decay: 0.1,
            betas: (0.8, 0.99, 0.995),
            eps: (1e-30, 1e-3),
            ..Default::default()
        };
        [
            (
                "adafactor defaults",
                Case::adafactor(AdafactorConfig::default()),
            ),
            (
                "adafactor fixed lr, momentum",
                Case::adafactor(adafactor_fixed),
            ),
            (
                "adafactor warm-up, momentum",
                Case::adafactor(adafactor_warmup),
            ),
            ("came", Case::came(came)),
            (
                "came defaults",
                Case::came(CAMEConfig {
                    lr: 0.05,
                    ..Default::default()
                }),
            ),
        ]
        .into()
    }

    fn adafactor(c: AdafactorConfig) -> Self {
        let r = AdafactorRef {
            lr: c.lr,
            eps1: c.eps.0,
            eps2: c.eps.1,
            clip_threshold: c.clip_threshold,
            decay_rate: c.decay_rate,
            beta1: c.beta1,
            weight_decay: c.weight_decay,
            scale_parameter: c.scale_parameter,
            relative_step: c.relative_step,
            warmup_init: c.warmup_init,
        };
        Case::Adafactor(c, r)
    }

    fn came(c: CAMEConfig) -> Self {
        let r = CameRef {
            lr: c.lr,
            eps1: c.eps.0,
            eps2: c.eps.1,
            clip_threshold: c.clip_threshold,
            betas: c.betas,
            weight_decay: c.weight_decay,
        };
        Case::Came(c, r)
    }

    fn reference_step(&self, shape: &[usize], p: &mut [f64], g: &[f64], s: &mut FactoredRefState) {
        match self {
            Case::Adafactor(_, r) => adafactor_step(r, shape, p, g, s),
            Case::Came(_, r) => came_step(r, shape, p, g, s),
        }
    }

    /// Our optimizer over `vars` at `bits`.
    fn optimizer(
        &self,
        vars: Vec<Var>,
        bits: u32,
    ) -> Box<dyn FnMut(&candle_core::backprop::GradStore)> {
        fn boxed<C: OptimizerConfig, const B: u32>(
            vars: Vec<Var>,
            c: C,
        ) -> Box<dyn FnMut(&candle_core::backprop::GradStore)> {
            let mut opt = Optim::<C, B>::new(vars, c).unwrap();
            Box::new(move |g| opt.step(g).unwrap())
        }
        match (self, bits) {
            (Case::Adafactor(c, _), 32) => boxed::<_, 32>(vars, c.clone()),
            (Case::Adafactor(c, _), _) => boxed::<_, 8>(vars, c.clone()),
            (Case::Came(c, _), 32) => boxed::<_, 32>(vars, c.clone()),
            (Case::Came(c, _), _) => boxed::<_, 8>(vars, c.clone()),
        }
    }
}

/// The gradients of `sum(w·g)` over every var: exactly `grads` (in the vars' dtype).
fn grads_of(vars: &[Var], grads: &[Tensor]) -> candle_core::backprop::GradStore {
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for (v, g) in vars.iter().zip(grads) {
        let term = (v.as_tensor() * g).unwrap().sum_all().unwrap();
        loss = (loss + term.to_dtype(DType::F32).unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn rms(x: &[f64]) -> f64 {
    (x.iter().map(|v| v * v).sum::<f64>() / x.len().max(1) as f64).sqrt()
}

/// `values` rounded to `dtype`, as f64.
fn rounded(values: &[f64], dtype: DType) -> Vec<f64> {
    match dtype {
        DType::F16 => values.iter().map(|&v| f16::from_f64(v).to_f64()).collect(),
        DType::BF16 => values.iter().map(|&v| bf16::from_f64(v).to_f64()).collect(),
        _ => values.iter().map(|&v| v as f32 as f64).collect(),
    }
}

/// Half the distance from `v` to the next representable value of `dtype` above |v|: the most a
/// value correctly rounded to nearest differs from the exact one.
fn half_ulp(v: f64, dtype: DType) -> f64 {
    let bits = match dtype {
        DType::F16 => 11,
        DType::BF16 => 8,
        _ => 24,
    };
    let exp = v.abs().max(f64::MIN_POSITIVE).log2().floor();
    // f16's subnormals are 2^-24 apart.
    let floor = if dtype == DType::F16 {
        2f64.powi(-25)
    } else {
        0.0
    };
    2f64.powf(exp - bits as f64).max(floor)
}

/// Fresh parameters and 10 steps of gradients for each shape, from the seeded RNG.
fn draw(rng: &mut TestRng, dtype: DType, steps: usize) -> (Vec<Tensor>, Vec<Vec<Tensor>>) {
    let tensor = |rng: &mut TestRng, shape: &[usize], scale: f32| {
        let n = shape.iter().product();
        Tensor::from_vec(randn(rng, n, scale), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let params = SHAPES.iter().map(|s| tensor(rng, s, 1.0)).collect();
    let grads = (0..steps)
        .map(|_| SHAPES.iter().map(|s| tensor(rng, s, 0.5)).collect())
        .collect();
    (params, grads)
}

#[test]
fn f32_trajectories_follow_the_f64_references_for_10_steps() {
    let mut rng = rng("factored_f32_trajectories");
    for (name, case) in Case::cases() {
        let (params, grads) = draw(&mut rng, DType::F32, 10);
        let vars: Vec<Var> = params
            .iter()
            .map(|p| Var::from_tensor(p).unwrap())
            .collect();
        let mut step = case.optimizer(vars.clone(), 32);
        let mut reference: Vec<Vec<f64>> = params.iter().map(to_f64).collect();
        let mut states = vec![FactoredRefState::default(); SHAPES.len()];
        for g in &grads {
            step(&grads_of(&vars, g));
            for (i, shape) in SHAPES.iter().enumerate() {
                if reference[i].is_empty() {
                    continue;
                }
                case.reference_step(shape, &mut reference[i], &to_f64(&g[i]), &mut states[i]);
            }
        }
        for (i, shape) in SHAPES.iter().enumerate() {
            let ours = to_f64(vars[i].as_tensor());
            let start = to_f64(&params[i]);
            assert_eq!(ours.len(), reference[i].len());
            let moved = rms(&ours
                .iter()
                .zip(&start)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>());
            // The warm-up moves by 1e-6·t: f32 cannot see it to 1e-3 (the bound below still
            // holds it to the reference).
            if !ours.is_empty() && !name.contains("warm-up") {
                // The test sees the update: 10 steps move the parameters by at least 1 % of
                // their RMS, so an update wrong by 1e-3 would break the 1e-5 bound.
                assert!(
                    moved > 1e-2 * rms(&start),
                    "{name} {shape:?}: moved {moved:e}"
                );
            }
            // 1e-5 relative, floored at 1e-5 of the parameter's RMS: an element that ends near 0
            // keeps the f32 rounding (6e-8 relative per step) of the values it passed through.
            let floor = rms(&reference[i]);
            for (k, (a, b)) in ours.iter().zip(&reference[i]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs().max(floor),
                    "{name} {shape:?}[{k}]: ours {a:e}, reference {b:e}"
                );
            }
        }
    }
}

#[test]
fn half_precision_steps_round_the_reference_step_once() {
    let mut rng = rng("factored_half_steps");
    for dtype in [DType::F16, DType::BF16] {
        for (name, case) in Case::cases() {
            let (params, grads) = draw(&mut rng, dtype, 10);
            let vars: Vec<Var> = params
                .iter()
                .map(|p| Var::from_tensor(p).unwrap())
                .collect();
            let mut step = case.optimizer(vars.clone(), 32);
            let mut states = vec![FactoredRefState::default(); SHAPES.len()];
            for g in &grads {
                // Each step from our parameters: both round once per step, and an exact value
                // within f32 rounding of a rounding boundary may round either way, so errors
                // are bounded per step, not accumulated over a trajectory.
                let before: Vec<Vec<f64>> = vars.iter().map(|v| to_f64(v.as_tensor())).collect();
                step(&grads_of(&vars, g));
                for (i, shape) in SHAPES.iter().enumerate() {
                    let mut reference = before[i].clone();
                    if reference.is_empty() {
                        continue;
                    }
                    case.reference_step(shape, &mut reference, &to_f64(&g[i]), &mut states[i]);
                    let want = rounded(&reference, dtype);
                    let ours = to_f64(vars[i].as_tensor());
                    let steps = ours.iter().zip(&want).zip(&reference).zip(&before[i]);
                    for (k, (((a, w), exact), b)) in steps.enumerate() {
                        // One step of the dtype from the correctly rounded value (which ours is
                        // unless the exact value lies within the f32 error of a rounding
                        // boundary), plus that error: 1e-5 of the update (as the f32 test
                        // bounds it) and f32 rounding of the parameter.
                        let tolerance = 2.0 * half_ulp(*exact, dtype)
                            + 1e-5 * (exact - b).abs()
                            + 1e-7 * b.abs();
                        assert!(
                            (a - w).abs() <= tolerance,
                            "{name} {dtype:?} {shape:?}[{k}]: ours {a:e}, reference {w:e} (exact {exact:e})"
                        );
                    }
                }
            }
        }
    }
}
