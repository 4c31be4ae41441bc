//! Sums of squares for the optimizers' gradient pre-pass (norms, clipping, finiteness).

use rayon::prelude::*;

use super::{absmax_bits, Element, Isa, IsaKind, MAX_BLOCK, PARALLEL_MIN_ELEMS};

/// Lanes summed independently: four AVX2 vectors, so the adds pipeline and vectorise.
const LANES: usize = 32;

/// `Σ x²` over a chunk in f32, lanes in a fixed order (the same result on every path).
#[inline(always)]
fn sum_squares_f32_body(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    for (a, &x) in acc.iter_mut().zip(chunks.remainder()) {
        *a += x * x;
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_squares_f32_avx2(xs: &[f32]) -> f32 {
    sum_squares_f32_body(xs)
}

fn sum_squares_f32(isa: Isa, xs: &[f32]) -> f32 {
    match isa.kind() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` is only made by `Isa::available`, after detection; both AVX paths imply AVX2.
        IsaKind::Avx2 | IsaKind::Avx512 => unsafe { sum_squares_f32_avx2(xs) },
        _ => sum_squares_f32_body(xs),
    }
}

/// `Σ x²` in f64: NaN when some element is NaN or infinite, finite otherwise (f32 partial sums
/// that overflow are redone in f64, so huge finite gradients are not mistaken for infinite ones).
/// Chunks are summed in index order, so the result does not depend on the thread count.
pub(crate) fn sum_squares<T: Element>(isa: Isa, xs: &[T]) -> f64 {
    let chunk = |c: &[T]| -> f64 {
        let mut buf = [0f32; MAX_BLOCK];
        let xf = T::load_f32(c, &mut buf[..c.len()]);
        let s = sum_squares_f32(isa, xf);
        if s.is_finite() {
            s as f64
        } else if absmax_bits(isa, xf) >= 0x7F80_0000 {
            f64::NAN
        } else {
            xf.iter().map(|&x| x as f64 * x as f64).sum()
        }
    };
    let sums: Vec<f64> = if xs.len() >= PARALLEL_MIN_ELEMS {
        xs.par_chunks(MAX_BLOCK).map(chunk).collect()
    } else {
        xs.chunks(MAX_BLOCK).map(chunk).collect()
    };
    sums.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_sums_like_f64_and_flags_non_finite_values() {
        let xs: Vec<f32> = (0..10_007)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
            .collect();
        let exact: f64 = xs.iter().map(|&x| x as f64 * x as f64).sum();
        let mut results = Vec::new();
        for isa in Isa::available() {
            let s = sum_squares(isa, &xs);
            assert!((s - exact).abs() / exact < 1e-5, "{isa:?}: {s} vs {exact}");
            results.push(s);
            let mut big = xs.clone();
            big[5000] = 3e30; // its square overflows f32 but is finite
            assert!((sum_squares(isa, &big) / 9e60 - 1.0).abs() < 1e-6);
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut ys = xs.clone();
                ys[7777] = bad;
                assert!(sum_squares(isa, &ys).is_nan(), "{isa:?} {bad}");
            }
            assert_eq!(sum_squares::<f32>(isa, &[]), 0.0);
        }
        assert!(results.windows(2).all(|w| w[0] == w[1]), "{results:?}");
    }
}
