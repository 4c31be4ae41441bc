//! The step of factored optimizers (Adafactor, CAME) on the CPU: a few passes over a parameter,
//! its gradient and its momentum, each split in tasks of whole rows (and whole quantization
//! blocks) run on rayon's pool, with the widest instruction set the CPU has.
//!
//! Every sum is f64. Sums are taken in a fixed order that depends only on the parameter's shape
//! and the momentum's block size: each row in [`LANES`] interleaved partial sums (column `j`
//! into lane `j % LANES`, lanes added in order), a matrix's totals (`Σp²`, `Σu²`) as its rows'
//! sums in row order, columns row by row within a task, tasks in order; a vector's totals in
//! lanes per task, tasks in order. So the result does not depend on the thread count or on the
//! instruction set, and `kernels/factored.cu` reproduces it bit for bit.

use rayon::prelude::*;

use super::{
    absmax_bits, encode, portable, Element, Isa, IsaKind, MAX_BLOCK, PARALLEL_MIN_ELEMS, TASK_ELEMS,
};
use crate::factored::{FactoredState, Factoring, Momentum};
use crate::rules::{FactoredRule, SecondMomentStep};
use crate::QuantMap;

/// Interleaved partial sums of a row (or of a task).
const LANES: usize = 8;

/// f64 sums in [`LANES`] interleaved lanes: the value of column `j` goes to lane `j % LANES`.
#[derive(Clone, Copy, Default)]
struct Lanes([f64; LANES]);

impl Lanes {
    /// Adds `f(x)` of each `xs[k]`, the value of column `j0 + k`.
    #[inline(always)]
    fn add(&mut self, j0: usize, xs: &[f32], f: impl Fn(f32) -> f64) {
        let head = ((LANES - j0 % LANES) % LANES).min(xs.len());
        for (k, &x) in xs[..head].iter().enumerate() {
            self.0[(j0 + k) % LANES] += f(x);
        }
        let mut chunks = xs[head..].chunks_exact(LANES);
        for c in &mut chunks {
            for (lane, &x) in self.0.iter_mut().zip(c) {
                *lane += f(x);
            }
        }
        for (l, &x) in chunks.remainder().iter().enumerate() {
            self.0[l] += f(x);
        }
    }

    /// The lanes added in order.
    fn total(&self) -> f64 {
        self.0.iter().fold(0.0, |a, &b| a + b)
    }
}

/// Per-row totals of a task's values in [`Lanes`]: one total per finished row, in row order.
struct RowTotals {
    cols: usize,
    row: Lanes,
    totals: Vec<f64>,
}

impl RowTotals {
    fn new(cols: usize, rows: usize) -> Self {
        Self {
            cols,
            row: Lanes::default(),
            totals: Vec::with_capacity(rows),
        }
    }

    /// Adds `f(x)` of each `xs[k]`, the value of column `j0 + k` of the current row (in order
    /// after the values added before); a row's last value closes its total.
    #[inline(always)]
    fn add(&mut self, j0: usize, xs: &[f32], f: impl Fn(f32) -> f64) {
        self.row.add(j0, xs, f);
        if j0 + xs.len() == self.cols {
            self.totals.push(self.row.total());
            self.row = Lanes::default();
        }
    }
}

/// The sum of every row total, tasks in order and rows in order within a task.
fn sum_rows<'a>(parts: impl IntoIterator<Item = &'a [f64]>) -> f64 {
    parts.into_iter().flatten().fold(0.0, |a, &b| a + b)
}

/// Runs `f` compiled for `isa`: the passes' loops are inlined into it, so on AVX2 (and AVX-512,
/// where 256-bit vectors serve these sqrt- and conversion-bound loops as well) they are
/// vectorised 256 bits wide. Rust never contracts `a * b + c` into a fused multiply-add, so
/// every path rounds as the portable one.
#[inline(always)]
fn on_isa<O>(isa: Isa, f: impl FnOnce() -> O) -> O {
    match isa.kind() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: an `Isa` is only made by `Isa::available`, after detection; both AVX paths imply AVX2.
        IsaKind::Avx2 | IsaKind::Avx512 => unsafe { on_avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn on_avx2<O>(f: impl FnOnce() -> O) -> O {
    f()
}

/// Runs `f` on each task, on rayon's pool when the parameter is large, and returns the results
/// in task order.
fn run_tasks<I: Send, O: Send>(
    n: usize,
    tasks: Vec<I>,
    f: impl Fn(I) -> O + Sync + Send,
) -> Vec<O> {
    if n >= PARALLEL_MIN_ELEMS {
        tasks.into_par_iter().map(f).collect()
    } else {
        tasks.into_iter().map(f).collect()
    }
}

/// One task's share of the momentum.
enum MomentumChunk<'a> {
    None,
    F32(&'a mut [f32]),
    Blockwise {
        codes: &'a mut [u8],
        absmax: &'a mut [f32],
        map: &'a QuantMap,
        block_size: usize,
    },
}

/// The momentum cut into `task_elems`-element chunks (a multiple of its block size), one per
/// task; `None`s when there is no momentum.
fn momentum_chunks<'a>(
    momentum: Option<&'a mut Momentum>,
    task_elems: usize,
    tasks: usize,
) -> Vec<MomentumChunk<'a>> {
    match momentum {
        None => (0..tasks).map(|_| MomentumChunk::None).collect(),
        Some(Momentum::F32(m)) => m.chunks_mut(task_elems).map(MomentumChunk::F32).collect(),
        Some(Momentum::Blockwise(q)) => {
            let block_size = q.block_size();
            let (codes, absmax, map) = q.parts_mut();
            codes
                .chunks_mut(task_elems)
                .zip(absmax.chunks_mut(task_elems / block_size))
                .map(|(codes, absmax)| MomentumChunk::Blockwise {
                    codes,
                    absmax,
                    map,
                    block_size,
                })
                .collect()
        }
    }
}

/// A piece of a task: `len` (≤ [`MAX_BLOCK`]) consecutive elements from `start` (relative to the
/// task) that cross no row (of `cols` elements) and no quantization block.
#[derive(Clone, Copy)]
struct Piece {
    start: usize,
    len: usize,
}

/// The pieces of `[from, to)` (relative to a task starting at a row start), split at row ends.
#[inline(always)]
fn pieces(from: usize, to: usize, cols: usize, mut f: impl FnMut(Piece)) {
    let mut start = from;
    while start < to {
        let row_end = (start / cols + 1) * cols;
        let len = (row_end.min(to) - start).min(MAX_BLOCK);
        f(Piece { start, len });
        start += len;
    }
}

/// Visits a task of `len` elements piece by piece with its momentum values as f32 (dequantized
/// per block, and re-quantized after the block's pieces when `write`); without momentum the
/// values are a scratch buffer of zeros.
#[inline(always)]
fn with_momentum(
    isa: Isa,
    momentum: &mut MomentumChunk<'_>,
    len: usize,
    cols: usize,
    write: bool,
    mut f: impl FnMut(Piece, &mut [f32]),
) {
    match momentum {
        MomentumChunk::None => {
            let mut scratch = [0f32; MAX_BLOCK];
            pieces(0, len, cols, |piece| {
                let m = &mut scratch[..piece.len];
                m.fill(0.0);
                f(piece, m)
            });
        }
        MomentumChunk::F32(m) => pieces(0, len, cols, |piece| {
            f(piece, &mut m[piece.start..piece.start + piece.len])
        }),
        MomentumChunk::Blockwise {
            codes,
            absmax,
            map,
            block_size,
        } => {
            let mut buf = [0f32; MAX_BLOCK];
            let zero_code = map.lookup().code_by_search(0.0);
            for (b, start) in (0..len).step_by(*block_size).enumerate() {
                let block = start..(start + *block_size).min(len);
                let values = &mut buf[..block.len()];
                portable::decode(&codes[block.clone()], map.values(), absmax[b], values);
                pieces(block.start, block.end, cols, |piece| {
                    let at = piece.start - block.start;
                    f(piece, &mut values[at..at + piece.len])
                });
                if write {
                    let mut bits = absmax_bits(isa, values);
                    if bits >= 0x7F80_0000 {
                        saturate(values);
                        bits = absmax_bits(isa, values);
                    }
                    absmax[b] = f32::from_bits(bits);
                    let out = &mut codes[block];
                    if bits == 0 {
                        out.fill(zero_code);
                    } else {
                        encode(
                            isa,
                            values,
                            f32::from_bits(bits),
                            map.lookup(),
                            super::fused::as_uninit(out),
                        );
                    }
                }
            }
        }
    }
}

/// Replaces NaN by 0 and ±inf by ±f32::MAX, so an overflowing momentum saturates instead of
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

/// One step of `rule` over a parameter (`params`, `grads` as stored) and its state.
pub(crate) fn step<R: FactoredRule, T: Element>(
    isa: Isa,
    rule: &R,
    params: &mut [T],
    grads: &[T],
    state: &mut FactoredState,
) {
    if params.is_empty() {
        return;
    }
    let factoring = state.factoring();
    let (stats, momentum) = state.parts_mut();
    match factoring {
        Factoring::Factored { rows, cols, .. } => {
            step_factored(isa, rule, params, grads, (rows, cols), stats, momentum)
        }
        Factoring::Full { .. } => step_full(isa, rule, params, grads, &mut stats[0], momentum),
    }
}

/// How a factored step cuts a parameter into tasks: whole rows and whole quantization blocks
/// (about [`TASK_ELEMS`] elements each) for a matrix, whole blocks (or [`LANES`] elements) for
/// a vector. The CPU runs the tasks in parallel; the column sums' and vectors' totals are taken
/// per task, so the CUDA kernels use the same cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TaskLayout {
    /// Elements per task (the last may have fewer).
    pub(crate) task_elems: usize,
    /// Tasks over the parameter.
    pub(crate) tasks: usize,
}

impl TaskLayout {
    /// The tasks of a parameter factored as `factoring` whose momentum (if any) is quantized in
    /// blocks of `block_size`.
    pub(crate) fn of(factoring: Factoring, block_size: Option<usize>) -> Self {
        let unit = match (factoring, block_size) {
            (Factoring::Factored { cols, .. }, Some(bs)) => cols.max(1) / gcd(cols.max(1), bs) * bs,
            (Factoring::Factored { cols, .. }, None) => cols.max(1),
            (Factoring::Full { .. }, bs) => bs.unwrap_or(LANES),
        };
        let task_elems = unit * (TASK_ELEMS / unit).max(1);
        Self {
            task_elems,
            tasks: factoring.len().div_ceil(task_elems),
        }
    }

    /// For `batch` matrices of `rows × cols`: the rows of a task, and the most matrices one task
    /// touches (its column sums hold one partial per matrix it touches).
    pub(crate) fn matrix_split(&self, batch: usize, rows: usize, cols: usize) -> (usize, usize) {
        let rows_per_task = self.task_elems / cols.max(1);
        let touched = rows_per_task.div_ceil(rows.max(1)) + 1;
        (rows_per_task, touched.min(batch.max(1)))
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The momentum's block size, when quantized.
fn block_size(momentum: &Option<&mut Momentum>) -> Option<usize> {
    match momentum {
        Some(Momentum::Blockwise(q)) => Some(q.block_size()),
        _ => None,
    }
}

/// `rule` for a parameter of `n` elements whose squares sum to `squares` (0 when the rule does not
/// use the parameter's RMS; it then returns itself).
fn with_param_rms<R: FactoredRule>(rule: &R, squares: f64, n: usize) -> R {
    rule.with_param_rms((squares / n as f64).sqrt() as f32)
}

/// Exponential averages of row (or column) means: `stat ← β·stat + (1-β)·(sum / count)`, the
/// mean rounded to f32 once.
fn average(stat: &mut [f32], sums: &[f64], count: usize, beta: f32, one_minus_beta: f32) {
    for (s, &sum) in stat.iter_mut().zip(sums) {
        let mean = (sum / count as f64) as f32;
        *s = beta * *s + one_minus_beta * mean;
    }
}

/// The factors of a factored root: per row `1/√(row / mean of its matrix's rows)` (the mean in
/// f64), per column `1/√col`, each computed in f64 and rounded once; rows scaled by `scale`.
fn factors(row: &[f32], col: &[f32], rows: usize, scale: f64) -> (Vec<f32>, Vec<f32>) {
    let mut row_factors = Vec::with_capacity(row.len());
    for matrix in row.chunks(rows) {
        let mean = matrix.iter().map(|&r| r as f64).sum::<f64>() / rows as f64;
        row_factors.extend(
            matrix
                .iter()
                .map(|&r| (scale / (r as f64 / mean).sqrt()) as f32),
        );
    }
    let col_factors = col
        .iter()
        .map(|&c| (1.0 / (c as f64).sqrt()) as f32)
        .collect();
    (row_factors, col_factors)
}

/// The clipping divisor `max(1, RMS / clip_threshold)` of an update whose squares sum to `sum`
/// over `n` elements.
fn clip_divisor(sum: f64, n: usize, clip_threshold: f32) -> f64 {
    ((sum / n as f64).sqrt() / clip_threshold as f64).max(1.0)
}

/// Row, column and running sums of one task of a factored parameter (whole rows from its first),
/// fed piece by piece in order.
struct RowSums {
    cols: usize,
    rows_per_matrix: usize,
    /// The matrix of the task's first row.
    first_matrix: usize,
    /// One sum per finished row.
    rows: RowTotals,
    /// Per column of each matrix the task touches, from `first_matrix`.
    col_sums: Vec<f64>,
}

impl RowSums {
    /// The sums of a task of `len` elements from element `start` (a row start).
    fn new(start: usize, len: usize, cols: usize, rows_per_matrix: usize) -> Self {
        let (first_row, last_row) = (start / cols, (start + len).div_ceil(cols).max(1) - 1);
        let first_matrix = first_row / rows_per_matrix;
        let matrices = last_row / rows_per_matrix - first_matrix + 1;
        Self {
            cols,
            rows_per_matrix,
            first_matrix,
            rows: RowTotals::new(cols, len / cols),
            col_sums: vec![0f64; matrices * cols],
        }
    }

    /// Adds `xs`, the values of elements `start..start + xs.len()` (one row's, in order after the
    /// elements added before).
    #[inline(always)]
    fn add(&mut self, start: usize, xs: &[f32]) {
        let (row, j0) = (start / self.cols, start % self.cols);
        self.rows.add(j0, xs, |x| x as f64);
        let at = (row / self.rows_per_matrix - self.first_matrix) * self.cols + j0;
        for (c, &x) in self.col_sums[at..at + xs.len()].iter_mut().zip(xs) {
            *c += x as f64;
        }
    }

    /// Each task's sums added in task order: per row, per column of every matrix.
    fn merge(parts: Vec<RowSums>, n_rows: usize, n_cols: usize) -> (Vec<f64>, Vec<f64>) {
        let mut rows = Vec::with_capacity(n_rows);
        let mut cols = vec![0f64; n_cols];
        for part in parts {
            rows.extend_from_slice(&part.rows.totals);
            let at = part.first_matrix * part.cols;
            for (c, s) in cols[at..at + part.col_sums.len()]
                .iter_mut()
                .zip(&part.col_sums)
            {
                *c += s;
            }
        }
        (rows, cols)
    }
}

/// The factored step: statistics, clipping and update over `[batch, rows, cols]`; with a
/// confidence step (CAME), the residual statistics and the confidence-weighted update.
fn step_factored<R: FactoredRule, T: Element>(
    isa: Isa,
    rule: &R,
    params: &mut [T],
    grads: &[T],
    (rows, cols): (usize, usize),
    stats: &mut [Vec<f32>],
    mut momentum: Option<&mut Momentum>,
) {
    let n = params.len();
    let n_rows = n / cols;
    let factoring = Factoring::Factored {
        batch: n_rows / rows,
        rows,
        cols,
    };
    let TaskLayout {
        task_elems,
        tasks: n_tasks,
    } = TaskLayout::of(factoring, block_size(&momentum));
    let range = |t: usize| (t * task_elems, (task_elems).min(n - t * task_elems));
    let SecondMomentStep {
        eps1,
        beta2,
        one_minus_beta2,
        clip_threshold,
    } = rule.second_moment();
    let gs = rule.grad_scale();
    let uses_rms = rule.uses_param_rms();

    // Pass 1: row and column sums of g² + ε1 (and the parameter's squares).
    let shared: &[T] = params;
    let parts = run_tasks(n, (0..n_tasks).collect(), |t| {
        on_isa(isa, || {
            let (start, len) = range(t);
            let mut sums = RowSums::new(start, len, cols, rows);
            let mut squares = RowTotals::new(cols, len / cols);
            let (mut gbuf, mut pbuf, mut sq) =
                ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
            pieces(start, start + len, cols, |piece| {
                let span = piece.start..piece.start + piece.len;
                let g = T::load_f32(&grads[span.clone()], &mut gbuf[..piece.len]);
                for (s, &g) in sq.iter_mut().zip(g) {
                    let x = g * gs;
                    *s = x * x + eps1;
                }
                sums.add(piece.start, &sq[..piece.len]);
                if uses_rms {
                    let p = T::load_f32(&shared[span], &mut pbuf[..piece.len]);
                    squares.add(piece.start % cols, p, |x| (x as f64) * (x as f64));
                }
            });
            (sums, squares.totals)
        })
    });
    let param_squares = sum_rows(parts.iter().map(|(_, s)| s.as_slice()));
    let (row_sums, col_sums) = RowSums::merge(
        parts.into_iter().map(|(s, _)| s).collect(),
        n_rows,
        stats[1].len(),
    );
    average(&mut stats[0], &row_sums, cols, beta2, one_minus_beta2);
    average(&mut stats[1], &col_sums, rows, beta2, one_minus_beta2);
    let rule = with_param_rms(rule, param_squares, n);

    // Pass 2: the RMS of the update g·(row/mean row)^-½·col^-½, for clipping.
    let (row_factors, col_factors) = factors(&stats[0], &stats[1], rows, 1.0);
    let totals = run_tasks(n, (0..n_tasks).collect(), |t| {
        on_isa(isa, || {
            let (start, len) = range(t);
            let mut squares = RowTotals::new(cols, len / cols);
            let (mut gbuf, mut ubuf) = ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
            pieces(start, start + len, cols, |piece| {
                let (row, j0) = (piece.start / cols, piece.start % cols);
                let c = &col_factors[(row / rows) * cols + j0..][..piece.len];
                let r = row_factors[row];
                let g = T::load_f32(
                    &grads[piece.start..piece.start + piece.len],
                    &mut gbuf[..piece.len],
                );
                for ((u, &g), &c) in ubuf.iter_mut().zip(g).zip(c) {
                    *u = (g * gs * r) * c;
                }
                squares.add(j0, &ubuf[..piece.len], |u| (u as f64) * (u as f64));
            });
            squares.totals
        })
    });
    let divisor = clip_divisor(
        sum_rows(totals.iter().map(Vec::as_slice)),
        n,
        clip_threshold,
    );
    // The clipped update's row factors: the division by the divisor folded in.
    let (row_factors, _) = factors(&stats[0], &stats[1], rows, 1.0 / divisor);

    // Pass 3: the update, or with a confidence step the momentum and its residuals' sums.
    let confidence = rule.confidence();
    let tasks: Vec<_> = params
        .chunks_mut(task_elems)
        .zip(grads.chunks(task_elems))
        .zip(momentum_chunks(
            momentum.as_deref_mut(),
            task_elems,
            n_tasks,
        ))
        .enumerate()
        .collect();
    let parts = run_tasks(n, tasks, |(t, ((p, g), mut m))| {
        on_isa(isa, || {
            let start = t * task_elems;
            let len = p.len();
            let mut sums = confidence.map(|_| RowSums::new(start, len, cols, rows));
            let mut bufs = ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
            let (gbuf, pbuf, res) = (&mut bufs.0, &mut bufs.1, &mut bufs.2);
            with_momentum(isa, &mut m, len, cols, true, |piece, m| {
                let global = start + piece.start;
                let (row, j0) = (global / cols, global % cols);
                let c = &col_factors[(row / rows) * cols + j0..][..piece.len];
                let r = row_factors[row];
                let span = piece.start..piece.start + piece.len;
                let gf = T::load_f32(&g[span.clone()], &mut gbuf[..piece.len]);
                match (&confidence, &mut sums) {
                    (Some(came), Some(sums)) => {
                        for (((x, &g), &c), m) in res.iter_mut().zip(gf).zip(c).zip(m.iter_mut()) {
                            *x = came.residual((g * gs * r) * c, m);
                        }
                        sums.add(global, &res[..piece.len]);
                    }
                    _ => T::update_f32(&mut p[span], &mut pbuf[..piece.len], |pf| {
                        for (((p, &g), &c), m) in pf.iter_mut().zip(gf).zip(c).zip(m.iter_mut()) {
                            *p = rule.apply(*p, (g * gs * r) * c, m);
                        }
                    }),
                }
            });
            sums
        })
    });
    let Some(came) = confidence else {
        return;
    };

    // CAME: the residual statistics, then pass 4: the confidence-weighted momentum.
    let (res_rows, res_cols) = RowSums::merge(
        parts.into_iter().flatten().collect(),
        n_rows,
        stats[3].len(),
    );
    let (beta3, one_minus_beta3) = came.beta3();
    average(&mut stats[2], &res_rows, cols, beta3, one_minus_beta3);
    average(&mut stats[3], &res_cols, rows, beta3, one_minus_beta3);
    let (row_factors, col_factors) = factors(&stats[2], &stats[3], rows, 1.0);
    let tasks: Vec<_> = params
        .chunks_mut(task_elems)
        .zip(momentum_chunks(momentum, task_elems, n_tasks))
        .enumerate()
        .collect();
    run_tasks(n, tasks, |(t, (p, mut m))| {
        on_isa(isa, || {
            let start = t * task_elems;
            let mut pbuf = [0f32; MAX_BLOCK];
            with_momentum(isa, &mut m, p.len(), cols, false, |piece, m| {
                let global = start + piece.start;
                let (row, j0) = (global / cols, global % cols);
                let c = &col_factors[(row / rows) * cols + j0..][..piece.len];
                let r = row_factors[row];
                let span = piece.start..piece.start + piece.len;
                T::update_f32(&mut p[span], &mut pbuf[..piece.len], |pf| {
                    for ((p, &c), &m) in pf.iter_mut().zip(c).zip(m.iter()) {
                        *p = came.apply_confident(*p, (m * r) * c);
                    }
                })
            });
        })
    });
}

/// The step of a parameter of fewer than two dims: a full second moment `v` per element.
fn step_full<R: FactoredRule, T: Element>(
    isa: Isa,
    rule: &R,
    params: &mut [T],
    grads: &[T],
    v: &mut [f32],
    momentum: Option<&mut Momentum>,
) {
    let n = params.len();
    let TaskLayout {
        task_elems,
        tasks: n_tasks,
    } = TaskLayout::of(Factoring::Full { len: n }, block_size(&momentum));
    let SecondMomentStep {
        eps1,
        beta2,
        one_minus_beta2,
        clip_threshold,
    } = rule.second_moment();
    let gs = rule.grad_scale();
    let uses_rms = rule.uses_param_rms();

    // Pass 1: the second moment, the update's squares (and the parameter's).
    let shared: &[T] = params;
    let tasks: Vec<_> = v.chunks_mut(task_elems).enumerate().collect();
    let parts = run_tasks(n, tasks, |(t, v)| {
        on_isa(isa, || {
            let start = t * task_elems;
            let (mut updates, mut squares) = (Lanes::default(), Lanes::default());
            let (mut gbuf, mut pbuf, mut ubuf) =
                ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
            for (k, v) in (0..v.len()).step_by(MAX_BLOCK).zip(v.chunks_mut(MAX_BLOCK)) {
                let span = start + k..start + k + v.len();
                let g = T::load_f32(&grads[span.clone()], &mut gbuf[..v.len()]);
                for ((u, v), &g) in ubuf.iter_mut().zip(v.iter_mut()).zip(g) {
                    let x = g * gs;
                    *v = beta2 * *v + one_minus_beta2 * (x * x + eps1);
                    *u = x / v.sqrt();
                }
                updates.add(span.start, &ubuf[..v.len()], |u| (u as f64) * (u as f64));
                if uses_rms {
                    let p = T::load_f32(&shared[span.clone()], &mut pbuf[..v.len()]);
                    squares.add(span.start, p, |x| (x as f64) * (x as f64));
                }
            }
            (updates.total(), squares.total())
        })
    });
    let (updates, param_squares) = parts
        .iter()
        .fold((0.0, 0.0), |(a, b), (u, p)| (a + u, b + p));
    let rule = with_param_rms(rule, param_squares, n);
    let inverse = (1.0 / clip_divisor(updates, n, clip_threshold)) as f32;

    // Pass 2: the update.
    let tasks: Vec<_> = params
        .chunks_mut(task_elems)
        .zip(grads.chunks(task_elems))
        .zip(v.chunks(task_elems))
        .zip(momentum_chunks(momentum, task_elems, n_tasks))
        .collect();
    run_tasks(n, tasks, |(((p, g), v), mut m)| {
        on_isa(isa, || {
            let (mut gbuf, mut pbuf) = ([0f32; MAX_BLOCK], [0f32; MAX_BLOCK]);
            with_momentum(isa, &mut m, p.len(), task_elems, true, |piece, m| {
                let span = piece.start..piece.start + piece.len;
                let gf = T::load_f32(&g[span.clone()], &mut gbuf[..piece.len]);
                let v = &v[span.clone()];
                T::update_f32(&mut p[span], &mut pbuf[..piece.len], |pf| {
                    for (((p, &g), &v), m) in pf.iter_mut().zip(gf).zip(v).zip(m.iter_mut()) {
                        let x = g * gs;
                        *p = rule.apply(*p, (x / v.sqrt()) * inverse, m);
                    }
                })
            });
        })
    });
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::{AdafactorRule, AdafactorStepSize, CameRule, ScaledGrad};

    fn adafactor(step: u64, beta1: Option<f64>) -> AdafactorRule {
        let size = AdafactorStepSize::Relative { warmup_init: false };
        AdafactorRule::new(step, size, (1e-30, 1e-3), 1.0, -0.8, beta1, 0.01, true)
    }

    fn came() -> CameRule {
        CameRule::new(2e-4, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.01)
    }

    /// Runs `steps` steps of `rule` on a copy of `params` with `isa`, returning the parameter and
    /// the state.
    fn run<R: FactoredRule, T: Element>(
        isa: Isa,
        rule: &R,
        dims: &[usize],
        params: &[T],
        grads: &[Vec<T>],
        block_size: Option<usize>,
    ) -> (Vec<T>, FactoredState) {
        let mut p = params.to_vec();
        let mut state = FactoredState::new(rule, dims, block_size).unwrap();
        for g in grads {
            step(isa, rule, &mut p, g, &mut state);
        }
        (p, state)
    }

    fn bits<T: Element>(xs: &[T]) -> Vec<u32> {
        xs.iter().map(|x| x.to_f32().to_bits()).collect()
    }

    fn state_bits(s: &FactoredState) -> Vec<u32> {
        let mut out: Vec<u32> = s.stats().iter().flat_map(|(_, v)| bits(v)).collect();
        if let Some(m) = s.momentum() {
            out.extend(bits(&m.to_f32()));
        }
        out
    }

    fn random(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Shapes around the task and block boundaries: single elements, rows that are not
    /// multiples of the lanes or blocks, matrices whose batches straddle 8-bit blocks, and a
    /// parameter large enough to run in parallel.
    const SHAPES: &[&[usize]] = &[
        &[1],
        &[7],
        &[1, 1],
        &[33, 65],
        &[3, 17, 9],
        &[1, 4096],
        &[5, 4099],
        &[2, 3, 1000],
        &[300_001],
        &[513, 600],
    ];

    fn check_isas<R: FactoredRule>(name: &str, make: impl Fn(u64) -> R) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for dims in SHAPES {
            let n: usize = dims.iter().product();
            let params = random(&mut rng, n);
            let grads: Vec<Vec<f32>> = (0..3).map(|_| random(&mut rng, n)).collect();
            for bs in [None, Some(64), Some(256)] {
                let rule = ScaledGrad::new(make(1), 0.75);
                let portable = Isa(IsaKind::Portable);
                let (want_p, want_s) = run(portable, &rule, dims, &params, &grads, bs);
                for isa in Isa::available() {
                    let (p, s) = run(isa, &rule, dims, &params, &grads, bs);
                    assert_eq!(bits(&p), bits(&want_p), "{name} {isa:?} {dims:?} {bs:?}");
                    assert_eq!(
                        state_bits(&s),
                        state_bits(&want_s),
                        "{name} {isa:?} {dims:?}"
                    );
                }
                // One thread gives what the pool gives.
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                let (p, s) =
                    pool.install(|| run(Isa::selected(), &rule, dims, &params, &grads, bs));
                assert_eq!(bits(&p), bits(&want_p), "{name} one thread {dims:?} {bs:?}");
                assert_eq!(
                    state_bits(&s),
                    state_bits(&want_s),
                    "{name} one thread {dims:?}"
                );
            }
        }
    }

    #[test]
    fn every_isa_and_thread_count_step_adafactor_alike() {
        check_isas("adafactor", |t| adafactor(t, Some(0.9)));
        check_isas("adafactor without momentum", |t| adafactor(t, None));
    }

    #[test]
    fn every_isa_and_thread_count_step_came_alike() {
        check_isas("came", |_| came());
    }

    #[test]
    fn half_parameters_step_as_their_f32_values_rounded_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let dims = [33, 65];
        let n = 33 * 65;
        let p32: Vec<f32> = random(&mut rng, n);
        let g32: Vec<f32> = random(&mut rng, n);
        let ph: Vec<f16> = p32.iter().map(|&x| f16::from_f32(x)).collect();
        let gh: Vec<f16> = g32.iter().map(|&x| f16::from_f32(x)).collect();
        let pb: Vec<bf16> = p32.iter().map(|&x| bf16::from_f32(x)).collect();
        let gb: Vec<bf16> = g32.iter().map(|&x| bf16::from_f32(x)).collect();
        let isa = Isa::selected();
        let rule = came();
        let (out_h, _) = run(isa, &rule, &dims, &ph, std::slice::from_ref(&gh), None);
        let up = |xs: &[f16]| xs.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (want, _) = run(isa, &rule, &dims, &up(&ph), &[up(&gh)], None);
        let want_h: Vec<f16> = want.iter().map(|&x| f16::from_f32(x)).collect();
        assert_eq!(out_h, want_h);
        let (out_b, _) = run(isa, &rule, &dims, &pb, std::slice::from_ref(&gb), None);
        let upb = |xs: &[bf16]| xs.iter().map(|x| x.to_f32()).collect::<Vec<_>>();
        let (want, _) = run(isa, &rule, &dims, &upb(&pb), &[upb(&gb)], None);
        let want_b: Vec<bf16> = want.iter().map(|&x| bf16::from_f32(x)).collect();
        assert_eq!(out_b, want_b);
    }

    #[test]
    fn lanes_sum_in_column_order_whatever_the_split() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let xs = random(&mut rng, 1001);
        let mut whole = Lanes::default();
        whole.add(0, &xs, |x| x as f64);
        let mut split = Lanes::default();
        for (a, b) in [(0, 3), (3, 17), (17, 500), (500, 1001)] {
            split.add(a, &xs[a..b], |x| x as f64);
        }
        assert_eq!(whole.total().to_bits(), split.total().to_bits());
        let direct = xs.iter().map(|&x| x as f64).sum::<f64>();
        assert!((whole.total() - direct).abs() < 1e-12);
    }
}
