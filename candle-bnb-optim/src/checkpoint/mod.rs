//! Optimizer checkpoints: the whole state of an optimizer in one safetensors file.
//!
//! Written by `save` on every optimizer (e.g. [`AdamW8bit::save`](crate::AdamW8bit::save)) and
//! read back by `load`. Parameters are keyed by their position `i`, never by their name, so no
//! name can collide with another entry. For parameter `i` the file holds the tensors
//!
//! - `param.{i}.state{k}`: f32 state `k`, one value per element (32-bit state), or
//!   `param.{i}.state{k}.codes` (U8, one per element), `param.{i}.state{k}.absmax` (F32, one per
//!   block) and `param.{i}.state{k}.map` (F32, the 256 map values) for 8-bit state;
//! - `param.{i}.grad_norms` (F64): the percentile-clipping history, oldest first;
//! - for factored optimizers (Adafactor, CAME), whose `state0` is the momentum (when they keep
//!   one): `param.{i}.stat.{name}` (F32), each second-moment statistic, named as
//!   `candle_bnb_kernels::Factoring::stats` names them (`row`, `col`, `res_row`, `res_col`, or
//!   `full`), listed in the metadata `param.{i}.stats` (comma-separated);
//!
//! and as safetensors metadata: `format` ([`FORMAT`]), `version` ([`VERSION`]), `kind` (the
//! optimizer family, e.g. `AdamW` for `AdamW` and `AdamW8bit`), `steps`, `skipped`, `params`
//! (the count), `param.{i}.name` (its `VarMap` name, the name given to `new_named`, or `"i"`
//! for `Optimizer::new`), `param.{i}.shape`, `param.{i}.dtype`, `param.{i}.steps` (the steps
//! this parameter took), `param.{i}.states` (`f32:K` or `8bit:K`), `param.{i}.block_size`,
//! `param.{i}.overrides` (the [`crate::Overrides`] settings that apply to it,
//! `field=value;...`: loading with other overrides is an error naming the parameter),
//! `config.FIELD` for every field of the base config, `optimizer.initial_lr`, and checksums
//! (XXH3-64 with seed 0, as 16 lower-case hex digits): `checksum.TENSOR` of each tensor's
//! bytes, and `checksum.metadata` of the text made of every other metadata entry, sorted by key,
//! as `key 0x00 value 0x00`, then one `0x00`, then each tensor, sorted by name, as
//! `name 0x00 DTYPE[shape] 0x00` (safetensors' dtype name, e.g. `F32[90]`).
//!
//! Saving is atomic: the file is written under a temporary name in the same folder, flushed to
//! disk (fsync), then renamed over `path`, so a crash leaves either the old file or the new one.
//!
//! Loading reads and checks everything before it changes anything, and either restores exactly
//! what was saved or refuses with an error naming the file and what is wrong: any corrupted
//! byte of metadata or tensor data fails its checksum; a tensor that is missing, unexpected, or
//! of another dtype or size, a state value that is not finite (or negative where the state
//! cannot be, such as a second moment), a quantization map that is not the one the state uses,
//! a config field that is missing, and step counts beyond 2^53 ([`MAX_STEPS`]) are refused.

mod load;
mod save;

pub(crate) use load::load;
pub(crate) use save::save;

use std::collections::HashMap;

use safetensors::tensor::Dtype;

use candle_bnb_kernels::{BlockwiseState, Momentum, ParamState};

use crate::engine::TrackedState;

/// The `format` metadata value of every checkpoint.
pub const FORMAT: &str = "candle-bnb-optimizer";
/// The checkpoint format version this build writes and reads.
pub const VERSION: u32 = 2;
/// The largest step (or skipped-step) count a checkpoint may hold: 2^53, beyond which counts
/// are no longer exact as f64 and which a step of one microsecond would take 285 years to
/// reach. Larger counts can only come from a damaged file, and would overflow.
pub const MAX_STEPS: u64 = 1 << 53;

/// A checkpoint read and checked against an optimizer's parameters.
pub(crate) struct Loaded {
    /// What the tracked parameters get back.
    pub(crate) state: TrackedState,
    pub(crate) config: Vec<(String, String)>,
    /// Metadata the optimizer itself wrote (`save`'s `extra`).
    pub(crate) extra: HashMap<String, String>,
}

/// The buffers of one value per element of a state: its states, or a factored state's momentum.
enum Buffers<'a> {
    F32(Vec<&'a [f32]>),
    Blockwise(Vec<&'a BlockwiseState>),
}

impl<'a> Buffers<'a> {
    fn of(state: &'a ParamState) -> Self {
        match state {
            ParamState::F32(s) => Self::F32(s.iter().map(Vec::as_slice).collect()),
            ParamState::Blockwise(s) => Self::Blockwise(s.iter().collect()),
            ParamState::Factored(f) => match f.momentum() {
                None => Self::F32(Vec::new()),
                Some(Momentum::F32(m)) => Self::F32(vec![m]),
                Some(Momentum::Blockwise(q)) => Self::Blockwise(vec![q]),
            },
        }
    }

    /// The metadata value `param.{i}.states`: `f32:K` or `8bit:K`.
    fn text(&self) -> String {
        match self {
            Self::F32(s) => format!("f32:{}", s.len()),
            Self::Blockwise(s) => format!("8bit:{}", s.len()),
        }
    }
}

/// A parameter's override settings as one metadata value: `field=value` joined by `;`.
fn settings_text(settings: &[(String, String)]) -> String {
    settings
        .iter()
        .map(|(f, v)| format!("{f}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// The metadata key of parameter `i`'s `field`, and the prefix of its tensors.
fn param_key(i: usize, field: &str) -> String {
    format!("param.{i}.{field}")
}

/// The metadata key holding the checksum of tensor `key`.
fn checksum_key(key: &str) -> String {
    format!("checksum.{key}")
}

/// The metadata key holding the checksum of the rest of the metadata and the tensor table.
const METADATA_CHECKSUM: &str = "checksum.metadata";

fn checksum_text(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// The checksum of every metadata entry except [`METADATA_CHECKSUM`], and of each tensor's
/// name, dtype and shape: entries sorted by key, each field followed by a 0 byte. A name holding
/// a 0 byte makes this text ambiguous, which only someone crafting a collision could use; a
/// 64-bit checksum guards against damage, not against forgery.
fn metadata_checksum<'a>(
    meta: &HashMap<String, String>,
    tensors: impl Iterator<Item = (&'a str, Dtype, &'a [usize])>,
) -> String {
    let mut entries: Vec<(&str, &str)> = meta
        .iter()
        .filter(|(k, _)| k.as_str() != METADATA_CHECKSUM)
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    entries.sort_unstable();
    let mut tensors: Vec<(&str, String)> = tensors
        .map(|(k, dtype, shape)| (k, format!("{dtype:?}{shape:?}")))
        .collect();
    tensors.sort_unstable();
    let mut text = Vec::new();
    for (k, v) in entries {
        text.extend_from_slice(k.as_bytes());
        text.push(0);
        text.extend_from_slice(v.as_bytes());
        text.push(0);
    }
    text.push(0);
    for (k, v) in &tensors {
        text.extend_from_slice(k.as_bytes());
        text.push(0);
        text.extend_from_slice(v.as_bytes());
        text.push(0);
    }
    checksum_text(&text)
}

fn shape_text(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn dtype_name(dtype: candle_core::DType) -> &'static str {
    dtype.as_str()
}
