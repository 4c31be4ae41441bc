//! Optimizer update rules: the per-element math of one step, written once and shared by the
//! 8-bit (blockwise-quantized state) and 32-bit (f32 state) paths. Elementwise rules
//! ([`UpdateRule`]) see one element at a time; factored rules ([`FactoredRule`]: Adafactor, CAME)
//! also see row and column statistics the kernels gather first.

mod adafactor;
mod adam;
mod ademamix;
mod came;
mod factored;
mod lion;
mod rmsprop;
mod sgd;

pub use adafactor::{AdafactorRule, AdafactorStepSize};
pub use adam::{AdamRule, LambRule};
pub use ademamix::AdEMAMixRule;
pub use came::CameRule;
pub use factored::{FactoredRule, SecondMomentStep};
pub use lion::LionRule;
pub use rmsprop::{AdagradRule, RmspropRule};
pub use sgd::{LarsRule, SgdRule};

/// Most state values a rule keeps per parameter element.
pub const MAX_STATES: usize = 3;

/// The per-element math of one optimizer step.
///
/// The fused kernels load a parameter element, its gradient and its state values as f32
/// (dequantizing 8-bit state first), call [`UpdateRule::apply`], and store the results back
/// (re-quantizing 8-bit state). Step-dependent scalars (bias corrections, schedules) are computed
/// once per step when the rule value is built, so `apply` is plain arithmetic the compiler can
/// vectorise. Adding an optimizer is one rule plus one config.
///
/// Layer-wise rules (LAMB, LARS) scale each parameter's step by a trust ratio computed from the
/// norms of the parameter and of its update direction: they set [`UpdateRule::LAYERWISE`], and
/// the kernels first measure both norms with [`UpdateRule::direction`] (on a copy of the state),
/// then step with the rule returned by [`UpdateRule::with_norms`].
pub trait UpdateRule: Sync + Clone {
    /// Whether the step of a parameter depends on its norm and its update direction's norm.
    const LAYERWISE: bool = false;

    /// One entry per state value kept per parameter element (at most [`MAX_STATES`]): whether it
    /// takes negative values (stored with the signed dynamic map) or not (the unsigned map).
    fn signed_states(&self) -> &'static [bool];

    /// The value each state starts from (zero unless the rule says otherwise).
    fn initial_state(&self) -> [f32; MAX_STATES] {
        [0.0; MAX_STATES]
    }

    /// Updates one element: returns the new parameter value and updates the first
    /// `signed_states().len()` entries of `state`.
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32;

    /// The update direction of one element before the learning rate and the trust ratio scale
    /// it, advancing `state` as [`UpdateRule::apply`] would. Only layer-wise rules need it; the
    /// default is the gradient.
    fn direction(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        let _ = (param, state);
        grad
    }

    /// This rule for one parameter whose L2 norm is `param_norm` and whose update direction's L2
    /// norm is `direction_norm` (layer-wise rules fix their trust ratio here; others ignore it).
    fn with_norms(&self, param_norm: f32, direction_norm: f32) -> Self {
        let _ = (param_norm, direction_norm);
        self.clone()
    }
}

/// A rule that sees every gradient multiplied by `scale` (gradient clipping); an [`UpdateRule`] or
/// a [`FactoredRule`] as the rule it wraps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ScaledGrad<R> {
    rule: R,
    scale: f32,
}

impl<R> ScaledGrad<R> {
    /// `rule` applied to `scale * grad`.
    pub fn new(rule: R, scale: f32) -> Self {
        Self { rule, scale }
    }
}

impl<R: UpdateRule> UpdateRule for ScaledGrad<R> {
    const LAYERWISE: bool = R::LAYERWISE;

    fn signed_states(&self) -> &'static [bool] {
        self.rule.signed_states()
    }

    fn initial_state(&self) -> [f32; MAX_STATES] {
        self.rule.initial_state()
    }

    #[inline(always)]
    fn apply(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        self.rule.apply(param, grad * self.scale, state)
    }

    #[inline(always)]
    fn direction(&self, param: f32, grad: f32, state: &mut [f32; MAX_STATES]) -> f32 {
        self.rule.direction(param, grad * self.scale, state)
    }

    fn with_norms(&self, param_norm: f32, direction_norm: f32) -> Self {
        Self {
            rule: self.rule.with_norms(param_norm, direction_norm),
            scale: self.scale,
        }
    }
}

/// An update rule the CUDA kernels implement (`kernels/rules/*.cuh`): the multi-tensor step copies
/// the rule value into the device's slot table as it is. Sealed: only this crate's rules, whose
/// layouts are checked against the kernels', implement it.
///
/// # Safety
/// The type is `#[repr(C)]`, has no padding bytes (every byte is an initialised field, so it can
/// be read as bytes), no pointers, and the same layout as the struct of the same name in
/// `kernels/rules/`; `KERNEL_NAME` names its kernels in `kernels/fused.cu`.
pub unsafe trait CudaRule: UpdateRule + Copy + Send + 'static + sealed::Sealed {
    /// The `<rule>` of the kernels `bnb_fused_<rule>_<dtype>_<q8|f32>_s<states>`.
    const KERNEL_NAME: &'static str;

    /// The rule's bytes, as the kernels read them.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: #[repr(C)], no padding.
        unsafe { plain_bytes(self) }
    }
}

/// The bytes of `value`.
///
/// # Safety
/// `T` has no padding bytes (all `size_of::<T>()` bytes are initialised); any alignment of `u8`
/// is satisfied.
unsafe fn plain_bytes<T>(value: &T) -> &[u8] {
    // SAFETY: as the caller promises.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
}

/// A [`FactoredRule`] with CUDA kernels (`kernels/factored.cu`): its bytes are what the kernels
/// read as the rule of a `FactoredSlot`.
///
/// # Safety
/// As [`CudaRule`]: `#[repr(C)]`, no padding, no pointers, the layout of the struct of the same
/// name in `kernels/rules/`; `KERNEL_NAME` names its kernels in `kernels/factored.cu`.
pub unsafe trait FactoredCudaRule:
    FactoredRule + Copy + Send + 'static + sealed::Sealed
{
    /// The `<rule>` of the kernels `bnb_factored_<pass>_<rule>[_<dtype>]`.
    const KERNEL_NAME: &'static str;

    /// The rule's bytes, as the kernels read them.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: the trait's contract: #[repr(C)], no padding.
        unsafe { plain_bytes(self) }
    }
}

impl sealed::Sealed for AdafactorRule {}
// SAFETY: #[repr(C)], 11 f32 and 2 u32 fields (52 bytes, no padding), laid out as
// kernels/rules/adafactor.cuh (which static_asserts the size).
unsafe impl FactoredCudaRule for AdafactorRule {
    const KERNEL_NAME: &'static str = "adafactor";
}
impl sealed::Sealed for CameRule {}
// SAFETY: #[repr(C)], 11 f32 fields (44 bytes), laid out as kernels/rules/came.cuh.
unsafe impl FactoredCudaRule for CameRule {
    const KERNEL_NAME: &'static str = "came";
}

/// Keeps [`CudaRule`] and [`FactoredCudaRule`] to this crate's rules.
mod sealed {
    pub trait Sealed {}
}

/// `CudaRule` for each rule with its kernels' name.
macro_rules! cuda_rules {
    ($($rule:ty => $name:literal),* $(,)?) => {$(
        impl sealed::Sealed for $rule {}
        // SAFETY: a #[repr(C)] struct of f32 fields (and bools with explicit padding bytes),
        // laid out as its kernels/rules/*.cuh twin; `layout_tests` checks the sizes, which
        // equal the sum of the fields' sizes.
        unsafe impl CudaRule for $rule {
            const KERNEL_NAME: &'static str = $name;
        }
    )*};
}

cuda_rules! {
    AdamRule => "adam",
    LambRule => "lamb",
    LionRule => "lion",
    SgdRule => "sgd",
    LarsRule => "lars",
    RmspropRule => "rmsprop",
    AdagradRule => "adagrad",
    AdEMAMixRule => "ademamix",
}

/// `1 / (1 - beta^step)`, in f64 then rounded once, as candle-nn does.
pub(crate) fn bias_correction(beta: f64, step: u64) -> f32 {
    let t = step.clamp(1, i32::MAX as u64) as i32;
    (1.0 / (1.0 - beta.powi(t))) as f32
}

/// The trust ratio of LAMB and LARS as bitsandbytes applies it (`max_unorm`): the step is scaled
/// down so that the update's norm stays at most `max_unorm` times the parameter's norm; 1 when
/// `max_unorm` is 0 (no limit) or either norm is 0 (a zero-initialised parameter still moves).
pub(crate) fn trust_ratio(max_unorm: f32, param_norm: f32, direction_norm: f32) -> f32 {
    let limit = max_unorm * param_norm;
    if max_unorm > 0.0 && param_norm > 0.0 && direction_norm > limit {
        limit / direction_norm
    } else {
        1.0
    }
}

#[inline(always)]
pub(crate) fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use std::mem::size_of;

    /// The CUDA kernels copy these structs as they are (kernels/rules/*.cuh static_asserts the
    /// same sizes; `#[repr(C)]` keeps the declared field order).
    #[test]
    fn rule_layouts_match_the_cuda_structs() {
        assert_eq!(size_of::<AdamRule>(), 40);
        assert_eq!(size_of::<LambRule>(), 48);
        assert_eq!(size_of::<LionRule>(), 24);
        assert_eq!(size_of::<SgdRule>(), 20);
        assert_eq!(size_of::<LarsRule>(), 28);
        assert_eq!(size_of::<RmspropRule>(), 28);
        assert_eq!(size_of::<AdagradRule>(), 16);
        assert_eq!(size_of::<AdEMAMixRule>(), 48);
        assert_eq!(size_of::<AdafactorRule>(), 52);
        assert_eq!(size_of::<CameRule>(), 44);
    }

    /// The factored rules' bytes in the order kernels/rules/{adafactor,came}.cuh declares them.
    #[test]
    fn factored_rules_lay_out_their_fields_in_order() {
        let f = |b: &[u8], k: usize| f32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap());
        let u = |b: &[u8], k: usize| u32::from_le_bytes(b[4 * k..4 * k + 4].try_into().unwrap());
        let size = AdafactorStepSize::Fixed(0.25);
        let ada = AdafactorRule::new(4, size, (1e-30, 1e-3), 1.5, -0.8, Some(0.9), 0.125, true);
        let b = ada.as_bytes();
        assert_eq!(b.len(), 52);
        // eps1, beta2, 1 - beta2, clip, rho, eps2, beta1, 1 - beta1, wd, alpha, -wd·alpha.
        assert_eq!(f(b, 0), 1e-30);
        assert_eq!(f(b, 2), 4f64.powf(-0.8) as f32);
        assert_eq!((f(b, 3), f(b, 4), f(b, 5)), (1.5, 0.25, 1e-3));
        assert_eq!((f(b, 6), f(b, 8), f(b, 9)), (0.9, 0.125, 0.25));
        assert_eq!(f(b, 10), -(0.125f32 * 0.25));
        assert_eq!((u(b, 11), u(b, 12)), (1, 1));
        let came = CameRule::new(2e-4, (1e-30, 1e-16), 1.0, (0.9, 0.999, 0.9999), 0.5);
        let b = came.as_bytes();
        assert_eq!(b.len(), 44);
        // eps1, beta2, 1 - beta2, clip, eps2, beta1, 1 - beta1, beta3, 1 - beta3, lr, -wd·lr.
        assert_eq!((f(b, 1), f(b, 4), f(b, 5)), (0.999, 1e-16, 0.9));
        assert_eq!(
            (f(b, 7), f(b, 9), f(b, 10)),
            (0.9999, 2e-4, -(0.5 * 2e-4) as f32)
        );
    }

    /// No padding: a rule's bytes are its fields' bytes (what `CudaRule::as_bytes` relies on).
    #[test]
    fn rules_have_no_padding() {
        let sgd = SgdRule::new(1, 0.1, 0.9, 0.0, 0.0, true);
        assert_eq!(sgd.as_bytes().len(), 4 * 4 + 2 + 2);
        assert_eq!(&sgd.as_bytes()[16..], &[1, 1, 0, 0]);
        let rms = RmspropRule::new(0.1, 0.99, 1e-8, 0.0, 0.0, true);
        assert_eq!(&rms.as_bytes()[24..], &[1, 0, 0, 0]);
        assert_eq!(&rms.as_bytes()[..4], &0.1f32.to_le_bytes());
    }
}
