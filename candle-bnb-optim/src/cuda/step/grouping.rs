//! Parameters in groups that one launch steps together.

use candle_core::{DType, Result};

use super::device_state::DeviceState;
use super::CudaParam;
use candle_bnb_kernels::cuda::{quant_table_bytes, Backend, QUANT_TABLE_BYTES};
use candle_bnb_kernels::slot_table::F32_TILE_BLOCK;

/// Parameters stepped by one launch: same dtype, state precision, state count, block size and
/// maps.
pub(super) struct Group<B: Backend> {
    pub(super) dtype: DType,
    pub(super) quantized: bool,
    pub(super) n_states: usize,
    pub(super) block_size: usize,
    pub(super) members: Vec<usize>,
    /// The `QuantTable` of each state, in state order (8-bit groups only).
    pub(super) tables: Option<B::Buffer<u8>>,
    /// `2 * blocks` f64 for the layer-wise first pass, allocated on the first layer-wise step.
    pub(super) partials: Option<B::Buffer<f64>>,
    pub(super) total_blocks: usize,
}

/// Parameters in groups of one launch each, in parameter order within a group.
pub(super) fn group_params<B: Backend>(
    dev: &B,
    params: &[CudaParam<'_>],
    states: &[DeviceState<B>],
) -> Result<Vec<Group<B>>> {
    let mut groups: Vec<Group<B>> = Vec::new();
    for (i, (p, state)) in params.iter().zip(states).enumerate() {
        let (quantized, n_states, block_size, maps) = match state {
            // Stepped one by one (factored.cu), not in groups.
            DeviceState::Factored(_) => continue,
            DeviceState::F32(d) => (false, d.len(), F32_TILE_BLOCK, &[][..]),
            DeviceState::Blockwise {
                codes,
                maps,
                block_size,
                ..
            } => (true, codes.len(), *block_size, &maps[..]),
        };
        let dtype = p.param.dtype();
        let found = groups.iter().position(|g| {
            g.dtype == dtype
                && g.quantized == quantized
                && g.n_states == n_states
                && g.block_size == block_size
                && match (&states[g.members[0]], state) {
                    (
                        DeviceState::Blockwise { maps: a, .. },
                        DeviceState::Blockwise { maps: b, .. },
                    ) => a.iter().zip(b).all(|(a, b)| a.values() == b.values()),
                    _ => true,
                }
        });
        let blocks = p.param.elem_count().div_ceil(block_size);
        let g = match found {
            Some(g) => g,
            None => {
                let tables = if quantized && n_states > 0 {
                    let mut bytes = Vec::with_capacity(n_states * QUANT_TABLE_BYTES);
                    for m in maps {
                        bytes.extend(quant_table_bytes(m));
                    }
                    Some(dev.upload(&bytes)?)
                } else {
                    None
                };
                groups.push(Group {
                    dtype,
                    quantized,
                    n_states,
                    block_size,
                    members: Vec::new(),
                    tables,
                    partials: None,
                    total_blocks: 0,
                });
                groups.len() - 1
            }
        };
        groups[g].members.push(i);
        groups[g].total_blocks += blocks;
    }
    Ok(groups)
}
