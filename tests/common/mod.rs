//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses a subset

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

pub type TestRng = rand::rngs::StdRng;

/// A fresh seed per run (printed, and reusable through `CANDLE_BNB_TEST_SEED`).
pub fn rng(test: &str) -> TestRng {
    let seed = std::env::var("CANDLE_BNB_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("{test}: CANDLE_BNB_TEST_SEED={seed}");
    TestRng::seed_from_u64(seed)
}

/// `n` draws from N(0, scale²).
pub fn randn(rng: &mut TestRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f32 = StandardNormal.sample(rng);
            scale * z
        })
        .collect()
}
