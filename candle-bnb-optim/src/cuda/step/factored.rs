//! Factored optimizers (Adafactor, CAME) on the device: each parameter's statistics and
//! momentum, the scratch buffers their steps share, and the step (the pre-pass, then per
//! parameter the launches of `candle_bnb_kernels::cuda::launch_factored`).

use candle_core::{bail, Result, Tensor};

use super::device_state::DeviceState;
use super::tables::write_grad_slots;
use super::{CudaParam, StepState};
use candle_bnb_kernels::cuda::{
    launch_factored, quant_table_bytes, Backend, FactoredLaunch, QUANT_TABLE_BYTES,
};
use candle_bnb_kernels::slot_table::{
    factored_slot_bytes, FactoredLayout, FactoredScratch, FactoredSlot, MomentumKind, TableWriter,
    GRAD_SLOT_BYTES,
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
        FactoredState::from_parts(self.factoring, stats, momentum)
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

/// The scratch buffers every factored parameter's step uses in turn (sized for the largest), and
/// the signed dynamic map's `QuantTable` for 8-bit momentum.
pub(super) struct FactoredBuffers<B: Backend> {
    row_sums: B::Buffer<f64>,
    row_squares: B::Buffer<f64>,
    col_partials: B::Buffer<f64>,
    means: B::Buffer<f64>,
    row_factors: B::Buffer<f32>,
    col_factors: B::Buffer<f32>,
    scalars: B::Buffer<f64>,
    quant_table: B::Buffer<u8>,
}

impl<B: Backend> FactoredBuffers<B> {
    /// The buffers the factored parameters among `params` need; `None` when there are none.
    pub(super) fn new(
        dev: &B,
        params: &[CudaParam<'_>],
        states: &[DeviceState<B>],
    ) -> Result<Option<Self>> {
        let mut lens = [1usize; 6];
        let mut any = false;
        for state in states {
            if let DeviceState::Factored(f) = state {
                any = true;
                for (len, need) in lens.iter_mut().zip(f.layout().scratch_lens()) {
                    *len = (*len).max(need);
                }
            }
        }
        if !any {
            return Ok(None);
        }
        debug_assert_eq!(params.len(), states.len());
        let map = QuantMap::dynamic_signed();
        let table = quant_table_bytes(&map);
        debug_assert_eq!(table.len(), QUANT_TABLE_BYTES);
        Ok(Some(Self {
            row_sums: dev.alloc_zeros(lens[0])?,
            row_squares: dev.alloc_zeros(lens[1])?,
            col_partials: dev.alloc_zeros(lens[2])?,
            means: dev.alloc_zeros(lens[3])?,
            row_factors: dev.alloc_zeros(lens[4])?,
            col_factors: dev.alloc_zeros(lens[5])?,
            scalars: dev.alloc_zeros(2)?,
            quant_table: dev.upload(&table)?,
        }))
    }

    fn addresses(&self, dev: &B) -> FactoredScratch {
        FactoredScratch {
            row_sums: dev.address(&self.row_sums),
            row_squares: dev.address(&self.row_squares),
            col_partials: dev.address(&self.col_partials),
            means: dev.address(&self.means),
            row_factors: dev.address(&self.row_factors),
            col_factors: dev.address(&self.col_factors),
            scalars: dev.address(&self.scalars),
        }
    }
}

impl<B: Backend> StepState<B> {
    /// As [`CudaOptimizerState::step_factored`](super::super::CudaOptimizerState::step_factored).
    pub(crate) fn step_factored<R: FactoredCudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        self.check_grad_count(grads.len())?;
        for (i, entry) in grads.iter().enumerate() {
            let Some((_, rule)) = entry else { continue };
            let DeviceState::Factored(state) = &self.states[i] else {
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
        }
        let inputs = self.prepare(grads.iter().map(|e| e.as_ref().map(|(g, _)| *g)))?;
        let slot_bytes = factored_slot_bytes::<R>();
        self.ready_staging((GRAD_SLOT_BYTES + slot_bytes) * self.params.len())?;
        let total_chunks = {
            let dev = &self.backend;
            let scratch = self
                .factored
                .as_ref()
                .expect("allocated with the factored states")
                .addresses(dev);
            let staging = self.staging.as_mut().expect("allocated by ready_staging");
            let host = dev.pinned_mut(&mut staging.buffers[staging.next])?;
            let mut w = TableWriter::new(host);
            let chunks = write_grad_slots(
                &mut w,
                &self.params,
                &inputs.with_grad,
                &inputs.grad_address,
            )?;
            for &i in &inputs.with_grad {
                let Some((_, rule)) = &grads[i] else { continue };
                let DeviceState::Factored(state) = &self.states[i] else {
                    unreachable!("checked above")
                };
                let mut stats = [0u64; 4];
                for (s, (buf, _)) in stats.iter_mut().zip(&state.stats) {
                    *s = dev.address(buf);
                }
                let (momentum_kind, momentum, absmax, block_size) = match &state.momentum {
                    DeviceMomentum::None => (MomentumKind::None, 0, 0, 0),
                    DeviceMomentum::F32(m) => (MomentumKind::F32, dev.address(m), 0, 0),
                    DeviceMomentum::Blockwise {
                        codes,
                        absmax,
                        block_size,
                        ..
                    } => (
                        MomentumKind::Blockwise,
                        dev.address(codes),
                        dev.address(absmax),
                        *block_size as u64,
                    ),
                };
                w.factored_slot(&FactoredSlot {
                    param: inputs.param_address[i],
                    grad: inputs.grad_address[i],
                    stats,
                    momentum,
                    absmax,
                    layout: state.layout(),
                    momentum_kind,
                    block_size,
                    scale_index: i as u64,
                    scratch,
                    rule,
                });
            }
            chunks
        };
        self.send_staging()?;
        self.launch_prepass(inputs.with_grad.len(), total_chunks, max_grad_norm)?;
        // From here the pre-pass has run: the outcome is pending even if a later launch fails.
        self.pending = Some(inputs.with_grad.clone());
        let dev = &self.backend;
        let quant_table = self
            .factored
            .as_ref()
            .map_or(0, |f| dev.address(&f.quant_table));
        for (k, &i) in inputs.with_grad.iter().enumerate() {
            let Some((_, rule)) = &grads[i] else { continue };
            let DeviceState::Factored(state) = &self.states[i] else {
                unreachable!("checked above")
            };
            let launch = FactoredLaunch {
                slot: self.table_address(GRAD_SLOT_BYTES * self.params.len() + k * slot_bytes),
                layout: state.layout(),
                confidence: rule.confidence().is_some(),
                block_size: state.block_size(),
                quant_table,
                dtype: self.params[i].dtype(),
                grad_scales: dev.address(&self.grad_scales),
                flags: dev.address(&self.flags),
            };
            // SAFETY: the slot written above holds this parameter's and gradient's addresses,
            // its statistics and momentum buffers (allocated for its factoring and block
            // size), and the scratch buffers sized for the largest factored parameter; the
            // quant table is the signed dynamic map's; this state alone uses them, on the
            // device's stream.
            unsafe { launch_factored::<R, B>(dev, &launch) }?;
        }
        // The gradients copied to be contiguous are freed in stream order, after the kernels.
        drop(inputs);
        Ok(())
    }
}
