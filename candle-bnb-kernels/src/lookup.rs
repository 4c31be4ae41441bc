//! Fast nearest-code search for a quantization map.
//!
//! Nearest-value quantization is a step function of `y`: the code changes only at the midpoints
//! between neighbouring distinct map values. [`CodeLookup`] precomputes, for every such boundary,
//! the first f32 that lands on its upper side (ties to the even index already decided), so a
//! single `y >= threshold` comparison is exact.
//!
//! To avoid a binary search per element, the f32 bit pattern of `|y|` (monotonic in `|y|`) is cut
//! into buckets narrow enough that each holds at most one boundary; a bucket stores the code below
//! and above its boundary. Encoding is then: bucket index from the bits, one table read, one
//! compare. Maps whose boundaries are too dense for a table of bounded size keep the binary search.

use crate::midpoint::first_above_midpoint;

/// Largest bucket table (entries over both signs) worth building: 16 Ki entries, 64 KiB.
const MAX_TABLE_ENTRIES: u32 = 1 << 14;
const ONE_BITS: u32 = 0x3F80_0000;

/// Code boundaries of a map plus, when it fits, the bucket table that finds them quickly.
#[derive(Debug)]
pub(crate) struct CodeLookup {
    /// `thresholds[r]` is the first f32 whose code is `region_codes[r + 1]`; strictly increasing.
    thresholds: Vec<f32>,
    /// Code of each region between consecutive thresholds; one more entry than `thresholds`.
    region_codes: Vec<u8>,
    table: Option<BucketTable>,
}

/// Buckets over the f32 bits of `|y|` for `|y| <= 1`, one half per sign.
///
/// Each entry packs `code_below | code_above << 8 | key << 16`. The key is the bucket's boundary
/// as the offset of `|threshold|`'s bits from the bucket's first magnitude, stored as
/// `0xFFFF - offset` on the negative side, where larger magnitudes mean smaller `y`: with the
/// input's offset flipped the same way (`within ^ 0xFFFF`), "`y` is on or above the boundary" is
/// `within >= key` on both sides. One table read per element (gathers are the costly part of the
/// SIMD paths), then one integer compare.
#[derive(Debug)]
pub(crate) struct BucketTable {
    /// Bits of the magnitude where bucket 0 starts; smaller magnitudes count as offset 0 of
    /// bucket 0. Every nonzero boundary lies above it, so those tiny inputs stay on one side.
    pub(crate) base: u32,
    /// log2 of the bucket width in magnitude bits; at most 16 so offsets fit in 16 bits.
    pub(crate) shift: u32,
    /// Buckets per sign; negative `y` use entries `n_buckets..2 * n_buckets`.
    pub(crate) n_buckets: u32,
    pub(crate) entries: Vec<u32>,
}

impl CodeLookup {
    pub(crate) fn new(values: &[f32]) -> Self {
        // Runs of equal values ("clusters") share one distance; the lowest even index of a run wins.
        let mut clusters: Vec<(usize, usize)> = Vec::new();
        let mut start = 0;
        for i in 1..=values.len() {
            if i == values.len() || values[i] != values[start] {
                clusters.push((start, i - 1));
                start = i;
            }
        }
        let choice = |(first, last): (usize, usize)| -> u8 {
            if first % 2 == 0 || first == last {
                first as u8
            } else {
                (first + 1) as u8
            }
        };
        let mut thresholds = Vec::with_capacity(clusters.len() - 1);
        let mut region_codes = Vec::with_capacity(clusters.len());
        region_codes.push(choice(clusters[0]));
        for w in clusters.windows(2) {
            let (lower, upper) = (w[0], w[1]);
            // On an exact midpoint both runs are nearest: the union's lowest even index wins,
            // which is the upper run's choice only when the lower run is a single odd index.
            let tie_up = lower.0 % 2 == 1 && lower.0 == lower.1;
            thresholds.push(first_above_midpoint(
                values[lower.0],
                values[upper.0],
                tie_up,
            ));
            region_codes.push(choice(upper));
        }
        let table = BucketTable::build(&thresholds, &region_codes);
        Self {
            thresholds,
            region_codes,
            table,
        }
    }

    /// The nearest code by binary search over the boundaries (the scalar fallback path).
    #[inline]
    pub(crate) fn code_by_search(&self, y: f32) -> u8 {
        self.region_codes[self.thresholds.partition_point(|&t| t <= y)]
    }

    /// The code boundaries, ascending: `thresholds()[r]` is the first f32 of region `r + 1`.
    #[cfg_attr(not(any(feature = "cuda", feature = "emulator")), allow(dead_code))]
    pub(crate) fn thresholds(&self) -> &[f32] {
        &self.thresholds
    }

    /// The code of each region between boundaries (one more than the boundaries).
    #[cfg_attr(not(any(feature = "cuda", feature = "emulator")), allow(dead_code))]
    pub(crate) fn region_codes(&self) -> &[u8] {
        &self.region_codes
    }

    /// The bucket table, when the map's boundaries allow one of bounded size.
    pub(crate) fn table(&self) -> Option<&BucketTable> {
        self.table.as_ref()
    }
}

impl BucketTable {
    fn build(thresholds: &[f32], region_codes: &[u8]) -> Option<Self> {
        let min_magnitude = thresholds
            .iter()
            .map(|t| t.abs())
            .filter(|m| *m <= 1.0)
            .fold(1.0f32, f32::min);
        // One binade below the smallest boundary, so that boundary's offset is nonzero; a zero
        // boundary (a map symmetric about 0 without 0 in it) needs exact offsets down to 0.
        let base = if min_magnitude == 0.0 {
            0
        } else {
            (min_magnitude.to_bits() & 0xFF80_0000).saturating_sub(1 << 23)
        };
        for shift in (0..=16).rev() {
            let n_buckets = ((ONE_BITS - base) >> shift) + 1;
            if 2 * n_buckets > MAX_TABLE_ENTRIES {
                return None;
            }
            if let Some(table) = Self::try_build(thresholds, region_codes, base, shift, n_buckets) {
                return Some(table);
            }
        }
        None
    }

    fn try_build(
        thresholds: &[f32],
        region_codes: &[u8],
        base: u32,
        shift: u32,
        n_buckets: u32,
    ) -> Option<Self> {
        let mut entries = Vec::with_capacity(2 * n_buckets as usize);
        for negative in [false, true] {
            for b in 0..n_buckets {
                let start_bits = base + (b << shift);
                let lo_bits = if b == 0 { 0 } else { start_bits };
                let hi_bits = if b + 1 == n_buckets {
                    ONE_BITS
                } else {
                    start_bits + (1 << shift) - 1
                };
                let (lo_mag, hi_mag) = (f32::from_bits(lo_bits), f32::from_bits(hi_bits));
                let (y_lo, y_hi) = if negative {
                    (-hi_mag, -lo_mag)
                } else {
                    (lo_mag, hi_mag)
                };
                let r_lo = thresholds.partition_point(|&t| t <= y_lo);
                let r_hi = thresholds.partition_point(|&t| t <= y_hi);
                if r_hi - r_lo > 1 {
                    return None;
                }
                let below = region_codes[r_lo] as u32;
                let above = region_codes[r_hi] as u32;
                let key = if r_hi > r_lo {
                    let offset = thresholds[r_lo].abs().to_bits().checked_sub(start_bits)?;
                    if negative {
                        0xFFFF - offset
                    } else {
                        offset
                    }
                } else {
                    0
                };
                entries.push(below | above << 8 | key << 16);
            }
        }
        Some(Self {
            base,
            shift,
            n_buckets,
            entries,
        })
    }

    /// The nearest code of `y` (`|y| <= 1`): the portable fast path, and the lane-by-lane model
    /// of the SIMD paths.
    #[inline(always)]
    pub(crate) fn code(&self, y: f32) -> u8 {
        let bits = y.to_bits();
        let magnitude = bits & 0x7FFF_FFFF;
        let offset = magnitude.max(self.base) - self.base;
        // Magnitudes above 1 cannot occur (|x| <= absmax); clamping keeps the read in bounds.
        let bucket = (offset >> self.shift).min(self.n_buckets - 1);
        let sign = bits >> 31;
        let entry = self.entries[(bucket + sign * self.n_buckets) as usize];
        let within = (offset & ((1 << self.shift) - 1)) ^ (sign * 0xFFFF);
        let above = (within >= entry >> 16) as u32;
        (entry >> (above << 3)) as u8
    }
}

#[cfg(test)]
mod tests {
    use crate::QuantMap;
    use rand::{Rng, SeedableRng};

    /// Inputs that sit on, just below and just above every boundary, plus random ones.
    fn probe_inputs(map: &QuantMap, rng: &mut impl Rng) -> Vec<f32> {
        let mut ys = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            -1e-30,
            1e-30,
            1e-45,
        ];
        for &t in &map.lookup().thresholds {
            if t.abs() <= 1.0 {
                ys.extend([t, t.next_up(), t.next_down()]);
            }
        }
        for &v in map.values() {
            if v.abs() <= 1.0 {
                ys.extend([v, v.next_up(), v.next_down()]);
            }
        }
        for _ in 0..20_000 {
            let y: f32 = rng.random_range(-1.0..=1.0);
            ys.push(y);
            ys.push(y * 1e-6);
        }
        ys.retain(|y| y.abs() <= 1.0);
        ys
    }

    fn check_map(map: &QuantMap, expect_table: bool) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let lookup = map.lookup();
        assert_eq!(lookup.table().is_some(), expect_table);
        for y in probe_inputs(map, &mut rng) {
            let want = map.nearest_code(y);
            assert_eq!(
                lookup.code_by_search(y),
                want,
                "search, y = {y:e} ({:#x})",
                y.to_bits()
            );
            if let Some(t) = lookup.table() {
                assert_eq!(t.code(y), want, "table, y = {y:e} ({:#x})", y.to_bits());
            }
        }
    }

    #[test]
    fn builtin_maps_match_brute_force_on_every_boundary() {
        check_map(&QuantMap::dynamic_signed(), true);
        check_map(&QuantMap::dynamic_unsigned(), true);
        check_map(&QuantMap::linear_signed(), true);
        check_map(&QuantMap::dynamic(true, 4, 8).unwrap(), true);
        check_map(&QuantMap::dynamic(true, 3, 4).unwrap(), true);
    }

    #[test]
    fn dense_map_falls_back_to_search() {
        // 256 values packed into [0.5, 0.5 + 255 ulp]: no bounded table separates them.
        let values = std::array::from_fn(|i| f32::from_bits(0.5f32.to_bits() + i as u32));
        check_map(&QuantMap::from_values(&values).unwrap(), false);
    }

    #[test]
    fn random_maps_match_brute_force() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..4 {
            let mut values: [f32; crate::QUANT_MAP_LEN] =
                std::array::from_fn(|_| rng.random_range(-1.0f32..=1.0));
            // A few duplicates exercise the run rules.
            values[17] = values[18];
            values[100] = 0.0;
            values[101] = 0.0;
            values.sort_by(f32::total_cmp);
            let map = QuantMap::from_values(&values).unwrap();
            let has_table = map.lookup().table().is_some();
            check_map(&map, has_table);
        }
    }
}
