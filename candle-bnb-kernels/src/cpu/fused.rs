//! Fused optimizer steps on the CPU: one pass per block over a parameter, its gradient and its
//! state, with the rule applied in f32.

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::{
    absmax_bits, encode, portable, Element, Isa, IsaKind, MAX_BLOCK, PARALLEL_MIN_ELEMS, TASK_ELEMS,
};
use crate::rules::{UpdateRule, MAX_STATES};
use crate::QuantMap;

/// One 8-bit state of a parameter, borrowed for a step: codes and per-block absmax.
pub(crate) struct BlockwiseStateMut<'a> {
    pub(crate) codes: &'a mut [u8],
    pub(crate) absmax: &'a mut [f32],
    pub(crate) map: &'a QuantMap,
}

/// Applies `rule` to every element: `params` and `grads` as f32, `states[k]` the k-th state
/// (one per `rule.signed_states()` entry, every slice as long as `params`).
///
/// Written per state count with zipped iterators so the loop has no bounds checks and
/// vectorises; compiled once per instruction set (see [`apply_rule`]).
#[inline(always)]
fn apply_rule_body<R: UpdateRule>(
    rule: &R,
    params: &mut [f32],
    grads: &[f32],
    states: &mut [&mut [f32]],
) {
    let pg = params.iter_mut().zip(grads);
    match states {
        [] => pg.for_each(|(p, &g)| *p = rule.apply(*p, g, &mut [0.0; MAX_STATES])),
        [s0] => pg.zip(s0.iter_mut()).for_each(|((p, &g), a)| {
            let mut s = [*a, 0.0, 0.0];
            *p = rule.apply(*p, g, &mut s);
            *a = s[0];
        }),
        [s0, s1] => pg
            .zip(s0.iter_mut())
            .zip(s1.iter_mut())
            .for_each(|(((p, &g), a), b)| {
                let mut s = [*a, *b, 0.0];
                *p = rule.apply(*p, g, &mut s);
                (*a, *b) = (s[0], s[1]);
            }),
        [s0, s1, s2, ..] => pg
            .zip(s0.iter_mut())
            .zip(s1.iter_mut())
            .zip(s2.iter_mut())
            .for_each(|((((p, &g), a), b), c)| {
                let mut s = [*a, *b, *c];
                *p = rule.apply(*p, g, &mut s);
                (*a, *b, *c) = (s[0], s[1], s[2]);
            }),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_rule_avx2<R: UpdateRule>(
    rule: &R,
    params: &mut [f32],
    grads: &[f32],
    states: &mut [&mut [f32]],
) {
    apply_rule_body(rule, params, grads, states)
}

/// [`apply_rule_body`] with the widest vectors the CPU has. Rust never contracts `a * b + c`
/// into a fused multiply-add, so every path rounds exactly like the portable one.
fn apply_rule<R: UpdateRule>(
    isa: Isa,
    rule: &R,
    params: &mut [f32],
    grads: &[f32],
    states: &mut [&mut [f32]],
) {
    debug_assert_eq!(states.len(), rule.signed_states().len());
    match isa.kind() {
        // AVX2 (256-bit) also on AVX-512 CPUs: the rule is divide- and sqrt-bound, where 512-bit
        // vectors gain little and cost twice on Zen 4.
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` is only made by `Isa::available`, after detection; both AVX paths imply AVX2.
        IsaKind::Avx2 | IsaKind::Avx512 => unsafe { apply_rule_avx2(rule, params, grads, states) },
        _ => apply_rule_body(rule, params, grads, states),
    }
}

/// The 32-bit path: `states[k]` are f32 buffers as long as `params`.
pub(crate) fn step_f32_state<R: UpdateRule, T: Element>(
    isa: Isa,
    rule: &R,
    params: &mut [T],
    grads: &[T],
    states: &mut [&mut [f32]],
) {
    let n = params.len();
    let mut state_chunks: Vec<_> = states
        .iter_mut()
        .map(|s| s.chunks_mut(TASK_ELEMS))
        .collect();
    let tasks: Vec<_> = params
        .chunks_mut(TASK_ELEMS)
        .zip(grads.chunks(TASK_ELEMS))
        .map(|(p, g)| {
            (
                p,
                g,
                state_chunks
                    .iter_mut()
                    .filter_map(|c| c.next())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let run = |(p, g, mut s): (&mut [T], &[T], Vec<&mut [f32]>)| {
        let (mut pbuf, mut gbuf) = ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
        let mut offset = 0;
        for pb in p.chunks_mut(MAX_BLOCK) {
            let len = pb.len();
            let gf = T::load_f32(&g[offset..offset + len], &mut gbuf[..len]);
            let mut sb: Vec<&mut [f32]> =
                s.iter_mut().map(|s| &mut s[offset..offset + len]).collect();
            T::update_f32(pb, &mut pbuf[..len], |pf| {
                apply_rule(isa, rule, pf, gf, &mut sb)
            });
            offset += len;
        }
    };
    if n >= PARALLEL_MIN_ELEMS {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}

/// The slices of one parallel task of the 8-bit path: whole blocks of the parameter, its
/// gradient and each state.
struct BlockwiseTask<'a, T> {
    params: &'a mut [T],
    grads: &'a [T],
    codes: Vec<&'a mut [u8]>,
    absmax: Vec<&'a mut [f32]>,
}

/// Views initialised codes as the write-only buffer `encode` fills.
pub(crate) fn as_uninit(codes: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: `MaybeUninit<u8>` has `u8`'s layout, and only initialised bytes are written back.
    unsafe { &mut *(codes as *mut [u8] as *mut [MaybeUninit<u8>]) }
}

/// Replaces NaN by 0 and ±inf by ±f32::MAX, so an overflowing state saturates instead of
/// poisoning its block's scale.
fn saturate(values: &mut [f32]) {
    for v in values {
        *v = if v.is_nan() {
            0.0
        } else {
            v.clamp(-f32::MAX, f32::MAX)
        };
    }
}

/// The 8-bit path: each state is blockwise-quantized with `block_size` elements per block.
///
/// Per block: dequantize each state, apply the rule, take each new state's absmax and re-quantize
/// it, store the parameter. Gradients are expected finite (optimizers check them first); a state
/// that still overflows saturates at `±f32::MAX`.
pub(crate) fn step_blockwise_state<R: UpdateRule, T: Element>(
    isa: Isa,
    rule: &R,
    params: &mut [T],
    grads: &[T],
    states: &mut [BlockwiseStateMut<'_>],
    block_size: usize,
) {
    let n = params.len();
    let n_states = states.len();
    let blocks_per_task = (TASK_ELEMS / block_size).max(1);
    let task_elems = blocks_per_task * block_size;
    let maps: Vec<&QuantMap> = states.iter().map(|s| s.map).collect();
    let zero_codes: Vec<u8> = maps
        .iter()
        .map(|m| m.lookup().code_by_search(0.0))
        .collect();
    let (mut code_chunks, mut absmax_chunks): (Vec<_>, Vec<_>) = states
        .iter_mut()
        .map(|s| {
            (
                s.codes.chunks_mut(task_elems),
                s.absmax.chunks_mut(blocks_per_task),
            )
        })
        .unzip();
    let tasks: Vec<_> = params
        .chunks_mut(task_elems)
        .zip(grads.chunks(task_elems))
        .map(|(params, grads)| BlockwiseTask {
            params,
            grads,
            codes: code_chunks.iter_mut().filter_map(|c| c.next()).collect(),
            absmax: absmax_chunks.iter_mut().filter_map(|c| c.next()).collect(),
        })
        .collect();
    let run = |task: BlockwiseTask<'_, T>| {
        let BlockwiseTask {
            params: p,
            grads: g,
            mut codes,
            mut absmax,
        } = task;
        let (mut pbuf, mut gbuf) = ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
        let mut sbuf = [[0f32; MAX_BLOCK]; MAX_STATES];
        for (b, (pb, gb)) in p
            .chunks_mut(block_size)
            .zip(g.chunks(block_size))
            .enumerate()
        {
            let len = pb.len();
            let range = b * block_size..b * block_size + len;
            for k in 0..n_states {
                let values = maps[k].values();
                portable::decode(
                    &codes[k][range.clone()],
                    values,
                    absmax[k][b],
                    &mut sbuf[k][..len],
                );
            }
            let gf = T::load_f32(gb, &mut gbuf[..len]);
            let [s0, s1, s2] = &mut sbuf;
            let mut sb = [&mut s0[..len], &mut s1[..len], &mut s2[..len]];
            T::update_f32(pb, &mut pbuf[..len], |pf| {
                apply_rule(isa, rule, pf, gf, &mut sb[..n_states])
            });
            for k in 0..n_states {
                let s = &mut *sb[k];
                let mut bits = absmax_bits(isa, s);
                if bits >= 0x7F80_0000 {
                    saturate(s);
                    bits = absmax_bits(isa, s);
                }
                absmax[k][b] = f32::from_bits(bits);
                let out = &mut codes[k][range.clone()];
                if bits == 0 {
                    out.fill(zero_codes[k]);
                } else {
                    encode(
                        isa,
                        s,
                        f32::from_bits(bits),
                        maps[k].lookup(),
                        as_uninit(out),
                    );
                }
            }
        }
    };
    if n >= PARALLEL_MIN_ELEMS {
        tasks.into_par_iter().for_each(run);
    } else {
        tasks.into_iter().for_each(run);
    }
}

/// One state of a parameter, read-only, for [`measure`].
pub(crate) enum StateView<'a> {
    /// f32 values, one per element.
    F32(&'a [f32]),
    /// Codes, per-block scales and the map they index.
    Blockwise(&'a [u8], &'a [f32], &'a QuantMap),
}

/// Sums of squares of the parameter and of `rule`'s update direction, for layer-wise rules; the
/// state is read (dequantized) but not written. `chunk` must be the block size of blockwise
/// states (any size up to [`MAX_BLOCK`] for f32 states).
///
/// Chunks are summed in f64 in index order whatever the thread count, so the result (and the
/// trust ratio it gives) is the same from run to run.
pub(crate) fn measure<R: UpdateRule, T: Element>(
    rule: &R,
    params: &[T],
    grads: &[T],
    states: &[StateView<'_>],
    chunk: usize,
) -> (f64, f64) {
    debug_assert!(chunk <= MAX_BLOCK && states.len() <= MAX_STATES);
    let n = params.len();
    let per_chunk = |c: usize| -> (f64, f64) {
        let range = c * chunk..((c + 1) * chunk).min(n);
        let len = range.len();
        let (mut pbuf, mut gbuf) = ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
        let mut sbuf = [[0f32; MAX_BLOCK]; MAX_STATES];
        let pf = T::load_f32(&params[range.clone()], &mut pbuf[..len]);
        let gf = T::load_f32(&grads[range.clone()], &mut gbuf[..len]);
        for (k, state) in states.iter().enumerate() {
            match state {
                StateView::F32(values) => sbuf[k][..len].copy_from_slice(&values[range.clone()]),
                StateView::Blockwise(codes, absmax, map) => portable::decode(
                    &codes[range.clone()],
                    map.values(),
                    absmax[c],
                    &mut sbuf[k][..len],
                ),
            }
        }
        let (mut param_sq, mut direction_sq) = (0f64, 0f64);
        for i in 0..len {
            let mut s = [sbuf[0][i], sbuf[1][i], sbuf[2][i]];
            let d = rule.direction(pf[i], gf[i], &mut s) as f64;
            param_sq += pf[i] as f64 * pf[i] as f64;
            direction_sq += d * d;
        }
        (param_sq, direction_sq)
    };
    let chunks = n.div_ceil(chunk);
    let sums: Vec<(f64, f64)> = if n >= PARALLEL_MIN_ELEMS {
        (0..chunks).into_par_iter().map(per_chunk).collect()
    } else {
        (0..chunks).map(per_chunk).collect()
    };
    sums.iter()
        .fold((0.0, 0.0), |(a, b), &(p, d)| (a + p, b + d))
}
