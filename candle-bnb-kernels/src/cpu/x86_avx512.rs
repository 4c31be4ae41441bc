//! AVX-512 (F, BW, VL) kernels; each mirrors its twin in `portable.rs` lane for lane. Tails are
//! handled with masks, so no scalar loop is needed.

use std::arch::x86_64::*;

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

/// See `portable::encode`; `xs.len() == codes.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn encode(xs: &[f32], absmax: f32, t: &BucketTable, codes: &mut [u8]) {
    let scale = _mm512_set1_ps(absmax);
    let base = _mm512_set1_epi32(t.base as i32);
    let shift = _mm_cvtsi32_si128(t.shift as i32);
    let within_mask = _mm512_set1_epi32((1i32 << t.shift) - 1);
    let last = _mm512_set1_epi32(t.n_buckets as i32 - 1);
    let n_buckets = _mm512_set1_epi32(t.n_buckets as i32);
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let byte = _mm512_set1_epi32(0xFF);
    let code16 = |y: __m512| -> __m512i {
        let bits = _mm512_castps_si512(y);
        let magnitude = _mm512_and_si512(bits, abs_mask);
        let offset = _mm512_sub_epi32(_mm512_max_epu32(magnitude, base), base);
        let bucket = _mm512_min_epu32(_mm512_srl_epi32(offset, shift), last);
        let negative = _mm512_movepi32_mask(bits);
        let index = _mm512_mask_add_epi32(bucket, negative, bucket, n_buckets);
        let entry = _mm512_i32gather_epi32::<4>(index, t.entries.as_ptr() as *const i32);
        let within = _mm512_and_si512(offset, within_mask);
        let boundary = _mm512_srli_epi32::<16>(entry);
        // Offsets order like y on the positive side and reversed on the negative side.
        let above = _mm512_mask_cmpge_epu32_mask(!negative, within, boundary)
            | _mm512_mask_cmple_epu32_mask(negative, within, boundary);
        _mm512_and_si512(_mm512_mask_srli_epi32(entry, above, entry, 8), byte)
    };
    let (x, c) = (xs.as_ptr(), codes.as_mut_ptr());
    let n16 = xs.len() / 16 * 16;
    let mut i = 0;
    while i < n16 {
        let code = code16(_mm512_div_ps(_mm512_loadu_ps(x.add(i)), scale));
        // The register form of vpmovdb: its store form is slow on some cores (Zen 4).
        _mm_storeu_si128(c.add(i) as *mut __m128i, _mm512_cvtepi32_epi8(code));
        i += 16;
    }
    if i < xs.len() {
        let m = lanes(xs.len() - i);
        // Masked-off lanes load 0.0, whose bucket index is valid.
        let code = code16(_mm512_div_ps(_mm512_maskz_loadu_ps(m, x.add(i)), scale));
        _mm512_mask_cvtepi32_storeu_epi8(c.add(i) as *mut i8, m, code);
    }
}
