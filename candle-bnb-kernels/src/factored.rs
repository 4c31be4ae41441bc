//! Fused steps of factored-second-moment optimizers (Adafactor, CAME) on Candle tensors: the
//! parameter is updated in place, its [`FactoredState`] read and written in the same step.

use std::cell::RefCell;

use candle_core::{bail, Result, Tensor};

use crate::checks::check_block_size;
use crate::cpu::{Element, Isa};
use crate::rules::FactoredRule;
use crate::update::{check_step_tensors, step_in_place, InPlaceStep};
use crate::{BlockwiseState, QuantMap};

/// How a factored optimizer sees a parameter's shape: tensors of two or more dims are factored
/// over their last two (`[..., rows, cols]`, the leading dims a batch of such matrices, as
/// transformers' Adafactor and CAME do, whatever the sizes); the others keep a statistic per
/// element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Factoring {
    /// `batch` matrices of `rows × cols` (`batch` is the product of the leading dims, 1 for a
    /// matrix).
    Factored {
        /// The product of the dims before the last two.
        batch: usize,
        /// The second-to-last dim.
        rows: usize,
        /// The last dim.
        cols: usize,
    },
    /// `len` elements (a vector or a scalar).
    Full {
        /// The element count.
        len: usize,
    },
}

impl Factoring {
    /// The factoring of a parameter of shape `dims`.
    pub fn of(dims: &[usize]) -> Self {
        match dims {
            [lead @ .., rows, cols] => Self::Factored {
                batch: lead.iter().product(),
                rows: *rows,
                cols: *cols,
            },
            _ => Self::Full {
                len: dims.iter().product(),
            },
        }
    }

    /// The parameter's element count.
    pub fn len(&self) -> usize {
        match *self {
            Self::Factored { batch, rows, cols } => batch * rows * cols,
            Self::Full { len } => len,
        }
    }

    /// Whether the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The statistics a rule keeps for this factoring, by name, with their lengths: `row`
    /// (`batch·rows`) and `col` (`batch·cols`), plus `res_row` and `res_col` for a rule with a
    /// confidence step (CAME), when factored; else `full` (one per element).
    pub fn stats(&self, confidence: bool) -> Vec<(&'static str, usize)> {
        match *self {
            Self::Factored { batch, rows, cols } => {
                let mut stats = vec![("row", batch * rows), ("col", batch * cols)];
                if confidence {
                    stats.extend([("res_row", batch * rows), ("res_col", batch * cols)]);
                }
                stats
            }
            Self::Full { len } => vec![("full", len)],
        }
    }
}

/// A factored optimizer's momentum: f32, or 8-bit blockwise with the signed dynamic map.
#[derive(Clone, Debug)]
pub enum Momentum {
    /// One f32 per element.
    F32(Vec<f32>),
    /// Blockwise-quantized (boxed: a state holds its map, about 1 kB).
    Blockwise(Box<BlockwiseState>),
}

impl Momentum {
    /// Elements held.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(m) => m.len(),
            Self::Blockwise(m) => m.len(),
        }
    }

    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held (codes and scales when quantized).
    pub fn bytes(&self) -> usize {
        match self {
            Self::F32(m) => 4 * m.len(),
            Self::Blockwise(m) => m.bytes(),
        }
    }

    /// The values (dequantized when quantized).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Self::F32(m) => m.clone(),
            Self::Blockwise(m) => m.dequantize(),
        }
    }
}

/// The state of one parameter of a factored optimizer: its second-moment statistics (f32, see
/// [`Factoring::stats`]: `O(rows + cols)` values for a matrix) and, when the rule keeps one, its
/// momentum (one value per element, f32 or 8-bit).
#[derive(Clone, Debug)]
pub struct FactoredState {
    factoring: Factoring,
    stats: Vec<Vec<f32>>,
    momentum: Option<Momentum>,
}

impl FactoredState {
    /// The initial (all-zero) state of `rule` for a parameter of shape `dims`; the momentum is
    /// quantized in blocks of `block_size` when given.
    ///
    /// # Errors
    /// An unsupported `block_size`.
    pub fn new<R: FactoredRule>(
        rule: &R,
        dims: &[usize],
        block_size: Option<usize>,
    ) -> Result<Self> {
        let factoring = Factoring::of(dims);
        let stats = factoring
            .stats(rule.confidence().is_some())
            .into_iter()
            .map(|(_, len)| vec![0f32; len])
            .collect();
        let n = factoring.len();
        let momentum = match (rule.has_momentum(), block_size) {
            (false, _) => None,
            (true, None) => Some(Momentum::F32(vec![0f32; n])),
            (true, Some(bs)) => Some(Momentum::Blockwise(Box::new(BlockwiseState::zeros(
                n,
                QuantMap::dynamic_signed(),
                bs,
            )?))),
        };
        Ok(Self {
            factoring,
            stats,
            momentum,
        })
    }

    /// A state from its parts (as a checkpoint stores them): the statistics in the order of
    /// [`Factoring::stats`].
    ///
    /// # Errors
    /// A statistic count or length other than `factoring` gives (with or without the
    /// confidence statistics), a statistic that is negative or not finite (naming it and the
    /// index), a momentum of another length or quantized with another map than the signed
    /// dynamic one.
    pub fn from_parts(
        factoring: Factoring,
        stats: Vec<Vec<f32>>,
        momentum: Option<Momentum>,
    ) -> Result<Self> {
        let state = Self::from_stepped_parts(factoring, stats, momentum)?;
        for ((name, _), values) in factoring
            .stats(state.stats.len() == 4)
            .iter()
            .zip(&state.stats)
        {
            if let Some((i, v)) = values
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
            {
                bail!("statistic {name}[{i}] is {v}; it must be finite and >= 0")
            }
        }
        Ok(state)
    }

    /// A state from the parts a step left (a CUDA device's copy): checked as
    /// [`Self::from_parts`] checks them, except the statistics' values, which a step may have
    /// overflowed to `inf` (a gradient element near `1.8e19` in f32) as on the CPU.
    ///
    /// # Errors
    /// As [`Self::from_parts`], but for the statistics' values.
    #[doc(hidden)]
    pub fn from_stepped_parts(
        factoring: Factoring,
        stats: Vec<Vec<f32>>,
        momentum: Option<Momentum>,
    ) -> Result<Self> {
        let expected = match stats.len() {
            4 => factoring.stats(true),
            _ => factoring.stats(false),
        };
        if stats.len() != expected.len() {
            bail!(
                "a factored state of {factoring:?} holds the statistics {expected:?}, got {} statistics",
                stats.len()
            )
        }
        for ((name, len), values) in expected.iter().zip(&stats) {
            if values.len() != *len {
                bail!(
                    "statistic {name} of {factoring:?} holds {len} values, got {}",
                    values.len()
                )
            }
        }
        if let Some(m) = &momentum {
            if m.len() != factoring.len() {
                bail!(
                    "the momentum holds {} values, the parameter {}",
                    m.len(),
                    factoring.len()
                )
            }
            if let Momentum::Blockwise(q) = m {
                check_block_size(q.block_size())?;
                if q.map().values() != QuantMap::dynamic_signed().values() {
                    bail!(
                        "an 8-bit momentum must be quantized with the signed dynamic map; this one has another map"
                    )
                }
            }
        }
        Ok(Self {
            factoring,
            stats,
            momentum,
        })
    }

    /// How the parameter is factored.
    pub fn factoring(&self) -> Factoring {
        self.factoring
    }

    /// The statistics by name, in the order of [`Factoring::stats`].
    pub fn stats(&self) -> Vec<(&'static str, &[f32])> {
        self.factoring
            .stats(self.stats.len() == 4)
            .into_iter()
            .zip(&self.stats)
            .map(|((name, _), values)| (name, values.as_slice()))
            .collect()
    }

    /// The momentum, when the rule keeps one.
    pub fn momentum(&self) -> Option<&Momentum> {
        self.momentum.as_ref()
    }

    /// Bytes held: 4 per statistic value, plus the momentum's.
    pub fn bytes(&self) -> usize {
        4 * self.stats.iter().map(Vec::len).sum::<usize>()
            + self.momentum.as_ref().map_or(0, Momentum::bytes)
    }

    /// The state's kind without the momentum's values: the statistics as they are (they are
    /// `O(rows + cols)`), a momentum of length 0 of the same precision, map and block size. What
    /// an optimizer keeps on the host of a state that lives on a CUDA device (checkpoints read
    /// the kind from it); [`factored_update`] refuses it when the parameter has elements.
    #[doc(hidden)]
    pub fn kind_only(&self) -> Self {
        let momentum = self.momentum.as_ref().map(|m| match m {
            Momentum::F32(_) => Momentum::F32(Vec::new()),
            Momentum::Blockwise(q) => Momentum::Blockwise(Box::new(
                BlockwiseState::zeros(0, q.map().clone(), q.block_size())
                    .expect("the block size of an existing state is supported"),
            )),
        });
        Self {
            factoring: self.factoring,
            stats: self.stats.clone(),
            momentum,
        }
    }

    /// The statistics and the momentum, to step.
    pub(crate) fn parts_mut(&mut self) -> (&mut [Vec<f32>], Option<&mut Momentum>) {
        (&mut self.stats, self.momentum.as_mut())
    }
}

/// One step of a factored optimizer (`rule`: [`AdafactorRule`](crate::AdafactorRule),
/// [`CameRule`](crate::CameRule)) for one parameter, fused: `param` is updated in place from
/// `grad`, and `state` read and written, in a few passes (the statistics, the update's RMS, the
/// update; CAME's residual statistics take one more) with the math in f32 and every sum in f64.
///
/// `param` must be a contiguous `F32`, `F16` or `BF16` tensor; `grad` has its shape and dtype,
/// any layout. A parameter with no elements is left as it is (and so is its state).
/// `F16`/`BF16` parameters are rounded to nearest-even once per step. The result does not
/// depend on the thread count.
///
/// # Errors
/// A dtype, shape or device mismatch, a non-contiguous `param`, or a state made for another
/// shape or rule (its factoring, momentum or confidence statistics). Nothing is changed on
/// error.
pub fn factored_update<R: FactoredRule>(
    rule: &R,
    param: &Tensor,
    grad: &Tensor,
    state: &mut FactoredState,
) -> Result<()> {
    check_factored_update(rule, param, grad, state)?;
    step_in_place(
        param,
        grad,
        FactoredUpdate {
            rule,
            state: RefCell::new(state),
        },
    )
}

/// Checks everything [`factored_update`] checks, without updating anything.
///
/// # Errors
/// Those of [`factored_update`].
pub fn check_factored_update<R: FactoredRule>(
    rule: &R,
    param: &Tensor,
    grad: &Tensor,
    state: &FactoredState,
) -> Result<()> {
    check_step_tensors("factored_update", param, grad)?;
    let factoring = Factoring::of(param.dims());
    if state.factoring != factoring {
        bail!(
            "factored_update: the state is for {:?}, the parameter of shape {:?} is {factoring:?}",
            state.factoring,
            param.dims()
        )
    }
    if state.momentum.is_some() != rule.has_momentum() {
        bail!(
            "factored_update: the rule {} a momentum, the state {}",
            if rule.has_momentum() {
                "keeps"
            } else {
                "keeps no"
            },
            if state.momentum.is_some() {
                "has one"
            } else {
                "has none"
            }
        )
    }
    if let Some(m) = &state.momentum {
        if m.len() != factoring.len() {
            bail!(
                "factored_update: the momentum holds {} values, the parameter {}",
                m.len(),
                factoring.len()
            )
        }
    }
    let expected = factoring.stats(rule.confidence().is_some());
    if state.stats.len() != expected.len() {
        bail!(
            "factored_update: the rule keeps the statistics {:?}, the state holds {}",
            expected.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            state.stats.len()
        )
    }
    Ok(())
}

struct FactoredUpdate<'a, R> {
    rule: &'a R,
    state: RefCell<&'a mut FactoredState>,
}

impl<R: FactoredRule> InPlaceStep for FactoredUpdate<'_, R> {
    const NAME: &'static str = "factored-optimizer-update";

    fn run<T: Element>(&self, params: &mut [T], grads: &[T]) {
        let mut state = self.state.borrow_mut();
        crate::cpu::factored::step(Isa::selected(), self.rule, params, grads, &mut state);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;
    use crate::{AdafactorRule, AdafactorStepSize, CameRule};

    fn came() -> CameRule {
        CameRule::new(1e-2, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.0)
    }

    #[test]
    fn factoring_follows_the_last_two_dims() {
        let f = Factoring::of(&[3, 17, 9]);
        assert_eq!(
            f,
            Factoring::Factored {
                batch: 3,
                rows: 17,
                cols: 9
            }
        );
        assert_eq!(
            f.stats(true),
            vec![("row", 51), ("col", 27), ("res_row", 51), ("res_col", 27)]
        );
        assert_eq!(Factoring::of(&[7]).stats(true), vec![("full", 7)]);
        assert_eq!(Factoring::of(&[]), Factoring::Full { len: 1 });
        assert_eq!(Factoring::of(&[4, 0, 3]).len(), 0);
    }

    #[test]
    fn mismatched_states_are_refused_and_nothing_changes() {
        let param = Tensor::ones((4, 6), DType::F32, &Device::Cpu).unwrap();
        let grad = Tensor::ones((4, 6), DType::F32, &Device::Cpu).unwrap();
        let before = param.to_vec2::<f32>().unwrap();
        // A state made for another shape.
        let mut other = FactoredState::new(&came(), &[6, 4], None).unwrap();
        let err = factored_update(&came(), &param, &grad, &mut other)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rows: 6") && err.contains("[4, 6]"), "{err}");
        // A state without the momentum the rule keeps.
        let size = AdafactorStepSize::Relative { warmup_init: false };
        let plain = AdafactorRule::new(1, size, (1e-30, 1e-3), 1.0, -0.8, None, 0.0, true);
        let mut no_momentum = FactoredState::new(&plain, &[4, 6], None).unwrap();
        let err = factored_update(&came(), &param, &grad, &mut no_momentum)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("keeps a momentum") && err.contains("has none"),
            "{err}"
        );
        // Adafactor's state lacks CAME's confidence statistics.
        let momentum = AdafactorRule::new(1, size, (1e-30, 1e-3), 1.0, -0.8, Some(0.9), 0.0, true);
        let mut adafactor = FactoredState::new(&momentum, &[4, 6], None).unwrap();
        let err = factored_update(&came(), &param, &grad, &mut adafactor)
            .unwrap_err()
            .to_string();
        assert!(err.contains("res_row"), "{err}");
        assert_eq!(param.to_vec2::<f32>().unwrap(), before);
        assert!(adafactor
            .stats()
            .iter()
            .all(|(_, v)| v.iter().all(|x| *x == 0.0)));
        // A gradient of another shape.
        let wrong = Tensor::ones((4, 5), DType::F32, &Device::Cpu).unwrap();
        let mut state = FactoredState::new(&came(), &[4, 6], None).unwrap();
        let err = factored_update(&came(), &param, &wrong, &mut state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[4, 5]"), "{err}");
    }

    #[test]
    fn a_kind_only_state_keeps_the_kind_and_is_never_stepped() {
        let mut state = FactoredState::new(&came(), &[4, 6], Some(64)).unwrap();
        let param = Tensor::ones((4, 6), DType::F32, &Device::Cpu).unwrap();
        factored_update(&came(), &param, &param.clone(), &mut state).unwrap();
        let mut kind = state.kind_only();
        assert_eq!(kind.factoring(), state.factoring());
        assert_eq!(kind.stats(), state.stats());
        let Some(Momentum::Blockwise(q)) = kind.momentum() else {
            panic!("the momentum's kind is lost")
        };
        assert_eq!((q.len(), q.block_size()), (0, 64));
        let before = param.to_vec2::<f32>().unwrap();
        let err = factored_update(&came(), &param, &param.clone(), &mut kind)
            .unwrap_err()
            .to_string();
        assert!(err.contains("momentum holds 0 values"), "{err}");
        assert_eq!(param.to_vec2::<f32>().unwrap(), before);
    }

    #[test]
    fn from_parts_checks_counts_lengths_and_values() {
        let f = Factoring::of(&[2, 3]);
        let err = FactoredState::from_parts(f, vec![vec![0.0; 3], vec![0.0; 3]], None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("statistic row") && err.contains("got 3"),
            "{err}"
        );
        let err = FactoredState::from_parts(f, vec![vec![0.0; 2], vec![-1.0, 0.0, 0.0]], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("col[0] is -1"), "{err}");
        let err = FactoredState::from_parts(
            f,
            vec![vec![0.0; 2], vec![0.0; 3]],
            Some(Momentum::F32(vec![0.0; 5])),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("momentum holds 5"), "{err}");
        let ok = FactoredState::from_parts(f, vec![vec![1.0; 2], vec![2.0; 3]], None).unwrap();
        assert_eq!(ok.bytes(), 20);
    }
}
