//! [`Optim`]: the optimizer of this crate, one generic type over its config (the algorithm with
//! its hyper-parameters and the shared [`Settings`](crate::Settings)) and its default state
//! precision. Every named optimizer is one: `AdamW` is `Optim<AdamWConfig>`, `AdamW8bit` is
//! `Optim<AdamWConfig, 8>`.

use crate::OptimizerConfig;

/// An optimizer with 8-bit (blockwise-quantized) or 32-bit state, generic over its config `C`
/// and its state precision `BITS` (8 or 32), which applies where the config's
/// [`Settings::optim_bits`](crate::Settings::optim_bits) is `None`; see the named forms ([`AdamW`](crate::AdamW) =
/// `Optim<AdamWConfig>`, [`AdamW8bit`](crate::AdamW8bit) = `Optim<AdamWConfig, 8>`, ...).
/// Per-parameter settings: [`Optim::new_with_overrides`]. Checkpoints: [`Optim::save`], with
/// kind [`Optim::KIND`].
pub struct Optim<C: OptimizerConfig, const BITS: u32 = 32> {
    tracked: crate::engine::TrackedParams,
    /// The base config (what `learning_rate` reports and `set_learning_rate` sets).
    config: C,
    /// The base learning rate at construction: overridden learning rates keep their
    /// ratio to it when the base changes.
    initial_lr: f64,
    /// Per parameter: the overrides that apply (field and value as text), in application
    /// order.
    overridden: Vec<Vec<(String, String)>>,
    /// Per parameter: the resolved config.
    params: Vec<C>,
}

impl<C: OptimizerConfig, const BITS: u32> candle_nn::Optimizer for Optim<C, BITS> {
    type Config = C;

    /// Parameters are named by position (`"0"`, `"1"`, ...) in checkpoints.
    fn new(vars: Vec<candle_core::Var>, config: C) -> candle_core::Result<Self> {
        Self::new_named(
            vars.into_iter()
                .enumerate()
                .map(|(i, v)| (i.to_string(), v))
                .collect(),
            config,
        )
    }

    fn step(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        C::step(&mut self.tracked, grads, &self.config, &self.params)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr()
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

impl<C: OptimizerConfig, const BITS: u32> Optim<C, BITS> {
    /// The kind written into and checked in checkpoints.
    pub const KIND: &'static str = C::KIND;

    /// An optimizer over named parameters; the names key its checkpoints.
    ///
    /// # Errors
    /// An invalid config (naming the field), duplicate names, one `Var` under two names,
    /// or a float parameter that is not F32, F16 or BF16 (naming it).
    pub fn new_named(
        vars: Vec<(String, candle_core::Var)>,
        config: C,
    ) -> candle_core::Result<Self> {
        Self::new_with_overrides(vars, config, &crate::Overrides::new())
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
        config: C,
        overrides: &crate::Overrides,
    ) -> candle_core::Result<Self> {
        // The config first: its errors come before those of the parameters.
        config.validate()?;
        let vars = crate::engine::float_vars(vars)?;
        let overridden = overrides.resolve(&vars)?;
        let names: Vec<&str> = vars.iter().map(|(name, _)| name.as_str()).collect();
        let (config, params) = Self::resolve_configs(config, &names, &overridden)?;
        let tracked = crate::engine::TrackedParams::new(vars, |i| {
            (
                params[i].settings().layout(BITS),
                params[i].rule(1),
                params[i].settings().percentile_clipping,
            )
        })?;
        Ok(Self {
            tracked,
            initial_lr: config.lr(),
            config,
            overridden,
            params,
        })
    }

    /// An optimizer over every variable of `varmap`, named as in the map (sorted by name,
    /// so the order does not depend on hashing).
    ///
    /// # Errors
    /// As [`Self::new_named`].
    pub fn from_varmap(varmap: &candle_nn::VarMap, config: C) -> candle_core::Result<Self> {
        Self::new_named(crate::engine::sorted_vars(varmap), config)
    }

    /// [`Self::from_varmap`] with per-parameter overrides.
    ///
    /// # Errors
    /// As [`Self::new_with_overrides`].
    pub fn from_varmap_with_overrides(
        varmap: &candle_nn::VarMap,
        config: C,
        overrides: &crate::Overrides,
    ) -> candle_core::Result<Self> {
        Self::new_with_overrides(crate::engine::sorted_vars(varmap), config, overrides)
    }

    /// The base config (validated by the caller) with this optimizer's precision filled in where
    /// it is `None`, and each parameter's config (`overridden[i]` applied to the base, checked),
    /// as construction and [`Self::plan`] resolve them.
    ///
    /// # Errors
    /// A per-parameter override of a whole-step setting; an override naming
    /// an unknown field or an invalid value (naming the parameter).
    fn resolve_configs(
        mut config: C,
        names: &[&str],
        overridden: &[Vec<(String, String)>],
    ) -> candle_core::Result<(C, Vec<C>)> {
        // A constant check (BITS is 8 or 32 in every name of the family).
        if BITS != 8 && BITS != 32 {
            candle_core::bail!("Optim's state precision must be 8 or 32, got {BITS}")
        }
        let bits = *config.settings_mut().optim_bits.get_or_insert(BITS);
        config.resolve_for_bits(bits);
        for (name, set) in names.iter().zip(overridden) {
            if let Some((field, _)) = set
                .iter()
                .find(|(f, _)| f == "non_finite" || f == "max_grad_norm")
            {
                candle_core::bail!(
                    "{field} applies to the whole step and cannot be overridden per parameter (override for {name:?})"
                )
            }
        }
        let params = Self::derive(&config, config.lr(), overridden, names.iter().copied())?;
        Ok((config, params))
    }

    /// The optimizer state this optimizer would allocate for the trainable float tensors of
    /// `tensors` with `config` and `overrides`, one entry per tensor in their order, without
    /// allocating anything: the same precision, fallback (`min_8bit_size`), block scales,
    /// overrides and embedding mark (`TensorSpec::keep_32bit`) as construction, so the sum of
    /// the bytes equals [`Self::state_bytes`] of the optimizer built over such tensors.
    ///
    /// # Errors
    /// As [`Self::new_with_overrides`]; an override for a `Target::Var` (a plan knows tensors
    /// by name only).
    pub fn plan(
        tensors: &[crate::plan::TensorSpec],
        config: C,
        overrides: &crate::Overrides,
    ) -> candle_core::Result<Vec<crate::plan::StatePlan>> {
        // The config first, as construction checks it.
        config.validate()?;
        let trainable = crate::plan::trainable_float(tensors)?;
        let named: Vec<(&str, bool)> = trainable
            .iter()
            .map(|t| (t.name.as_str(), t.keep_32bit))
            .collect();
        let overridden = overrides.resolve_names(&named)?;
        let names: Vec<&str> = named.iter().map(|(name, _)| *name).collect();
        let (_, params) = Self::resolve_configs(config, &names, &overridden)?;
        Ok(trainable
            .iter()
            .zip(&params)
            .map(|(t, c)| {
                let size = crate::engine::StepRule::state_size(
                    &c.rule(1),
                    &t.shape,
                    c.settings().layout(BITS),
                );
                crate::plan::StatePlan {
                    name: t.name.clone(),
                    elements: t.elem_count(),
                    quantized: size.quantized,
                    states: size.states,
                    bytes: size.bytes,
                }
            })
            .collect())
    }

    /// Per-parameter configs: `base` with each parameter's settings applied (an
    /// overridden `lr` scaled by `base.lr / initial_lr`), each validated; errors name the
    /// parameter.
    fn derive<'a>(
        base: &C,
        initial_lr: f64,
        overridden: &[Vec<(String, String)>],
        names: impl Iterator<Item = &'a str>,
    ) -> candle_core::Result<Vec<C>> {
        let mut params = Vec::with_capacity(overridden.len());
        for (name, set) in names.zip(overridden) {
            let resolve = || -> candle_core::Result<C> {
                let mut c = base.clone();
                for (field, value) in set {
                    c.set_field(field, value)?;
                }
                if initial_lr > 0.0 && set.iter().any(|(field, _)| field == "lr") {
                    c.set_lr(c.lr() * base.lr() / initial_lr);
                }
                c.validate()?;
                Ok(c)
            };
            params.push(
                resolve().map_err(|e| e.context(format!("override for parameter {name:?}")))?,
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
        config.set_lr(lr);
        config.validate()?;
        self.params = Self::derive(
            &config,
            self.initial_lr,
            &self.overridden,
            self.tracked.names(),
        )?;
        self.config = config;
        Ok(())
    }

    /// The base configuration.
    pub fn config(&self) -> &C {
        &self.config
    }

    /// The resolved configuration of each parameter (base config plus its overrides), in
    /// the order of [`Self::param_names`].
    pub fn param_configs(&self) -> &[C] {
        &self.params
    }

    /// Steps taken (skipped steps not included).
    pub fn step_count(&self) -> u64 {
        self.tracked.step_count()
    }

    /// Steps skipped because a gradient was not finite ([`NonFinitePolicy::Skip`](crate::NonFinitePolicy::Skip)).
    pub fn skipped_steps(&self) -> u64 {
        self.tracked.skipped_count()
    }

    /// Bytes held by the optimizer state (codes, scales and f32 state).
    pub fn state_bytes(&self) -> usize {
        self.tracked.state_bytes()
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
        let percentile: Vec<u32> = self
            .params
            .iter()
            .map(|p| p.settings().percentile_clipping)
            .collect();
        self.tracked.emulate_cuda(emu, &percentile)
    }

    /// The parameter names, in order (positions when built with `new`).
    pub fn param_names(&self) -> Vec<&str> {
        self.tracked.names().collect()
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
        Vec<(
            &candle_core::Var,
            std::borrow::Cow<'_, candle_bnb_kernels::ParamState>,
        )>,
    > {
        self.tracked.states()
    }

    /// Writes the whole optimizer state to `path` as safetensors, atomically (a
    /// temporary file in the same folder, fsync, rename): see [`crate::checkpoint`].
    ///
    /// # Errors
    /// I/O errors, naming the path.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> candle_core::Result<()> {
        let extra = vec![("initial_lr".to_string(), self.initial_lr.to_string())];
        crate::checkpoint::save(
            path.as_ref(),
            C::KIND,
            &self.config.fields(),
            &self.overridden,
            &extra,
            &self.tracked,
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
            .map(crate::engine::StepRule::signed_states)
            .collect();
        let loaded =
            crate::checkpoint::load(path, C::KIND, &self.tracked, &self.overridden, &signed)?;
        let mut config = self.config.clone();
        for (name, value) in &loaded.config {
            config
                .set_field(name, value)
                .map_err(|e| e.context(format!("checkpoint {}: config", path.display())))?;
        }
        // Every field must come from the file: a missing one would silently keep this
        // optimizer's value, and the run would not resume as it was saved.
        if let Some((missing, _)) = C::default()
            .fields()
            .into_iter()
            .find(|(f, _)| !loaded.config.iter().any(|(name, _)| name == f))
        {
            candle_core::bail!(
                "checkpoint {}: config field {missing:?} is missing",
                path.display()
            )
        }
        let (theirs, ours) = (
            config.settings().layout(BITS),
            self.config.settings().layout(BITS),
        );
        if theirs != ours {
            candle_core::bail!(
                "checkpoint {}: state layout {theirs:?} differs from this optimizer's {ours:?}",
                path.display(),
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
        let params = Self::derive(&config, initial_lr, &self.overridden, self.tracked.names())
            .map_err(|e| e.context(format!("checkpoint {}", path.display())))?;
        // The states were checked against this optimizer's rules (their count, which
        // may be negative, their maps): the loaded config must make the same rules.
        for (i, (ours, theirs)) in self.params.iter().zip(&params).enumerate() {
            let (ours, theirs) = (ours.rule(1), theirs.rule(1));
            let (ours, theirs) = (
                crate::engine::StepRule::signed_states(&ours),
                crate::engine::StepRule::signed_states(&theirs),
            );
            if ours != theirs {
                candle_core::bail!(
                    "checkpoint {}: its config gives parameter {:?} states {theirs:?} (signed or not), its saved state is {ours:?}",
                    path.display(),
                    self.tracked.names().nth(i).unwrap_or_default()
                )
            }
        }
        self.tracked.restore(loaded.state)?;
        self.config = config;
        self.initial_lr = initial_lr;
        self.params = params;
        Ok(())
    }
}
