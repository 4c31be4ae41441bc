//! `define_optimizer!`: one config struct and one `candle_nn::Optimizer` per name, from a rule and
//! a list of hyper-parameters. Every config also gets the fields shared by the family: state
//! storage (`optim_bits`, `min_8bit_size`, `block_size`) and gradient handling (`non_finite`,
//! `max_grad_norm`, `percentile_clipping`).

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
                self.layout().validate()?;
                self.grad_handling().validate()
            }

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
        }

        #[doc = $doc]
        #[doc = ""]
        #[doc = concat!("This form keeps ", $what, " state by default. Per-parameter settings: [`", stringify!($name), "::new_with_overrides`].")]
        #[doc = concat!("Checkpoints ([`", stringify!($name), "::save`]) have kind `", $kind, "`.")]
        pub struct $name {
            slots: $crate::engine::TrackedParams,
            /// The base config (what `learning_rate` reports and `set_learning_rate` sets).
            config: $config,
            /// The base learning rate at construction: overridden learning rates keep their
            /// ratio to it when the base changes.
            initial_lr: f64,
            /// Per parameter: the override settings that apply, in application order.
            settings: Vec<Vec<(String, String)>>,
            /// Per parameter: the resolved config.
            params: Vec<$config>,
        }

        impl candle_nn::Optimizer for $name {
            type Config = $config;

            /// Parameters are named by position (`"0"`, `"1"`, ...) in checkpoints.
            fn new(vars: Vec<candle_core::Var>, config: $config) -> candle_core::Result<Self> {
                Self::new_named(
                    vars.into_iter().enumerate().map(|(i, v)| (i.to_string(), v)).collect(),
                    config,
                )
            }

            fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
                let params = &self.params;
                self.slots.step(
                    grads,
                    self.config.grad_handling(),
                    |i| params[i].percentile_clipping,
                    |i, t| params[i].rule(t),
                )
            }

            fn learning_rate(&self) -> f64 {
                self.config.lr
            }

            /// Sets the base learning rate. A parameter whose `lr` was overridden keeps its ratio
            /// to the base: its learning rate becomes `lr * override / base_at_construction`
            /// (or stays at the override when the base was 0 at construction).
            ///
            /// An invalid `lr` (negative, NaN, infinite, or one that makes an overridden rate
            /// invalid) leaves the optimizer as it was: the trait cannot return an error;
            /// [`try_set_learning_rate`](Self::try_set_learning_rate) reports it.
            fn set_learning_rate(&mut self, lr: f64) {
                let _ = self.try_set_learning_rate(lr);
            }
        }

        impl $name {
            /// The kind written into and checked in checkpoints.
            pub const KIND: &'static str = $kind;

            /// An optimizer over named parameters; the names key its checkpoints.
            ///
            /// # Errors
            /// An invalid config (naming the field), duplicate names, one `Var` under two names,
            /// or a float parameter that is not F32, F16 or BF16 (naming it).
            pub fn new_named(
                vars: Vec<(String, candle_core::Var)>,
                config: $config,
            ) -> candle_core::Result<Self> {
                Self::new_with_overrides(vars, config, &$crate::Overrides::new())
            }

            /// An optimizer over named parameters whose config is `config` with `overrides`
            /// applied per parameter (see [`Overrides`](crate::Overrides) for the precedence).
            ///
            /// # Errors
            /// An invalid config, an override naming an unknown field or an invalid value (naming
            /// the parameter), an override that matches no parameter (naming the closest
            /// names), a per-parameter override of a whole-step setting (`non_finite`,
            /// `max_grad_norm`), duplicate names, one `Var` under two names, or a float parameter
            /// that is not F32, F16 or BF16.
            pub fn new_with_overrides(
                vars: Vec<(String, candle_core::Var)>,
                config: $config,
                overrides: &$crate::Overrides,
            ) -> candle_core::Result<Self> {
                config.validate()?;
                let vars = $crate::engine::float_vars(vars)?;
                let settings = overrides.resolve(&vars)?;
                for ((name, _), set) in vars.iter().zip(&settings) {
                    if let Some((field, _)) =
                        set.iter().find(|(f, _)| f == "non_finite" || f == "max_grad_norm")
                    {
                        candle_core::bail!(
                            "{field} applies to the whole step and cannot be overridden per parameter (override for {name:?})"
                        )
                    }
                }
                let names = vars.iter().map(|(name, _)| name.as_str());
                let params = Self::derive(&config, config.lr, &settings, names)?;
                let slots =
                    $crate::engine::TrackedParams::new(vars, |i| {
                        (params[i].layout(), params[i].rule(1), params[i].percentile_clipping)
                    })?;
                Ok(Self {
                    slots,
                    initial_lr: config.lr,
                    config,
                    settings,
                    params,
                })
            }

            /// An optimizer over every variable of `varmap`, named as in the map (sorted by name,
            /// so the order does not depend on hashing).
            ///
            /// # Errors
            /// As [`Self::new_named`].
            pub fn from_varmap(
                varmap: &candle_nn::VarMap,
                config: $config,
            ) -> candle_core::Result<Self> {
                Self::new_named($crate::engine::sorted_vars(varmap), config)
            }

            /// [`Self::from_varmap`] with per-parameter overrides.
            ///
            /// # Errors
            /// As [`Self::new_with_overrides`].
            pub fn from_varmap_with_overrides(
                varmap: &candle_nn::VarMap,
                config: $config,
                overrides: &$crate::Overrides,
            ) -> candle_core::Result<Self> {
                Self::new_with_overrides($crate::engine::sorted_vars(varmap), config, overrides)
            }

            /// Per-parameter configs: `base` with each parameter's settings applied (an
            /// overridden `lr` scaled by `base.lr / initial_lr`), each validated; errors name the
            /// parameter.
            fn derive<'a>(
                base: &$config,
                initial_lr: f64,
                settings: &[Vec<(String, String)>],
                names: impl Iterator<Item = &'a str>,
            ) -> candle_core::Result<Vec<$config>> {
                let mut params = Vec::with_capacity(settings.len());
                for (name, set) in names.zip(settings) {
                    let resolve = || -> candle_core::Result<$config> {
                        let mut c = base.clone();
                        for (field, value) in set {
                            c.set_field(field, value)?;
                        }
                        if initial_lr > 0.0 && set.iter().any(|(field, _)| field == "lr") {
                            c.lr *= base.lr / initial_lr;
                        }
                        c.validate()?;
                        Ok(c)
                    };
                    params.push(
                        resolve()
                            .map_err(|e| e.context(format!("override for parameter {name:?}")))?,
                    );
                }
                Ok(params)
            }

            /// Sets the base learning rate as `Optimizer::set_learning_rate` does (overridden
            /// rates keep their ratio to the base), or returns an error and changes nothing.
            ///
            /// # Errors
            /// An `lr` that is negative or not finite, or that makes a parameter's overridden
            /// rate invalid (naming the parameter).
            pub fn try_set_learning_rate(&mut self, lr: f64) -> candle_core::Result<()> {
                let mut config = self.config.clone();
                config.lr = lr;
                config.validate()?;
                self.params =
                    Self::derive(&config, self.initial_lr, &self.settings, self.slots.names())?;
                self.config = config;
                Ok(())
            }

            /// The base configuration.
            pub fn config(&self) -> &$config {
                &self.config
            }

            /// The resolved configuration of each parameter (base config plus its overrides), in
            /// the order of [`Self::param_names`].
            pub fn param_configs(&self) -> &[$config] {
                &self.params
            }

            /// Steps taken (skipped steps not included).
            pub fn step_count(&self) -> u64 {
                self.slots.step_count()
            }

            /// Steps skipped because a gradient was not finite ([`NonFinitePolicy::Skip`](crate::NonFinitePolicy::Skip)).
            pub fn skipped_steps(&self) -> u64 {
                self.slots.skipped_count()
            }

            /// Bytes held by the optimizer state (codes, scales and f32 state).
            pub fn state_bytes(&self) -> usize {
                self.slots.state_bytes()
            }

            /// Moves the state to the emulated CUDA device `emu`: the parameters stay CPU
            /// tensors and every later step runs the CUDA host code and kernels on the emulator
            /// (`candle_bnb_kernels::emulator`). For tests; not a public promise.
            ///
            /// # Errors
            /// Parameters not on the CPU; a state already on a device.
            #[cfg(feature = "emulator")]
            #[doc(hidden)]
            pub fn emulate_cuda(
                &mut self,
                emu: &candle_bnb_kernels::emulator::Emulator,
            ) -> candle_core::Result<()> {
                let percentile: Vec<u32> =
                    self.params.iter().map(|p| p.percentile_clipping).collect();
                self.slots.emulate_cuda(emu, &percentile)
            }

            /// The parameter names, in order (positions when built with `new`).
            pub fn param_names(&self) -> Vec<&str> {
                self.slots.names().collect()
            }

            /// Each parameter with its state (states in the order of the rule's), in the order of
            /// [`Self::param_names`]. Borrowed on the CPU; on CUDA a copy downloaded from the
            /// device (this waits for the device).
            ///
            /// # Errors
            /// CUDA errors while copying.
            pub fn states(
                &self,
            ) -> candle_core::Result<
                Vec<(&candle_core::Var, std::borrow::Cow<'_, candle_bnb_kernels::ParamState>)>,
            > {
                self.slots.states()
            }

            /// Writes the whole optimizer state to `path` as safetensors, atomically (a
            /// temporary file in the same folder, fsync, rename): see [`crate::checkpoint`].
            ///
            /// # Errors
            /// I/O errors, naming the path.
            pub fn save(&self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
                let extra = vec![("initial_lr".to_string(), self.initial_lr.to_string())];
                $crate::checkpoint::save(
                    path.as_ref(),
                    $kind,
                    &self.config.fields(),
                    &self.settings,
                    &extra,
                    &self.slots,
                )
            }

            /// Replaces the whole optimizer state (states, step counts, clipping history and
            /// hyper-parameters) by the checkpoint at `path`. Everything is checked first; on
            /// error nothing changes.
            ///
            /// # Errors
            /// An unreadable or truncated file, another kind or version, or a mismatch with this
            /// optimizer (parameter count, names, shapes, dtypes, overrides, state precision,
            /// block size): the message names the first mismatch.
            pub fn load(&mut self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
                let path = path.as_ref();
                let rules: Vec<_> = self.params.iter().map(|c| c.rule(1)).collect();
                let signed: Vec<&[bool]> = rules
                    .iter()
                    .map(candle_bnb_kernels::UpdateRule::signed_states)
                    .collect();
                let loaded =
                    $crate::checkpoint::load(path, $kind, &self.slots, &self.settings, &signed)?;
                let mut config = self.config.clone();
                for (name, value) in &loaded.config {
                    config.set_field(name, value).map_err(|e| {
                        e.context(format!("checkpoint {}: config", path.display()))
                    })?;
                }
                // Every field must come from the file: a missing one would silently keep this
                // optimizer's value, and the run would not resume as it was saved.
                if let Some(missing) = $config::FIELD_NAMES
                    .iter()
                    .find(|f| !loaded.config.iter().any(|(name, _)| name == *f))
                {
                    candle_core::bail!(
                        "checkpoint {}: config field {missing:?} is missing",
                        path.display()
                    )
                }
                if config.layout() != self.config.layout() {
                    candle_core::bail!(
                        "checkpoint {}: state layout {:?} differs from this optimizer's {:?}",
                        path.display(),
                        config.layout(),
                        self.config.layout()
                    )
                }
                config
                    .validate()
                    .map_err(|e| e.context(format!("checkpoint {}: config", path.display())))?;
                let initial_lr: f64 = match loaded.extra.get("initial_lr").map(|v| v.parse()) {
                    Some(Ok(v)) if f64::is_finite(v) && v >= 0.0 => v,
                    other => candle_core::bail!(
                        "checkpoint {}: metadata \"initial_lr\" must be a finite number >= 0, got {:?}",
                        path.display(),
                        loaded.extra.get("initial_lr").filter(|_| other.is_some())
                    ),
                };
                let params = Self::derive(&config, initial_lr, &self.settings, self.slots.names())
                    .map_err(|e| e.context(format!("checkpoint {}", path.display())))?;
                // The states were checked against this optimizer's rules (their count, which
                // may be negative, their maps): the loaded config must make the same rules.
                for (i, (ours, theirs)) in self.params.iter().zip(&params).enumerate() {
                    let (ours, theirs) = (ours.rule(1), theirs.rule(1));
                    let (ours, theirs) = (
                        candle_bnb_kernels::UpdateRule::signed_states(&ours),
                        candle_bnb_kernels::UpdateRule::signed_states(&theirs),
                    );
                    if ours != theirs {
                        candle_core::bail!(
                            "checkpoint {}: its config gives parameter {:?} states {theirs:?} (signed or not), its saved state is {ours:?}",
                            path.display(),
                            self.slots.names().nth(i).unwrap_or_default()
                        )
                    }
                }
                self.slots.restore(loaded.slots)?;
                self.config = config;
                self.initial_lr = initial_lr;
                self.params = params;
                Ok(())
            }
        }
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
