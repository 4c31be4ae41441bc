//! AVX-512 (F, BW, VL) kernels; each mirrors its twin in `portable.rs` lane for lane. Tails are
//! handled with masks, so no scalar loop is needed.

use std::arch::x86_64::*;

use crate::lookup::BucketTable;
use crate::qmap::QUANT_MAP_LEN;

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
    let inv = _mm512_set1_ps(absmax);
    let base = _mm512_set1_epi32(t.base as i32);
    let shift = _mm_cvtsi32_si128(t.shift as i32);
    let last = _mm512_set1_epi32(t.n_buckets as i32 - 1);
    let n_buckets = _mm512_set1_epi32(t.n_buckets as i32);
    let abs_mask = _mm512_set1_epi32(0x7FFF_FFFF);
    let byte = _mm512_set1_epi32(0xFF);
    let (x, c) = (xs.as_ptr(), codes.as_mut_ptr());
    let mut i = 0;
    while i < xs.len() {
        let m = lanes(xs.len() - i);
        // Masked-off lanes load 0.0, whose bucket index is valid.
        let y = _mm512_div_ps(_mm512_maskz_loadu_ps(m, x.add(i)), inv);
        let bits = _mm512_castps_si512(y);
        let magnitude = _mm512_and_si512(bits, abs_mask);
        let offset = _mm512_sub_epi32(_mm512_max_epu32(magnitude, base), base);
        let bucket = _mm512_min_epu32(_mm512_srl_epi32(offset, shift), last);
        let negative = _mm512_movepi32_mask(bits);
        let index = _mm512_mask_add_epi32(bucket, negative, bucket, n_buckets);
        let packed = _mm512_i32gather_epi32::<4>(index, t.codes.as_ptr() as *const i32);
        let threshold = _mm512_i32gather_ps::<4>(index, t.thresholds.as_ptr());
        let above = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(y, threshold);
        let code = _mm512_and_si512(_mm512_mask_srli_epi32(packed, above, packed, 8), byte);
        _mm512_mask_cvtepi32_storeu_epi8(c.add(i) as *mut i8, m, code);
        i += 16;
    }
}

/// See `portable::decode`; `codes.len() == out.len()`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn decode(
    codes: &[u8],
    values: &[f32; QUANT_MAP_LEN],
    absmax: f32,
    out: &mut [f32],
) {
    let scale = _mm512_set1_ps(absmax);
    let (c, o) = (codes.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < codes.len() {
        let m = lanes(codes.len() - i);
        let idx = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, c.add(i) as *const i8));
        let v = _mm512_i32gather_ps::<4>(idx, values.as_ptr());
        _mm512_mask_storeu_ps(o.add(i), m, _mm512_mul_ps(v, scale));
        i += 16;
    }
}
