//! Fused optimizer steps on Candle tensors: the parameter is updated in place and its state,
//! owned by the optimizer, is read and written in the same pass.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};

use crate::checks::check_block_size;
use crate::cpu::fused::{
    measure, step_blockwise_state, step_f32_state, BlockwiseStateMut, StateView,
};
use crate::cpu::{Element, Isa, MAX_BLOCK};
use crate::rules::UpdateRule;
use crate::{FactoredState, QuantMap};

/// One state buffer stored 8-bit blockwise: a code per element and an f32 absmax per block.
#[derive(Clone, Debug)]
pub struct BlockwiseState {
    codes: Vec<u8>,
    absmax: Vec<f32>,
    map: QuantMap,
    block_size: usize,
}

impl BlockwiseState {
    /// An all-zero state of `len` elements (absmax 0, every code the code of 0.0).
    ///
    /// # Errors
    /// A `block_size` not in [`crate::SUPPORTED_BLOCK_SIZES`].
    pub fn zeros(len: usize, map: QuantMap, block_size: usize) -> Result<Self> {
        Self::filled(len, 0.0, map, block_size)
    }

    /// A state of `len` elements all equal to `value` as nearly as the map allows (exactly when
    /// the map holds `value.signum()`, as both dynamic maps hold 1.0).
    ///
    /// # Errors
    /// A `block_size` not in [`crate::SUPPORTED_BLOCK_SIZES`], or a non-finite `value`.
    pub fn filled(len: usize, value: f32, map: QuantMap, block_size: usize) -> Result<Self> {
        check_block_size(block_size)?;
        if !value.is_finite() {
            bail!("initial optimizer state must be finite, got {value}")
        }
        let (code, scale) = if value == 0.0 {
            (map.nearest_code(0.0), 0.0)
        } else {
            (map.nearest_code(value.signum()), value.abs())
        };
        Ok(Self {
            codes: vec![code; len],
            absmax: vec![scale; len.div_ceil(block_size)],
            map,
            block_size,
        })
    }

    /// A state from its parts (as a checkpoint stores them).
    ///
    /// # Errors
    /// An unsupported `block_size`, `absmax` not holding `ceil(codes.len() / block_size)`
    /// values, or a scale that is negative or not finite (naming the block).
    pub fn from_parts(
        codes: Vec<u8>,
        absmax: Vec<f32>,
        map: QuantMap,
        block_size: usize,
    ) -> Result<Self> {
        check_block_size(block_size)?;
        let blocks = codes.len().div_ceil(block_size);
        if absmax.len() != blocks {
            bail!(
                "{} codes in blocks of {block_size} need {blocks} absmax values, got {}",
                codes.len(),
                absmax.len()
            )
        }
        if let Some((b, a)) = absmax
            .iter()
            .enumerate()
            .find(|(_, a)| !(a.is_finite() && **a >= 0.0))
        {
            bail!("absmax of block {b} is {a}; scales must be finite and >= 0")
        }
        Ok(Self {
            codes,
            absmax,
            map,
            block_size,
        })
    }

    /// The codes, one per element.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The per-block scales, `ceil(len / block_size)` of them.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// The map the codes index.
    pub fn map(&self) -> &QuantMap {
        &self.map
    }

    /// Elements per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// Whether the state has no elements.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// The codes and scales to write, with the map they index.
    pub(crate) fn parts_mut(&mut self) -> (&mut [u8], &mut [f32], &QuantMap) {
        (&mut self.codes, &mut self.absmax, &self.map)
    }

    /// Bytes the buffers hold: one code per element and one f32 scale per block.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.absmax.len() * 4
    }

    /// The dequantized values, `map[code] * absmax[block]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.codes.len()];
        crate::cpu::dequantize(
            &self.codes,
            &self.absmax,
            &self.map,
            self.block_size,
            &mut out,
        );
        out
    }
}

/// The optimizer state of one parameter: for elementwise rules ([`UpdateRule`]) one buffer per
/// state value of its rule, as long as the parameter, either f32 (32-bit optimizers) or 8-bit
/// blockwise; for factored rules ([`FactoredRule`](crate::FactoredRule)) row and column
/// statistics and an optional momentum.
#[derive(Clone, Debug)]
pub enum ParamState {
    /// 32-bit state: one f32 buffer per state value.
    F32(Vec<Vec<f32>>),
    /// 8-bit state: one blockwise-quantized buffer per state value.
    Blockwise(Vec<BlockwiseState>),
    /// The state of a factored rule (Adafactor, CAME), stepped by
    /// [`factored_update`](crate::factored_update).
    Factored(FactoredState),
}

impl ParamState {
    /// Initial f32 state for `rule` and a parameter of `len` elements.
    pub fn new_f32<R: UpdateRule>(rule: &R, len: usize) -> Self {
        let init = rule.initial_state();
        Self::F32(
            (0..rule.signed_states().len())
                .map(|k| vec![init[k]; len])
                .collect(),
        )
    }

    /// Initial 8-bit state for `rule`: the signed dynamic map for states that take negative
    /// values, the unsigned one for the others (see [`UpdateRule::signed_states`]).
    ///
    /// # Errors
    /// An unsupported `block_size` or a non-finite initial value.
    pub fn new_blockwise<R: UpdateRule>(rule: &R, len: usize, block_size: usize) -> Result<Self> {
        let init = rule.initial_state();
        let states = rule
            .signed_states()
            .iter()
            .enumerate()
            .map(|(k, &signed)| {
                let map = if signed {
                    QuantMap::dynamic_signed()
                } else {
                    QuantMap::dynamic_unsigned()
                };
                BlockwiseState::filled(len, init[k], map, block_size)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::Blockwise(states))
    }

    /// Bytes the state buffers hold (codes, scales and f32 values; not the shared maps).
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(states) => states.iter().map(|s| s.len() * 4).sum(),
            Self::Blockwise(states) => states.iter().map(BlockwiseState::bytes).sum(),
            Self::Factored(state) => state.bytes(),
        }
    }

    /// Number of buffers holding one value per parameter element (a factored state's momentum
    /// counts, its row and column statistics do not).
    pub fn n_states(&self) -> usize {
        match self {
            Self::F32(states) => states.len(),
            Self::Blockwise(states) => states.len(),
            Self::Factored(state) => state.momentum().is_some() as usize,
        }
    }

    /// Elements per state buffer, or `None` when there are no buffers.
    fn len(&self) -> Option<usize> {
        match self {
            Self::F32(states) => states.first().map(Vec::len),
            Self::Blockwise(states) => states.first().map(BlockwiseState::len),
            Self::Factored(state) => Some(state.factoring().len()),
        }
    }

    fn check_consistent(&self) -> Result<()> {
        let len = self.len().unwrap_or(0);
        match self {
            Self::F32(states) => {
                if let Some((k, s)) = states.iter().enumerate().find(|(_, s)| s.len() != len) {
                    bail!(
                        "optimizer state {k} has {} elements, state 0 has {len}",
                        s.len()
                    )
                }
            }
            Self::Blockwise(states) => {
                for (k, s) in states.iter().enumerate() {
                    let blocks = s.codes.len().div_ceil(s.block_size);
                    if s.codes.len() != len
                        || s.absmax.len() != blocks
                        || s.block_size != states[0].block_size
                    {
                        bail!(
                            "optimizer state {k}: {} codes, {} absmax, block size {} (state 0: {len} codes, block size {})",
                            s.codes.len(),
                            s.absmax.len(),
                            s.block_size,
                            states[0].block_size
                        )
                    }
                }
            }
            // Checked whole when made (`FactoredState::from_parts`).
            Self::Factored(_) => {}
        }
        Ok(())
    }
}

/// One optimizer step for one parameter, fused: `param` is updated in place from `grad` by
/// `rule`, and `state` is read and written in the same pass (8-bit state is dequantized,
/// updated in f32 and re-quantized block by block with fresh absmax scales).
///
/// `param` must be a contiguous `F32`, `F16` or `BF16` tensor (a `Var`'s tensor is); `grad` has
/// its shape and dtype, any layout, and may share the parameter's storage (it is then copied
/// first). A parameter with no elements (any shape with a zero dimension) is left as it is. Math is f32 whatever the dtype; `F16`/`BF16` parameters are
/// rounded to nearest-even once per step.
///
/// # Errors
/// A dtype, shape or device mismatch, a non-contiguous `param`, a state with another element
/// count or number of buffers than the rule keeps, or a tensor not on the CPU (this host-state
/// form is CPU-only; the optimizers of `candle-bnb-optim` step CUDA parameters with their state
/// on the device). Nothing is changed on error.
pub fn fused_update<R: UpdateRule>(
    rule: &R,
    param: &Tensor,
    grad: &Tensor,
    state: &mut ParamState,
) -> Result<()> {
    check_fused_update(rule, param, grad, state)?;
    step_in_place(
        param,
        grad,
        FusedUpdate {
            rule,
            state: RefCell::new(state),
        },
    )
}

/// Checks everything [`fused_update`] checks, without updating anything: optimizers validate
/// every parameter this way before a step touches the first one.
///
/// # Errors
/// Those of [`fused_update`].
pub fn check_fused_update<R: UpdateRule>(
    rule: &R,
    param: &Tensor,
    grad: &Tensor,
    state: &ParamState,
) -> Result<()> {
    check_step_tensors("fused_update", param, grad)?;
    if let ParamState::Factored(_) = state {
        bail!("fused_update: the state is a factored optimizer's; step it with factored_update")
    }
    let n_states = rule.signed_states().len();
    if state.n_states() != n_states {
        bail!(
            "fused_update: the rule keeps {n_states} states per element, the state has {}",
            state.n_states()
        )
    }
    state.check_consistent()?;
    if let Some(len) = state.len() {
        if len != param.elem_count() {
            bail!(
                "fused_update: state has {len} elements, parameter shape {:?} has {}",
                param.dims(),
                param.elem_count()
            )
        }
    }
    Ok(())
}

/// The checks every fused step makes of its parameter and gradient (`op` names the step in
/// errors): dtypes F32, F16 or BF16 and equal, equal shapes, a contiguous parameter, both on the
/// CPU.
pub(crate) fn check_step_tensors(op: &str, param: &Tensor, grad: &Tensor) -> Result<()> {
    if !matches!(param.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        bail!(
            "{op}: parameter dtype must be F32, F16 or BF16, got {:?}",
            param.dtype()
        )
    }
    if grad.dtype() != param.dtype() {
        bail!(
            "{op}: gradient dtype {:?} differs from parameter dtype {:?}",
            grad.dtype(),
            param.dtype()
        )
    }
    if grad.dims() != param.dims() {
        bail!(
            "{op}: gradient shape {:?} differs from parameter shape {:?}",
            grad.dims(),
            param.dims()
        )
    }
    if !param.is_contiguous() {
        bail!(
            "{op}: the parameter must be contiguous, got strides {:?}",
            param.stride()
        )
    }
    if !param.device().is_cpu() || !grad.device().is_cpu() {
        bail!(
            "{op}: takes CPU tensors (parameter on {:?}, gradient on {:?}); the optimizers of candle-bnb-optim step CUDA parameters with their state on the device",
            param.device().location(),
            grad.device().location()
        )
    }
    Ok(())
}

/// Whether two tensors are views of one storage (the same allocation, whatever their layouts).
pub(crate) fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    let a_storage: *const _ = &*a.storage_and_layout().0;
    let b_storage: *const _ = &*b.storage_and_layout().0;
    std::ptr::eq(a_storage, b_storage)
}

/// [`measure`] over a parameter's state, whatever its storage.
fn measure_state<R: UpdateRule, T: Element>(
    rule: &R,
    params: &[T],
    grads: &[T],
    state: &ParamState,
) -> (f64, f64) {
    match state {
        ParamState::Factored(_) => unreachable!("checked by check_fused_update"),
        ParamState::F32(states) => {
            let views: Vec<StateView<'_>> = states.iter().map(|s| StateView::F32(s)).collect();
            measure(rule, params, grads, &views, MAX_BLOCK)
        }
        ParamState::Blockwise(states) => {
            let views: Vec<StateView<'_>> = states
                .iter()
                .map(|s| StateView::Blockwise(&s.codes, &s.absmax, &s.map))
                .collect();
            let chunk = states.first().map_or(MAX_BLOCK, |s| s.block_size);
            measure(rule, params, grads, &views, chunk)
        }
    }
}

struct FusedUpdate<'a, R> {
    rule: &'a R,
    state: RefCell<&'a mut ParamState>,
}

impl<R: UpdateRule> InPlaceStep for FusedUpdate<'_, R> {
    const NAME: &'static str = "fused-optimizer-update";

    fn run<T: Element>(&self, params: &mut [T], grads: &[T]) {
        let mut state = self.state.borrow_mut();
        let layerwise_rule;
        let rule = if R::LAYERWISE {
            let (param_sq, direction_sq) = measure_state(self.rule, params, grads, &state);
            layerwise_rule = self
                .rule
                .with_norms(param_sq.sqrt() as f32, direction_sq.sqrt() as f32);
            &layerwise_rule
        } else {
            self.rule
        };
        match &mut **state {
            ParamState::Factored(_) => unreachable!("checked by check_fused_update"),
            ParamState::F32(states) => {
                let mut slices: Vec<&mut [f32]> =
                    states.iter_mut().map(Vec::as_mut_slice).collect();
                step_f32_state(Isa::selected(), rule, params, grads, &mut slices);
            }
            ParamState::Blockwise(states) if states.is_empty() => {
                step_f32_state(Isa::selected(), rule, params, grads, &mut []);
            }
            ParamState::Blockwise(states) => {
                let block_size = states[0].block_size;
                let mut views: Vec<BlockwiseStateMut<'_>> = states
                    .iter_mut()
                    .map(|s| BlockwiseStateMut {
                        codes: &mut s.codes,
                        absmax: &mut s.absmax,
                        map: &s.map,
                    })
                    .collect();
                step_blockwise_state(Isa::selected(), rule, params, grads, &mut views, block_size);
            }
        }
    }
}

/// A fused step over a parameter's and its gradient's elements, whatever their type (f32, f16 or
/// bf16, both the same), run in place by [`step_in_place`].
pub(crate) trait InPlaceStep {
    /// The op's name, in errors.
    const NAME: &'static str;
    /// Steps `params` (updated in place) with `grads`, of the same length.
    fn run<T: Element>(&self, params: &mut [T], grads: &[T]);
}

/// Runs `step` on `param`'s storage with `grad` (both checked by the caller): nothing for a
/// parameter with no elements (Candle refuses in-place writes to shapes such as `[3, 0]`, whose
/// zero-sized dimension gives the others repeated (zero) strides), and from a copy of a gradient
/// that shares the parameter's storage (it would be read while it is written).
pub(crate) fn step_in_place<S: InPlaceStep>(param: &Tensor, grad: &Tensor, step: S) -> Result<()> {
    if param.elem_count() == 0 {
        return Ok(());
    }
    let grad = if shares_storage(param, grad) {
        grad.copy()?
    } else {
        grad.contiguous()?
    };
    param.inplace_op2(&grad, &InPlace(step))
}

/// [`InPlaceStep`] as a Candle in-place op.
struct InPlace<S>(S);

impl<S: InPlaceStep> InplaceOp2 for InPlace<S> {
    fn name(&self) -> &'static str {
        S::NAME
    }

    fn cpu_fwd(
        &self,
        param: &mut CpuStorage,
        pl: &Layout,
        grad: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let (Some((ps, pe)), Some((gs, ge))) = (pl.contiguous_offsets(), gl.contiguous_offsets())
        else {
            bail!("{}: parameter and gradient must be contiguous", S::NAME)
        };
        match (param, grad) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => self.0.run(&mut p[ps..pe], &g[gs..ge]),
            (CpuStorage::F16(p), CpuStorage::F16(g)) => self.0.run(&mut p[ps..pe], &g[gs..ge]),
            (CpuStorage::BF16(p), CpuStorage::BF16(g)) => self.0.run(&mut p[ps..pe], &g[gs..ge]),
            (p, g) => bail!(
                "{}: unsupported dtypes {:?} / {:?}",
                S::NAME,
                p.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }
}
