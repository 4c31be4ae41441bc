//! [`StepRule`]: what the engine needs of a parameter's rule, for both kinds of algorithm:
//! elementwise rules ([`Elementwise`], stepped by `fused_update`) and factored ones
//! ([`Factored`]: Adafactor, CAME, stepped by `factored_update`).

use candle_bnb_kernels::{
    check_factored_update, check_fused_update, factored_update, fused_update, CudaRule,
    FactoredCudaRule, FactoredState, Factoring, ParamState, ScaledGrad,
};
use candle_core::{bail, Result, Tensor};

#[cfg(any(feature = "cuda", feature = "emulator"))]
use super::{StepConfig, TrackedParams};
#[cfg(any(feature = "cuda", feature = "emulator"))]
use crate::Settings;
#[cfg(any(feature = "cuda", feature = "emulator"))]
use candle_core::backprop::GradStore;

use crate::settings::StateLayout;

/// The state a rule gives a parameter, as plans count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateSize {
    /// Whether the per-element state is 8-bit.
    pub(crate) quantized: bool,
    /// Buffers of one value per element.
    pub(crate) states: usize,
    /// Bytes in all (statistics included).
    pub(crate) bytes: usize,
}

/// A parameter's rule for one step, of either kind: how its state is made, sized, checked and
/// stepped on the CPU. Sealed in effect (only this crate names it).
pub trait StepRule: Clone + Send + Sync + 'static {
    /// A fresh state for a parameter of shape `dims`.
    fn initial_state(&self, dims: &[usize], layout: StateLayout) -> Result<ParamState>;

    /// The size of [`StepRule::initial_state`], without allocating it.
    fn state_size(&self, dims: &[usize], layout: StateLayout) -> StateSize;

    /// Per buffer of one value per element: whether it may be negative (checkpoints check it).
    fn signed_states(&self) -> &'static [bool];

    /// Everything [`StepRule::update`] checks, changing nothing.
    fn check(&self, param: &Tensor, grad: &Tensor, state: &ParamState) -> Result<()>;

    /// One step of `param` from `grad` times `scale`.
    fn update(
        &self,
        scale: f32,
        param: &Tensor,
        grad: &Tensor,
        state: &mut ParamState,
    ) -> Result<()>;

    /// The step of `tracked`, whose state is on a CUDA device (or the emulated one), with
    /// `handling`'s gradient handling and each parameter's config in `params`.
    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn step_on_device<C: StepConfig<Rule = Self>>(
        tracked: &mut TrackedParams,
        grads: &GradStore,
        handling: &Settings,
        params: &[C],
    ) -> Result<()>;
}

/// An elementwise rule ([`UpdateRule`]): every element steps on its own state values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Elementwise<R>(pub R);

/// A factored rule ([`FactoredRule`](candle_bnb_kernels::FactoredRule)): row and column statistics and an optional momentum.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Factored<R>(pub R);

impl<R: CudaRule + Sync> StepRule for Elementwise<R> {
    fn initial_state(&self, dims: &[usize], layout: StateLayout) -> Result<ParamState> {
        let n = dims.iter().product();
        if layout.quantizes(n) {
            ParamState::new_blockwise(&self.0, n, layout.block_size)
        } else {
            Ok(ParamState::new_f32(&self.0, n))
        }
    }

    fn state_size(&self, dims: &[usize], layout: StateLayout) -> StateSize {
        let n = dims.iter().product();
        let states = self.0.signed_states().len();
        StateSize {
            quantized: layout.quantizes(n) && states > 0,
            states,
            bytes: layout.state_bytes(n, states),
        }
    }

    fn signed_states(&self) -> &'static [bool] {
        self.0.signed_states()
    }

    fn check(&self, param: &Tensor, grad: &Tensor, state: &ParamState) -> Result<()> {
        check_fused_update(&self.0, param, grad, state)
    }

    fn update(
        &self,
        scale: f32,
        param: &Tensor,
        grad: &Tensor,
        state: &mut ParamState,
    ) -> Result<()> {
        fused_update(&ScaledGrad::new(self.0, scale), param, grad, state)
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn step_on_device<C: StepConfig<Rule = Self>>(
        tracked: &mut TrackedParams,
        grads: &GradStore,
        handling: &Settings,
        params: &[C],
    ) -> Result<()> {
        tracked.step_cuda(grads, handling, params, |device, inputs, max_grad_norm| {
            let inputs: Vec<_> = inputs
                .into_iter()
                .map(|e| e.map(|(g, rule)| (g, rule.0)))
                .collect();
            device.step(&inputs, max_grad_norm)
        })
    }
}

impl<R: FactoredCudaRule> StepRule for Factored<R> {
    fn initial_state(&self, dims: &[usize], layout: StateLayout) -> Result<ParamState> {
        let n = dims.iter().product();
        let block_size = layout.quantizes(n).then_some(layout.block_size);
        Ok(ParamState::Factored(FactoredState::new(
            &self.0, dims, block_size,
        )?))
    }

    fn state_size(&self, dims: &[usize], layout: StateLayout) -> StateSize {
        let n = dims.iter().product();
        let stats: usize = Factoring::of(dims)
            .stats(self.0.confidence().is_some())
            .iter()
            .map(|(_, len)| len)
            .sum();
        let states = self.0.has_momentum() as usize;
        StateSize {
            quantized: layout.quantizes(n) && states > 0,
            states,
            bytes: 4 * stats + layout.state_bytes(n, states),
        }
    }

    fn signed_states(&self) -> &'static [bool] {
        if self.0.has_momentum() {
            &[true]
        } else {
            &[]
        }
    }

    fn check(&self, param: &Tensor, grad: &Tensor, state: &ParamState) -> Result<()> {
        let ParamState::Factored(state) = state else {
            bail!("a factored optimizer's parameter holds an elementwise optimizer's state")
        };
        check_factored_update(&self.0, param, grad, state)
    }

    fn update(
        &self,
        scale: f32,
        param: &Tensor,
        grad: &Tensor,
        state: &mut ParamState,
    ) -> Result<()> {
        let ParamState::Factored(state) = state else {
            bail!("a factored optimizer's parameter holds an elementwise optimizer's state")
        };
        factored_update(&ScaledGrad::new(self.0, scale), param, grad, state)
    }

    #[cfg(any(feature = "cuda", feature = "emulator"))]
    fn step_on_device<C: StepConfig<Rule = Self>>(
        tracked: &mut TrackedParams,
        grads: &GradStore,
        handling: &Settings,
        params: &[C],
    ) -> Result<()> {
        tracked.step_cuda(grads, handling, params, |device, inputs, max_grad_norm| {
            let inputs: Vec<_> = inputs
                .into_iter()
                .map(|e| e.map(|(g, rule)| (g, rule.0)))
                .collect();
            device.step_factored(&inputs, max_grad_norm)
        })
    }
}
