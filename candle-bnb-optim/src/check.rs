//! Range checks shared by the configs' `validate`; each error names the field and its value.

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

/// A regulariser added before a division by a square root (Adafactor's and CAME's `eps`): 0
/// would give `0·inf = NaN` for an all-zero row or column, silently (the reference
/// implementations do not guard it; the gradient check cannot see it).
pub(crate) fn positive(name: &str, value: f64) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        bail!(
            "{name} must be finite and > 0, got {value}: with 0 an all-zero row or column of the statistics gives 0/0 = NaN"
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

/// SGD's momentum settings (SGD's and LARS'): `momentum >= 0`, `dampening` in `[0, 1]`, and
/// Nesterov only with momentum and no dampening (as torch).
pub(crate) fn momentum(momentum: f64, dampening: f64, nesterov: bool) -> Result<()> {
    non_negative("momentum", momentum)?;
    closed_unit_interval("dampening", dampening)?;
    if nesterov && (momentum == 0.0 || dampening != 0.0) {
        bail!(
            "nesterov needs momentum > 0 and dampening == 0, got momentum {momentum} and dampening {dampening}"
        )
    }
    Ok(())
}

/// The moment averages of the Adam family: `beta1` and `beta2` in `[0, 1)`, `eps` > 0.
pub(crate) fn moments(beta1: f64, beta2: f64, eps: f64) -> Result<()> {
    unit_interval("beta1", beta1)?;
    unit_interval("beta2", beta2)?;
    positive_eps(eps)
}
