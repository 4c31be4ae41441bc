//! Portable scalar kernels: the reference the SIMD paths are tested against, and the path used
//! on CPUs without them.

use std::mem::MaybeUninit;

use crate::lookup::BucketTable;
use crate::qmap::QUANT_MAP_LEN;

pub(crate) fn absmax_bits(xs: &[f32]) -> u32 {
    xs.iter().fold(0, |m, x| m.max(x.to_bits() & 0x7FFF_FFFF))
}

pub(crate) fn encode(xs: &[f32], absmax: f32, table: &BucketTable, codes: &mut [MaybeUninit<u8>]) {
    for (c, &x) in codes.iter_mut().zip(xs) {
        c.write(table.code(x / absmax));
    }
}

pub(crate) fn decode(codes: &[u8], values: &[f32; QUANT_MAP_LEN], absmax: f32, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = values[c as usize] * absmax;
    }
}
