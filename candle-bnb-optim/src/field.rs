//! The text form of config fields, as checkpoints store them and
//! [`OptimizerConfig::set_field`](crate::OptimizerConfig::set_field) reads them.

use std::fmt::Display;
use std::str::FromStr;

use candle_core::Result;

/// A config field that reads and writes its value as text; `f64` values round-trip exactly.
pub trait FieldText {
    /// The value as text (read back exactly by [`FieldText::set_text`]).
    fn to_text(&self) -> String;
    /// Sets the value of the field `name` from `value`.
    ///
    /// # Errors
    /// `value` does not parse as the field's type (the message names the field).
    fn set_text(&mut self, name: &str, value: &str) -> Result<()>;
}

/// Parses `value` for the field `name`.
fn parse<T: FromStr>(name: &str, value: &str) -> Result<T>
where
    T::Err: Display,
{
    value.trim().parse().map_err(|e| {
        candle_core::Error::Msg(format!(
            "field {name}: cannot parse {value:?} as {}: {e}",
            std::any::type_name::<T>()
        ))
    })
}

/// The numbers and flags of configs: their `Display` and `FromStr` forms.
trait Plain: Display + FromStr<Err: Display> {}

impl Plain for f64 {}
impl Plain for bool {}
impl Plain for u32 {}
impl Plain for u64 {}
impl Plain for usize {}

impl<T: Plain> FieldText for T {
    fn to_text(&self) -> String {
        self.to_string()
    }

    fn set_text(&mut self, name: &str, value: &str) -> Result<()> {
        *self = parse(name, value)?;
        Ok(())
    }
}

/// `none` or the value.
impl<T: Plain> FieldText for Option<T> {
    fn to_text(&self) -> String {
        match self {
            Some(v) => v.to_string(),
            None => "none".to_string(),
        }
    }

    fn set_text(&mut self, name: &str, value: &str) -> Result<()> {
        *self = match value.trim() {
            "none" => None,
            v => Some(parse(name, v)?),
        };
        Ok(())
    }
}

/// Comma-separated values, as `1e-30,0.001`.
fn tuple_text(values: &[f64]) -> String {
    values
        .iter()
        .map(f64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The `N` comma-separated values of the field `name`.
fn parse_tuple<const N: usize>(name: &str, value: &str) -> Result<[f64; N]> {
    let parts: Vec<&str> = value.split(',').collect();
    if parts.len() != N {
        candle_core::bail!("field {name}: expected {N} comma-separated numbers, got {value:?}")
    }
    let mut out = [0f64; N];
    for (o, part) in out.iter_mut().zip(parts) {
        *o = parse(name, part)?;
    }
    Ok(out)
}

/// Two values, `a,b` (Adafactor's and CAME's `eps`).
impl FieldText for (f64, f64) {
    fn to_text(&self) -> String {
        tuple_text(&[self.0, self.1])
    }

    fn set_text(&mut self, name: &str, value: &str) -> Result<()> {
        let [a, b] = parse_tuple(name, value)?;
        *self = (a, b);
        Ok(())
    }
}

/// Three values, `a,b,c` (CAME's `betas`).
impl FieldText for (f64, f64, f64) {
    fn to_text(&self) -> String {
        tuple_text(&[self.0, self.1, self.2])
    }

    fn set_text(&mut self, name: &str, value: &str) -> Result<()> {
        let [a, b, c] = parse_tuple(name, value)?;
        *self = (a, b, c);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NonFinitePolicy;

    #[test]
    fn every_kind_of_field_round_trips_its_text() {
        let mut x = 0.1f64 + 0.2;
        let text = x.to_text();
        x.set_text("x", "1").unwrap();
        x.set_text("x", &text).unwrap();
        assert_eq!(x, 0.1 + 0.2);
        let mut steps: Option<u64> = Some(7);
        steps.set_text("t", "none").unwrap();
        assert_eq!(steps, None);
        steps.set_text("t", " 12 ").unwrap();
        assert_eq!((steps, steps.to_text()), (Some(12), "12".to_string()));
        let mut policy = NonFinitePolicy::Skip;
        policy.set_text("non_finite", "error").unwrap();
        assert_eq!(policy.to_text(), "error");
        let err = policy.set_text("non_finite", "ignore").unwrap_err();
        assert!(err.to_string().contains("\"ignore\""), "{err}");
        let mut flag = false;
        let err = flag.set_text("nesterov", "yes").unwrap_err().to_string();
        assert!(err.contains("nesterov") && err.contains("\"yes\""), "{err}");
        assert!(!flag);
    }
}
