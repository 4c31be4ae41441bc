//! f64 references of Hugging Face transformers' `Adafactor` and came_pytorch's `CAME`, written from
//! the step-by-step specification in `docs/factored-optimizers.md` (not from any kernel of ours),
//! for the factored optimizers of issue 16 to be tested against; checked here against closed forms
//! the formulas give for rank-one gradients, where the factored second moment is exact.

/// Adafactor's settings, as transformers names them.
#[derive(Clone, Copy, Debug)]
pub struct AdafactorRef {
    pub lr: Option<f64>,
    pub eps1: f64,
    pub eps2: f64,
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorRef {
    fn default() -> Self {
        Self {
            lr: None,
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

/// CAME's settings, as came_pytorch names them.
#[derive(Clone, Copy, Debug)]
pub struct CameRef {
    pub lr: f64,
    pub eps1: f64,
    pub eps2: f64,
    pub clip_threshold: f64,
    pub betas: (f64, f64, f64),
    pub weight_decay: f64,
}

impl Default for CameRef {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            eps1: 1e-30,
            eps2: 1e-16,
            clip_threshold: 1.0,
            betas: (0.9, 0.999, 0.9999),
            weight_decay: 0.0,
        }
    }
}

/// One parameter's state: row and column statistics per leading index for a tensor of two or
/// more dims (`factored`), else a full second moment; the momentum; CAME's residual statistics.
#[derive(Clone, Debug, Default)]
pub struct FactoredRefState {
    pub step: u64,
    pub row: Vec<f64>,
    pub col: Vec<f64>,
    pub v: Vec<f64>,
    pub m: Vec<f64>,
    pub res_row: Vec<f64>,
    pub res_col: Vec<f64>,
}

/// `(batch, n, m)` of a shape: its last two dims and the product of the others; `None` for
/// fewer than two dims (not factored).
fn factored_dims(shape: &[usize]) -> Option<(usize, usize, usize)> {
    let d = shape.len();
    (d >= 2).then(|| (shape[..d - 2].iter().product(), shape[d - 2], shape[d - 1]))
}

fn rms(x: &[f64]) -> f64 {
    (x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64).sqrt()
}

/// The EMAs of the row and column means of `x` (`[batch, n, m]`) with decay `beta`, then
/// `rsqrt(row / mean(row)) ⊗ rsqrt(col) ⊙ y` over `[batch, n, m]`.
fn factored_scale(
    (batch, n, m): (usize, usize, usize),
    x: &[f64],
    beta: f64,
    row: &mut [f64],
    col: &mut [f64],
    y: &[f64],
) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for b in 0..batch {
        for i in 0..n {
            let mean = (0..m).map(|j| x[(b * n + i) * m + j]).sum::<f64>() / m as f64;
            row[b * n + i] = beta * row[b * n + i] + (1.0 - beta) * mean;
        }
        for j in 0..m {
            let mean = (0..n).map(|i| x[(b * n + i) * m + j]).sum::<f64>() / n as f64;
            col[b * m + j] = beta * col[b * m + j] + (1.0 - beta) * mean;
        }
        let row_mean = row[b * n..(b + 1) * n].iter().sum::<f64>() / n as f64;
        for i in 0..n {
            let r = (row[b * n + i] / row_mean).sqrt().recip();
            for j in 0..m {
                let k = (b * n + i) * m + j;
                out[k] = r * col[b * m + j].sqrt().recip() * y[k];
            }
        }
    }
    out
}

/// The second-moment part shared by both: `U` from `g` (state created on the first call).
fn second_moment(
    shape: &[usize],
    g: &[f64],
    eps1: f64,
    beta2: f64,
    s: &mut FactoredRefState,
) -> Vec<f64> {
    let g2: Vec<f64> = g.iter().map(|g| g * g + eps1).collect();
    match factored_dims(shape) {
        Some((batch, n, m)) => {
            s.row.resize(batch * n, 0.0);
            s.col.resize(batch * m, 0.0);
            factored_scale((batch, n, m), &g2, beta2, &mut s.row, &mut s.col, g)
        }
        None => {
            s.v.resize(g.len(), 0.0);
            s.v.iter_mut()
                .zip(&g2)
                .zip(g)
                .map(|((v, g2), g)| {
                    *v = beta2 * *v + (1.0 - beta2) * g2;
                    g / v.sqrt()
                })
                .collect()
        }
    }
}

/// Divides `u` by `max(1, RMS(u) / clip_threshold)`.
fn clip(u: &mut [f64], clip_threshold: f64) {
    let d = (rms(u) / clip_threshold).max(1.0);
    u.iter_mut().for_each(|x| *x /= d);
}

/// One Adafactor step of parameter `p` (shape `shape`) with gradient `g`.
pub fn adafactor_step(
    c: &AdafactorRef,
    shape: &[usize],
    p: &mut [f64],
    g: &[f64],
    s: &mut FactoredRefState,
) {
    s.step += 1;
    let t = s.step as f64;
    let rms_p = rms(p);
    let rho = if c.relative_step {
        let min_step = if c.warmup_init { 1e-6 * t } else { 1e-2 };
        min_step.min(t.sqrt().recip())
    } else {
        c.lr.expect("an lr without relative_step")
    };
    let alpha = if c.scale_parameter {
        c.eps2.max(rms_p) * rho
    } else {
        rho
    };
    let beta2 = 1.0 - t.powf(c.decay_rate);
    let mut u = second_moment(shape, g, c.eps1, beta2, s);
    clip(&mut u, c.clip_threshold);
    u.iter_mut().for_each(|x| *x *= alpha);
    if let Some(beta1) = c.beta1 {
        s.m.resize(u.len(), 0.0);
        for (m, u) in s.m.iter_mut().zip(u.iter_mut()) {
            *m = beta1 * *m + (1.0 - beta1) * *u;
            *u = *m;
        }
    }
    for (p, u) in p.iter_mut().zip(&u) {
        *p += -c.weight_decay * alpha * *p;
        *p -= u;
    }
}

/// One CAME step of parameter `p` (shape `shape`) with gradient `g`.
pub fn came_step(c: &CameRef, shape: &[usize], p: &mut [f64], g: &[f64], s: &mut FactoredRefState) {
    s.step += 1;
    let (beta1, beta2, beta3) = c.betas;
    let mut u = second_moment(shape, g, c.eps1, beta2, s);
    clip(&mut u, c.clip_threshold);
    s.m.resize(u.len(), 0.0);
    for (m, u) in s.m.iter_mut().zip(&u) {
        *m = beta1 * *m + (1.0 - beta1) * u;
    }
    let update = match factored_dims(shape) {
        Some((batch, n, m)) => {
            let res: Vec<f64> = u
                .iter()
                .zip(&s.m)
                .map(|(u, m)| (u - m) * (u - m) + c.eps2)
                .collect();
            s.res_row.resize(batch * n, 0.0);
            s.res_col.resize(batch * m, 0.0);
            let dims = (batch, n, m);
            factored_scale(dims, &res, beta3, &mut s.res_row, &mut s.res_col, &s.m)
        }
        None => s.m.clone(),
    };
    for (p, d) in p.iter_mut().zip(&update) {
        *p += -c.weight_decay * c.lr * *p;
        *p -= c.lr * d;
    }
}

/// A rank-one gradient `g[b, i, j] = a[i]·b[j]·(b + 1)` over `shape` and a parameter, from the
/// seeded RNG.
fn rank_one(rng: &mut crate::common::TestRng, shape: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let (batch, n, m) = factored_dims(shape).unwrap_or((1, 1, shape.iter().product()));
    let a: Vec<f64> = crate::common::randn(rng, n, 1.0)
        .iter()
        .map(|&x| x as f64)
        .collect();
    let b: Vec<f64> = crate::common::randn(rng, m, 1.0)
        .iter()
        .map(|&x| x as f64)
        .collect();
    let mut g = Vec::with_capacity(batch * n * m);
    for k in 0..batch {
        for ai in &a {
            for bj in &b {
                g.push(ai * bj * (k + 1) as f64);
            }
        }
    }
    let p = crate::common::randn(rng, g.len(), 1.0)
        .iter()
        .map(|&x| x as f64)
        .collect();
    (g, p)
}

/// Equal up to the f64 rounding of the few operations between them (square roots, divisions,
/// means of a handful of terms). Every value here is O(1) (N(0, 1) parameters, steps below 1), so
/// that rounding is ~1e-15 absolute, while the smallest effect the tests look for (a weight decay
/// by ρ instead of α, ε2 of 0.19 in CAME's residual) moves results by more than 1e-9. Absolute, not
/// relative: a parameter near 0 after its step would make a relative bound meaningless.
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

#[test]
fn adafactor_steps_a_rank_one_gradient_by_its_sign() {
    // With a rank-one g² (ε1 negligible) the factored second moment is g² itself, so U = sign(g)
    // (RMS 1, not clipped) and the step is α_t·sign(g), α_t = ρ_t·max(ε2, RMS(p)), ρ_t = 1e-2 for
    // t ≤ 10⁴. The gradient repeats, so each step's statistics stay rank one. Vectors take the
    // unfactored path to the same result.
    let mut rng = crate::common::rng("adafactor_reference");
    for shape in [&[33, 65][..], &[3, 17, 9], &[7], &[1, 4096]] {
        let (g, mut p) = rank_one(&mut rng, shape);
        let mut expected = p.clone();
        let mut state = FactoredRefState::default();
        for _ in 0..5 {
            let alpha = 1e-2 * 1e-3f64.max(rms(&expected));
            for (e, g) in expected.iter_mut().zip(&g) {
                *e -= alpha * g.signum();
            }
            adafactor_step(&AdafactorRef::default(), shape, &mut p, &g, &mut state);
        }
        for (k, (p, e)) in p.iter().zip(&expected).enumerate() {
            assert!(close(*p, *e), "{shape:?} [{k}]: {p} vs {e}");
        }
    }
}

#[test]
fn adafactor_clips_warms_up_decays_and_keeps_momentum() {
    let mut rng = crate::common::rng("adafactor_reference_options");
    let shape = [9, 5];
    let (g, p0) = rank_one(&mut rng, &shape);
    // clip_threshold 0.5 halves the unit update; warm-up gives ρ_t = 1e-6·t; decay by wd·α; the
    // momentum holds lr-scaled updates: m_t = 0.9·m_{t−1} + 0.1·α_t·sign(g).
    let c = AdafactorRef {
        clip_threshold: 0.5,
        warmup_init: true,
        weight_decay: 0.1,
        beta1: Some(0.9),
        ..Default::default()
    };
    let (mut p, mut expected, mut m) = (p0.clone(), p0, vec![0.0; g.len()]);
    let mut state = FactoredRefState::default();
    for t in 1..=4 {
        let alpha = 1e-6 * t as f64 * 1e-3f64.max(rms(&expected));
        for ((e, m), g) in expected.iter_mut().zip(&mut m).zip(&g) {
            *m = 0.9 * *m + 0.1 * alpha * 0.5 * g.signum();
            *e -= 0.1 * alpha * *e;
            *e -= *m;
        }
        adafactor_step(&c, &shape, &mut p, &g, &mut state);
    }
    for (p, e) in p.iter().zip(&expected) {
        assert!(close(*p, *e), "{p} vs {e}");
    }
}

#[test]
fn came_steps_a_rank_one_gradient_by_its_confidence_weighted_sign() {
    // At t = 1 the statistics are (1 − β2)·g² (no bias correction), so U = sign(g)/√(1 − β2),
    // clipped to sign(g); m = 0.1·sign(g); the residual (U − m)² + ε2 = 0.81 + ε2 is constant, so
    // its row factor is 1 and its column factor (1 − β3)·(0.81 + ε2): the step is
    // lr·0.1·sign(g)/√((1 − β3)·0.81). Vectors skip the confidence weighting: lr·0.1·sign(g).
    let mut rng = crate::common::rng("came_reference");
    // ε2 large enough to show in the result, then the default.
    let configs = [
        CameRef {
            eps2: 0.19,
            ..Default::default()
        },
        CameRef::default(),
    ];
    for (c, shape) in configs
        .iter()
        .flat_map(|c| [(c, &[33, 65][..]), (c, &[3, 17, 9]), (c, &[7])])
    {
        let (g, mut p) = rank_one(&mut rng, shape);
        let factor = if shape.len() >= 2 {
            0.1 / (1e-4 * (0.81 + c.eps2)).sqrt()
        } else {
            0.1
        };
        let expected: Vec<f64> = p
            .iter()
            .zip(&g)
            .map(|(p, g)| p - c.lr * factor * g.signum())
            .collect();
        came_step(c, shape, &mut p, &g, &mut FactoredRefState::default());
        for (k, (p, e)) in p.iter().zip(&expected).enumerate() {
            assert!(close(*p, *e), "{shape:?} [{k}]: {p} vs {e}");
        }
    }
}
