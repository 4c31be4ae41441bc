//! The floating-point element types the kernels read and write, seen through f32.

use half::{bf16, f16, slice::HalfFloatSliceExt};

/// A tensor element type whose values the kernels process as f32.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    const ZERO: Self;

    fn to_f32(self) -> f32;

    /// `src` as f32: borrowed when it already is, else converted into `buf` (same length).
    fn load_f32<'a>(src: &'a [Self], buf: &'a mut [f32]) -> &'a [f32];

    /// Lets `fill` write f32 values that end up in `dst`, rounded to nearest-even
    /// (`buf` has `dst`'s length and is used only when a conversion is needed).
    fn store_f32(dst: &mut [Self], buf: &mut [f32], fill: impl FnOnce(&mut [f32]));

    /// Lets `f` update `values` in place as f32 (through `buf`, same length, when converting).
    fn update_f32(values: &mut [Self], buf: &mut [f32], f: impl FnOnce(&mut [f32])) {
        Self::load_f32(values, buf);
        Self::store_f32(values, buf, f);
    }
}

impl Element for f32 {
    const ZERO: Self = 0.0;

    fn to_f32(self) -> f32 {
        self
    }

    fn load_f32<'a>(src: &'a [f32], _buf: &'a mut [f32]) -> &'a [f32] {
        src
    }

    fn store_f32(dst: &mut [f32], _buf: &mut [f32], fill: impl FnOnce(&mut [f32])) {
        fill(dst)
    }

    fn update_f32(values: &mut [f32], _buf: &mut [f32], f: impl FnOnce(&mut [f32])) {
        f(values)
    }
}

impl Element for f16 {
    const ZERO: Self = f16::ZERO;

    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }

    fn load_f32<'a>(src: &'a [f16], buf: &'a mut [f32]) -> &'a [f32] {
        // `half` converts with F16C when the CPU has it (detected at run time).
        src.convert_to_f32_slice(buf);
        buf
    }

    fn store_f32(dst: &mut [f16], buf: &mut [f32], fill: impl FnOnce(&mut [f32])) {
        fill(buf);
        dst.convert_from_f32_slice(buf);
    }
}

impl Element for bf16 {
    const ZERO: Self = bf16::ZERO;

    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }

    fn load_f32<'a>(src: &'a [bf16], buf: &'a mut [f32]) -> &'a [f32] {
        // bf16 is the top half of an f32: a shift, which the compiler vectorises.
        for (d, s) in buf.iter_mut().zip(src) {
            *d = f32::from_bits((s.to_bits() as u32) << 16);
        }
        buf
    }

    fn store_f32(dst: &mut [bf16], buf: &mut [f32], fill: impl FnOnce(&mut [f32])) {
        fill(buf);
        for (d, s) in dst.iter_mut().zip(buf.iter()) {
            *d = bf16_round(*s);
        }
    }
}

/// f32 to bf16, round to nearest even, branch-free so the loop vectorises; NaN stays NaN.
#[inline(always)]
fn bf16_round(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    let is_nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    bf16::from_bits(if is_nan {
        ((b >> 16) as u16) | 0x0040
    } else {
        rounded
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let specials = [
            0.0f32,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
        ];
        for x in specials
            .into_iter()
            .chain((0..100_000).map(|_| f32::from_bits(rng.random())))
        {
            let want = bf16::from_f32(x);
            let got = bf16_round(x);
            if x.is_nan() {
                assert!(got.is_nan());
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "x = {x:e}");
            }
        }
    }
}
