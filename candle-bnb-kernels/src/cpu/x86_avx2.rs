//! AVX2 kernels; each mirrors its twin in `portable.rs` lane for lane.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

use crate::lookup::BucketTable;

/// See `portable::absmax_bits`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn absmax_bits(xs: &[f32]) -> u32 {
    let mask = _mm256_set1_epi32(0x7FFF_FFFF);
    let (mut acc0, mut acc1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let chunks = xs.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        let p = c.as_ptr() as *const __m256i;
        acc0 = _mm256_max_epu32(acc0, _mm256_and_si256(_mm256_loadu_si256(p), mask));
        acc1 = _mm256_max_epu32(acc1, _mm256_and_si256(_mm256_loadu_si256(p.add(1)), mask));
    }
    let mut lanes = [0u32; 8];
    _mm256_storeu_si256(
        lanes.as_mut_ptr() as *mut __m256i,
        _mm256_max_epu32(acc0, acc1),
    );
    let simd = lanes.into_iter().max().unwrap_or(0);
    simd.max(super::portable::absmax_bits(rest))
}

/// Loop-invariant registers of the bucket lookup.
struct Lookup8 {
    absmax: __m256,
    base: __m256i,
    shift: __m128i,
    within_mask: __m256i,
    n_buckets: __m256i,
    abs_mask: __m256i,
    flip_mask: __m256i,
    eight: __m256i,
    byte: __m256i,
}

#[target_feature(enable = "avx2")]
unsafe fn lookup8(absmax: f32, t: &BucketTable) -> Lookup8 {
    Lookup8 {
        absmax: _mm256_set1_ps(absmax),
        base: _mm256_set1_epi32(t.base as i32),
        shift: _mm_cvtsi32_si128(t.shift as i32),
        within_mask: _mm256_set1_epi32((1i32 << t.shift) - 1),
        n_buckets: _mm256_set1_epi32(t.n_buckets as i32),
        abs_mask: _mm256_set1_epi32(0x7FFF_FFFF),
        flip_mask: _mm256_set1_epi32(0xFFFF),
        eight: _mm256_set1_epi32(8),
        byte: _mm256_set1_epi32(0xFF),
    }
}

/// Codes of 8 elements at `x` as 32-bit lanes: `BucketTable::code(x / absmax)`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn code8(x: *const f32, k: &Lookup8, t: &BucketTable) -> __m256i {
    let y = _mm256_div_ps(_mm256_loadu_ps(x), k.absmax);
    let bits = _mm256_castps_si256(y);
    let magnitude = _mm256_and_si256(bits, k.abs_mask);
    let offset = _mm256_sub_epi32(_mm256_max_epu32(magnitude, k.base), k.base);
    // No clamp to the last bucket: |y| <= 1 (see `encode`'s safety contract).
    let bucket = _mm256_srl_epi32(offset, k.shift);
    let negative = _mm256_srai_epi32(bits, 31);
    let index = _mm256_add_epi32(bucket, _mm256_and_si256(negative, k.n_buckets));
    let entry = _mm256_i32gather_epi32::<4>(t.entries.as_ptr() as *const i32, index);
    // Flip the offset on the negative side as the table's keys are (see `BucketTable`); both
    // are below 2^16, so a signed compare orders them.
    let flip = _mm256_and_si256(negative, k.flip_mask);
    let within = _mm256_xor_si256(_mm256_and_si256(offset, k.within_mask), flip);
    let key = _mm256_srli_epi32::<16>(entry);
    let below = _mm256_cmpgt_epi32(key, within);
    let shift = _mm256_andnot_si256(below, k.eight);
    _mm256_and_si256(_mm256_srlv_epi32(entry, shift), k.byte)
}

/// See `portable::encode`.
///
/// # Safety
/// The CPU has AVX2; `xs.len() == codes.len()`; `absmax >= |x|` for every `x` in `xs` (so
/// `|x / absmax| <= 1` and every table index is in bounds).
#[target_feature(enable = "avx2")]
pub(super) unsafe fn encode(
    xs: &[f32],
    absmax: f32,
    t: &BucketTable,
    codes: &mut [MaybeUninit<u8>],
) {
    let k = lookup8(absmax, t);
    // packus interleaves 128-bit lanes; this puts the 4-byte groups back in element order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let n32 = xs.len() / 32 * 32;
    let (x, c) = (xs.as_ptr(), codes.as_mut_ptr() as *mut u8);
    let mut i = 0;
    while i < n32 {
        let c0 = code8(x.add(i), &k, t);
        let c1 = code8(x.add(i + 8), &k, t);
        let c2 = code8(x.add(i + 16), &k, t);
        let c3 = code8(x.add(i + 24), &k, t);
        let words = (_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
        let bytes = _mm256_packus_epi16(words.0, words.1);
        _mm256_storeu_si256(
            c.add(i) as *mut __m256i,
            _mm256_permutevar8x32_epi32(bytes, order),
        );
        i += 32;
    }
    super::portable::encode(&xs[n32..], absmax, t, &mut codes[n32..]);
}
