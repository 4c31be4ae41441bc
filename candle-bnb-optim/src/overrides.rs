//! Per-parameter configuration: [`Overrides`], a plain value handed to an optimizer's
//! constructor, that sets config fields for some parameters. Settings are never read from
//! process-wide state; the one thing the crate records per variable is the embedding mark
//! ([`keep_32bit_state`](crate::keep_32bit_state)), a fixed property of a variable that any
//! override wins over.

use candle_core::{bail, Result, Var};

/// Which parameters an override applies to. Names are those of the `VarMap` (or of
/// `new_named`), e.g. `model.layers.0.self_attn.q_proj.weight`.
#[derive(Clone, Debug)]
pub enum Target {
    /// One variable, by identity.
    Var(Var),
    /// The parameter with exactly this name.
    Name(String),
    /// Every parameter of a module: its name equals the prefix or starts with `prefix.`.
    Module(String),
    /// Every parameter whose name matches a glob: `*` matches any run of characters (dots
    /// included), `?` one character; e.g. `*.bias`, `*norm*`.
    Pattern(String),
}

impl Target {
    /// Precedence rank: a higher rank wins over a lower one (Var > name > module > pattern).
    fn rank(&self) -> u8 {
        match self {
            Target::Pattern(_) => 0,
            Target::Module(_) => 1,
            Target::Name(_) => 2,
            Target::Var(_) => 3,
        }
    }

    /// Whether the parameter `name` (with its Var, when known) is a target.
    fn matches(&self, name: &str, var: Option<&Var>) -> bool {
        match self {
            Target::Var(v) => var.is_some_and(|var| v.as_tensor().id() == var.as_tensor().id()),
            Target::Name(n) => n == name,
            Target::Module(m) => {
                name == m || (name.starts_with(m.as_str()) && name[m.len()..].starts_with('.'))
            }
            Target::Pattern(p) => glob_match(p.as_bytes(), name.as_bytes()),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Var(v) => format!("a Var of shape {:?}", v.dims()),
            Target::Name(n) => format!("name {n:?}"),
            Target::Module(m) => format!("module {m:?}"),
            Target::Pattern(p) => format!("pattern {p:?}"),
        }
    }
}

/// A parameter overrides may apply to.
struct Candidate<'a> {
    name: &'a str,
    /// `None` when planning by name.
    var: Option<&'a Var>,
    /// Marked (or planned) to keep 32-bit state.
    keep_32bit: bool,
}

/// One typed setting for the parameters of a target, made by [`Overrides::for_module`] and its
/// siblings: each method adds the override and gives the [`Overrides`] back. The settings every
/// optimizer of the family has are typed here; any other field of a config (e.g. `beta2`) goes
/// through [`TargetSettings::field`] in its text form. Values are checked when the optimizer is
/// built, and the errors name the parameter.
#[derive(Clone, Debug)]
#[must_use = "a setting takes effect only in the Overrides it returns"]
pub struct TargetSettings {
    overrides: Overrides,
    target: Target,
}

impl TargetSettings {
    /// The learning rate (an overridden rate keeps its ratio to the base rate when
    /// `set_learning_rate` changes the base).
    pub fn lr(self, lr: f64) -> Overrides {
        self.field("lr", lr)
    }

    /// The weight decay (each optimizer applies it as its config documents: decoupled for AdamW,
    /// added to the gradient for Adam, ...).
    pub fn weight_decay(self, weight_decay: f64) -> Overrides {
        self.field("weight_decay", weight_decay)
    }

    /// State precision: 8 (blockwise-quantized) or 32 bits.
    pub fn optim_bits(self, bits: u32) -> Overrides {
        self.field("optim_bits", bits)
    }

    /// Parameters with fewer elements keep 32-bit state even when `optim_bits` is 8.
    pub fn min_8bit_size(self, elements: usize) -> Overrides {
        self.field("min_8bit_size", elements)
    }

    /// Elements per quantization block of 8-bit state (one of
    /// [`SUPPORTED_BLOCK_SIZES`](candle_bnb_kernels::SUPPORTED_BLOCK_SIZES)).
    pub fn block_size(self, elements: usize) -> Overrides {
        self.field("block_size", elements)
    }

    /// Percentile clipping, in `1..=100` (100: off).
    pub fn percentile_clipping(self, percentile: u32) -> Overrides {
        self.field("percentile_clipping", percentile)
    }

    /// Any other config field by name, with its value in the config's text form
    /// ([`OptimizerConfig::set_field`](crate::OptimizerConfig::set_field)).
    pub fn field(self, name: &str, value: impl ToString) -> Overrides {
        self.overrides.set(self.target, name, value)
    }
}

/// `*` and `?` glob matching, iterative with backtracking to the last `*`.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// One override: set `field` to `value` (in its text form) for the parameters of `target`.
#[derive(Clone, Debug)]
struct Entry {
    target: Target,
    field: String,
    value: String,
}

/// Config fields set for some parameters, for any optimizer of the family.
///
/// The settings every optimizer has are typed ([`Overrides::for_module`] and its siblings give a
/// [`TargetSettings`]); other fields go by name and text form ([`Overrides::set`] and its
/// siblings, or [`TargetSettings::field`]: numbers, `true`/`false`, `none`). Everything is
/// checked when the optimizer is built, and every override must match at least one parameter (a
/// typo is an error naming the closest real names, never a silent no-op).
///
/// Precedence, when several overrides set the same field of one parameter: a [`Target::Var`]
/// wins over a [`Target::Name`], which wins over a [`Target::Module`] (the longest prefix winning
/// among modules), which wins over a [`Target::Pattern`], which wins over a variable's
/// [32-bit mark](crate::keep_32bit_state) (set by the embedding modules of [`crate::nn`]), which
/// wins over the config; among equals, the one added last wins.
///
/// ```
/// use candle_bnb_optim::Overrides;
///
/// let overrides = Overrides::new()
///     .for_module("model.embed_tokens")
///     .optim_bits(32)
///     .for_name("lm_head.weight")
///     .lr(1e-4)
///     .for_pattern("*.q_proj.*")
///     .field("beta2", 0.99)
///     .no_weight_decay_for_biases_and_norms();
/// assert_eq!(overrides.len(), 5);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    entries: Vec<Entry>,
}

impl Overrides {
    /// No overrides.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `field` to `value` for the parameters of `target`.
    pub fn set(mut self, target: Target, field: &str, value: impl ToString) -> Self {
        self.entries.push(Entry {
            target,
            field: field.to_string(),
            value: value.to_string(),
        });
        self
    }

    /// [`Overrides::set`] for one variable.
    pub fn var(self, var: &Var, field: &str, value: impl ToString) -> Self {
        self.set(Target::Var(var.clone()), field, value)
    }

    /// [`Overrides::set`] for the parameter with exactly this name.
    pub fn name(self, name: &str, field: &str, value: impl ToString) -> Self {
        self.set(Target::Name(name.to_string()), field, value)
    }

    /// [`Overrides::set`] for every parameter of the module `prefix`.
    pub fn module(self, prefix: &str, field: &str, value: impl ToString) -> Self {
        self.set(Target::Module(prefix.to_string()), field, value)
    }

    /// [`Overrides::set`] for every parameter whose name matches the glob `pattern`.
    pub fn pattern(self, pattern: &str, field: &str, value: impl ToString) -> Self {
        self.set(Target::Pattern(pattern.to_string()), field, value)
    }

    /// The usual parameter group: no weight decay for biases (`*.bias`) and normalisation
    /// weights (`*norm*`), as patterns (so a name or module override still wins).
    pub fn no_weight_decay_for_biases_and_norms(self) -> Self {
        self.for_pattern("*.bias")
            .weight_decay(0.0)
            .for_pattern("*norm*")
            .weight_decay(0.0)
    }

    /// Typed settings for one variable: `overrides.for_var(&v).lr(1e-4)`.
    pub fn for_var(self, var: &Var) -> TargetSettings {
        self.for_target(Target::Var(var.clone()))
    }

    /// Typed settings for the parameter with exactly this name.
    pub fn for_name(self, name: &str) -> TargetSettings {
        self.for_target(Target::Name(name.to_string()))
    }

    /// Typed settings for every parameter of the module `prefix`:
    /// `Overrides::new().for_module("lm_head").lr(1e-4)`.
    pub fn for_module(self, prefix: &str) -> TargetSettings {
        self.for_target(Target::Module(prefix.to_string()))
    }

    /// Typed settings for every parameter whose name matches the glob `pattern`.
    pub fn for_pattern(self, pattern: &str) -> TargetSettings {
        self.for_target(Target::Pattern(pattern.to_string()))
    }

    /// Typed settings for the parameters of `target`.
    pub fn for_target(self, target: Target) -> TargetSettings {
        TargetSettings {
            overrides: self,
            target,
        }
    }

    /// Number of overrides.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// For each parameter, the `(field, value)` settings to apply in order (later ones win),
    /// starting with `optim_bits = 32` for a variable marked by [`crate::keep_32bit_state`].
    ///
    /// # Errors
    /// An override that matches no parameter, naming the closest names.
    pub(crate) fn resolve(&self, params: &[(String, Var)]) -> Result<Vec<Vec<(String, String)>>> {
        let candidates: Vec<Candidate<'_>> = params
            .iter()
            .map(|(name, var)| Candidate {
                name,
                var: Some(var),
                keep_32bit: crate::marks::keeps_32bit_state(var),
            })
            .collect();
        self.resolve_candidates(&candidates)
    }

    /// [`Self::resolve`] for parameters known by name only (a plan): `keep_32bit` stands for
    /// the embedding mark.
    ///
    /// # Errors
    /// As [`Self::resolve`]; an override for a [`Target::Var`], which no name can match.
    pub(crate) fn resolve_names(
        &self,
        params: &[(&str, bool)],
    ) -> Result<Vec<Vec<(String, String)>>> {
        let candidates: Vec<Candidate<'_>> = params
            .iter()
            .map(|&(name, keep_32bit)| Candidate {
                name,
                var: None,
                keep_32bit,
            })
            .collect();
        self.resolve_candidates(&candidates)
    }

    fn resolve_candidates(&self, params: &[Candidate<'_>]) -> Result<Vec<Vec<(String, String)>>> {
        for entry in &self.entries {
            if params.iter().any(|c| entry.target.matches(c.name, c.var)) {
                continue;
            }
            match &entry.target {
                Target::Var(_) => bail!(
                    "the override of {} for {} matches no parameter: that Var is not one of {}",
                    entry.field,
                    entry.target.describe(),
                    if params.iter().any(|c| c.var.is_some()) {
                        "this optimizer's"
                    } else {
                        "these (a plan knows parameters by name only)"
                    }
                ),
                Target::Name(s) | Target::Module(s) | Target::Pattern(s) => bail!(
                    "the override of {} for {} matches no parameter; closest names: {}",
                    entry.field,
                    entry.target.describe(),
                    closest_names(s, params.iter().map(|c| c.name), 3).join(", ")
                ),
            }
        }
        Ok(params
            .iter()
            .map(|c| {
                let mut matching: Vec<(usize, &Entry)> = self
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.target.matches(c.name, c.var))
                    .collect();
                let key = |e: &Entry| {
                    let prefix = match &e.target {
                        Target::Module(m) => m.len(),
                        _ => 0,
                    };
                    (e.target.rank(), prefix)
                };
                // Stable sort: among equal keys, insertion order is kept, so the last added wins.
                matching.sort_by_key(|(_, e)| key(e));
                // A variable marked for 32-bit state gets that first, so any override wins.
                let mark = c
                    .keep_32bit
                    .then(|| ("optim_bits".to_string(), "32".to_string()));
                mark.into_iter()
                    .chain(
                        matching
                            .into_iter()
                            .map(|(_, e)| (e.field.clone(), e.value.clone())),
                    )
                    .collect()
            })
            .collect())
    }
}

/// The `k` names closest to `wanted` (edit distance to the whole name or to one of its module
/// prefixes, so `model.embd` finds `model.embed.weight`).
fn closest_names<'a>(wanted: &str, names: impl Iterator<Item = &'a str>, k: usize) -> Vec<String> {
    let mut scored: Vec<(usize, &str)> = names
        .map(|name| {
            let prefixes = name
                .match_indices('.')
                .map(|(i, _)| &name[..i])
                .chain(std::iter::once(name));
            (
                prefixes
                    .map(|p| edit_distance(wanted, p))
                    .min()
                    .unwrap_or(usize::MAX),
                name,
            )
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(k)
        .map(|(_, n)| format!("{n:?}"))
        .collect()
}

/// Levenshtein distance over bytes.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (row[j + 1] + 1)
                .min(row[j] + 1)
                .min(diag + usize::from(ca != cb));
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        for (p, t, want) in [
            ("*.bias", "model.l0.bias", true),
            ("*.bias", "model.l0.bias_x", false),
            ("*norm*", "model.layernorm.weight", true),
            ("*norm*", "model.ln.weight", false),
            ("l?.weight", "l0.weight", true),
            ("l?.weight", "l10.weight", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), want, "{p} {t}");
        }
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("embd", "embed"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
