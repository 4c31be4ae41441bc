//! Quantization maps: the 256 values an 8-bit code stands for.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use candle_core::{bail, Result};

use crate::lookup::CodeLookup;
use crate::midpoint::cmp_to_midpoint;

/// Number of entries in a quantization map (one per 8-bit code).
pub const QUANT_MAP_LEN: usize = 256;

/// Decade scales `10^-k` of the dynamic map, as Python computes `10 ** -k` (correctly rounded f64).
const DECADES: [f64; 8] = [1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7];

/// A quantization map: the 256 `f32` values that codes `0..=255` stand for, sorted ascending.
///
/// Blockwise quantization stores `x / absmax` as the index of the nearest map value (ties to the
/// even index), so a map fixes both the precision profile and the on-disk meaning of a code.
/// The dynamic maps equal bitsandbytes' maps bit for bit, so codes are interchangeable with it.
///
/// Besides the values, a map carries a lookup structure, built once at construction, that finds
/// the nearest code in a few instructions instead of a 256-way scan.
#[derive(Clone)]
pub struct QuantMap {
    values: [f32; QUANT_MAP_LEN],
    lookup: Arc<CodeLookup>,
}

impl QuantMap {
    /// bitsandbytes' signed dynamic map (`create_dynamic_map(signed=True)`, 7 exponent bits),
    /// used for first moments and momentum. Index 127 is `0.0`, index 255 is `1.0`.
    pub fn dynamic_signed() -> Self {
        Self::dynamic(true, 7, 8).expect("the default signed dynamic map parameters are valid")
    }

    /// bitsandbytes' unsigned dynamic map (`create_dynamic_map(signed=False)`), used for second
    /// moments. Index 0 is `0.0`, index 255 is `1.0`.
    pub fn dynamic_unsigned() -> Self {
        Self::dynamic(false, 7, 8).expect("the default unsigned dynamic map parameters are valid")
    }

    /// The general dynamic (exponent + fraction) map of bitsandbytes' `create_dynamic_map`.
    ///
    /// `max_exponent_bits` decades of `10^-k` scale a linear fraction whose resolution grows with
    /// the magnitude; maps with `total_bits < 8` are padded with zeros to 256 entries, as
    /// bitsandbytes does. Arithmetic is the f32 arithmetic of torch (fused `linspace`), so the
    /// result equals bitsandbytes' map bit for bit.
    ///
    /// # Errors
    /// `total_bits` outside `2..=8`, `max_exponent_bits` outside `1..=total_bits - 1`, and for an
    /// unsigned map any `max_exponent_bits` other than `total_bits - 1` (bitsandbytes' construction
    /// does not produce `2^total_bits` values for those).
    pub fn dynamic(signed: bool, max_exponent_bits: usize, total_bits: usize) -> Result<Self> {
        if !(2..=8).contains(&total_bits) {
            bail!("dynamic quantization map: total_bits must be in 2..=8, got {total_bits}")
        }
        let non_sign_bits = total_bits - 1;
        if !(1..=non_sign_bits).contains(&max_exponent_bits) {
            bail!(
                "dynamic quantization map: max_exponent_bits must be in 1..={non_sign_bits} for \
                 total_bits={total_bits}, got {max_exponent_bits}"
            )
        }
        if !signed && max_exponent_bits != non_sign_bits {
            bail!(
                "unsigned dynamic quantization map: max_exponent_bits must equal total_bits - 1 \
                 ({non_sign_bits}) to give 2^{total_bits} values, got {max_exponent_bits}"
            )
        }
        let fraction_bits = non_sign_bits - max_exponent_bits;
        let mut data: Vec<f32> = Vec::with_capacity(QUANT_MAP_LEN);
        for i in 0..max_exponent_bits {
            let items = if signed {
                (1usize << (i + fraction_bits)) + 1
            } else {
                (1usize << (i + fraction_bits + 1)) + 1
            };
            let scale = DECADES[max_exponent_bits - 1 - i] as f32;
            push_scaled_means(&mut data, items, scale, signed);
        }
        let additional_items = (1usize << fraction_bits) - 1;
        if additional_items > 0 {
            // bitsandbytes reuses the last decade (10^0) for the items of an all-zero exponent.
            push_scaled_means(&mut data, additional_items + 1, 1.0, signed);
        }
        data.push(0.0);
        data.push(1.0);
        if data.len() != 1 << total_bits {
            bail!(
                "dynamic quantization map: built {} values for total_bits={total_bits}, expected {}",
                data.len(),
                1usize << total_bits
            )
        }
        data.resize(QUANT_MAP_LEN, 0.0);
        data.sort_by(f32::total_cmp);
        let mut values = [0f32; QUANT_MAP_LEN];
        values.copy_from_slice(&data);
        Self::from_values(&values)
    }

    /// Symmetric absmax int8 ("linear"): code `i` stands for `(i - 128) / 127`, so codes
    /// `1..=255` cover `-1..=1` in steps of `1/127` and `x / absmax` rounds to the nearest step.
    /// Code 0 (`-128/127`) lies outside `[-1, 1]` and is never produced by quantization.
    pub fn linear_signed() -> Self {
        let values = std::array::from_fn(|i| (i as f32 - 128.0) / 127.0);
        Self::from_values(&values).expect("the linear map is finite and sorted")
    }

    /// A map from explicit values.
    ///
    /// # Errors
    /// A value that is not finite, or values not sorted ascending (equal neighbours are allowed);
    /// the message names the first offending index and value.
    pub fn from_values(values: &[f32; QUANT_MAP_LEN]) -> Result<Self> {
        if let Some((i, v)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            bail!("quantization map value at index {i} is not finite: {v}")
        }
        if let Some(i) = (1..QUANT_MAP_LEN).find(|&i| values[i - 1] > values[i]) {
            bail!(
                "quantization map is not sorted ascending: index {} = {:e} > index {i} = {:e}",
                i - 1,
                values[i - 1],
                values[i]
            )
        }
        Ok(Self {
            values: *values,
            lookup: Arc::new(CodeLookup::new(values)),
        })
    }

    /// The 256 values, indexed by code.
    pub fn values(&self) -> &[f32; QUANT_MAP_LEN] {
        &self.values
    }

    /// The code of the value nearest to `y` by brute force over all 256 values, in exact
    /// arithmetic; among equally near values the lowest even index wins.
    ///
    /// This is the definition every fast path is tested against; it is slow (256 comparisons).
    /// `y` must not be NaN (NaN is nearest to nothing; this returns 0 for it).
    pub fn nearest_code(&self, y: f32) -> u8 {
        let v = &self.values;
        let mut best = 0usize;
        for k in 1..QUANT_MAP_LEN {
            match cmp_distance(y, v[k], v[best]) {
                Ordering::Less => best = k,
                Ordering::Equal if best % 2 == 1 && k % 2 == 0 => best = k,
                _ => {}
            }
        }
        best as u8
    }

    pub(crate) fn lookup(&self) -> &CodeLookup {
        &self.lookup
    }
}

impl PartialEq for QuantMap {
    /// Maps are equal when their values are equal bit for bit.
    fn eq(&self, other: &Self) -> bool {
        self.values
            .iter()
            .zip(other.values.iter())
            .all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl fmt::Debug for QuantMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = &self.values;
        write!(
            f,
            "QuantMap([{:e}, {:e}, ..., {:e}, {:e}])",
            v[0], v[1], v[254], v[255]
        )
    }
}

/// Appends `scale * midpoints(linspace(0.1, 1, items))` (and its negation when `signed`) in f32.
fn push_scaled_means(data: &mut Vec<f32>, items: usize, scale: f32, signed: bool) {
    let bounds = torch_linspace_f32(0.1, 1.0, items);
    for w in bounds.windows(2) {
        let mean = (w[0] + w[1]) / 2.0;
        data.push(scale * mean);
    }
    if signed {
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(-scale * mean);
        }
    }
}

/// `torch.linspace(start, end, steps)` in f32 as torch's vectorised x86 kernel computes it: the
/// first half fused from `start`, the second half fused backwards from `end`.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Orders `|y - a|` against `|y - b|` exactly.
fn cmp_distance(y: f32, a: f32, b: f32) -> Ordering {
    match a.partial_cmp(&b) {
        Some(Ordering::Less) => cmp_to_midpoint(y, a, b),
        Some(Ordering::Greater) => cmp_to_midpoint(y, b, a).reverse(),
        _ => Ordering::Equal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symmetric_pair_without_zero_is_decided_by_sign() {
        let mut values = [0f32; QUANT_MAP_LEN];
        for (i, v) in values.iter_mut().enumerate() {
            *v = (i as f32 - 127.5) / 128.0;
        }
        let map = QuantMap::from_values(&values).unwrap();
        assert_eq!(map.nearest_code(1e-30), 128);
        assert_eq!(map.nearest_code(-1e-30), 127);
        // Exactly between index 127 and 128: the even index wins.
        assert_eq!(map.nearest_code(0.0), 128);
        assert_eq!(map.nearest_code(-0.0), 128);
    }

    #[test]
    fn duplicate_values_prefer_lowest_even_index() {
        let mut values = [1f32; QUANT_MAP_LEN];
        for (i, v) in values.iter_mut().enumerate().take(5) {
            *v = [-1.0, -0.5, 0.0, 0.0, 0.0][i];
        }
        // indices 2,3,4 are 0.0; 5.. are 1.0
        let map = QuantMap::from_values(&values).unwrap();
        assert_eq!(map.nearest_code(0.0), 2);
        assert_eq!(map.nearest_code(0.9), 6);
        assert_eq!(map.nearest_code(-0.75), 0);
    }

    #[test]
    fn rejects_unsorted_and_non_finite() {
        let mut values = *QuantMap::dynamic_signed().values();
        values.swap(10, 11);
        let err = QuantMap::from_values(&values).unwrap_err().to_string();
        assert!(err.contains("index 10"), "{err}");
        let mut values = *QuantMap::dynamic_signed().values();
        values[200] = f32::NAN;
        let err = QuantMap::from_values(&values).unwrap_err().to_string();
        assert!(err.contains("index 200"), "{err}");
    }

    #[test]
    fn dynamic_rejects_bad_parameters() {
        assert!(QuantMap::dynamic(true, 0, 8).is_err());
        assert!(QuantMap::dynamic(true, 8, 8).is_err());
        assert!(QuantMap::dynamic(true, 3, 9).is_err());
        assert!(QuantMap::dynamic(false, 5, 8)
            .unwrap_err()
            .to_string()
            .contains("max_exponent_bits"));
        // Smaller maps are padded with zeros, as bitsandbytes does.
        let m = QuantMap::dynamic(true, 3, 4).unwrap();
        assert_eq!(m.values().iter().filter(|v| **v == 0.0).count(), 256 - 15);
        let m = QuantMap::dynamic(true, 4, 8).unwrap();
        assert_eq!(m.values()[255], 1.0);
    }

    #[test]
    fn linear_map_steps_by_one_127th() {
        let m = QuantMap::linear_signed();
        assert_eq!(m.values()[128], 0.0);
        assert_eq!(m.values()[255], 1.0);
        assert_eq!(m.values()[1], -1.0);
        for k in -127i32..=127 {
            assert_eq!(m.nearest_code(k as f32 / 127.0) as i32, k + 128);
        }
        assert_eq!(m.nearest_code(-1.0), 1);
    }
}
