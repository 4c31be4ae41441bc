//! A step state's device buffers: each parameter's optimizer state and the clipping history,
//! uploaded (construction, checkpoints), checked and downloaded.

use std::collections::VecDeque;

use candle_core::{bail, Result};

use super::factored::FactoredDeviceState;
use super::StepState;
use candle_bnb_kernels::cuda::Backend;
use candle_bnb_kernels::slot_table::CUDA_GRAD_NORM_HISTORY;
use candle_bnb_kernels::{BlockwiseState, ParamState, QuantMap};

/// A parameter's state buffers on the device.
pub(super) enum DeviceState<B: Backend> {
    F32(Vec<B::Buffer<f32>>),
    Blockwise {
        codes: Vec<B::Buffer<u8>>,
        absmax: Vec<B::Buffer<f32>>,
        maps: Vec<QuantMap>,
        block_size: usize,
    },
    /// A factored optimizer's statistics and momentum.
    Factored(FactoredDeviceState<B>),
}

impl<B: Backend> StepState<B> {
    pub(super) fn upload_histories(&mut self, norms: &[&VecDeque<f64>]) -> Result<()> {
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

    /// As [`CudaOptimizerState::set_percentiles`](super::super::CudaOptimizerState::set_percentiles).
    pub(crate) fn set_percentiles(&mut self, percentiles: &[u32]) -> Result<()> {
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

    /// As [`CudaOptimizerState::upload`](super::super::CudaOptimizerState::upload).
    pub(crate) fn upload(
        &mut self,
        states: &[&ParamState],
        grad_norms: &[&VecDeque<f64>],
    ) -> Result<()> {
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
                (ParamState::Factored(s), DeviceState::Factored(d)) => {
                    d.copy_from(&self.backend, s)?
                }
                _ => unreachable!("layouts checked above"),
            }
        }
        self.upload_histories(grad_norms)
    }

    /// As [`CudaOptimizerState::check_upload`](super::super::CudaOptimizerState::check_upload).
    pub(crate) fn check_upload(
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
                (ParamState::Factored(s), DeviceState::Factored(d)) => d.same_kind(s),
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

    /// As [`CudaOptimizerState::download`](super::super::CudaOptimizerState::download).
    pub(crate) fn download(&self) -> Result<Vec<(ParamState, VecDeque<f64>)>> {
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
                DeviceState::Factored(d) => ParamState::Factored(d.download(&self.backend)?),
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

    pub(super) fn n_states(&self, i: usize) -> usize {
        match &self.states[i] {
            DeviceState::F32(s) => s.len(),
            DeviceState::Blockwise { codes, .. } => codes.len(),
            DeviceState::Factored(d) => d.has_momentum() as usize,
        }
    }
}

/// The state pointers of a slot: 3 state buffers and 3 absmax arrays, unused ones 0.
pub(super) fn state_addresses<B: Backend>(dev: &B, state: &DeviceState<B>) -> ([u64; 3], [u64; 3]) {
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
        // Its slots take the addresses from the state itself.
        DeviceState::Factored(_) => {}
    }
    (s, a)
}

pub(super) fn upload_state<B: Backend>(
    dev: &B,
    n: usize,
    state: &ParamState,
    what: &str,
) -> Result<DeviceState<B>> {
    // cuMemAlloc refuses 0 bytes: empty parameters get one-element buffers they never touch.
    Ok(match state {
        ParamState::Factored(s) => {
            DeviceState::Factored(FactoredDeviceState::upload(dev, n, s, what)?)
        }
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
