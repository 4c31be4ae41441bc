//! Exact comparisons of an f32 with the midpoint of two f32 values: the boundaries of
//! nearest-value quantization, computed without rounding (the midpoint of two f32 values needs
//! more precision than an f64 sum keeps when they are far apart).

use std::cmp::Ordering;

/// Exact `a + b` as an unevaluated pair `(s, e)` with `s = fl(a + b)` and `s + e = a + b`.
fn two_sum(a: f64, b: f64) -> (f64, f64) {
    let s = a + b;
    let bb = s - a;
    let e = (a - (s - bb)) + (b - bb);
    (s, e)
}

/// The exact midpoint `(lo + hi) / 2` of two f32 values as `(half, err)` with
/// `midpoint = half + err / 2` and `|err / 2|` smaller than any nonzero `|y - half|` for f32 `y`.
fn exact_midpoint(lo: f32, hi: f32) -> (f64, f64) {
    let (s, e) = two_sum(lo as f64, hi as f64);
    (s * 0.5, e)
}

/// Compares `y` with the exact midpoint of `lo` and `hi`.
pub(crate) fn cmp_to_midpoint(y: f32, lo: f32, hi: f32) -> Ordering {
    let (half, err) = exact_midpoint(lo, hi);
    match (y as f64).partial_cmp(&half) {
        Some(Ordering::Equal) => 0f64.partial_cmp(&err).unwrap_or(Ordering::Equal),
        Some(o) => o,
        None => Ordering::Equal,
    }
}

/// The smallest f32 `y` that lies above the exact midpoint of `lo < hi`, or on it when `tie_up`:
/// the first input that quantizes to the upper side of this boundary.
pub(crate) fn first_above_midpoint(lo: f32, hi: f32, tie_up: bool) -> f32 {
    // The f32 nearest the midpoint, or its successor, is the first one on the upper side.
    let c = exact_midpoint(lo, hi).0 as f32;
    match cmp_to_midpoint(c, lo, hi) {
        Ordering::Greater => c,
        Ordering::Equal if tie_up => c,
        _ => c.next_up(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_sum_is_exact_for_far_apart_values() {
        let (s, e) = two_sum(0.5, 1e-30);
        assert_eq!(s, 0.5);
        assert_eq!(e, 1e-30);
    }

    #[test]
    fn midpoint_comparison_sees_below_f64_resolution() {
        // The midpoint of -1e-30 and 0.5 is just below 0.25; 0.25 itself is above it.
        assert_eq!(cmp_to_midpoint(0.25, -1e-30, 0.5), Ordering::Greater);
        assert_eq!(cmp_to_midpoint(0.25, 1e-30, 0.5), Ordering::Less);
        assert_eq!(cmp_to_midpoint(0.25, 0.0, 0.5), Ordering::Equal);
        assert_eq!(first_above_midpoint(1e-30, 0.5, true), 0.25f32.next_up());
        assert_eq!(first_above_midpoint(-1e-30, 0.5, false), 0.25);
        assert_eq!(first_above_midpoint(0.0, 0.5, true), 0.25);
        assert_eq!(first_above_midpoint(0.0, 0.5, false), 0.25f32.next_up());
    }
}
