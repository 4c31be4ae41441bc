//! Host side of `kernels/fused.cu` and `kernels/norms.cu`: an optimizer's state on one device,
//! and a whole step (gradient pre-pass, layer-wise norms, fused updates of every parameter) as a
//! handful of launches, written once over [`Backend`] (a GPU or the emulated device). The order
//! of a step's operations and what the host waits for are documented on
//! [`CudaOptimizerState`](super::optimizer_state::CudaOptimizerState), the public face of
//! [`StepState`].

use std::collections::VecDeque;

use candle_core::{bail, DType, Result, Tensor};

use super::backend::{Backend, KernelArg, Module};
use super::{grid, quant_table_bytes, MAX_GRID, QUANT_TABLE_BYTES, THREADS};
use crate::rules::CudaRule;
use crate::slot_table::{slot_bytes, GradSlot, Slot, TableWriter, GRAD_SLOT_BYTES};
use crate::update::{BlockwiseState, ParamState};
use crate::QuantMap;

/// Elements per partial sum of the pre-pass (`norms.cu` kChunk, the CPU's `MAX_BLOCK`).
const NORM_CHUNK: usize = 4096;
/// Squared norms kept per parameter (`norms.cu` kHistory; the optimizers' history length).
pub const CUDA_GRAD_NORM_HISTORY: usize = 100;
/// Tiling of 32-bit state: `fused.cu` needs a block size even where nothing is quantized; 256
/// gives 16 quantization blocks per CUDA block.
const F32_TILE_BLOCK: usize = 256;

/// One parameter of a [`CudaOptimizerState`](crate::CudaOptimizerState): the parameter tensor
/// (contiguous, `F32`, `F16` or `BF16`, on the state's CUDA device; on the CPU for the emulated
/// device), its initial state, its percentile-clipping setting (1..=100, 100 = off) and the
/// squared gradient norms recorded so far (at most [`CUDA_GRAD_NORM_HISTORY`], oldest first).
pub struct CudaParam<'a> {
    /// The parameter, updated in place by every step.
    pub param: &'a Tensor,
    /// Its optimizer state (host copy, uploaded).
    pub state: &'a ParamState,
    /// Percentile clipping, 1..=100 (100: off).
    pub percentile_clipping: u32,
    /// The squared gradient norms recorded so far, oldest first.
    pub grad_norms: &'a VecDeque<f64>,
}

/// What the device decided about a step once the host reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaStepOutcome {
    /// Every gradient was finite: the parameters with a gradient were updated.
    Taken,
    /// The gradient of the parameter with this index (the first one) was not finite: nothing
    /// changed on the device.
    Skipped {
        /// Index of the first parameter whose gradient holds NaN or ±inf.
        first_bad: usize,
    },
}

/// A parameter's state buffers on the device.
enum DeviceState<B: Backend> {
    F32(Vec<B::Buffer<f32>>),
    Blockwise {
        codes: Vec<B::Buffer<u8>>,
        absmax: Vec<B::Buffer<f32>>,
        maps: Vec<QuantMap>,
        block_size: usize,
    },
}

/// Parameters stepped by one launch: same dtype, state precision, state count, block size and
/// maps.
struct Group<B: Backend> {
    dtype: DType,
    quantized: bool,
    n_states: usize,
    block_size: usize,
    members: Vec<usize>,
    /// The `QuantTable` of each state, in state order (8-bit groups only).
    tables: Option<B::Buffer<u8>>,
    /// `2 * blocks` f64 for the layer-wise first pass, allocated on the first layer-wise step.
    partials: Option<B::Buffer<f64>>,
    total_blocks: usize,
}

/// Where one group's slot table is in a step's tables, and what it covers this step (only
/// parameters with a gradient are in it).
struct GroupTable {
    offset: usize,
    n_slots: usize,
    total_blocks: u64,
}

/// The layout of one step's tables.
struct Tables {
    /// Pre-pass chunks over every gradient of the step.
    total_chunks: u64,
    /// One entry per group, in group order.
    groups: Vec<GroupTable>,
}

/// The arguments every fused-step kernel starts with (`BNB_STEP_ARGS` in fused.cu).
struct StepArgs {
    slots: u64,
    n_slots: i32,
    total_blocks: u64,
    block_size: i32,
    tables: u64,
    grad_scales: u64,
    skip: u64,
}

impl StepArgs {
    fn args(&self) -> Vec<KernelArg> {
        vec![
            KernelArg::U64(self.slots),
            KernelArg::I32(self.n_slots),
            KernelArg::U64(self.total_blocks),
            KernelArg::I32(self.block_size),
            KernelArg::U64(self.tables),
            KernelArg::U64(self.grad_scales),
            KernelArg::U64(self.skip),
        ]
    }
}

/// The pinned host memory a step's tables are written into; two of them alternate, so writing
/// step `t`'s tables waits at most for the copy of step `t - 2`'s.
///
/// cudarc records the pinned buffers' own events only when the context has several streams,
/// and Candle's device uses one, so each buffer has an event of ours, recorded after its copy.
struct Staging<B: Backend> {
    buffers: [B::Pinned<u8>; 2],
    copied: [B::Event; 2],
    device: B::Buffer<u8>,
    next: usize,
    bytes: usize,
}

/// The state of an optimizer whose parameters are on one device of backend `B`, with what a
/// step launches: the host side of every CUDA step, the same code on a GPU and on the emulator.
pub(crate) struct StepState<B: Backend> {
    backend: B,
    params: Vec<Tensor>,
    states: Vec<DeviceState<B>>,
    /// Per parameter: the addresses of its state buffers and scales (fixed for its lifetime).
    state_ptrs: Vec<([u64; 3], [u64; 3])>,
    groups: Vec<Group<B>>,
    // The pre-pass buffers (norms.cu).
    partials: B::Buffer<f64>,
    sq: B::Buffer<f64>,
    percentile: B::Buffer<i32>,
    /// What `percentile` holds, to upload only changes.
    percentile_host: Vec<i32>,
    history: B::Buffer<f64>,
    history_count: B::Buffer<u64>,
    grad_scales: B::Buffer<f32>,
    /// `[skip, first_bad]`.
    flags: B::Buffer<i32>,
    /// The flags of the last step, copied back without waiting.
    outcome: B::Pinned<i32>,
    outcome_ready: B::Event,
    /// The parameter indices that had a gradient in the step whose outcome is pending, in
    /// pre-pass order (`first_bad` indexes this list).
    pending: Option<Vec<usize>>,
    /// Whether the host has seen `outcome_ready` complete since the last pre-pass was issued:
    /// then everything issued before it, the last two table copies included, has run.
    outcome_seen: bool,
    staging: Option<Staging<B>>,
    /// Times reading a step's outcome had to wait for the device.
    blocking_waits: u64,
}

fn dtype_code(dtype: DType) -> Result<u32> {
    Ok(match dtype {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        other => bail!("CUDA optimizer steps take F32, F16 or BF16 parameters, got {other:?}"),
    })
}

fn dtype_suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

impl<B: Backend> StepState<B> {
    /// Uploads the state of `params` to `backend` and allocates every buffer a step needs.
    ///
    /// # Errors
    /// A parameter not on the device, not contiguous, or not `F32`/`F16`/`BF16`; a state whose
    /// length differs from its parameter's; a percentile outside 1..=100; more than
    /// [`CUDA_GRAD_NORM_HISTORY`] recorded norms; more than `u32::MAX` parameters; CUDA errors.
    pub(crate) fn new(backend: B, params: &[CudaParam<'_>]) -> Result<Self> {
        let dev = &backend;
        if params.len() > u32::MAX as usize {
            bail!(
                "{} parameters; CUDA steps take at most {}",
                params.len(),
                u32::MAX
            )
        }
        let mut states = Vec::with_capacity(params.len());
        let mut percentile = Vec::with_capacity(params.len());
        let mut chunks = 0usize;
        for (i, p) in params.iter().enumerate() {
            let what = format!("CUDA optimizer state: parameter {i}");
            dev.tensor_address(p.param, &what)?;
            dtype_code(p.param.dtype())?;
            if !(1..=100).contains(&p.percentile_clipping) {
                bail!(
                    "{what}: percentile_clipping must be in 1..=100, got {}",
                    p.percentile_clipping
                )
            }
            percentile.push(p.percentile_clipping as i32);
            chunks += p.param.elem_count().div_ceil(NORM_CHUNK);
            states.push(upload_state(dev, p.param.elem_count(), p.state, &what)?);
        }
        let groups = group_params(dev, params, &states)?;
        let state_ptrs = states.iter().map(|s| state_addresses(dev, s)).collect();
        let n = params.len().max(1);
        // Padded to one entry: CUDA refuses empty allocations.
        percentile.resize(n, 100);
        let mut this = Self {
            params: params.iter().map(|p| p.param.clone()).collect(),
            states,
            state_ptrs,
            groups,
            partials: dev.alloc_zeros::<f64>(chunks.max(1))?,
            sq: dev.alloc_zeros::<f64>(n)?,
            percentile: dev.upload(&percentile)?,
            percentile_host: percentile[..params.len()].to_vec(),
            history: dev.alloc_zeros::<f64>(n * CUDA_GRAD_NORM_HISTORY)?,
            history_count: dev.alloc_zeros::<u64>(n)?,
            grad_scales: dev.alloc_zeros::<f32>(n)?,
            flags: dev.alloc_zeros::<i32>(2)?,
            outcome: dev.alloc_pinned::<i32>(2)?,
            outcome_ready: dev.new_event()?,
            pending: None,
            outcome_seen: false,
            staging: None,
            blocking_waits: 0,
            backend,
        };
        let norms: Vec<&VecDeque<f64>> = params.iter().map(|p| p.grad_norms).collect();
        this.upload_histories(&norms)?;
        Ok(this)
    }

    /// As [`CudaOptimizerState::len`](crate::CudaOptimizerState::len).
    pub fn len(&self) -> usize {
        self.params.len()
    }

    /// As [`CudaOptimizerState::is_empty`](crate::CudaOptimizerState::is_empty).
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// The device the state is on.
    pub(crate) fn backend(&self) -> &B {
        &self.backend
    }

    /// As [`CudaOptimizerState::blocking_waits`](crate::CudaOptimizerState::blocking_waits).
    pub fn blocking_waits(&self) -> u64 {
        self.blocking_waits
    }

    fn upload_histories(&mut self, norms: &[&VecDeque<f64>]) -> Result<()> {
        let mut ring = vec![0f64; self.params.len().max(1) * CUDA_GRAD_NORM_HISTORY];
        let mut count = vec![0u64; self.params.len().max(1)];
        for (i, h) in norms.iter().enumerate() {
            if h.len() > CUDA_GRAD_NORM_HISTORY {
                bail!(
                    "parameter {i}: {} recorded gradient norms, at most {CUDA_GRAD_NORM_HISTORY} are kept",
                    h.len()
                )
            }
            // A deque of m norms loads as ring[0..m] with count m (norms.cu).
            for (j, v) in h.iter().enumerate() {
                ring[i * CUDA_GRAD_NORM_HISTORY + j] = *v;
            }
            count[i] = h.len() as u64;
        }
        self.backend.copy_to_device(&ring, &mut self.history)?;
        self.backend.copy_to_device(&count, &mut self.history_count)
    }

    /// As [`CudaOptimizerState::set_percentiles`](crate::CudaOptimizerState::set_percentiles).
    pub fn set_percentiles(&mut self, percentiles: &[u32]) -> Result<()> {
        if percentiles.len() != self.params.len() {
            bail!(
                "{} percentile settings for {} parameters",
                percentiles.len(),
                self.params.len()
            )
        }
        if let Some((i, p)) = percentiles
            .iter()
            .enumerate()
            .find(|(_, p)| !(1..=100).contains(*p))
        {
            bail!("parameter {i}: percentile_clipping must be in 1..=100, got {p}")
        }
        let new: Vec<i32> = percentiles.iter().map(|&p| p as i32).collect();
        if !new.is_empty() && new != self.percentile_host {
            self.backend.copy_to_device(&new, &mut self.percentile)?;
            self.percentile_host = new;
        }
        Ok(())
    }

    /// As [`CudaOptimizerState::upload`](crate::CudaOptimizerState::upload).
    pub fn upload(&mut self, states: &[&ParamState], grad_norms: &[&VecDeque<f64>]) -> Result<()> {
        self.check_upload(states, grad_norms)?;
        for (new, old) in states.iter().zip(self.states.iter_mut()) {
            match (new, old) {
                (ParamState::F32(s), DeviceState::F32(d)) => {
                    for (s, d) in s.iter().zip(d.iter_mut()) {
                        if !s.is_empty() {
                            self.backend.copy_to_device(s.as_slice(), d)?;
                        }
                    }
                }
                (ParamState::Blockwise(s), DeviceState::Blockwise { codes, absmax, .. }) => {
                    for ((s, c), a) in s.iter().zip(codes.iter_mut()).zip(absmax.iter_mut()) {
                        if !s.is_empty() {
                            self.backend.copy_to_device(s.codes(), c)?;
                            self.backend.copy_to_device(s.absmax(), a)?;
                        }
                    }
                }
                _ => unreachable!("layouts checked above"),
            }
        }
        self.upload_histories(grad_norms)
    }

    /// As [`CudaOptimizerState::check_upload`](crate::CudaOptimizerState::check_upload).
    pub fn check_upload(
        &self,
        states: &[&ParamState],
        grad_norms: &[&VecDeque<f64>],
    ) -> Result<()> {
        if states.len() != self.params.len() || grad_norms.len() != self.params.len() {
            bail!(
                "CUDA optimizer state holds {} parameters, got {} states and {} histories",
                self.params.len(),
                states.len(),
                grad_norms.len()
            )
        }
        for (i, (new, old)) in states.iter().zip(&self.states).enumerate() {
            let same = match (new, old) {
                (ParamState::F32(s), DeviceState::F32(d)) => {
                    s.len() == d.len() && s.iter().all(|v| v.len() == self.params[i].elem_count())
                }
                (
                    ParamState::Blockwise(s),
                    DeviceState::Blockwise {
                        codes,
                        maps,
                        block_size,
                        ..
                    },
                ) => {
                    s.len() == codes.len()
                        && s.iter().zip(maps).all(|(s, m)| {
                            s.len() == self.params[i].elem_count()
                                && s.block_size() == *block_size
                                && s.map().values() == m.values()
                        })
                }
                _ => false,
            };
            if !same {
                bail!("parameter {i}: the new state's layout differs from the CUDA state's")
            }
        }
        if let Some((i, h)) = grad_norms
            .iter()
            .enumerate()
            .find(|(_, h)| h.len() > CUDA_GRAD_NORM_HISTORY)
        {
            bail!(
                "parameter {i}: {} recorded gradient norms, at most {CUDA_GRAD_NORM_HISTORY} are kept",
                h.len()
            )
        }
        Ok(())
    }

    /// As [`CudaOptimizerState::download`](crate::CudaOptimizerState::download).
    pub fn download(&self) -> Result<Vec<(ParamState, VecDeque<f64>)>> {
        let ring = self.backend.download(&self.history)?;
        let count = self.backend.download(&self.history_count)?;
        let mut out = Vec::with_capacity(self.params.len());
        for (i, (state, param)) in self.states.iter().zip(&self.params).enumerate() {
            let n = param.elem_count();
            let host = match state {
                DeviceState::F32(d) => ParamState::F32(
                    d.iter()
                        .map(|d| {
                            if n == 0 {
                                Ok(Vec::new())
                            } else {
                                self.backend.download_range(d, 0, n)
                            }
                        })
                        .collect::<Result<_>>()?,
                ),
                DeviceState::Blockwise {
                    codes,
                    absmax,
                    maps,
                    block_size,
                } => ParamState::Blockwise(
                    codes
                        .iter()
                        .zip(absmax)
                        .zip(maps)
                        .map(|((c, a), m)| {
                            let blocks = n.div_ceil(*block_size);
                            let (c, a) = if n == 0 {
                                (Vec::new(), Vec::new())
                            } else {
                                (
                                    self.backend.download_range(c, 0, n)?,
                                    self.backend.download_range(a, 0, blocks)?,
                                )
                            };
                            BlockwiseState::from_parts(c, a, m.clone(), *block_size)
                        })
                        .collect::<Result<_>>()?,
                ),
            };
            let c = count[i] as usize;
            let m = c.min(CUDA_GRAD_NORM_HISTORY);
            let ring = &ring[i * CUDA_GRAD_NORM_HISTORY..(i + 1) * CUDA_GRAD_NORM_HISTORY];
            let norms = (0..m)
                .map(|j| ring[(c - m + j) % CUDA_GRAD_NORM_HISTORY])
                .collect();
            out.push((host, norms));
        }
        Ok(out)
    }

    /// As [`CudaOptimizerState::take_outcome`](crate::CudaOptimizerState::take_outcome).
    pub fn take_outcome(&mut self) -> Result<Option<(CudaStepOutcome, Vec<usize>)>> {
        let Some(with_grad) = self.pending.take() else {
            return Ok(None);
        };
        let outcome = self.read_outcome(&with_grad)?;
        Ok(Some((outcome, with_grad)))
    }

    /// As [`CudaOptimizerState::pending_params`](crate::CudaOptimizerState::pending_params).
    pub fn pending_params(&self) -> &[usize] {
        self.pending.as_deref().unwrap_or(&[])
    }

    /// As [`CudaOptimizerState::peek_outcome`](crate::CudaOptimizerState::peek_outcome).
    pub fn peek_outcome(&self) -> Result<Option<CudaStepOutcome>> {
        match &self.pending {
            None => Ok(None),
            Some(with_grad) => {
                // `&self`: the wait is not remembered in `outcome_seen`, so the next step may
                // wait for its staging buffer (at once: it is done).
                self.backend.wait_event(&self.outcome_ready)?;
                let flags = self.backend.pinned_ref(&self.outcome)?;
                Ok(Some(Self::decode(flags, with_grad)))
            }
        }
    }

    fn read_outcome(&mut self, with_grad: &[usize]) -> Result<CudaStepOutcome> {
        if !self.backend.is_complete(&self.outcome_ready)? {
            self.blocking_waits += 1;
            self.backend.wait_event(&self.outcome_ready)?;
        }
        self.outcome_seen = true;
        let flags = self.backend.pinned_ref(&self.outcome)?;
        Ok(Self::decode(flags, with_grad))
    }

    fn decode(flags: &[i32], with_grad: &[usize]) -> CudaStepOutcome {
        if flags[0] == 0 {
            CudaStepOutcome::Taken
        } else {
            let s = usize::try_from(flags[1]).unwrap_or(0);
            CudaStepOutcome::Skipped {
                first_bad: with_grad.get(s).copied().unwrap_or(0),
            }
        }
    }

    /// As [`CudaOptimizerState::step`](crate::CudaOptimizerState::step).
    pub fn step<R: CudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!(
                "CUDA step: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )
        }
        // Checks and addresses first: nothing is launched unless every gradient is usable.
        let mut with_grad: Vec<usize> = Vec::with_capacity(self.params.len());
        let mut grad_address = vec![0u64; self.params.len()];
        let mut param_address = vec![0u64; self.params.len()];
        // The gradients copied to be contiguous, and what keeps every address valid until the
        // launches are issued.
        let mut contiguous: Vec<Tensor> = Vec::new();
        let mut holds: Vec<B::Hold> = Vec::with_capacity(2 * self.params.len());
        for (i, entry) in grads.iter().enumerate() {
            let Some((grad, rule)) = entry else { continue };
            let param = &self.params[i];
            let what = format!("CUDA step: gradient of parameter {i}");
            if grad.dims() != param.dims() || grad.dtype() != param.dtype() {
                bail!(
                    "{what}: shape {:?} / dtype {:?}, the parameter has {:?} / {:?}",
                    grad.dims(),
                    grad.dtype(),
                    param.dims(),
                    param.dtype()
                )
            }
            let n_states = self.n_states(i);
            if rule.signed_states().len() != n_states {
                bail!(
                    "{what}: the rule keeps {} states per element, the state has {n_states}",
                    rule.signed_states().len()
                )
            }
            let (address, hold) = if grad.is_contiguous() {
                self.backend.tensor_address(grad, &what)?
            } else {
                let g = grad.contiguous()?;
                let a = self.backend.tensor_address(&g, &what)?;
                contiguous.push(g);
                a
            };
            grad_address[i] = address;
            holds.push(hold);
            let (address, hold) = self
                .backend
                .tensor_address(param, &format!("CUDA step: parameter {i}"))?;
            param_address[i] = address;
            holds.push(hold);
            with_grad.push(i);
        }
        let tables =
            self.write_and_copy_tables(grads, &with_grad, &grad_address, &param_address)?;
        self.launch_prepass(with_grad.len(), tables.total_chunks, max_grad_norm)?;
        // From here the pre-pass has run (history, clipping scales): the outcome is pending even
        // if a later launch fails.
        self.pending = Some(with_grad);
        for (g, table) in tables.groups.iter().enumerate() {
            self.launch_group::<R>(g, table)?;
        }
        // The gradients copied to be contiguous are freed in stream order, after the kernels.
        drop((contiguous, holds));
        Ok(())
    }

    fn n_states(&self, i: usize) -> usize {
        match &self.states[i] {
            DeviceState::F32(s) => s.len(),
            DeviceState::Blockwise { codes, .. } => codes.len(),
        }
    }

    /// Writes the grad-slot table and every group's slot table into the next pinned staging
    /// buffer and copies it to the device (stream-ordered, no wait). Returns where each group's
    /// table is and what it covers, for the launches.
    fn write_and_copy_tables<R: CudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        with_grad: &[usize],
        grad_address: &[u64],
        param_address: &[u64],
    ) -> Result<Tables> {
        let bytes = GRAD_SLOT_BYTES * self.params.len() + slot_bytes::<R>() * self.params.len();
        if self.staging.as_ref().is_none_or(|s| s.bytes < bytes) {
            // First step (or a rule with a larger struct): allocated once.
            if let Some(old) = &self.staging {
                // Copies from the old buffers must be done before they are freed.
                for e in &old.copied {
                    self.backend.wait_event(e)?;
                }
            }
            let dev = &self.backend;
            self.staging = Some(Staging {
                buffers: [
                    dev.alloc_pinned::<u8>(bytes)?,
                    dev.alloc_pinned::<u8>(bytes)?,
                ],
                copied: [dev.new_event()?, dev.new_event()?],
                device: dev.alloc_zeros::<u8>(bytes.max(1))?,
                next: 0,
                bytes: bytes.max(1),
            });
        }
        let dev = &self.backend;
        let staging = self.staging.as_mut().expect("allocated above");
        // This buffer was last copied from by step t - 2. Once step t - 1's outcome has been
        // seen (the optimizers read it before building step t's rules), that copy is known to be
        // done and the host need not ask.
        if !self.outcome_seen {
            dev.wait_event(&staging.copied[staging.next])?;
        }
        let host = dev.pinned_mut(&mut staging.buffers[staging.next])?;
        let mut w = TableWriter::new(host);
        let mut first_chunk = 0u64;
        for &i in with_grad {
            let param = &self.params[i];
            let n = param.elem_count() as u64;
            w.grad_slot(&GradSlot {
                grad: grad_address[i],
                n,
                first_chunk,
                dtype: dtype_code(param.dtype())?,
                index: i as u32,
            });
            first_chunk += n.div_ceil(NORM_CHUNK as u64);
        }
        w.seek(GRAD_SLOT_BYTES * self.params.len());
        let mut groups = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let offset = w.position();
            let mut n_slots = 0;
            let mut first_block = 0u64;
            for &i in &group.members {
                let Some((_, rule)) = &grads[i] else { continue };
                let n = self.params[i].elem_count() as u64;
                let (state, absmax) = self.state_ptrs[i];
                w.slot(&Slot {
                    param: param_address[i],
                    grad: grad_address[i],
                    state,
                    absmax,
                    n,
                    first_block,
                    scale_index: i as u64,
                    rule,
                });
                n_slots += 1;
                first_block += n.div_ceil(group.block_size as u64);
            }
            groups.push(GroupTable {
                offset,
                n_slots,
                total_blocks: first_block,
            });
        }
        let staging = self.staging.as_mut().expect("allocated above");
        let (buffers, device) = (&staging.buffers, &mut staging.device);
        self.outcome_seen = false;
        dev.copy_from_pinned(&buffers[staging.next], device)?;
        dev.record(&staging.copied[staging.next])?;
        staging.next = 1 - staging.next;
        Ok(Tables {
            total_chunks: first_chunk,
            groups,
        })
    }

    fn table_address(&self, offset: usize) -> u64 {
        let staging = self
            .staging
            .as_ref()
            .expect("tables written before launches");
        self.backend.address(&staging.device) + offset as u64
    }

    fn launch_prepass(
        &mut self,
        n_slots: usize,
        total_chunks: u64,
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        let dev = &self.backend;
        let slots = self.table_address(0);
        let n_slots = n_slots as i32;
        let args = [
            KernelArg::U64(slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(total_chunks),
            KernelArg::U64(dev.address(&self.partials)),
        ];
        // SAFETY: bnb_sum_squares(const GradSlot*, int, u64, double*): the table holds n_slots
        // GradSlots, partials has room for every chunk of every parameter.
        unsafe {
            dev.launch(
                Module::Norms,
                "bnb_sum_squares",
                grid(total_chunks, 8),
                &args,
            )
        }?;
        let flags = dev.address(&self.flags);
        let (skip, first_bad) = (flags, flags + 4);
        let args = [
            KernelArg::U64(slots),
            KernelArg::I32(n_slots),
            KernelArg::U64(dev.address(&self.partials)),
            KernelArg::U64(dev.address(&self.sq)),
            KernelArg::F64(max_grad_norm.unwrap_or(0.0)),
            KernelArg::U64(dev.address(&self.percentile)),
            KernelArg::U64(dev.address(&self.history)),
            KernelArg::U64(dev.address(&self.history_count)),
            KernelArg::U64(dev.address(&self.grad_scales)),
            KernelArg::U64(skip),
            KernelArg::U64(first_bad),
        ];
        // SAFETY: the arguments of bnb_prepass_finish in kernels/norms.cu, in order; the
        // per-parameter arrays cover every parameter index the grad slots name.
        unsafe { dev.launch(Module::Norms, "bnb_prepass_finish", 1, &args) }?;
        dev.copy_to_pinned(&self.flags, &mut self.outcome)?;
        dev.record(&self.outcome_ready)
    }

    fn launch_group<R: CudaRule>(&mut self, g: usize, table: &GroupTable) -> Result<()> {
        if table.n_slots == 0 || table.total_blocks == 0 {
            return Ok(());
        }
        if R::LAYERWISE && self.groups[g].partials.is_none() {
            let blocks = self.groups[g].total_blocks;
            self.groups[g].partials = Some(self.backend.alloc_zeros::<f64>(2 * blocks.max(1))?);
        }
        let dev = &self.backend;
        let group = &self.groups[g];
        let args = StepArgs {
            slots: self.table_address(table.offset),
            n_slots: table.n_slots as i32,
            total_blocks: table.total_blocks,
            block_size: group.block_size as i32,
            tables: group.tables.as_ref().map_or(0, |t| dev.address(t)),
            grad_scales: dev.address(&self.grad_scales),
            skip: dev.address(&self.flags),
        };
        let precision = if group.quantized { "q8" } else { "f32" };
        let suffix = format!(
            "{}_{}_{precision}_s{}",
            R::KERNEL_NAME,
            dtype_suffix(group.dtype),
            group.n_states
        );
        let per_tile = (THREADS as usize / (group.block_size / 16)) as u64;
        let cfg = grid(table.total_blocks, per_tile);
        if R::LAYERWISE {
            let partials = dev.address(group.partials.as_ref().expect("allocated above"));
            let mut measure = args.args();
            measure.push(KernelArg::U64(partials));
            // SAFETY: bnb_measure_* (BNB_STEP_ARGS, double* partials): the slot table holds
            // n_slots slots of this group with their pointers; partials has 2 * total_blocks.
            unsafe {
                dev.launch(
                    Module::Fused,
                    &format!("bnb_measure_{suffix}"),
                    cfg,
                    &measure,
                )
            }?;
            let trust = [
                KernelArg::U64(args.slots),
                KernelArg::I32(args.n_slots),
                KernelArg::I32(args.block_size),
                KernelArg::U64(partials),
                KernelArg::U64(args.skip),
            ];
            let kernel = format!("bnb_set_trust_{}", R::KERNEL_NAME);
            let blocks = (table.n_slots as u32).min(MAX_GRID as u32);
            // SAFETY: bnb_set_trust_*(Slot*, int, int, const double*, const int*).
            unsafe { dev.launch(Module::Fused, &kernel, blocks, &trust) }?;
        }
        // SAFETY: bnb_fused_* (BNB_STEP_ARGS): the slot table holds n_slots slots whose
        // pointers cover n elements (states, codes) and ceil(n / block_size) scales each.
        unsafe {
            dev.launch(
                Module::Fused,
                &format!("bnb_fused_{suffix}"),
                cfg,
                &args.args(),
            )
        }
    }

    /// As [`CudaOptimizerState::state_bytes`](crate::CudaOptimizerState::state_bytes).
    pub fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .zip(&self.params)
            .map(|(s, p)| {
                let n = p.elem_count();
                match s {
                    DeviceState::F32(d) => d.len() * n * 4,
                    DeviceState::Blockwise {
                        codes, block_size, ..
                    } => codes.len() * (n + n.div_ceil(*block_size) * 4),
                }
            })
            .sum()
    }
}

impl<B: Backend> Drop for StepState<B> {
    /// Waits for the device before the pinned buffers are freed: their last copies may still be
    /// in flight, and cudarc tracks no events for them on a single stream.
    fn drop(&mut self) {
        let _ = self.backend.synchronize();
    }
}

/// The state pointers of a slot: 3 state buffers and 3 absmax arrays, unused ones 0.
fn state_addresses<B: Backend>(dev: &B, state: &DeviceState<B>) -> ([u64; 3], [u64; 3]) {
    let (mut s, mut a) = ([0u64; 3], [0u64; 3]);
    match state {
        DeviceState::F32(d) => {
            for (k, d) in d.iter().enumerate() {
                s[k] = dev.address(d);
            }
        }
        DeviceState::Blockwise { codes, absmax, .. } => {
            for (k, (c, m)) in codes.iter().zip(absmax).enumerate() {
                s[k] = dev.address(c);
                a[k] = dev.address(m);
            }
        }
    }
    (s, a)
}

fn upload_state<B: Backend>(
    dev: &B,
    n: usize,
    state: &ParamState,
    what: &str,
) -> Result<DeviceState<B>> {
    // cuMemAlloc refuses 0 bytes: empty parameters get one-element buffers they never touch.
    Ok(match state {
        ParamState::F32(s) => {
            if let Some(k) = s.iter().position(|s| s.len() != n) {
                bail!(
                    "{what}: state {k} has {} elements, the parameter {n}",
                    s[k].len()
                )
            }
            DeviceState::F32(
                s.iter()
                    .map(|s| {
                        if n == 0 {
                            dev.alloc_zeros::<f32>(1)
                        } else {
                            dev.upload(s.as_slice())
                        }
                    })
                    .collect::<Result<_>>()?,
            )
        }
        ParamState::Blockwise(s) => {
            if let Some(k) = s.iter().position(|s| s.len() != n) {
                bail!(
                    "{what}: state {k} has {} elements, the parameter {n}",
                    s[k].len()
                )
            }
            let block_size = s.first().map_or(256, BlockwiseState::block_size);
            if let Some(k) = s.iter().position(|s| s.block_size() != block_size) {
                bail!(
                    "{what}: state {k} has block size {}, state 0 {block_size}",
                    s[k].block_size()
                )
            }
            let mut codes = Vec::with_capacity(s.len());
            let mut absmax = Vec::with_capacity(s.len());
            for s in s {
                if n == 0 {
                    codes.push(dev.alloc_zeros::<u8>(1)?);
                    absmax.push(dev.alloc_zeros::<f32>(1)?);
                } else {
                    codes.push(dev.upload(s.codes())?);
                    absmax.push(dev.upload(s.absmax())?);
                }
            }
            DeviceState::Blockwise {
                codes,
                absmax,
                maps: s.iter().map(|s| s.map().clone()).collect(),
                block_size,
            }
        }
    })
}

/// Parameters in groups of one launch each, in parameter order within a group.
fn group_params<B: Backend>(
    dev: &B,
    params: &[CudaParam<'_>],
    states: &[DeviceState<B>],
) -> Result<Vec<Group<B>>> {
    let mut groups: Vec<Group<B>> = Vec::new();
    for (i, (p, state)) in params.iter().zip(states).enumerate() {
        let (quantized, n_states, block_size, maps) = match state {
            DeviceState::F32(d) => (false, d.len(), F32_TILE_BLOCK, &[][..]),
            DeviceState::Blockwise {
                codes,
                maps,
                block_size,
                ..
            } => (true, codes.len(), *block_size, &maps[..]),
        };
        let dtype = p.param.dtype();
        let found = groups.iter().position(|g| {
            g.dtype == dtype
                && g.quantized == quantized
                && g.n_states == n_states
                && g.block_size == block_size
                && match (&states[g.members[0]], state) {
                    (
                        DeviceState::Blockwise { maps: a, .. },
                        DeviceState::Blockwise { maps: b, .. },
                    ) => a.iter().zip(b).all(|(a, b)| a.values() == b.values()),
                    _ => true,
                }
        });
        let blocks = p.param.elem_count().div_ceil(block_size);
        let g = match found {
            Some(g) => g,
            None => {
                let tables = if quantized && n_states > 0 {
                    let mut bytes = Vec::with_capacity(n_states * QUANT_TABLE_BYTES);
                    for m in maps {
                        bytes.extend(quant_table_bytes(m));
                    }
                    Some(dev.upload(&bytes)?)
                } else {
                    None
                };
                groups.push(Group {
                    dtype,
                    quantized,
                    n_states,
                    block_size,
                    members: Vec::new(),
                    tables,
                    partials: None,
                    total_blocks: 0,
                });
                groups.len() - 1
            }
        };
        groups[g].members.push(i);
        groups[g].total_blocks += blocks;
    }
    Ok(groups)
}
