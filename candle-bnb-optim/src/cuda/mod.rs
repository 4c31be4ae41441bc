//! An optimizer's state on a CUDA device: [`CudaOptimizerState`], one variant per device kind (a
//! CUDA GPU; the emulated device of the `emulator` feature, for tests) over the one host code
//! of a step, [`StepState`] (`step/`), which launches `candle_bnb_kernels`' CUDA kernels.

use std::collections::VecDeque;

use candle_core::{Result, Tensor};

#[cfg(feature = "cuda")]
use candle_bnb_kernels::cuda::CudaDriver;
#[cfg(feature = "emulator")]
use candle_bnb_kernels::emulator::Emulator;
use candle_bnb_kernels::{CudaRule, FactoredCudaRule, ParamState};

mod step;

use step::StepState;
pub(crate) use step::{CudaParam, CudaStepOutcome};

/// The state of an optimizer whose parameters are on one CUDA device, with what a step launches.
///
/// Built from the host state (`CudaOptimizerState::new`), stepped with
/// [`CudaOptimizerState::step`], copied back with [`CudaOptimizerState::download`] (checkpoints,
/// inspection) and replaced with [`CudaOptimizerState::upload`] (loading a checkpoint, wherever
/// it was saved).
///
/// A step is, on the device's stream, in this order: one copy of the slot tables from pinned
/// host memory, `bnb_sum_squares`, `bnb_prepass_finish`, an 8-byte copy of the skip flag into
/// pinned host memory, and per group of parameters (same dtype, state precision, state count,
/// block size and maps) the layer-wise passes when the rule has them and one fused launch; for
/// a factored optimizer (Adafactor, CAME; [`CudaOptimizerState::step_factored`]) instead, per
/// run of parameters with a gradient (one dtype, all matrices or all vectors, their scratch
/// within 64 MiB together), the multi-tensor launches of `kernels/factored.cu` (3 to 15), in a
/// scratch buffer allocated with the state. The host never waits for the device inside a
/// step: the pre-pass's outcome (taken or skipped) is read at the start of the next step, when
/// it is long known (see
/// [`CudaOptimizerState::take_outcome`]). Every buffer is allocated at construction or on the
/// first step that needs it (the tables on the first step, a layer-wise group's partial sums on
/// its first step with gradients); a step after those allocates nothing.
///
/// Everything runs on the device's stream (Candle's per-thread stream) and the tables hold raw
/// device addresses, which cudarc's cross-stream event tracking does not see: use the state from
/// the thread that runs the model, or synchronize other streams yourself. A gradient that is not
/// contiguous is copied to a contiguous one first (an allocation in that step). The math is the
/// CPU's, rule for rule (`kernels/README.md` lists where the bits may differ).
pub(crate) struct CudaOptimizerState(Inner);

/// Boxed: the two states differ in size by the size of their device handles and buffers.
enum Inner {
    #[cfg(feature = "cuda")]
    Cuda(Box<StepState<CudaDriver>>),
    #[cfg(feature = "emulator")]
    Emulated(Box<StepState<Emulator>>),
}

/// `$body` with `$s` bound to the [`StepState`] of whichever device `$state` is on.
macro_rules! on_device {
    ($state:expr, $s:ident => $body:expr) => {
        match $state {
            #[cfg(feature = "cuda")]
            Inner::Cuda($s) => $body,
            #[cfg(feature = "emulator")]
            Inner::Emulated($s) => $body,
        }
    };
}

impl CudaOptimizerState {
    /// Uploads the state of `params` to `dev` and allocates every buffer a step needs.
    ///
    /// # Errors
    /// A parameter not on `dev`, not contiguous, or not `F32`/`F16`/`BF16`; a state whose length
    /// differs from its parameter's; a percentile outside 1..=100; more than
    /// [`CUDA_GRAD_NORM_HISTORY`](candle_bnb_kernels::slot_table::CUDA_GRAD_NORM_HISTORY) recorded norms; more than
    /// `u32::MAX` parameters; CUDA errors.
    #[cfg(feature = "cuda")]
    pub(crate) fn new(dev: &candle_core::CudaDevice, params: &[CudaParam<'_>]) -> Result<Self> {
        Ok(Self(Inner::Cuda(Box::new(StepState::new(
            CudaDriver::new(dev),
            params,
        )?))))
    }

    /// As `CudaOptimizerState::new` (the `cuda` feature), on the emulated device `emu`: the
    /// parameters are CPU tensors, the kernels run compiled for the CPU. For tests; not a public
    /// promise.
    ///
    /// # Errors
    /// As `CudaOptimizerState::new`, with parameters that must be on the CPU.
    #[cfg(feature = "emulator")]
    pub(crate) fn new_emulated(emu: &Emulator, params: &[CudaParam<'_>]) -> Result<Self> {
        Ok(Self(Inner::Emulated(Box::new(StepState::new(
            emu.clone(),
            params,
        )?))))
    }

    /// Sets each parameter's percentile-clipping setting (1..=100, 100 = off), copying only when
    /// one changed (a loaded checkpoint can change them).
    ///
    /// # Errors
    /// Not one value per parameter, a value outside 1..=100, CUDA errors.
    pub(crate) fn set_percentiles(&mut self, percentiles: &[u32]) -> Result<()> {
        on_device!(&mut self.0, s => s.set_percentiles(percentiles))
    }

    /// Replaces every parameter's state and norm history (a checkpoint being loaded). Everything
    /// is checked ([`Self::check_upload`]) before anything is copied.
    ///
    /// # Errors
    /// Those of [`Self::check_upload`]; CUDA errors.
    pub(crate) fn upload(
        &mut self,
        states: &[&ParamState],
        grad_norms: &[&VecDeque<f64>],
    ) -> Result<()> {
        on_device!(&mut self.0, s => s.upload(states, grad_norms))
    }

    /// Checks that [`Self::upload`] would accept `states` and `grad_norms`, changing nothing.
    ///
    /// # Errors
    /// A count, length, precision, state count, block size or map that differs from the state
    /// this was built with (naming the parameter), or more than
    /// [`CUDA_GRAD_NORM_HISTORY`](candle_bnb_kernels::slot_table::CUDA_GRAD_NORM_HISTORY) norms.
    pub(crate) fn check_upload(
        &self,
        states: &[&ParamState],
        grad_norms: &[&VecDeque<f64>],
    ) -> Result<()> {
        on_device!(&self.0, s => s.check_upload(states, grad_norms))
    }

    /// Copies every parameter's state and norm history back to the host (waits for the device).
    ///
    /// # Errors
    /// CUDA errors.
    pub(crate) fn download(&self) -> Result<Vec<(ParamState, VecDeque<f64>)>> {
        on_device!(&self.0, s => s.download())
    }

    /// The outcome of the last step, once (the next call gives `None` until another step):
    /// waits for the device only if its pre-pass has not finished yet. Call it before building
    /// the next step's rules, so that a skipped step does not advance the step counts they are
    /// built from.
    ///
    /// Returns the outcome and the indices of the parameters that had a gradient in that step.
    ///
    /// # Errors
    /// CUDA errors.
    pub(crate) fn take_outcome(&mut self) -> Result<Option<(CudaStepOutcome, Vec<usize>)>> {
        on_device!(&mut self.0, s => s.take_outcome())
    }

    /// The parameters that had a gradient in the pending step (empty when none is pending).
    pub(crate) fn pending_params(&self) -> &[usize] {
        on_device!(&self.0, s => s.pending_params())
    }

    /// The outcome of the last step without consuming it (`None`: no step is pending). Waits
    /// for the step's pre-pass.
    ///
    /// # Errors
    /// CUDA errors.
    pub(crate) fn peek_outcome(&self) -> Result<Option<CudaStepOutcome>> {
        on_device!(&self.0, s => s.peek_outcome())
    }

    /// Launches one optimizer step: `grads[i]` is parameter `i`'s gradient and rule (`None`:
    /// no gradient, the parameter and its state are left alone). The pre-pass on the device
    /// checks every gradient for NaN/±inf (then the whole step changes nothing), clips
    /// (`max_grad_norm`, each parameter's percentile clipping) and the updates follow, without
    /// the host waiting. [`Self::take_outcome`] gives the outcome later (or at once, waiting,
    /// which is what `NonFinitePolicy::Error` needs).
    ///
    /// A previous step's outcome that was not taken is dropped: take it first.
    ///
    /// # Errors
    /// `grads` not holding one entry per parameter; a gradient whose shape, dtype or device
    /// differs from its parameter's (naming the parameter; nothing is launched); CUDA errors.
    pub(crate) fn step<R: CudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        on_device!(&mut self.0, s => s.step(grads, max_grad_norm))
    }

    /// As [`Self::step`], for a factored optimizer (Adafactor, CAME): after the same pre-pass,
    /// each parameter with a gradient is stepped by the launches of `kernels/factored.cu`.
    ///
    /// # Errors
    /// As [`Self::step`]; a state made for another rule (momentum, statistics) or an
    /// elementwise optimizer's state (naming the parameter; nothing is launched).
    pub(crate) fn step_factored<R: FactoredCudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        max_grad_norm: Option<f64>,
    ) -> Result<()> {
        on_device!(&mut self.0, s => s.step_factored(grads, max_grad_norm))
    }

    /// Bytes the device state buffers hold (codes, scales and f32 values), as
    /// [`ParamState::bytes`] counts them on the host.
    pub(crate) fn state_bytes(&self) -> usize {
        on_device!(&self.0, s => s.state_bytes())
    }
}
