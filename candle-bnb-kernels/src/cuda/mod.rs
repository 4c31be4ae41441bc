//! The CUDA kernels' host side, stateless: one device interface ([`Backend`]) with a GPU
//! implementation ([`CudaDriver`], the `cuda` feature: PTX compiled from `kernels/*.cu` by the
//! build script, embedded here and loaded through Candle's `CudaDevice` on first use) and an
//! emulated one (`emulator` feature: the same kernel files compiled for the CPU, `emu/`); the
//! blockwise quantization launches; the optimizer-step launches with typed arguments
//! ([`launch_prepass`], [`launch_update`]), whose tables [`crate::slot_table`] lays out. The
//! state those launches step lives in `candle-bnb-optim`. Each `.cu` file mirrors a CPU module
//! (see `kernels/README.md`).

pub use backend::{Backend, Element, KernelArg, Module};
#[cfg(feature = "cuda")]
pub use driver::CudaDriver;
pub use factored::{launch_factored, FactoredLaunch};
pub use launch::{launch_prepass, launch_update, PrepassLaunch, UpdateLaunch};

pub(crate) mod backend;
#[cfg(feature = "cuda")]
pub(crate) mod driver;
#[cfg(feature = "emulator")]
pub(crate) mod emulator;
pub(crate) mod factored;
pub(crate) mod launch;
pub(crate) mod quantize;

use crate::QuantMap;

/// Threads per CUDA block of every kernel (the kernels' `kThreads`).
pub(crate) const THREADS: u32 = 256;
/// Most CUDA blocks a grid-stride launch uses: enough to fill any current GPU several times.
pub(crate) const MAX_GRID: u64 = 8192;

/// Bytes of one `QuantTable` (`kernels/lookup.cuh`).
pub const QUANT_TABLE_BYTES: usize = 2304;

/// `map` in the layout of `kernels/lookup.cuh`'s `QuantTable`: the 256 values, the code
/// boundaries padded with +inf to 256, and the region codes padded with the last one.
pub fn quant_table_bytes(map: &QuantMap) -> Vec<u8> {
    let lookup = map.lookup();
    let (thresholds, region_codes) = (lookup.thresholds(), lookup.region_codes());
    let mut bytes = Vec::with_capacity(QUANT_TABLE_BYTES);
    bytes.extend(map.values().iter().flat_map(|v| v.to_le_bytes()));
    bytes.extend(
        (0..crate::QUANT_MAP_LEN)
            .map(|i| thresholds.get(i).copied().unwrap_or(f32::INFINITY))
            .flat_map(f32::to_le_bytes),
    );
    let last = *region_codes.last().unwrap_or(&0);
    bytes.extend((0..crate::QUANT_MAP_LEN).map(|i| region_codes.get(i).copied().unwrap_or(last)));
    debug_assert_eq!(bytes.len(), QUANT_TABLE_BYTES);
    bytes
}

/// CUDA blocks for a grid-stride loop over `units` units of `per_block` each.
pub(crate) fn grid(units: u64, per_block: u64) -> u32 {
    units.div_ceil(per_block).clamp(1, MAX_GRID) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quant_tables_follow_the_kernels_layout() {
        for map in [QuantMap::dynamic_signed(), QuantMap::linear_signed()] {
            let bytes = quant_table_bytes(&map);
            assert_eq!(bytes.len(), QUANT_TABLE_BYTES);
            let f =
                |offset: usize| f32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
            assert_eq!(f(0), map.values()[0]);
            assert_eq!(f(1020), map.values()[255]);
            let lookup = map.lookup();
            let n = lookup.thresholds().len();
            assert_eq!(f(1024), lookup.thresholds()[0]);
            assert_eq!(f(1024 + 4 * 255), f32::INFINITY);
            assert_eq!(&bytes[2048..2048 + n + 1], lookup.region_codes());
            // The kernels' search: the count of thresholds <= y indexes the region codes.
            for y in [-1.0f32, -0.3, 0.0, 1e-7, 0.5, 1.0] {
                let table: Vec<f32> = (0..256).map(|i| f(1024 + 4 * i)).collect();
                let mut count = 0;
                let mut step = 128;
                while step >= 1 {
                    if table[count + step - 1] <= y {
                        count += step;
                    }
                    step /= 2;
                }
                assert_eq!(bytes[2048 + count], map.nearest_code(y), "y = {y}");
            }
        }
    }
}
