//! AVX-512 (F, BW, VL) kernels; each mirrors its twin in `portable.rs` lane for lane. Tails are
//! handled with masks, so no scalar loop is needed.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::lookup::BucketTable;

/// Mask of the first `n` (< 16) lanes, or all 16.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// See `portable::absmax_bits`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn absmax_bits(xs: &[f32]) -> u32 {
    let mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
    let x = xs.as_ptr() as *const i32;
    let n32 = xs.len() / 32 * 32;
    let mut i = 0;
    while i < n32 {
        acc0 = _mm512_max_epu32(
            acc0,
            _mm512_and_si512(_mm512_loadu_si512(x.add(i) as _), mask),
        );
        acc1 = _mm512_max_epu32(
            acc1,
            _mm512_and_si512(_mm512_loadu_si512(x.add(i + 16) as _), mask),
        );
        i += 32;
    }
    while i < xs.len() {
        let v = _mm512_maskz_loadu_epi32(lanes(xs.len() - i), x.add(i));
        acc0 = _mm512_max_epu32(acc0, _mm512_and_si512(v, mask));
        i += 16;
    }
    _mm512_reduce_max_epu32(_mm512_max_epu32(acc0, acc1))
}

/// Loop-invariant registers of the bucket lookup.
struct Lookup8 {
    absmax: __m256,
    base: __m256i,
    shift: __m128i,
    within_mask: __m256i,
    n_buckets: __m256i,
    abs_mask: __m256i,
    flip: __m256i,
}

/// Codes of 8 lanes `y = x / absmax` in the low byte of each 32-bit lane (higher bytes are
/// garbage that `vpmovdb` drops): `BucketTable::code(y)`.
///
/// 256-bit vectors with AVX-512VL masks: on Zen 4, 512-bit gathers and ALU ops cost twice as
/// much per instruction, so the narrower form with fewer instructions (mask compares and
/// masked shifts instead of AVX2's blends) is the faster one.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
unsafe fn code8(y: __m256, k: &Lookup8, t: &BucketTable) -> __m256i {
    let bits = _mm256_castps_si256(y);
    let magnitude = _mm256_and_si256(bits, k.abs_mask);
    let offset = _mm256_sub_epi32(_mm256_max_epu32(magnitude, k.base), k.base);
    // No clamp to the last bucket: |y| <= 1 (see `encode`'s safety contract).
    let bucket = _mm256_srl_epi32(offset, k.shift);
    let negative = _mm256_cmplt_epi32_mask(bits, _mm256_setzero_si256());
    let index = _mm256_mask_add_epi32(bucket, negative, bucket, k.n_buckets);
    let entry = _mm256_i32gather_epi32::<4>(t.entries.as_ptr() as *const i32, index);
    // Flip the offset on the negative side as the table's keys are (see `BucketTable`).
    let within = _mm256_and_si256(offset, k.within_mask);
    let within = _mm256_mask_xor_epi32(within, negative, within, k.flip);
    let above = _mm256_cmpge_epu32_mask(within, _mm256_srli_epi32::<16>(entry));
    _mm256_mask_srli_epi32(entry, above, entry, 8)
}

/// See `portable::encode`.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `xs.len() == codes.len()`; `absmax >= |x|` for every `x`
/// in `xs` (so `|x / absmax| <= 1` and every table index is in bounds).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode(
    xs: &[f32],
    absmax: f32,
    t: &BucketTable,
    codes: &mut [MaybeUninit<u8>],
) {
    let k = Lookup8 {
        absmax: _mm256_set1_ps(absmax),
        base: _mm256_set1_epi32(t.base as i32),
        shift: _mm_cvtsi32_si128(t.shift as i32),
        within_mask: _mm256_set1_epi32((1i32 << t.shift) - 1),
        n_buckets: _mm256_set1_epi32(t.n_buckets as i32),
        abs_mask: _mm256_set1_epi32(0x7FFF_FFFF),
        flip: _mm256_set1_epi32(0xFFFF),
    };
    let (x, c) = (xs.as_ptr(), codes.as_mut_ptr() as *mut u8);
    let n32 = xs.len() / 32 * 32;
    let mut i = 0;
    while i < n32 {
        let load = |j: usize| _mm256_div_ps(_mm256_loadu_ps(x.add(i + j)), k.absmax);
        let (c0, c1) = (code8(load(0), &k, t), code8(load(8), &k, t));
        let (c2, c3) = (code8(load(16), &k, t), code8(load(24), &k, t));
        // The register form of vpmovdb: its store form is slow on some cores (Zen 4).
        let lo = _mm_unpacklo_epi64(_mm256_cvtepi32_epi8(c0), _mm256_cvtepi32_epi8(c1));
        let hi = _mm_unpacklo_epi64(_mm256_cvtepi32_epi8(c2), _mm256_cvtepi32_epi8(c3));
        _mm_storeu_si128(c.add(i) as *mut __m128i, lo);
        _mm_storeu_si128(c.add(i + 16) as *mut __m128i, hi);
        i += 32;
    }
    while i < xs.len() {
        let m = lanes(xs.len() - i) as __mmask8;
        // Masked-off lanes load 0.0, whose bucket index is valid.
        let y = _mm256_div_ps(_mm256_maskz_loadu_ps(m, x.add(i)), k.absmax);
        _mm256_mask_cvtepi32_storeu_epi8(c.add(i) as *mut i8, m, code8(y, &k, t));
        i += 8;
    }
}
