//! Factored optimizers (Adafactor, CAME) on the device: each parameter's statistics and
//! momentum, the scratch their steps share, and the step (the pre-pass, then per run of
//! parameters the multi-tensor launches of `candle_bnb_kernels::cuda::launch_factored`).

use candle_core::{bail, DType, Result, Tensor};

use super::device_state::DeviceState;
use super::tables::write_grad_slots;
use super::StepState;
use candle_bnb_kernels::cuda::{
    launch_factored, quant_table_bytes, Backend, FactoredLaunch, QUANT_TABLE_BYTES,
};
use candle_bnb_kernels::slot_table::{
    factored_slot_bytes, scratch_runs, FactoredLayout, FactoredScratch, FactoredSlot, MomentumKind,
    TableWriter, GRAD_SLOT_BYTES,
};
use candle_bnb_kernels::{
    BlockwiseState, FactoredCudaRule, FactoredState, Factoring, Momentum, QuantMap,
};

/// A factored parameter's momentum on the device.
pub(super) enum DeviceMomentum<B: Backend> {
    None,
    F32(B::Buffer<f32>),
    Blockwise {
        codes: B::Buffer<u8>,
        absmax: B::Buffer<f32>,
        /// Boxed: a map with its lookup is about 1 kB.
        map: Box<QuantMap>,
        block_size: usize,
    },
}

/// A factored parameter's state on the device: its statistics (f32, in the order of
/// [`Factoring::stats`]) and its momentum.
pub(super) struct FactoredDeviceState<B: Backend> {
    factoring: Factoring,
    /// Each statistic's buffer and length (a buffer holds at least one value: CUDA refuses
    /// empty allocations).
    stats: Vec<(B::Buffer<f32>, usize)>,
    momentum: DeviceMomentum<B>,
}

impl<B: Backend> FactoredDeviceState<B> {
    /// `state` uploaded to `dev` for a parameter of `n` elements.
    pub(super) fn upload(dev: &B, n: usize, state: &FactoredState, what: &str) -> Result<Self> {
        let factoring = state.factoring();
        if factoring.len() != n {
            bail!("{what}: the factored state is for {factoring:?}, the parameter has {n} elements")
        }
        if let Some(m) = state.momentum().filter(|m| m.len() != n) {
            bail!(
                "{what}: the momentum holds {} values, the parameter has {n} elements",
                m.len()
            )
        }
        let stats = state
            .stats()
            .iter()
            .map(|(_, v)| Ok((upload_or_one(dev, v)?, v.len())))
            .collect::<Result<_>>()?;
        let momentum = match state.momentum() {
            None => DeviceMomentum::None,
            Some(Momentum::F32(m)) => DeviceMomentum::F32(upload_or_one(dev, m)?),
            Some(Momentum::Blockwise(q)) => DeviceMomentum::Blockwise {
                codes: upload_or_one(dev, q.codes())?,
                absmax: upload_or_one(dev, q.absmax())?,
                map: Box::new(q.map().clone()),
                block_size: q.block_size(),
            },
        };
        Ok(Self {
            factoring,
            stats,
            momentum,
        })
    }

    /// Whether `state` has this state's factoring, statistics and momentum kind (precision,
    /// map, block size), so that [`Self::copy_from`] can take it.
    pub(super) fn same_kind(&self, state: &FactoredState) -> bool {
        let stats = state.stats();
        state.factoring() == self.factoring
            && stats.len() == self.stats.len()
            && stats
                .iter()
                .zip(&self.stats)
                .all(|((_, v), (_, len))| v.len() == *len)
            && match (state.momentum(), &self.momentum) {
                (None, DeviceMomentum::None) => true,
                (Some(Momentum::F32(m)), DeviceMomentum::F32(_)) => m.len() == self.factoring.len(),
                (
                    Some(Momentum::Blockwise(q)),
                    DeviceMomentum::Blockwise {
                        map, block_size, ..
                    },
                ) => {
                    q.len() == self.factoring.len()
                        && q.block_size() == *block_size
                        && q.map().values() == map.values()
                }
                _ => false,
            }
    }

    /// Replaces the values by `state`'s (checked with [`Self::same_kind`]).
    pub(super) fn copy_from(&mut self, dev: &B, state: &FactoredState) -> Result<()> {
        for ((_, v), (buf, _)) in state.stats().iter().zip(self.stats.iter_mut()) {
            if !v.is_empty() {
                dev.copy_to_device(v, buf)?;
            }
        }
        match (state.momentum(), &mut self.momentum) {
            (Some(Momentum::F32(m)), DeviceMomentum::F32(buf)) if !m.is_empty() => {
                dev.copy_to_device(m, buf)
            }
            (Some(Momentum::Blockwise(q)), DeviceMomentum::Blockwise { codes, absmax, .. })
                if !q.is_empty() =>
            {
                dev.copy_to_device(q.codes(), codes)?;
                dev.copy_to_device(q.absmax(), absmax)
            }
            _ => Ok(()),
        }
    }

    /// The state on the host (waits for the device).
    pub(super) fn download(&self, dev: &B) -> Result<FactoredState> {
        let n = self.factoring.len();
        let stats = self
            .stats
            .iter()
            .map(|(buf, len)| download_range(dev, buf, *len))
            .collect::<Result<_>>()?;
        let momentum = match &self.momentum {
            DeviceMomentum::None => None,
            DeviceMomentum::F32(buf) => Some(Momentum::F32(download_range(dev, buf, n)?)),
            DeviceMomentum::Blockwise {
                codes,
                absmax,
                map,
                block_size,
            } => Some(Momentum::Blockwise(Box::new(BlockwiseState::from_parts(
                download_range(dev, codes, n)?,
                download_range(dev, absmax, n.div_ceil(*block_size))?,
                QuantMap::clone(map),
                *block_size,
            )?))),
        };
        FactoredState::from_stepped_parts(self.factoring, stats, momentum)
    }

    pub(super) fn has_momentum(&self) -> bool {
        !matches!(self.momentum, DeviceMomentum::None)
    }

    /// Bytes held, as [`FactoredState::bytes`] counts them.
    pub(super) fn bytes(&self, n: usize) -> usize {
        let stats: usize = self.stats.iter().map(|(_, len)| 4 * len).sum();
        stats
            + match &self.momentum {
                DeviceMomentum::None => 0,
                DeviceMomentum::F32(_) => 4 * n,
                DeviceMomentum::Blockwise { block_size, .. } => n + 4 * n.div_ceil(*block_size),
            }
    }

    /// The momentum's block size when it is 8-bit.
    fn block_size(&self) -> Option<usize> {
        match &self.momentum {
            DeviceMomentum::Blockwise { block_size, .. } => Some(*block_size),
            _ => None,
        }
    }

    /// How `factored.cu` sees the parameter.
    fn layout(&self) -> FactoredLayout {
        FactoredLayout::of(self.factoring, self.block_size())
    }

    /// The parameter's slot in a step: its tensors' addresses, its gradient scale's index, its
    /// scratch and its rule.
    fn slot<'r, R>(
        &self,
        dev: &B,
        param: u64,
        grad: u64,
        index: usize,
        scratch: FactoredScratch,
        rule: &'r R,
    ) -> FactoredSlot<'r, R> {
        let mut stats = [0u64; 4];
        for (s, (buf, _)) in stats.iter_mut().zip(&self.stats) {
            *s = dev.address(buf);
        }
        let (momentum_kind, momentum, absmax) = match &self.momentum {
            DeviceMomentum::None => (MomentumKind::None, 0, 0),
            DeviceMomentum::F32(m) => (MomentumKind::F32, dev.address(m), 0),
            DeviceMomentum::Blockwise { codes, absmax, .. } => (
                MomentumKind::Blockwise,
                dev.address(codes),
                dev.address(absmax),
            ),
        };
        FactoredSlot {
            param,
            grad,
            stats,
            momentum,
            absmax,
            layout: self.layout(),
            momentum_kind,
            scale_index: index as u64,
            scratch,
            rule,
        }
    }
}

/// A device buffer holding `v`, or one zero when `v` is empty.
fn upload_or_one<B: Backend, T: candle_bnb_kernels::cuda::Element>(
    dev: &B,
    v: &[T],
) -> Result<B::Buffer<T>> {
    if v.is_empty() {
        dev.alloc_zeros::<T>(1)
    } else {
        dev.upload(v)
    }
}

/// The first `len` values of `buf` (none when `len` is 0).
fn download_range<B: Backend, T: candle_bnb_kernels::cuda::Element>(
    dev: &B,
    buf: &B::Buffer<T>,
    len: usize,
) -> Result<Vec<T>> {
    if len == 0 {
        Ok(Vec::new())
    } else {
        dev.download_range(buf, 0, len)
    }
}

/// Scratch words (f64) the factored parameters' launches share at most at once: a step's
/// parameters are launched in runs whose scratch fits in this much (64 MiB), or one parameter
/// alone when it needs more.
const SCRATCH_BUDGET_WORDS: usize = 8 << 20;

/// The scratch every factored parameter's step uses (each launch run lays its parameters'
/// scratch side by side in it: [`FactoredScratch::within`]), and the signed dynamic map's
/// `QuantTable` for 8-bit momentum.
pub(super) struct FactoredBuffers<B: Backend> {
    scratch: B::Buffer<f64>,
    /// Words of `scratch`: the most one launch run may use.
    words: usize,
    quant_table: B::Buffer<u8>,
}

impl<B: Backend> FactoredBuffers<B> {
    /// The buffers the factored parameters among `states` need; `None` when there are none.
    pub(super) fn new(dev: &B, states: &[DeviceState<B>]) -> Result<Option<Self>> {
        let needs: Vec<usize> = states
            .iter()
            .filter_map(|s| match s {
                DeviceState::Factored(f) => Some(f.layout().scratch_words()),
                _ => None,
            })
            .collect();
        let Some(&largest) = needs.iter().max() else {
            return Ok(None);
        };
        let total: usize = needs.iter().sum();
        // At least one word: CUDA refuses empty allocations.
        let words = largest.max(total.min(SCRATCH_BUDGET_WORDS)).max(1);
        let map = QuantMap::dynamic_signed();
        let table = quant_table_bytes(&map);
        debug_assert_eq!(table.len(), QUANT_TABLE_BYTES);
        Ok(Some(Self {
            scratch: dev.alloc_zeros(words)?,
            words,
            quant_table: dev.upload(&table)?,
        }))
    }
}

/// Parameters one multi-tensor launch sequence steps: one dtype, all matrices or all vectors,
/// their scratch fitting [`FactoredBuffers`] together; in slot-table order.
struct FactoredRun {
    dtype: DType,
    members: Vec<usize>,
    layouts: Vec<FactoredLayout>,
    /// Where the run's slots start in the step's tables.
    offset: usize,
}

impl FactoredRun {
    /// A member has an 8-bit momentum (the launches need the quant table).
    fn quantized(&self) -> bool {
        self.layouts.iter().any(|l| l.block_size.is_some())
    }
}

impl<B: Backend> StepState<B> {
    /// The runs of a step over the parameters `with_grad` (all factored; those without elements
    /// need no launch and are left out): grouped by dtype and by matrix or vector in order of
    /// first appearance, each group cut by [`scratch_runs`].
    fn factored_runs(&self, with_grad: &[usize], words: usize) -> Vec<FactoredRun> {
        let mut groups: Vec<FactoredRun> = Vec::new();
        for &i in with_grad {
            let DeviceState::Factored(state) = &self.states[i] else {
                continue;
            };
            let layout = state.layout();
            if layout.n == 0 {
                continue;
            }
            let dtype = self.params[i].dtype();
            let at = match groups
                .iter()
                .position(|g| g.dtype == dtype && g.layouts[0].factored == layout.factored)
            {
                Some(at) => at,
                None => {
                    groups.push(FactoredRun {
                        dtype,
                        members: Vec::new(),
                        layouts: Vec::new(),
                        offset: 0,
                    });
                    groups.len() - 1
                }
            };
            groups[at].members.push(i);
            groups[at].layouts.push(layout);
        }
        let mut runs = Vec::new();
        for g in groups {
            let needs: Vec<usize> = g.layouts.iter().map(|l| l.scratch_words()).collect();
            for r in scratch_runs(&needs, words) {
                runs.push(FactoredRun {
                    dtype: g.dtype,
                    members: g.members[r.clone()].to_vec(),
                    layouts: g.layouts[r].to_vec(),
                    offset: 0,
                });
            }
        }
        runs
    }

    /// As [`CudaOptimizerState::step_factored`](super::super::CudaOptimizerState::step_factored).
    pub(crate) fn step_factored<R: FactoredCudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        self.check_rules(grads, |i, state, rule| {
            let DeviceState::Factored(state) = state else {
                bail!("CUDA step: parameter {i} holds an elementwise optimizer's state")
            };
            let expected = state.factoring.stats(rule.confidence().is_some()).len();
            if state.has_momentum() != rule.has_momentum() || state.stats.len() != expected {
                bail!(
                    "CUDA step: parameter {i}: the rule keeps {} momentum and {expected} statistics, the state {} and {}",
                    if rule.has_momentum() { "a" } else { "no" },
                    if state.has_momentum() { "one" } else { "none" },
                    state.stats.len()
                )
            }
            Ok(())
        })?;
        let inputs = self.prepare(grads.iter().map(|e| e.as_ref().map(|(g, _)| *g)))?;
        let (words, scratch, quant_table) = {
            let buffers = self
                .factored
                .as_ref()
                .expect("allocated with the factored states");
            let dev = &self.backend;
            (
                buffers.words,
                dev.address(&buffers.scratch),
                dev.address(&buffers.quant_table),
            )
        };
        let mut runs = self.factored_runs(&inputs.with_grad, words);
        let slot_bytes = factored_slot_bytes::<R>();
        self.ready_staging((GRAD_SLOT_BYTES + slot_bytes) * self.params.len())?;
        let total_chunks = {
            let dev = &self.backend;
            let staging = self.staging.as_mut().expect("allocated by ready_staging");
            let host = dev.pinned_mut(&mut staging.buffers[staging.next])?;
            let mut w = TableWriter::new(host);
            let chunks = write_grad_slots(
                &mut w,
                &self.params,
                &inputs.with_grad,
                &inputs.grad_address,
            )?;
            for run in &mut runs {
                run.offset = w.position();
                let mut base = scratch;
                for (&i, layout) in run.members.iter().zip(&run.layouts) {
                    let Some((_, rule)) = &grads[i] else {
                        unreachable!("with a gradient")
                    };
                    let DeviceState::Factored(state) = &self.states[i] else {
                        unreachable!("checked above")
                    };
                    w.factored_slot(&state.slot(
                        dev,
                        inputs.param_address[i],
                        inputs.grad_address[i],
                        i,
                        FactoredScratch::within(base, layout),
                        rule,
                    ));
                    base += 8 * layout.scratch_words() as u64;
                }
            }
            chunks
        };
        self.send_staging()?;
        self.launch_prepass(inputs.with_grad.len(), total_chunks, max_grad_norm)?;
        // From here the pre-pass has run: the outcome is pending even if a later launch fails.
        self.pending = Some(inputs.with_grad.clone());
        let dev = &self.backend;
        let confidence = grads
            .iter()
            .flatten()
            .any(|(_, rule)| rule.confidence().is_some());
        for run in &runs {
            let launch = FactoredLaunch {
                slots: self.table_address(run.offset),
                layouts: &run.layouts,
                confidence,
                quant_table: if run.quantized() { quant_table } else { 0 },
                dtype: run.dtype,
                grad_scales: dev.address(&self.grad_scales),
                flags: dev.address(&self.flags),
            };
            // SAFETY: the run's slots, written above, hold each parameter's and gradient's
            // addresses, its statistics and momentum buffers (allocated for its factoring and
            // block size) and its own part of the scratch buffer (the run's scratch fits it:
            // factored_runs cut the runs by its size); the quant table is the signed dynamic
            // map's; this state alone uses them, on the device's stream.
            unsafe { launch_factored::<R, B>(dev, &launch) }?;
        }
        // The gradients copied to be contiguous are freed in stream order, after the kernels.
        drop(inputs);
        Ok(())
    }
}
