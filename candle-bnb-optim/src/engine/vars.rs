//! The variables an optimizer takes: from a `VarMap` in name order, float ones only, each once.

use candle_core::{bail, DType, Result, Var};

/// The variables of `varmap` with their names, sorted by name.
pub(crate) fn sorted_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// The floating-point vars among `vars` (integer ones are ignored, as in candle-nn).
///
/// # Errors
/// A name given twice, one var given under two names (it would be stepped twice, with two
/// states), or a float dtype the update kernels do not take (F64, F8 and the like: every step
/// would fail).
pub(crate) fn float_vars(vars: Vec<(String, Var)>) -> Result<Vec<(String, Var)>> {
    unique_names("parameter", vars.iter().map(|(name, _)| name.as_str()))?;
    let vars: Vec<(String, Var)> = vars
        .into_iter()
        .filter(|(_, v)| v.dtype().is_float())
        .collect();
    let mut ids = std::collections::HashMap::new();
    for (name, var) in &vars {
        if let Some(first) = ids.insert(var.id(), name.as_str()) {
            bail!("one parameter is given twice, as {first:?} and as {name:?}")
        }
    }
    steppable_dtypes(
        "parameter",
        vars.iter().map(|(name, var)| (name.as_str(), var.dtype())),
    )?;
    Ok(vars)
}

/// Refuses a name given twice; `what` names the kind of item in the error.
pub(crate) fn unique_names<'a>(what: &str, names: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !seen.insert(name) {
            bail!("{what} name {name:?} is given twice")
        }
    }
    Ok(())
}

/// Refuses a float dtype the update kernels do not take (F64, F8 and the like: every step would
/// fail); `what` names the kind of item in the error.
pub(crate) fn steppable_dtypes<'a>(
    what: &str,
    params: impl Iterator<Item = (&'a str, DType)>,
) -> Result<()> {
    for (name, dtype) in params {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!(
                "{what} {name:?} has dtype {dtype:?}; the optimizers step F32, F16 and BF16 parameters"
            )
        }
    }
    Ok(())
}
