//! [`OptimizerConfig`]: what [`Optim`](crate::Optim) needs of a config, implemented by each
//! algorithm file (`algorithms/`): its accessors, its text form (provided), and, sealed, its
//! hyper-parameters by name, their checks, the rule they make and the step compiled for it.

use candle_core::Result;

use crate::Settings;

/// The config of an optimizer of this crate: an algorithm's typed hyper-parameters plus the
/// shared [`Settings`]. Implemented by every config of the family (sealed: an algorithm is a
/// config here plus an update rule in `candle_bnb_kernels`, for the CPU and for CUDA). The text
/// form of the fields is what checkpoints store.
pub trait OptimizerConfig:
    Clone + std::fmt::Debug + PartialEq + Default + 'static + sealed::Sealed
{
    /// The kind written into and checked in checkpoints (`"AdamW"` for `AdamW` and
    /// `AdamW8bit`: both are the same algorithm).
    const KIND: &'static str;

    /// The learning rate.
    fn lr(&self) -> f64;
    /// Sets the learning rate (not validated: [`OptimizerConfig::validate`] is).
    fn set_lr(&mut self, lr: f64);
    /// The state storage and gradient handling settings.
    fn settings(&self) -> &Settings;
    /// The state storage and gradient handling settings, to change.
    fn settings_mut(&mut self) -> &mut Settings;

    /// Checks every field's range; errors name the field and its value.
    ///
    /// # Errors
    /// The first hyper-parameter or setting out of range.
    fn validate(&self) -> Result<()> {
        self.check()?;
        self.settings().validate()
    }

    /// Every field with its value as text (`f64` values round-trip exactly, `None` is
    /// `none`): the algorithm's hyper-parameters in declaration order, then the settings.
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut copy = self.clone();
        let mut fields: Vec<(&'static str, String)> = copy
            .hyper_parameters()
            .into_iter()
            .map(|(name, value)| (name, value.to_text()))
            .collect();
        fields.extend(
            copy.settings_mut()
                .fields_mut()
                .into_iter()
                .map(|(name, value)| (name, value.to_text())),
        );
        fields
    }

    /// Sets the field `name` from its text form (as [`OptimizerConfig::fields`] writes it).
    ///
    /// # Errors
    /// An unknown name (the message lists the fields) or a value that does not parse as the
    /// field's type. Values are range-checked by [`OptimizerConfig::validate`].
    fn set_field(&mut self, name: &str, value: &str) -> Result<()> {
        if let Some((_, field)) = self
            .hyper_parameters()
            .into_iter()
            .find(|(n, _)| *n == name)
        {
            return field.set_text(name, value);
        }
        if let Some((_, field)) = self
            .settings_mut()
            .fields_mut()
            .into_iter()
            .find(|(n, _)| *n == name)
        {
            return field.set_text(name, value);
        }
        let names: Vec<&str> = self.fields().into_iter().map(|(n, _)| n).collect();
        candle_core::bail!(
            "{} has no field {name:?}; its fields are {names:?}",
            Self::KIND
        )
    }
}

/// Keeps [`OptimizerConfig`] to this crate's configs, and holds what only the optimizer calls:
/// what an algorithm file implements besides its accessors.
pub(crate) mod sealed {
    use candle_core::backprop::GradStore;
    use candle_core::Result;

    use crate::engine::TrackedParams;
    use crate::field::FieldText;

    pub trait Sealed {
        /// The update rule the config makes.
        type Rule: crate::engine::StepRule;
        /// The algorithm's hyper-parameters by name, in declaration order (the shared
        /// settings not included).
        fn hyper_parameters(&mut self) -> Vec<(&'static str, &mut dyn FieldText)>;
        /// Checks the hyper-parameters' ranges; errors name the field and its value.
        fn check(&self) -> Result<()>;
        /// The update rule of a parameter's `step`-th step (1-based).
        fn rule(&self, step: u64) -> Self::Rule;
        /// Fills in what the config leaves to the optimizer's state precision `bits` (8 or
        /// 32), once, when an optimizer resolves its base config: nothing unless the
        /// algorithm says otherwise (Adafactor's momentum).
        fn resolve_for_bits(&mut self, bits: u32) {
            let _ = bits;
        }
        /// One step of `tracked` with `base`'s gradient handling and each parameter's config
        /// in `params`: [`TrackedParams::step`]. Each config calls it from its own
        /// (non-generic) impl so that the step (the CPU kernels and the CUDA launches, generic
        /// over the rule) is compiled once, in this crate with its optimisation level, instead
        /// of again in every crate that steps an optimizer.
        fn step(
            tracked: &mut TrackedParams,
            grads: &GradStore,
            base: &Self,
            params: &[Self],
        ) -> Result<()>
        where
            Self: Sized;
    }
}

impl<C: OptimizerConfig> crate::engine::StepConfig for C {
    type Rule = <C as sealed::Sealed>::Rule;

    fn rule(&self, step: u64) -> Self::Rule {
        sealed::Sealed::rule(self, step)
    }

    fn step_settings(&self) -> &Settings {
        self.settings()
    }
}
