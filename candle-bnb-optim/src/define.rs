//! `define_optimizer!`: one config struct per name, from a rule and a list of hyper-parameters,
//! and the name of the optimizer over it (`pub type AdamW8bit = Optim<AdamW8bitConfig>`): the
//! optimizer itself is plain generic code ([`crate::Optim`]). Every config also gets the fields
//! shared by the family: state storage (`optim_bits`, `min_8bit_size`, `block_size`) and
//! gradient handling (`non_finite`, `max_grad_norm`, `percentile_clipping`).

macro_rules! define_optimizer {
    (
        doc: $doc:literal,
        kind: $kind:literal,
        optimizers: [$( ($name:ident, $config:ident, $bits:expr, $what:literal) ),+ $(,)?],
        fields: $fields:tt,
        validate: |$vc:ident| $validate:block,
        rule: |$rc:ident, $t:ident| $rule:expr $(,)?
    ) => {
        $(
            define_optimizer!(@one
                $doc, $kind, $name, $config, $bits, $what, $fields, |$vc| $validate, |$rc, $t| $rule
            );
        )+
    };
    (@one
        $doc:literal, $kind:literal, $name:ident, $config:ident, $bits:expr, $what:literal,
        { $( $(#[$fdoc:meta])* $field:ident : $ty:ty = $default:expr ),* $(,)? },
        |$vc:ident| $validate:block, |$rc:ident, $t:ident| $rule:expr
    ) => {
        #[doc = concat!("Configuration of [`", stringify!($name), "`]; `Default` gives bitsandbytes' defaults")]
        #[doc = concat!("with ", $what, " state.")]
        #[derive(Clone, Debug, PartialEq)]
        pub struct $config {
            $( $(#[$fdoc])* pub $field: $ty, )*
            /// 8 (blockwise-quantized state) or 32 (f32 state); anything else is an error.
            pub optim_bits: u32,
            /// Parameters with fewer elements keep 32-bit state even when `optim_bits` is 8.
            pub min_8bit_size: usize,
            /// Elements per quantization block of 8-bit state (one of
            /// [`SUPPORTED_BLOCK_SIZES`](candle_bnb_kernels::SUPPORTED_BLOCK_SIZES)).
            pub block_size: usize,
            /// What a step does when a gradient holds NaN or ±inf.
            pub non_finite: $crate::NonFinitePolicy,
            /// Global gradient-norm clipping: when the L2 norm of all gradients together exceeds
            /// it, every gradient is scaled by `max_grad_norm / (norm + 1e-6)` (as
            /// `torch.nn.utils.clip_grad_norm_`). `None`: off.
            pub max_grad_norm: Option<f64>,
            /// Percentile clipping (bitsandbytes ≤ 0.49), in `1..=100`, 100 = off: each gradient
            /// whose norm exceeds this percentile of its own last 100 norms is scaled down to it.
            pub percentile_clipping: u32,
        }

        impl Default for $config {
            fn default() -> Self {
                Self {
                    $( $field: $default, )*
                    optim_bits: $bits,
                    min_8bit_size: 4096,
                    block_size: 256,
                    non_finite: $crate::NonFinitePolicy::Skip,
                    max_grad_norm: None,
                    percentile_clipping: 100,
                }
            }
        }

        impl $config {
            /// The name of every field, in declaration order (as [`Self::fields`] and
            /// [`Self::set_field`] spell them).
            pub const FIELD_NAMES: &'static [&'static str] = &[
                $( stringify!($field), )*
                "optim_bits", "min_8bit_size", "block_size", "non_finite", "max_grad_norm",
                "percentile_clipping",
            ];

            /// Every field with its value as text (`f64` values round-trip exactly; `None`
            /// is `none`), in the order of [`Self::FIELD_NAMES`].
            pub fn fields(&self) -> Vec<(&'static str, String)> {
                use $crate::define::FieldText;
                vec![
                    $( (stringify!($field), self.$field.to_text()), )*
                    ("optim_bits", self.optim_bits.to_text()),
                    ("min_8bit_size", self.min_8bit_size.to_text()),
                    ("block_size", self.block_size.to_text()),
                    ("non_finite", self.non_finite.to_text()),
                    ("max_grad_norm", self.max_grad_norm.to_text()),
                    ("percentile_clipping", self.percentile_clipping.to_text()),
                ]
            }

            /// Sets the field `name` from its text form (as [`Self::fields`] writes it).
            ///
            /// # Errors
            /// An unknown name (the message lists the fields) or a value that does not parse
            /// as the field's type. Values are range-checked when an optimizer is built.
            pub fn set_field(&mut self, name: &str, value: &str) -> candle_core::Result<()> {
                use $crate::define::FieldText;
                match name {
                    $( stringify!($field) => self.$field = FieldText::from_text(name, value)?, )*
                    "optim_bits" => self.optim_bits = FieldText::from_text(name, value)?,
                    "min_8bit_size" => self.min_8bit_size = FieldText::from_text(name, value)?,
                    "block_size" => self.block_size = FieldText::from_text(name, value)?,
                    "non_finite" => self.non_finite = FieldText::from_text(name, value)?,
                    "max_grad_norm" => self.max_grad_norm = FieldText::from_text(name, value)?,
                    "percentile_clipping" => {
                        self.percentile_clipping = FieldText::from_text(name, value)?
                    }
                    _ => candle_core::bail!(
                        "{} has no field {name:?}; its fields are {:?}",
                        stringify!($config),
                        Self::FIELD_NAMES
                    ),
                }
                Ok(())
            }

            /// Checks every field's range; errors name the field and its value.
            pub fn validate(&self) -> candle_core::Result<()> {
                let $vc = self;
                $validate
                $crate::optimizer::sealed::Sealed::layout(self).validate()?;
                $crate::optimizer::sealed::Sealed::grad_handling(self).validate()
            }
        }

        impl $crate::optimizer::sealed::Sealed for $config {
            fn layout(&self) -> $crate::engine::StateLayout {
                $crate::engine::StateLayout {
                    optim_bits: self.optim_bits,
                    min_8bit_size: self.min_8bit_size,
                    block_size: self.block_size,
                }
            }

            fn grad_handling(&self) -> $crate::engine::GradHandling {
                $crate::engine::GradHandling {
                    non_finite: self.non_finite,
                    max_grad_norm: self.max_grad_norm,
                    percentile_clipping: self.percentile_clipping,
                }
            }

            fn rule(&self, step: u64) -> impl candle_bnb_kernels::CudaRule {
                let ($rc, $t) = (self, step);
                $rule
            }

            fn step(
                tracked: &mut $crate::engine::TrackedParams,
                grads: &candle_core::backprop::GradStore,
                base: &Self,
                params: &[Self],
            ) -> candle_core::Result<()> {
                tracked.step(
                    grads,
                    base.grad_handling(),
                    |i| params[i].percentile_clipping,
                    |i, t| params[i].rule(t),
                )
            }
        }

        impl $crate::OptimizerConfig for $config {
            const KIND: &'static str = $kind;
            const FIELD_NAMES: &'static [&'static str] = <$config>::FIELD_NAMES;

            fn lr(&self) -> f64 {
                self.lr
            }

            fn set_lr(&mut self, lr: f64) {
                self.lr = lr;
            }

            fn fields(&self) -> Vec<(&'static str, String)> {
                <$config>::fields(self)
            }

            fn set_field(&mut self, name: &str, value: &str) -> candle_core::Result<()> {
                <$config>::set_field(self, name, value)
            }

            fn validate(&self) -> candle_core::Result<()> {
                <$config>::validate(self)
            }
        }

        #[doc = $doc]
        #[doc = ""]
        #[doc = concat!("This form keeps ", $what, " state by default (`optim_bits` in [`", stringify!($config), "`]). Checkpoints have kind `", $kind, "`.")]
        pub type $name = $crate::Optim<$config>;
    };
}

pub(crate) use define_optimizer;

/// Config values as text, for checkpoints and [`set_field`](crate::AdamWConfig::set_field).
pub(crate) trait FieldText: Sized {
    /// The value as text (parsed back exactly by `from_text`).
    fn to_text(&self) -> String;
    /// Parses `value` for the field `name` (named in the error).
    fn from_text(name: &str, value: &str) -> candle_core::Result<Self>;
}

macro_rules! field_text_from_str {
    ($($ty:ty),*) => {$(
        impl FieldText for $ty {
            fn to_text(&self) -> String {
                self.to_string()
            }
            fn from_text(name: &str, value: &str) -> candle_core::Result<Self> {
                value.trim().parse().map_err(|e| {
                    candle_core::Error::Msg(format!(
                        "field {name}: cannot parse {value:?} as {}: {e}",
                        stringify!($ty)
                    ))
                })
            }
        }
    )*};
}

field_text_from_str!(f64, bool, u32, u64, usize);

impl<T: FieldText> FieldText for Option<T> {
    fn to_text(&self) -> String {
        match self {
            Some(v) => v.to_text(),
            None => "none".to_string(),
        }
    }

    fn from_text(name: &str, value: &str) -> candle_core::Result<Self> {
        match value.trim() {
            "none" => Ok(None),
            v => T::from_text(name, v).map(Some),
        }
    }
}

impl FieldText for crate::NonFinitePolicy {
    fn to_text(&self) -> String {
        match self {
            Self::Skip => "skip",
            Self::Error => "error",
        }
        .to_string()
    }

    fn from_text(name: &str, value: &str) -> candle_core::Result<Self> {
        match value.trim() {
            "skip" => Ok(Self::Skip),
            "error" => Ok(Self::Error),
            v => candle_core::bail!("field {name}: expected \"skip\" or \"error\", got {v:?}"),
        }
    }
}

/// Checks shared by many configs; each error names the field and its value.
pub(crate) mod check {
    use candle_core::{bail, Result};

    pub(crate) fn non_negative(name: &str, value: f64) -> Result<()> {
        if !(value.is_finite() && value >= 0.0) {
            bail!("{name} must be finite and >= 0, got {value}")
        }
        Ok(())
    }

    /// `eps` of a rule that divides by `sqrt(average) + eps`. torch accepts 0, but then a zero
    /// gradient (a frozen row, a masked token) gives 0 / 0 = NaN on the first step; refusing it
    /// here is cheaper than finding the NaN later.
    pub(crate) fn positive_eps(value: f64) -> Result<()> {
        if !(value.is_finite() && value > 0.0) {
            bail!(
                "eps must be finite and > 0, got {value}: the update divides by sqrt(v) + eps, which is 0 for a zero gradient when eps is 0"
            )
        }
        Ok(())
    }

    pub(crate) fn unit_interval(name: &str, value: f64) -> Result<()> {
        if !(0.0..1.0).contains(&value) {
            bail!("{name} must be in [0, 1), got {value}")
        }
        Ok(())
    }

    pub(crate) fn closed_unit_interval(name: &str, value: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&value) {
            bail!("{name} must be in [0, 1], got {value}")
        }
        Ok(())
    }
}
