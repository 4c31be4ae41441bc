//! `define_optimizer!`: one config struct and one `candle_nn::Optimizer` per name, from a rule and
//! a list of hyper-parameters. Every config also gets the state-storage fields shared by the
//! family (`optim_bits`, `min_8bit_size`, `block_size`, `non_finite`).

macro_rules! define_optimizer {
    (
        doc: $doc:literal,
        optimizers: [$( ($name:ident, $config:ident, $bits:expr, $what:literal) ),+ $(,)?],
        fields: $fields:tt,
        validate: |$vc:ident| $validate:block,
        rule: |$rc:ident, $t:ident| $rule:expr $(,)?
    ) => {
        $(
            define_optimizer!(@one
                $doc, $name, $config, $bits, $what, $fields, |$vc| $validate, |$rc, $t| $rule
            );
        )+
    };
    (@one
        $doc:literal, $name:ident, $config:ident, $bits:expr, $what:literal,
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
            /// Elements per quantization block of 8-bit state.
            pub block_size: usize,
            /// What a step does when a gradient holds NaN or ±inf.
            pub non_finite: $crate::NonFinitePolicy,
        }

        impl Default for $config {
            fn default() -> Self {
                Self {
                    $( $field: $default, )*
                    optim_bits: $bits,
                    min_8bit_size: 4096,
                    block_size: 256,
                    non_finite: $crate::NonFinitePolicy::Skip,
                }
            }
        }

        impl $config {
            fn validate(&self) -> candle_core::Result<()> {
                let $vc = self;
                $validate
                Ok(())
            }

            fn layout(&self) -> $crate::engine::StateLayout {
                $crate::engine::StateLayout {
                    optim_bits: self.optim_bits,
                    min_8bit_size: self.min_8bit_size,
                    block_size: self.block_size,
                }
            }

            fn rule(&self, step: u64) -> impl candle_bnb_kernels::UpdateRule {
                let ($rc, $t) = (self, step);
                $rule
            }
        }

        #[doc = $doc]
        #[doc = ""]
        #[doc = concat!("This form keeps ", $what, " state by default.")]
        pub struct $name {
            slots: $crate::engine::Slots,
            config: $config,
        }

        impl candle_nn::Optimizer for $name {
            type Config = $config;

            fn new(vars: Vec<candle_core::Var>, config: $config) -> candle_core::Result<Self> {
                config.validate()?;
                let slots = $crate::engine::Slots::new(vars, config.layout(), &config.rule(1))?;
                Ok(Self { slots, config })
            }

            fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
                let config = &self.config;
                self.slots.step(grads, config.non_finite, |t| config.rule(t))
            }

            fn learning_rate(&self) -> f64 {
                self.config.lr
            }

            fn set_learning_rate(&mut self, lr: f64) {
                self.config.lr = lr
            }
        }

        impl $name {
            /// The configuration in use.
            pub fn config(&self) -> &$config {
                &self.config
            }

            /// Steps taken (skipped steps not included).
            pub fn step_count(&self) -> u64 {
                self.slots.steps()
            }

            /// Steps skipped because a gradient was not finite ([`NonFinitePolicy::Skip`](crate::NonFinitePolicy::Skip)).
            pub fn skipped_steps(&self) -> u64 {
                self.slots.skipped()
            }

            /// Bytes held by the optimizer state (codes, scales and f32 state).
            pub fn state_bytes(&self) -> usize {
                self.slots.state_bytes()
            }

            /// Each parameter with its state, in the order of the rule's states.
            pub fn states(&self) -> impl Iterator<Item = (&candle_core::Var, &candle_bnb_kernels::ParamState)> {
                self.slots.states()
            }
        }
    };
}

pub(crate) use define_optimizer;

/// Checks shared by many configs; each error names the field and its value.
pub(crate) mod check {
    use candle_core::{bail, Result};

    pub(crate) fn non_negative(name: &str, value: f64) -> Result<()> {
        if !(value.is_finite() && value >= 0.0) {
            bail!("{name} must be finite and >= 0, got {value}")
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
