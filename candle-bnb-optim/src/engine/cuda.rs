//! The step on a CUDA device (or the emulated one): moving the state there, the step's
//! launches through [`CudaOptimizerState`], and counting each step's outcome when the device
//! reports it.

use std::collections::VecDeque;

use candle_bnb_kernels::ParamState;
use candle_core::backprop::GradStore;
use candle_core::{bail, Result};

use super::{Placement, StepConfig, TrackedParams, TrackedState};
use crate::cuda::CudaOptimizerState;
use crate::{NonFinitePolicy, Settings};

impl TrackedParams {
    /// The device state (the caller checked the placement).
    fn cuda_mut(&mut self) -> &mut CudaOptimizerState {
        match &mut self.placement {
            Placement::Cuda(device) => device,
            Placement::Cpu => unreachable!("the state is on a device"),
        }
    }

    /// Moves the state to `dev`, leaving placeholders on the host.
    #[cfg(feature = "cuda")]
    pub(super) fn move_to_device(
        &mut self,
        dev: &candle_core::CudaDevice,
        percentile: &[u32],
    ) -> Result<()> {
        let device = CudaOptimizerState::new(dev, &self.device_params(percentile))?;
        self.adopt_device(device)
    }

    /// Moves the state to the emulated CUDA device `emu`, leaving placeholders on the host: the
    /// parameters stay CPU tensors, every later step runs the CUDA host code and kernels on the
    /// emulator. For tests; not a public promise.
    ///
    /// # Errors
    /// The parameters are not on the CPU; the state is on a device already.
    #[cfg(feature = "emulator")]
    pub(crate) fn emulate_cuda(
        &mut self,
        emu: &candle_bnb_kernels::emulator::Emulator,
        percentile: &[u32],
    ) -> Result<()> {
        if let Placement::Cuda(_) = self.placement {
            bail!("the optimizer state is on a device already")
        }
        let device = CudaOptimizerState::new_emulated(emu, &self.device_params(percentile))?;
        self.adopt_device(device)
    }

    /// What the device state is built from: every parameter with its host state.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn device_params(&self, percentile: &[u32]) -> Vec<crate::cuda::CudaParam<'_>> {
        self.params
            .iter()
            .zip(percentile)
            .map(|(s, &p)| crate::cuda::CudaParam {
                param: s.var.as_tensor(),
                state: &s.state,
                percentile_clipping: p,
                grad_norms: &s.grad_norms,
            })
            .collect()
    }

    /// Keeps `device` as the state, leaving placeholders on the host.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn adopt_device(&mut self, device: CudaOptimizerState) -> Result<()> {
        let placeholders = self
            .params
            .iter()
            .map(|s| placeholder(&s.state))
            .collect::<Result<Vec<_>>>()?;
        for (slot, state) in self.params.iter_mut().zip(placeholders) {
            slot.state = state;
            slot.grad_norms.clear();
        }
        self.placement = Placement::Cuda(device);
        Ok(())
    }

    /// The CUDA step: the pre-pass, clipping and every update run on the device (see
    /// `CudaOptimizerState`); `launch` issues them with each parameter's gradient and rule. The
    /// last step's outcome is read first, so the rules are built from exact step counts; that
    /// read finds the device long done in a training loop. `NonFinitePolicy::Error` waits for
    /// this step's pre-pass to report.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    pub(super) fn step_cuda<C: StepConfig>(
        &mut self,
        grads: &GradStore,
        handling: &Settings,
        params: &[C],
        launch: impl FnOnce(
            &mut CudaOptimizerState,
            Vec<Option<(&candle_core::Tensor, C::Rule)>>,
            Option<f64>,
        ) -> Result<()>,
    ) -> Result<()> {
        use crate::cuda::CudaStepOutcome;
        self.settle_cuda_outcome(true)?;
        let percentiles: Vec<u32> = params
            .iter()
            .map(|p| p.step_settings().percentile_clipping)
            .collect();
        // The placement alone is borrowed: the parameters are read below.
        let Placement::Cuda(device) = &mut self.placement else {
            unreachable!("the caller checked the placement")
        };
        device.set_percentiles(&percentiles)?;
        let inputs: Vec<Option<(&candle_core::Tensor, C::Rule)>> = self
            .params
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                grads
                    .get(&slot.var)
                    .map(|g| (g, params[i].rule(slot.steps + 1)))
            })
            .collect();
        let skip = handling.non_finite == NonFinitePolicy::Skip;
        launch(device, inputs, handling.max_grad_norm)
            .map_err(|e| e.context("CUDA optimizer step"))?;
        if !skip {
            // NonFinitePolicy::Error: this step's outcome decides what `step` returns. A refused
            // step is not a skipped one.
            if let Some(CudaStepOutcome::Skipped { first_bad }) = self.settle_cuda_outcome(false)? {
                let slot = &self.params[first_bad];
                bail!(
                    "the gradient of parameter {first_bad} {:?} (shape {:?}) is not finite",
                    slot.name,
                    slot.var.dims()
                )
            }
        }
        Ok(())
    }

    /// Counts the outcome of the step still pending on the device, if any (waiting for it only
    /// if the device has not finished that step's pre-pass), and returns it. A skipped step is
    /// counted in `skipped` when `count_skipped` (NonFinitePolicy::Skip).
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn settle_cuda_outcome(
        &mut self,
        count_skipped: bool,
    ) -> Result<Option<crate::cuda::CudaStepOutcome>> {
        use crate::cuda::CudaStepOutcome;
        let Placement::Cuda(device) = &mut self.placement else {
            return Ok(None);
        };
        let Some((outcome, with_grad)) = device.take_outcome()? else {
            return Ok(None);
        };
        match outcome {
            CudaStepOutcome::Taken => {
                self.steps += 1;
                for i in with_grad {
                    self.params[i].steps += 1;
                }
            }
            CudaStepOutcome::Skipped { .. } => self.skipped += count_skipped as u64,
        }
        Ok(Some(outcome))
    }

    /// [`TrackedParams::restore`] of a state on the device: checks, settles the pending step,
    /// uploads.
    pub(super) fn restore_cuda(&mut self, loaded: TrackedState) -> Result<()> {
        let states: Vec<&ParamState> = loaded.states.iter().collect();
        let norms: Vec<&VecDeque<f64>> = loaded.grad_norms.iter().collect();
        let device = self.cuda_mut();
        device.check_upload(&states, &norms)?;
        // The pending step is superseded by the checkpoint, but is counted first so that a
        // CUDA error while uploading leaves consistent counters.
        self.settle_cuda_outcome(true)?;
        let device = self.cuda_mut();
        device.upload(&states, &norms)?;
        for (slot, steps) in self.params.iter_mut().zip(loaded.param_steps) {
            slot.steps = steps;
        }
        self.steps = loaded.steps;
        self.skipped = loaded.skipped;
        Ok(())
    }
}

/// A state of the same kind as `state` (precision, count, maps, block size) with no elements:
/// what the host keeps of a state that lives on a device.
fn placeholder(state: &ParamState) -> Result<ParamState> {
    Ok(match state {
        ParamState::F32(s) => ParamState::F32(vec![Vec::new(); s.len()]),
        ParamState::Factored(f) => ParamState::Factored(f.kind_only()),
        ParamState::Blockwise(s) => ParamState::Blockwise(
            s.iter()
                .map(|s| {
                    candle_bnb_kernels::BlockwiseState::zeros(0, s.map().clone(), s.block_size())
                })
                .collect::<Result<_>>()?,
        ),
    })
}
