//! The table ABI of the CUDA step kernels: the byte layout of the device tables they read
//! (`kernels/norms.cu` `GradSlot`, `kernels/fused.cu` `Slot<Rule>`) and the constants they are
//! compiled with. Plain host code, compiled and tested without CUDA, so the offsets are checked
//! on every machine; the optimizers' device state (`candle-bnb-optim`) fills its tables with it.

use candle_core::{bail, DType, Result};

use crate::cpu::factored::TaskLayout;
use crate::rules::{CudaRule, FactoredCudaRule};
use crate::Factoring;

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

/// Bytes of `factored.cu`'s `FactoredSlot<Rule>` before the rule.
pub const FACTORED_SLOT_HEADER_BYTES: usize = 184;

/// Bytes of one `FactoredSlot<R>`: the header and the rule, rounded up to 8.
pub fn factored_slot_bytes<R: FactoredCudaRule>() -> usize {
    (FACTORED_SLOT_HEADER_BYTES + std::mem::size_of::<R>()).div_ceil(8) * 8
}

/// Columns (`batch · cols`) from which `factored.cu` sums a matrix's columns directly, one
/// thread per column walking the CPU's tasks and rows in order, instead of through per-task
/// partial sums: that many threads fill a GPU well enough, and the partials would grow with
/// the width.
pub const DIRECT_COLUMNS_MIN: usize = 65_536;
/// The most bytes of column partials (`tasks · matrices per task · cols` f64) a matrix may use;
/// above, its columns are summed directly (see [`DIRECT_COLUMNS_MIN`]).
pub const MAX_COLUMN_PARTIAL_BYTES: usize = 16 << 20;

/// How `factored.cu` sees a parameter of a factored optimizer: its shape as matrices (a vector
/// is one row), its tasks (the CPU's, which fix the order of the column and vector sums), how
/// its columns are summed, and the scratch its step needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FactoredLayout {
    /// Whether the parameter is factored (two or more dims).
    pub factored: bool,
    /// Matrices (1 for a vector).
    pub batch: usize,
    /// Rows per matrix (1 for a vector).
    pub rows: usize,
    /// Columns (the element count for a vector).
    pub cols: usize,
    /// Elements.
    pub n: usize,
    /// Elements per task.
    pub task_elems: usize,
    /// Tasks.
    pub tasks: usize,
    /// The momentum's quantization block when it is 8-bit.
    pub block_size: Option<usize>,
    /// A matrix whose columns are summed directly (no per-task partials; see
    /// [`DIRECT_COLUMNS_MIN`] and [`MAX_COLUMN_PARTIAL_BYTES`]).
    pub direct_columns: bool,
}

impl FactoredLayout {
    /// The layout of a parameter factored as `factoring` whose momentum (if any) is quantized in
    /// blocks of `block_size`.
    pub fn of(factoring: Factoring, block_size: Option<usize>) -> Self {
        let task_layout = TaskLayout::of(factoring, block_size);
        let (factored, batch, rows, cols) = match factoring {
            Factoring::Factored { batch, rows, cols } => (true, batch, rows, cols),
            Factoring::Full { len } => (false, 1, 1, len),
        };
        let (_, mats_per_task) = task_layout.matrix_split(batch, rows, cols);
        let partial_bytes = 8 * task_layout.tasks * mats_per_task * cols;
        Self {
            factored,
            batch,
            rows,
            cols,
            n: factoring.len(),
            task_elems: task_layout.task_elems,
            tasks: task_layout.tasks,
            block_size,
            direct_columns: factored
                && (batch * cols >= DIRECT_COLUMNS_MIN || partial_bytes > MAX_COLUMN_PARTIAL_BYTES),
        }
    }

    /// Elements of each scratch buffer the step needs, in [`FactoredScratch`]'s order (f64:
    /// row sums, row squares, column partials (with direct columns: one total per column),
    /// means; f32: row and column factors), the two f64 scalars not counted. None for a
    /// parameter without elements: its step launches nothing.
    pub fn scratch_lens(&self) -> [usize; 6] {
        if self.n == 0 {
            return [0; 6];
        }
        if !self.factored {
            return [self.tasks, self.tasks, 0, 0, 0, 0];
        }
        let tasks = TaskLayout {
            task_elems: self.task_elems,
            tasks: self.tasks,
        };
        let (_, mats_per_task) = tasks.matrix_split(self.batch, self.rows, self.cols);
        let n_rows = self.batch * self.rows;
        let partials = if self.direct_columns {
            self.batch * self.cols
        } else {
            self.tasks * mats_per_task * self.cols
        };
        [
            n_rows,
            n_rows,
            partials,
            self.batch,
            n_rows,
            self.batch * self.cols,
        ]
    }

    /// The step's whole scratch in f64 words: [`Self::scratch_lens`] (the f32 buffers rounded up
    /// to whole words) and the two scalars, as [`FactoredScratch::within`] lays it out; 0 for a
    /// parameter without elements.
    pub fn scratch_words(&self) -> usize {
        if self.n == 0 {
            return 0;
        }
        let [a, b, c, d, e, f] = self.scratch_lens();
        a + b + c + d + e.div_ceil(2) + f.div_ceil(2) + 2
    }

    /// `factored.cu`'s slot flags: bit 0 factored, bit 1 direct columns.
    fn flags(&self) -> u32 {
        u32::from(self.factored) | (u32::from(self.direct_columns) << 1)
    }
}

/// Splits parameters whose steps need `words[i]` f64 words of scratch each into runs of
/// consecutive parameters that fit in `budget` words together (a parameter needing more than
/// `budget` runs alone): each run is one multi-tensor launch sequence, its parameters' scratch
/// side by side in one buffer of `max(budget, largest need)` words.
pub fn scratch_runs(words: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let (mut start, mut used) = (0, 0usize);
    for (i, &w) in words.iter().enumerate() {
        if i > start && used + w > budget {
            runs.push(start..i);
            (start, used) = (i, 0);
        }
        used += w;
    }
    if start < words.len() {
        runs.push(start..words.len());
    }
    runs
}

/// The device addresses of one parameter's scratch buffers in a factored step (each at least as
/// long as [`FactoredLayout::scratch_lens`] asks, the scalars two f64).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FactoredScratch {
    /// f64 per row (matrix) or per task (vector).
    pub row_sums: u64,
    /// f64 per row or per task: Σp².
    pub row_squares: u64,
    /// f64 per task, matrix per task and column.
    pub col_partials: u64,
    /// f64 per matrix.
    pub means: u64,
    /// f32 per row.
    pub row_factors: u64,
    /// f32 per column of each matrix.
    pub col_factors: u64,
    /// Two f64.
    pub scalars: u64,
}

impl FactoredScratch {
    /// The buffers of a parameter laid out as `layout`, side by side from device address `base`
    /// (8-byte aligned) over [`FactoredLayout::scratch_words`] words: the f64 buffers, the f32
    /// ones (each from a word boundary), the scalars.
    pub fn within(base: u64, layout: &FactoredLayout) -> Self {
        let [a, b, c, d, e, _] = layout.scratch_lens().map(|l| l as u64);
        let word = |w: u64| base + 8 * w;
        Self {
            row_sums: word(0),
            row_squares: word(a),
            col_partials: word(a + b),
            means: word(a + b + c),
            row_factors: word(a + b + c + d),
            col_factors: word(a + b + c + d + e.div_ceil(2)),
            scalars: word(layout.scratch_words() as u64 - 2),
        }
    }
}

/// The kind of a factored parameter's momentum (`factored.cu` MomentumKind).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MomentumKind {
    /// No momentum.
    None = 0,
    /// f32 values.
    F32 = 1,
    /// 8-bit codes with per-block scales.
    Blockwise = 2,
}

/// One parameter of a factored step (`FactoredSlot<Rule>`).
pub struct FactoredSlot<'a, R> {
    /// Device address of the parameter.
    pub param: u64,
    /// Device address of its gradient.
    pub grad: u64,
    /// Device addresses of its statistics (row, col, res_row, res_col; or the full one; 0 past
    /// the rule's).
    pub stats: [u64; 4],
    /// Device address of its momentum (f32 values or codes; 0 without).
    pub momentum: u64,
    /// Device address of its momentum's scales (8-bit; else 0).
    pub absmax: u64,
    /// Its shape and tasks.
    pub layout: FactoredLayout,
    /// The momentum's kind.
    pub momentum_kind: MomentumKind,
    /// Its index into the pre-pass's gradient scales.
    pub scale_index: u64,
    /// The scratch buffers.
    pub scratch: FactoredScratch,
    /// Its rule.
    pub rule: &'a R,
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

impl TableWriter<'_> {
    /// Writes `s` as a `FactoredSlot<R>` ([`factored_slot_bytes`] bytes).
    ///
    /// # Panics
    /// The buffer has less than [`factored_slot_bytes`] left.
    pub fn factored_slot<R: FactoredCudaRule>(&mut self, s: &FactoredSlot<'_, R>) {
        let start = self.at;
        self.u64(s.param);
        self.u64(s.grad);
        for a in s.stats {
            self.u64(a);
        }
        self.u64(s.momentum);
        self.u64(s.absmax);
        let l = &s.layout;
        for v in [l.batch, l.rows, l.cols, l.n, l.task_elems] {
            self.u64(v as u64);
        }
        self.u64(l.block_size.unwrap_or(0) as u64);
        self.u64(s.scale_index);
        self.u32(s.momentum_kind as u32);
        self.u32(l.flags());
        let c = &s.scratch;
        for a in [
            c.row_sums,
            c.row_squares,
            c.col_partials,
            c.means,
            c.row_factors,
            c.col_factors,
            c.scalars,
        ] {
            self.u64(a);
        }
        debug_assert_eq!(self.at - start, FACTORED_SLOT_HEADER_BYTES);
        self.bytes(s.rule.as_bytes());
        self.at = start + factored_slot_bytes::<R>();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        AdEMAMixRule, AdafactorRule, AdagradRule, AdamRule, CameRule, LambRule, LarsRule, LionRule,
        RmspropRule, SgdRule,
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
        // factored.cu static_asserts these two.
        assert_eq!(factored_slot_bytes::<AdafactorRule>(), 240);
        assert_eq!(factored_slot_bytes::<CameRule>(), 232);
    }

    #[test]
    fn factored_slot_fields_land_at_the_documented_offsets() {
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let rule = CameRule::new(1e-3, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.0);
        let layout = FactoredLayout::of(Factoring::of(&[3, 17, 9]), Some(64));
        let mut buf = vec![0xAAu8; factored_slot_bytes::<CameRule>()];
        let mut w = TableWriter::new(&mut buf);
        w.factored_slot(&FactoredSlot {
            param: 0x10,
            grad: 0x20,
            stats: [0x30, 0x31, 0x32, 0x33],
            momentum: 0x40,
            absmax: 0x50,
            layout,
            momentum_kind: MomentumKind::Blockwise,
            scale_index: 7,
            scratch: FactoredScratch {
                row_sums: 0x60,
                row_squares: 0x61,
                col_partials: 0x62,
                means: 0x63,
                row_factors: 0x64,
                col_factors: 0x65,
                scalars: 0x66,
            },
            rule: &rule,
        });
        assert_eq!(w.position(), buf.len());
        let offsets: [(usize, u64); 22] = [
            (0, 0x10),
            (8, 0x20),
            (16, 0x30),
            (40, 0x33),
            (48, 0x40),
            (56, 0x50),
            (64, 3),
            (72, 17),
            (80, 9),
            (88, 459),
            (96, layout.task_elems as u64),
            (104, 64),
            (112, 7),
            (128, 0x60),
            (136, 0x61),
            (144, 0x62),
            (152, 0x63),
            (160, 0x64),
            (168, 0x65),
            (176, 0x66),
            (
                184,
                u64::from_le_bytes(rule.as_bytes()[..8].try_into().unwrap()),
            ),
            (
                184 + 40,
                u64::from(u32::from_le_bytes(
                    rule.as_bytes()[40..44].try_into().unwrap(),
                )),
            ),
        ];
        for (o, want) in &offsets[..21] {
            assert_eq!(u64_at(&buf, *o), *want, "offset {o}");
        }
        assert_eq!(u32_at(&buf, 224), offsets[21].1 as u32);
        assert_eq!((u32_at(&buf, 120), u32_at(&buf, 124)), (2, 1));
    }

    /// The tasks and scratch of a factored parameter: the CPU's task cut (whole rows and 8-bit
    /// blocks), one column partial per task, matrix touched and column.
    #[test]
    fn factored_layouts_follow_the_cpu_tasks() {
        let m = FactoredLayout::of(Factoring::of(&[2, 130, 300]), None);
        assert_eq!((m.task_elems, m.tasks), (65_400, 2));
        // 218 rows per task could touch 3 matrices of 130 rows; there are 2.
        assert_eq!(m.scratch_lens(), [260, 260, 2 * 2 * 300, 2, 260, 600]);
        assert!(!m.direct_columns);
        let c = FactoredLayout::of(Factoring::of(&[5, 7, 11]), None);
        // One task; its 35 rows touch all 5 matrices.
        assert_eq!(c.scratch_lens()[2], 5 * 11);
        let q = FactoredLayout::of(Factoring::of(&[65, 70]), Some(256));
        // lcm(70, 256) = 8960 elements per unit, one task over 4550 elements.
        assert_eq!((q.task_elems, q.tasks), (8960 * 7, 1));
        let v = FactoredLayout::of(Factoring::of(&[5000]), Some(64));
        assert!(!v.factored);
        assert_eq!((v.cols, v.task_elems, v.tasks), (5000, 65_536, 1));
        assert_eq!(v.scratch_lens(), [1, 1, 0, 0, 0, 0]);
        assert_eq!(v.scratch_words(), 4);
        let empty = FactoredLayout::of(Factoring::of(&[0, 5]), None);
        assert_eq!((empty.scratch_lens(), empty.scratch_words()), ([0; 6], 0));
    }

    /// Wide matrices sum their columns directly: the partials would hold about two values per
    /// element (`[4096, 128256]`: 8.4 GB) or more than MAX_COLUMN_PARTIAL_BYTES.
    #[test]
    fn wide_matrices_sum_columns_directly() {
        let lens = |shape: &[usize]| {
            let l = FactoredLayout::of(Factoring::of(shape), Some(256));
            (l.direct_columns, l.scratch_lens()[2])
        };
        assert_eq!(lens(&[4096, 128_256]), (true, 128_256));
        assert_eq!(lens(&[2, 70_000]), (true, 70_000));
        assert_eq!(lens(&[3, 2, 33_000]), (true, 99_000));
        // 820 tasks of 5 rows: 72 MB of partials.
        assert_eq!(lens(&[4096, 11_008]), (true, 11_008));
        // 256 tasks of 16 rows: 8 MiB of partials.
        assert_eq!(lens(&[4096, 4096]), (false, 256 * 4096));
        assert_eq!(lens(&[32, 4, 64]), (false, 32 * 64));
        for shape in [
            &[4096, 128_256][..],
            &[4096, 11_008],
            &[4096, 4096],
            &[7, 3, 300],
        ] {
            let l = FactoredLayout::of(Factoring::of(shape), None);
            assert!(8 * l.scratch_lens()[2] <= MAX_COLUMN_PARTIAL_BYTES.max(8 * l.batch * l.cols));
        }
    }

    /// A parameter's scratch buffers sit side by side, f64 first, each f32 one from a word
    /// boundary, the scalars last, within `scratch_words` words.
    #[test]
    fn scratch_buffers_are_carved_in_order() {
        let l = FactoredLayout::of(Factoring::of(&[3, 5, 7]), None);
        // row sums 15, row squares 15, partials 3 · 7 (one task), means 3, row factors 15 f32
        // (8 words), col factors 21 f32 (11 words), scalars 2.
        assert_eq!(l.scratch_lens(), [15, 15, 21, 3, 15, 21]);
        assert_eq!(l.scratch_words(), 15 + 15 + 21 + 3 + 8 + 11 + 2);
        let s = FactoredScratch::within(0x1000, &l);
        let words = |a: u64| (a - 0x1000) / 8;
        assert_eq!(
            [
                s.row_sums,
                s.row_squares,
                s.col_partials,
                s.means,
                s.row_factors,
                s.col_factors,
                s.scalars
            ]
            .map(words),
            [0, 15, 30, 51, 54, 62, 73]
        );
    }

    #[test]
    fn scratch_runs_fit_the_budget_and_cover_every_parameter_once() {
        assert_eq!(scratch_runs(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(
            scratch_runs(&[4, 5, 2, 30, 1, 9], 10),
            [0..2, 2..3, 3..4, 4..6]
        );
        assert_eq!(scratch_runs(&[10, 10], 10), [0..1, 1..2]);
        assert_eq!(scratch_runs(&[3; 7], 1000), vec![0..7]);
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
