// Factored-second-moment optimizers (Adafactor, CAME). Mirrors src/cpu/factored.rs pass for
// pass, with the same order of every f64 sum (docs/factored-optimizers.md §6), so parameters
// and states come out bit-identical to the CPU's:
//  - a row's sum: 8 interleaved lanes (column j into lane j % 8, in increasing j), added lane 0
//    to 7; here 8 consecutive threads per row, one per lane, combined by shuffles in lane order;
//  - a matrix's totals (Σp², Σu²): its rows' sums in row order (one thread, `average`,
//    `divisor`);
//  - a column's sum: per task (TaskLayout in cpu/factored.rs: whole rows, about 65536
//    elements), the task's rows in order; then the tasks' partial sums in task order. Either
//    one thread per task, matrix touched and column writes the partials and `average` adds
//    them, or (wide matrices, slot flag kDirectColumns) one thread per column does both;
//  - a vector's totals: 8 lanes per task (8 threads), tasks in order (`divisor`).
//
// Every kernel is multi-tensor: it takes a table of slots (parameters of one dtype, all
// matrices or all vectors) and steps each in turn, the work of a slot spread over the whole
// grid; the one-thread work (`divisor`, the scalars of `average`) takes a thread per slot.
// A step is a fixed sequence of launches per such table on one stream (src/cuda/factored.rs
// `launch_factored`); every launch reads the pre-pass's skip flag and gradient scales
// (norms.cu), so nothing is read back by the host:
//   matrices [batch, rows, cols]: rows(kStats), cols(kStats), average(0), means(0), factors(0),
//     rows(kSquares), divisor, factors(0); then Adafactor: apply(kUpdate); CAME: rows(kResidual),
//     cols(kResidual), apply(kAdvance), average(1), means(1), factors(1), apply(kConfident);
//   vectors or scalars: full_stats, divisor, apply(kFullUpdate).
// The state is the slot's: the statistics (f32), the momentum (none, f32, or 8-bit blockwise
// with the signed dynamic map, whose QuantTable a launch gets when one of its slots has such a
// momentum), and the slot's own scratch (FactoredScratch in src/slot_table.rs).
//
// Launch (every kernel here): blockDim.x = 256 (kThreads), any grid (grid-stride), no dynamic
// shared memory. Compile as fused.cu (--fmad=false -prec-div=true -prec-sqrt=true -ftz=false):
// the rules and sums are plain operators that must round as the Rust code.

#include "element.cuh"
#include "lookup.cuh"
#include "reduce.cuh"
#include "rules/adafactor.cuh"
#include "rules/came.cuh"

namespace bnb {

// Interleaved partial sums of a row or a vector's task (cpu/factored.rs LANES).
constexpr int kSumLanes = 8;
// Elements per thread in `apply`: a quantization block of B elements is owned by B / 16 threads.
constexpr int kRun = 16;
// The block `apply` tiles parameters without an 8-bit momentum with.
constexpr int kPlainBlock = 256;

enum MomentumKind : unsigned { kNoMomentum = 0, kF32Momentum = 1, kQ8Momentum = 2 };
// FactoredSlot::flags.
enum SlotFlags : unsigned { kFactored = 1, kDirectColumns = 2 };

// What `rows` and `cols` sum per element: the squared gradient plus eps1 (the statistics), the
// clipped update's square (its RMS), CAME's residual with the advanced momentum.
enum SumPass : int { kStats = 0, kSquares = 1, kResidual = 2 };
// What `apply` does per element: Adafactor's (and a vector's) update from the factored or the
// full statistic, CAME's momentum step (the momentum only), CAME's confidence-weighted update.
enum ApplyPass : int { kUpdate = 0, kAdvance = 1, kConfident = 2, kFullUpdate = 3 };

// One parameter of a factored step; the host writes it into device memory every step
// (slot_table.rs FactoredSlot, #[repr(C)]-style, 8-byte aligned). Offsets in bytes:
//    0  param          T*         updated in place
//    8  grad           const T*   its gradient
//   16  stats[4]       float*     row, col, res_row, res_col (factored) or the full statistic in
//                                 stats[0]; unused ones null
//   48  momentum       void*      f32 values or u8 codes; null without momentum
//   56  absmax         float*     the momentum's per-block scales (8-bit), else null
//   64  batch, rows, cols         factored: the matrices' shape; a vector: 1, 1, n
//   88  n              u64        elements
//   96  task_elems     u64        elements per task (TaskLayout)
//  104  block_size     u64        the momentum's quantization block (8-bit), else 0
//  112  scale_index    u64        this parameter's gradient scale in grad_scales
//  120  momentum_kind  u32        MomentumKind
//  124  flags          u32        SlotFlags
//  128  row_sums       double*    per row (matrix) or per task (vector)
//  136  row_squares    double*    Σp² per row (matrix) or per task (vector)
//  144  col_partials   double*    tasks × matrices per task × cols; with kDirectColumns the
//                                 column sums (batch × cols)
//  152  means          double*    per matrix, the mean of its row statistic
//  160  row_factors    float*     per row
//  168  col_factors    float*     per column of each matrix
//  176  scalars        double*    [0] the row factors' scale, [1] a vector's 1 / divisor
//  184  rule           Rule       the Rust rule struct as it is (rules/*.cuh)
template <class Rule>
struct FactoredSlot {
  void* param;
  const void* grad;
  float* stats[4];
  void* momentum;
  float* absmax;
  unsigned long long batch, rows, cols, n, task_elems, block_size, scale_index;
  unsigned momentum_kind, flags;
  double* row_sums;
  double* row_squares;
  double* col_partials;
  double* means;
  float* row_factors;
  float* col_factors;
  double* scalars;
  Rule rule;
};
static_assert(sizeof(FactoredSlot<AdafactorRule>) == 240, "layout shared with slot_table.rs");
static_assert(sizeof(FactoredSlot<CameRule>) == 232, "layout shared with slot_table.rs");

using u64 = unsigned long long;

__device__ __forceinline__ u64 global_thread() {
  return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ u64 grid_threads() { return (u64)gridDim.x * blockDim.x; }
__device__ __forceinline__ u64 min_u64(u64 a, u64 b) { return a < b ? a : b; }
__device__ __forceinline__ u64 max_u64(u64 a, u64 b) { return a > b ? a : b; }

// How a matrix's rows split into tasks (TaskLayout::matrix_split): rows per task, and the most
// matrices one task touches (at most all of them).
struct Split {
  u64 rows_per_task, mats_per_task, tasks;
};
template <class Rule>
__device__ __forceinline__ Split split_of(const FactoredSlot<Rule>& s) {
  Split sp;
  sp.rows_per_task = s.task_elems / s.cols;
  sp.mats_per_task = min_u64((sp.rows_per_task + s.rows - 1) / s.rows + 1, s.batch);
  sp.tasks = (s.batch * s.rows + sp.rows_per_task - 1) / sp.rows_per_task;
  return sp;
}

// The start of every kernel that reads elements: false when the step is skipped; else the
// launch's QuantTable (passed when one of its slots has an 8-bit momentum) is in `table`.
__device__ __forceinline__ bool begin_elements(const int* skip, QuantTable& table,
                                               const QuantTable* tables) {
  if (*skip != 0) return false;
  if (tables != nullptr) {
    load_table(table, tables);
    __syncthreads();
  }
  return true;
}

// A parameter's elements as f32, through its slot.
template <class T, class Rule>
struct Elements {
  const FactoredSlot<Rule>& s;
  float scale;  // the gradient's scale (clipping), as ScaledGrad hands it to the rules
  const QuantTable* table;

  __device__ __forceinline__ float grad(u64 i) const {
    return to_f32(static_cast<const T*>(s.grad)[i]) * scale;
  }
  __device__ __forceinline__ float param(u64 i) const {
    return to_f32(static_cast<const T*>(s.param)[i]);
  }
  __device__ __forceinline__ void set_param(u64 i, float p) const {
    static_cast<T*>(s.param)[i] = from_f32<T>(p);
  }
  // The stored momentum (dequantized: values[code] * absmax, as the CPU's decode); 0 without.
  __device__ __forceinline__ float momentum(u64 i) const {
    if (s.momentum_kind == kF32Momentum) return static_cast<const float*>(s.momentum)[i];
    if (s.momentum_kind == kQ8Momentum)
      return table->values[static_cast<const unsigned char*>(s.momentum)[i]] *
             s.absmax[i / s.block_size];
    return 0.0f;
  }
  // The clipped factored update of element (row, j): ((g * scale) * row factor) * col factor.
  __device__ __forceinline__ float update(u64 row, u64 j) const {
    const float x = grad(row * s.cols + j);
    return (x * s.row_factors[row]) * s.col_factors[(row / s.rows) * s.cols + j];
  }
  // What `pass` sums for element (row, j), as the CPU adds it (f32 widened; u squared in f64).
  __device__ __forceinline__ double summand(int pass, const Rule& rule, u64 row, u64 j) const {
    if (pass == kStats) {
      const float x = grad(row * s.cols + j);
      return (double)(x * x + rule.eps1);
    }
    const float u = update(row, j);
    if (pass == kSquares) return (double)u * (double)u;
    float m = momentum(row * s.cols + j);
    return (double)rule.residual(u, m);
  }
};

// The lane sums of the 8 threads of a row (or task) added in lane order, in every one of them.
// Every thread of the warp calls it.
__device__ __forceinline__ double lanes_total(double lane_sum) {
  const int first = (threadIdx.x % 32) & ~(kSumLanes - 1);
  double total = 0.0;
#pragma unroll
  for (int k = 0; k < kSumLanes; ++k) total += __shfl_sync(kFullMask, lane_sum, first + k);
  return total;
}

// Per row: the sum of `pass`'s summands into row_sums (and with kStats, for a rule that scales
// by the parameter's RMS, Σp² into row_squares). 8 threads per row, 32 rows per CUDA block.
template <class T, class Rule>
__device__ void rows_of(const FactoredSlot<Rule>& s, const float* grad_scales,
                        const QuantTable& table, int pass) {
  const Rule rule = s.rule;
  const Elements<T, Rule> e{s, grad_scales[s.scale_index], &table};
  const bool squares = pass == kStats && rule.uses_param_rms();
  const u64 n_rows = s.batch * s.rows;
  const int lane = threadIdx.x % 32, sub = lane % kSumLanes;
  constexpr u64 kRowsPerWarp = 32 / kSumLanes, kRowsPerBlock = kThreads / kSumLanes;
  // The loop runs alike for the whole warp (its shuffles need every lane).
  for (u64 base = (u64)blockIdx.x * kRowsPerBlock + (threadIdx.x / 32) * kRowsPerWarp;
       base < n_rows; base += (u64)gridDim.x * kRowsPerBlock) {
    const u64 row = base + lane / kSumLanes;
    const bool valid = row < n_rows;
    double sum = 0.0, sq = 0.0;
    if (valid) {
      for (u64 j = sub; j < s.cols; j += kSumLanes) {
        sum += e.summand(pass, rule, row, j);
        if (squares) {
          const double p = e.param(row * s.cols + j);
          sq += p * p;
        }
      }
    }
    const double total = lanes_total(sum), total_sq = lanes_total(sq);
    if (valid && sub == 0) {
      s.row_sums[row] = total;
      if (squares) s.row_squares[row] = total_sq;
    }
  }
}

// Per task, matrix it touches and column: the sum of `pass`'s summands over the task's rows of
// that matrix, in row order, into col_partials[(task * mats_per_task + k) * cols + column]
// (k: the matrix's index among those the task touches). With kDirectColumns, per column of
// each matrix: those sums for each task in order, added up into col_partials[matrix * cols +
// column] (the same additions in the same order, without the partials' memory).
template <class T, class Rule>
__device__ void cols_of(const FactoredSlot<Rule>& s, const float* grad_scales,
                        const QuantTable& table, int pass) {
  const Rule rule = s.rule;
  const Elements<T, Rule> e{s, grad_scales[s.scale_index], &table};
  const Split sp = split_of(s);
  const u64 n_rows = s.batch * s.rows;
  if (s.flags & kDirectColumns) {
    for (u64 it = global_thread(); it < s.batch * s.cols; it += grid_threads()) {
      const u64 c = it % s.cols, first = (it / s.cols) * s.rows, end = first + s.rows;
      double total = 0.0;
      for (u64 task = first / sp.rows_per_task; task * sp.rows_per_task < end; ++task) {
        double sum = 0.0;
        const u64 to = min_u64(end, (task + 1) * sp.rows_per_task);
        for (u64 r = max_u64(first, task * sp.rows_per_task); r < to; ++r)
          sum += e.summand(pass, rule, r, c);
        total += sum;
      }
      s.col_partials[it] = total;
    }
    return;
  }
  const u64 items = sp.tasks * sp.mats_per_task * s.cols;
  for (u64 it = global_thread(); it < items; it += grid_threads()) {
    const u64 c = it % s.cols, k = (it / s.cols) % sp.mats_per_task;
    const u64 task = it / s.cols / sp.mats_per_task;
    const u64 first = task * sp.rows_per_task;
    const u64 end = min_u64(first + sp.rows_per_task, n_rows);
    const u64 m = first / s.rows + k;
    if (m * s.rows >= end) continue;  // the task touches fewer matrices
    double sum = 0.0;
    for (u64 r = max_u64(first, m * s.rows); r < min_u64(end, (m + 1) * s.rows); ++r)
      sum += e.summand(pass, rule, r, c);
    s.col_partials[it] = sum;
  }
}

// Statistic pair `which` (0: row, col; 1: res_row, res_col) from the sums of `rows` and `cols`:
// stat <- beta * stat + (1 - beta) * (sum / count), the mean rounded to f32 once.
template <class Rule>
__device__ void average_of(const FactoredSlot<Rule>& s, int which) {
  float beta, one_minus;
  s.rule.stat_decay(which, beta, one_minus);
  float* row_stat = s.stats[2 * which];
  float* col_stat = s.stats[2 * which + 1];
  const Split sp = split_of(s);
  const u64 n_rows = s.batch * s.rows, n_cols = s.batch * s.cols;
  for (u64 it = global_thread(); it < n_rows + n_cols; it += grid_threads()) {
    if (it < n_rows) {
      const float mean = (float)(s.row_sums[it] / (double)s.cols);
      row_stat[it] = beta * row_stat[it] + one_minus * mean;
    } else {
      const u64 gc = it - n_rows, m = gc / s.cols, c = gc % s.cols;
      double total = 0.0;
      if (s.flags & kDirectColumns) {
        total = s.col_partials[gc];
      } else {
        const u64 last = ((m + 1) * s.rows - 1) / sp.rows_per_task;
        for (u64 task = m * s.rows / sp.rows_per_task; task <= last; ++task) {
          const u64 k = m - task * sp.rows_per_task / s.rows;
          total += s.col_partials[(task * sp.mats_per_task + k) * s.cols + c];
        }
      }
      const float mean = (float)(total / (double)s.rows);
      col_stat[gc] = beta * col_stat[gc] + one_minus * mean;
    }
  }
}

// One thread per slot, beside `average_of` (it reads none of what this writes): the row
// factors' scale reset to 1 and, for pair 0 of a rule that scales by the parameter's RMS, Σp²
// (rows in order) sets it.
template <class Rule>
__device__ void average_scalars(FactoredSlot<Rule>& s, int which) {
  s.scalars[0] = 1.0;
  if (which == 0 && s.rule.uses_param_rms()) {
    double sq = 0.0;
    for (u64 r = 0; r < s.batch * s.rows; ++r) sq += s.row_squares[r];
    s.rule.set_param_rms((float)sqrt(sq / (double)s.n));
  }
}

// Matrix m's mean of row statistic `which` (a plain sum of its rows in order).
template <class Rule>
__device__ void mean_of(const FactoredSlot<Rule>& s, u64 m, int which) {
  const float* row_stat = s.stats[2 * which];
  double sum = 0.0;
  for (u64 r = 0; r < s.rows; ++r) sum += (double)row_stat[m * s.rows + r];
  s.means[m] = sum / (double)s.rows;
}

// The factors of pair `which`: per row scalars[0] / sqrt(row / mean of its matrix), per column
// 1 / sqrt(col), each in f64 and rounded once.
template <class Rule>
__device__ void factors_of(const FactoredSlot<Rule>& s, int which) {
  const float* row_stat = s.stats[2 * which];
  const float* col_stat = s.stats[2 * which + 1];
  const double scale = s.scalars[0];
  const u64 n_rows = s.batch * s.rows, n_cols = s.batch * s.cols;
  for (u64 it = global_thread(); it < n_rows + n_cols; it += grid_threads()) {
    if (it < n_rows) {
      s.row_factors[it] = (float)(scale / sqrt((double)row_stat[it] / s.means[it / s.rows]));
    } else {
      s.col_factors[it - n_rows] = (float)(1.0 / sqrt((double)col_stat[it - n_rows]));
    }
  }
}

// One thread per slot: the clipping divisor max(1, sqrt(Σu² / n) / clip_threshold) (f64). A
// matrix: Σu² is its rows' sums in order, and scalars[0] becomes 1 / divisor (the row factors'
// scale). A vector: the tasks' sums in order, Σp² likewise sets the parameter's RMS, and
// scalars[1] becomes 1 / divisor rounded to f32.
template <class Rule>
__device__ void divisor_of(FactoredSlot<Rule>& s) {
  const bool factored = (s.flags & kFactored) != 0;
  const u64 parts = factored ? s.batch * s.rows : (s.n + s.task_elems - 1) / s.task_elems;
  double total = 0.0, sq = 0.0;
  for (u64 i = 0; i < parts; ++i) total += s.row_sums[i];
  const double divisor = fmax(sqrt(total / (double)s.n) / (double)s.rule.clip_threshold, 1.0);
  if (factored) {
    s.scalars[0] = 1.0 / divisor;
    return;
  }
  if (s.rule.uses_param_rms()) {
    for (u64 i = 0; i < parts; ++i) sq += s.row_squares[i];
    s.rule.set_param_rms((float)sqrt(sq / (double)s.n));
  }
  s.scalars[1] = (double)(float)(1.0 / divisor);
}

// A vector's first pass, 8 threads per task (lanes by element index), 32 tasks per CUDA block:
// the statistic v <- beta2 * v + (1 - beta2) * (x² + eps1) in place, and per task the lane sums
// of u² (u = x / sqrt(v)) and of p² into row_sums and row_squares.
template <class T, class Rule>
__device__ void full_stats_of(const FactoredSlot<Rule>& s, const float* grad_scales) {
  const Rule rule = s.rule;
  const Elements<T, Rule> e{s, grad_scales[s.scale_index], nullptr};
  const bool squares = rule.uses_param_rms();
  const u64 tasks = (s.n + s.task_elems - 1) / s.task_elems;
  const int lane = threadIdx.x % 32, sub = lane % kSumLanes;
  constexpr u64 kTasksPerWarp = 32 / kSumLanes, kTasksPerBlock = kThreads / kSumLanes;
  for (u64 base = (u64)blockIdx.x * kTasksPerBlock + (threadIdx.x / 32) * kTasksPerWarp;
       base < tasks; base += (u64)gridDim.x * kTasksPerBlock) {
    const u64 task = base + lane / kSumLanes;
    const bool valid = task < tasks;
    double sum = 0.0, sq = 0.0;
    if (valid) {
      const u64 end = min_u64((task + 1) * s.task_elems, s.n);
      for (u64 i = task * s.task_elems + sub; i < end; i += kSumLanes) {
        const float x = e.grad(i);
        const float v = rule.beta2 * s.stats[0][i] + rule.one_minus_beta2 * (x * x + rule.eps1);
        s.stats[0][i] = v;
        const float u = x / sqrtf(v);
        sum += (double)u * (double)u;
        if (squares) {
          const double p = e.param(i);
          sq += p * p;
        }
      }
    }
    const double total = lanes_total(sum), total_sq = lanes_total(sq);
    if (valid && sub == 0) {
      s.row_sums[task] = total;
      s.row_squares[task] = total_sq;
    }
  }
}

// NaN -> 0, ±inf -> ±FLT_MAX (cpu/factored.rs `saturate`; the identity on finite values, so it
// is applied to every value, as fused.cu does).
__device__ __forceinline__ float saturate_value(float v) {
  return isnan(v) ? 0.0f : fminf(fmaxf(v, -3.402823466e38f), 3.402823466e38f);
}

// The update passes (ApplyPass), element by element, each thread 16 consecutive elements of
// one block (the momentum's quantization block, or kPlainBlock): an 8-bit momentum is
// dequantized, stepped and requantized per block (absmax over the block after saturation),
// exactly as cpu/factored.rs `with_momentum`.
template <class T, class Rule>
__device__ void apply_of(const FactoredSlot<Rule>& s, const float* grad_scales,
                         const QuantTable& table, bool has_table, unsigned (*scratch)[kWarps],
                         int pass) {
  const bool q8 = s.momentum_kind == kQ8Momentum;
  if (q8 && !has_table) __trap();
  const unsigned char zero_code = q8 ? code_of(table, 0.0f) : 0;
  const Rule rule = s.rule;
  const Elements<T, Rule> e{s, grad_scales[s.scale_index], &table};
  const bool write_momentum = pass != kConfident && s.momentum_kind != kNoMomentum;
  const float inverse = (float)s.scalars[1];
  const int block = q8 ? (int)s.block_size : kPlainBlock;
  if (block < kRun || block > 4096 || (block & (block - 1)) != 0) __trap();
  const int group = block / kRun, lane = threadIdx.x % group;
  const u64 per_tile = kThreads / group;
  const u64 blocks = (s.n + block - 1) / block;
  const u64 tiles = (blocks + per_tile - 1) / per_tile;
  for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const u64 b = tile * per_tile + threadIdx.x / group;
    const u64 first = b * block + (u64)lane * kRun;
    const int live = (b < blocks && first < s.n) ? (int)min_u64(kRun, s.n - first) : 0;
    float m[kRun];
#pragma unroll
    for (int j = 0; j < kRun; ++j) m[j] = j < live ? e.momentum(first + j) : 0.0f;
    for (int j = 0; j < live; ++j) {
      const u64 i = first + j;
      const u64 row = i / s.cols, col = i % s.cols;
      switch (pass) {
        case kUpdate:
          e.set_param(i, rule.apply(e.param(i), e.update(row, col), m[j]));
          break;
        case kAdvance:
          rule.residual(e.update(row, col), m[j]);
          break;
        case kConfident: {
          const float d = (m[j] * s.row_factors[row]) * s.col_factors[(row / s.rows) * s.cols + col];
          e.set_param(i, rule.apply_confident(e.param(i), d));
          break;
        }
        default: {  // kFullUpdate
          const float x = e.grad(i);
          const float u = (x / sqrtf(s.stats[0][i])) * inverse;
          e.set_param(i, rule.apply(e.param(i), u, m[j]));
        }
      }
    }
    if (!write_momentum) continue;
    if (!q8) {
      for (int j = 0; j < live; ++j) static_cast<float*>(s.momentum)[first + j] = m[j];
      continue;
    }
    unsigned bits[1] = {0};
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      m[j] = saturate_value(m[j]);
      bits[0] = max(bits[0], __float_as_uint(m[j]) & 0x7fffffffu);
    }
    group_max(bits, group, scratch);  // every thread of the CUDA block takes part
    if (live == 0) continue;
    const float absmax = __uint_as_float(bits[0]);
    // Every thread of the group read absmax[b] before the reduction above.
    if (lane == 0) s.absmax[b] = absmax;
    unsigned char* codes = static_cast<unsigned char*>(s.momentum);
    for (int j = 0; j < live; ++j)
      codes[first + j] = bits[0] == 0 ? zero_code : code_of(table, __fdiv_rn(m[j], absmax));
  }
}

// The launches: each walks the slots of its table in order (see the top of this file).
template <class T, class Rule>
__device__ void rows_pass(const FactoredSlot<Rule>* slots, int n_slots, const float* grad_scales,
                          const int* skip, const QuantTable* tables, int pass) {
  __shared__ QuantTable table;
  if (!begin_elements(skip, table, tables)) return;
  for (int k = 0; k < n_slots; ++k) rows_of<T>(slots[k], grad_scales, table, pass);
}

template <class T, class Rule>
__device__ void cols_pass(const FactoredSlot<Rule>* slots, int n_slots, const float* grad_scales,
                          const int* skip, const QuantTable* tables, int pass) {
  __shared__ QuantTable table;
  if (!begin_elements(skip, table, tables)) return;
  for (int k = 0; k < n_slots; ++k) cols_of<T>(slots[k], grad_scales, table, pass);
}

template <class T, class Rule>
__device__ void apply_pass(const FactoredSlot<Rule>* slots, int n_slots, const float* grad_scales,
                           const int* skip, const QuantTable* tables, int pass) {
  __shared__ QuantTable table;
  __shared__ unsigned scratch[1][kWarps];
  if (!begin_elements(skip, table, tables)) return;
  for (int k = 0; k < n_slots; ++k)
    apply_of<T>(slots[k], grad_scales, table, tables != nullptr, scratch, pass);
}

template <class T, class Rule>
__device__ void full_stats_pass(const FactoredSlot<Rule>* slots, int n_slots,
                                const float* grad_scales, const int* skip) {
  if (*skip != 0) return;
  for (int k = 0; k < n_slots; ++k) full_stats_of<T>(slots[k], grad_scales);
}

template <class Rule>
__device__ void average_pass(FactoredSlot<Rule>* slots, int n_slots, const int* skip, int which) {
  if (*skip != 0) return;
  for (int k = 0; k < n_slots; ++k) average_of(slots[k], which);
  for (u64 k = global_thread(); k < (u64)n_slots; k += grid_threads())
    average_scalars(slots[k], which);
}

// The matrices of every slot as one list over the grid (a slot has few, often one, and each
// is a long sum: in turn they would run one thread at a time).
template <class Rule>
__device__ void means_pass(const FactoredSlot<Rule>* slots, int n_slots, const int* skip,
                           int which) {
  if (*skip != 0) return;
  const u64 t = global_thread(), g = grid_threads();
  u64 before = 0;  // matrices of the slots before k
  for (int k = 0; k < n_slots; ++k) {
    // This thread's matrices of slot k: list positions before + m = t (mod g).
    for (u64 m = (t + g - before % g) % g; m < slots[k].batch; m += g) mean_of(slots[k], m, which);
    before += slots[k].batch;
  }
}

template <class Rule>
__device__ void factors_pass(const FactoredSlot<Rule>* slots, int n_slots, const int* skip,
                             int which) {
  if (*skip != 0) return;
  for (int k = 0; k < n_slots; ++k) factors_of(slots[k], which);
}

template <class Rule>
__device__ void divisor_pass(FactoredSlot<Rule>* slots, int n_slots, const int* skip) {
  if (*skip != 0) return;
  for (u64 k = global_thread(); k < (u64)n_slots; k += grid_threads()) divisor_of(slots[k]);
}

}  // namespace bnb

#define BNB_FACTORED_ARGS(Rule)                                                         \
  bnb::FactoredSlot<Rule>*slots, int n_slots, const float *grad_scales, const int *skip, \
      const bnb::QuantTable *tables

// bnb_factored_{rows,cols,apply}_<rule>_<dtype>(slots, n_slots, grad_scales, skip, tables, pass)
// and bnb_factored_full_stats_<rule>_<dtype>(slots, n_slots, grad_scales, skip, tables); `tables`
// is the signed dynamic map's QuantTable, or null when no slot has an 8-bit momentum.
#define BNB_FACTORED(NAME, Rule, DNAME, T)                                                     \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                 \
      bnb_factored_rows_##NAME##_##DNAME(BNB_FACTORED_ARGS(Rule), int pass) {                  \
    bnb::rows_pass<T, Rule>(slots, n_slots, grad_scales, skip, tables, pass);                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                 \
      bnb_factored_cols_##NAME##_##DNAME(BNB_FACTORED_ARGS(Rule), int pass) {                  \
    bnb::cols_pass<T, Rule>(slots, n_slots, grad_scales, skip, tables, pass);                  \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                 \
      bnb_factored_apply_##NAME##_##DNAME(BNB_FACTORED_ARGS(Rule), int pass) {                 \
    bnb::apply_pass<T, Rule>(slots, n_slots, grad_scales, skip, tables, pass);                 \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads)                                 \
      bnb_factored_full_stats_##NAME##_##DNAME(BNB_FACTORED_ARGS(Rule)) {                      \
    (void)tables;                                                                              \
    bnb::full_stats_pass<T, Rule>(slots, n_slots, grad_scales, skip);                          \
  }

// bnb_factored_{average,means,factors}_<rule>(slots, n_slots, skip, which),
// bnb_factored_divisor_<rule>(slots, n_slots, skip): dtype-independent.
#define BNB_FACTORED_STATS(NAME, Rule)                                                         \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads) bnb_factored_average_##NAME(    \
      bnb::FactoredSlot<Rule>* slots, int n_slots, const int* skip, int which) {               \
    bnb::average_pass<Rule>(slots, n_slots, skip, which);                                      \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads) bnb_factored_means_##NAME(      \
      bnb::FactoredSlot<Rule>* slots, int n_slots, const int* skip, int which) {               \
    bnb::means_pass<Rule>(slots, n_slots, skip, which);                                        \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads) bnb_factored_factors_##NAME(    \
      bnb::FactoredSlot<Rule>* slots, int n_slots, const int* skip, int which) {               \
    bnb::factors_pass<Rule>(slots, n_slots, skip, which);                                      \
  }                                                                                            \
  extern "C" __global__ void __launch_bounds__(bnb::kThreads) bnb_factored_divisor_##NAME(    \
      bnb::FactoredSlot<Rule>* slots, int n_slots, const int* skip) {                          \
    bnb::divisor_pass<Rule>(slots, n_slots, skip);                                             \
  }

#define BNB_FACTORED_ALL_DTYPES(NAME, Rule)   \
  BNB_FACTORED(NAME, Rule, f32, float)        \
  BNB_FACTORED(NAME, Rule, f16, __half)       \
  BNB_FACTORED(NAME, Rule, bf16, __nv_bfloat16) \
  BNB_FACTORED_STATS(NAME, Rule)

BNB_FACTORED_ALL_DTYPES(adafactor, bnb::AdafactorRule)
BNB_FACTORED_ALL_DTYPES(came, bnb::CameRule)
