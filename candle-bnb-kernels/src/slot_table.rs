//! The table ABI of the CUDA step kernels: the byte layout of the device tables they read
//! (`kernels/norms.cu` `GradSlot`, `kernels/fused.cu` `Slot<Rule>`) and the constants they are
//! compiled with. Plain host code, compiled and tested without CUDA, so the offsets are checked
//! on every machine; the optimizers' device state (`candle-bnb-optim`) fills its tables with it.

use candle_core::{bail, DType, Result};

use crate::rules::CudaRule;

/// Elements per partial sum of the gradient pre-pass (`norms.cu` kChunk, the CPU's block of
/// [`sum_squares`](crate::sum_squares)).
pub const NORM_CHUNK: usize = 4096;
/// Squared gradient norms kept per parameter for percentile clipping (`norms.cu` kHistory).
pub const CUDA_GRAD_NORM_HISTORY: usize = 100;
/// The block size `fused.cu` tiles 32-bit state with (it needs one where nothing is quantized):
/// 16 quantization-sized blocks per CUDA block.
pub const F32_TILE_BLOCK: usize = 256;

/// The `dtype` code of a [`GradSlot`]: 0 f32, 1 f16, 2 bf16.
///
/// # Errors
/// Any other dtype (naming it).
pub fn dtype_code(dtype: DType) -> Result<u32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        other => bail!("CUDA optimizer steps take F32, F16 or BF16 parameters, got {other:?}"),
    })
}

/// Bytes of `norms.cu`'s `GradSlot`.
pub const GRAD_SLOT_BYTES: usize = 32;
/// Bytes of `fused.cu`'s `Slot<Rule>` before the rule.
pub const SLOT_HEADER_BYTES: usize = 88;

/// Bytes of one `Slot<R>`: the header and the rule, rounded up to 8 (the struct's alignment).
pub fn slot_bytes<R: CudaRule>() -> usize {
    (SLOT_HEADER_BYTES + std::mem::size_of::<R>()).div_ceil(8) * 8
}

/// One gradient of the pre-pass (`GradSlot`).
pub struct GradSlot {
    /// Device address of the gradient.
    pub grad: u64,
    /// Its elements.
    pub n: u64,
    /// Its first chunk among the step's partial sums.
    pub first_chunk: u64,
    /// [`dtype_code`] of the gradient.
    pub dtype: u32,
    /// The optimizer's parameter index.
    pub index: u32,
}

/// One parameter of a fused launch (`Slot<Rule>`).
pub struct Slot<'a, R> {
    /// Device address of the parameter.
    pub param: u64,
    /// Device address of its gradient.
    pub grad: u64,
    /// Device addresses of its states (f32 values or 8-bit codes; 0 past the rule's count).
    pub state: [u64; 3],
    /// Device addresses of its states' per-block scales (8-bit state; 0 otherwise).
    pub absmax: [u64; 3],
    /// Its elements.
    pub n: u64,
    /// Its first block among the group's blocks.
    pub first_block: u64,
    /// Its index into the pre-pass's gradient scales.
    pub scale_index: u64,
    /// Its update rule.
    pub rule: &'a R,
}

/// Little-endian fields written one after the other into a table.
pub struct TableWriter<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> TableWriter<'a> {
    /// A writer at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, at: 0 }
    }

    /// Where the next entry goes.
    pub fn position(&self) -> usize {
        self.at
    }

    /// Moves to byte `at` (the start of the slot tables after the grad slots).
    pub fn seek(&mut self, at: usize) {
        self.at = at;
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }

    /// Writes `s` as a `GradSlot`.
    ///
    /// # Panics
    /// The buffer has less than [`GRAD_SLOT_BYTES`] left.
    pub fn grad_slot(&mut self, s: &GradSlot) {
        let start = self.at;
        self.u64(s.grad);
        self.u64(s.n);
        self.u64(s.first_chunk);
        self.u32(s.dtype);
        self.u32(s.index);
        debug_assert_eq!(self.at - start, GRAD_SLOT_BYTES);
    }

    /// Writes `s` as a `Slot<R>` ([`slot_bytes`] bytes, padding zeroed).
    ///
    /// # Panics
    /// The buffer has less than [`slot_bytes`] left.
    pub fn slot<R: CudaRule>(&mut self, s: &Slot<'_, R>) {
        let start = self.at;
        self.u64(s.param);
        self.u64(s.grad);
        for a in s.state {
            self.u64(a);
        }
        for a in s.absmax {
            self.u64(a);
        }
        self.u64(s.n);
        self.u64(s.first_block);
        self.u64(s.scale_index);
        debug_assert_eq!(self.at - start, SLOT_HEADER_BYTES);
        self.bytes(s.rule.as_bytes());
        // Padding up to the next slot stays as it was (the kernels never read it).
        self.at = start + slot_bytes::<R>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AdEMAMixRule, AdagradRule, AdamRule, LambRule, LarsRule, LionRule, RmspropRule, SgdRule,
    };

    /// `sizeof(Slot<Rule>)` as the CUDA compiler lays it out (fused.cu static_asserts 128 for
    /// Adam; the others follow from the rule sizes and 8-byte alignment).
    #[test]
    fn slot_sizes_match_the_cuda_structs() {
        assert_eq!(slot_bytes::<AdamRule>(), 128);
        assert_eq!(slot_bytes::<LambRule>(), 136);
        assert_eq!(slot_bytes::<LionRule>(), 112);
        assert_eq!(slot_bytes::<SgdRule>(), 112);
        assert_eq!(slot_bytes::<LarsRule>(), 120);
        assert_eq!(slot_bytes::<RmspropRule>(), 120);
        assert_eq!(slot_bytes::<AdagradRule>(), 104);
        assert_eq!(slot_bytes::<AdEMAMixRule>(), 136);
    }

    #[test]
    fn fields_land_at_the_documented_offsets() {
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let rule = LionRule::new(1e-4, 0.9, 0.99, 0.01);
        let mut buf = vec![0xAAu8; 2 * GRAD_SLOT_BYTES + 2 * slot_bytes::<LionRule>()];
        let mut w = TableWriter::new(&mut buf);
        for k in 0..2u64 {
            w.grad_slot(&GradSlot {
                grad: 0x1000 + k,
                n: 77 + k,
                first_chunk: 5 + k,
                dtype: 2,
                index: 9 + k as u32,
            });
        }
        assert_eq!(w.position(), 64);
        for k in 0..2u64 {
            w.slot(&Slot {
                param: 0x10 + k,
                grad: 0x20 + k,
                state: [0x30 + k, 0x31, 0],
                absmax: [0x40 + k, 0x41, 0],
                n: 1000 + k,
                first_block: 4 * k,
                scale_index: 3 + k,
                rule: &rule,
            });
        }
        assert_eq!(w.position(), buf.len());
        // GradSlot: grad@0 n@8 first_chunk@16 dtype@24 index@28.
        for k in 0..2usize {
            let g = &buf[k * GRAD_SLOT_BYTES..];
            assert_eq!(u64_at(g, 0), 0x1000 + k as u64);
            assert_eq!(u64_at(g, 8), 77 + k as u64);
            assert_eq!(u64_at(g, 16), 5 + k as u64);
            assert_eq!(u32_at(g, 24), 2);
            assert_eq!(u32_at(g, 28), 9 + k as u32);
        }
        // Slot: param@0 grad@8 state@16 absmax@40 n@64 first_block@72 scale_index@80 rule@88.
        let s = &buf[64 + slot_bytes::<LionRule>()..];
        assert_eq!(u64_at(s, 0), 0x11);
        assert_eq!(u64_at(s, 8), 0x21);
        assert_eq!(
            (u64_at(s, 16), u64_at(s, 24), u64_at(s, 32)),
            (0x31, 0x31, 0)
        );
        assert_eq!(
            (u64_at(s, 40), u64_at(s, 48), u64_at(s, 56)),
            (0x41, 0x41, 0)
        );
        assert_eq!(u64_at(s, 64), 1001);
        assert_eq!(u64_at(s, 72), 4);
        assert_eq!(u64_at(s, 80), 4);
        assert_eq!(&s[88..88 + 24], rule.as_bytes());
    }
}
