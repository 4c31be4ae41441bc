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

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_bnb_kernels::{BlockwiseState, ParamState, QuantMap, QUANT_MAP_LEN};
use candle_core::{bail, Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::engine::{TrackedParams, TrackedState};
use crate::GRAD_NORM_HISTORY;

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

/// One tensor to write.
struct Entry<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Cow<'a, [u8]>,
}

impl safetensors::View for Entry<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn f32_entry(values: &[f32]) -> Entry<'static> {
    Entry {
        dtype: Dtype::F32,
        shape: vec![values.len()],
        data: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
    }
}

fn dtype_name(dtype: candle_core::DType) -> &'static str {
    dtype.as_str()
}

fn shape_text(dims: &[usize]) -> String {
    dims.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Writes the checkpoint of `tracked` to `path` atomically.
pub(crate) fn save(
    path: &Path,
    kind: &str,
    config: &[(&'static str, String)],
    settings: &[Vec<(String, String)>],
    extra: &[(String, String)],
    tracked: &TrackedParams,
) -> Result<()> {
    let synced = tracked.synced()?;
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("version".into(), VERSION.to_string());
    meta.insert("kind".into(), kind.into());
    meta.insert("steps".into(), tracked.step_count().to_string());
    meta.insert("skipped".into(), tracked.skipped_count().to_string());
    meta.insert("params".into(), synced.len().to_string());
    for (field, value) in config {
        meta.insert(format!("config.{field}"), value.clone());
    }
    for (key, value) in extra {
        meta.insert(format!("optimizer.{key}"), value.clone());
    }
    let mut tensors: Vec<(String, Entry<'_>)> = Vec::new();
    for (i, slot) in synced.iter().enumerate() {
        let key = |field: &str| param_key(i, field);
        meta.insert(key("name"), slot.name.clone());
        meta.insert(key("shape"), shape_text(slot.var.dims()));
        meta.insert(key("dtype"), dtype_name(slot.var.dtype()).into());
        meta.insert(key("steps"), slot.steps.to_string());
        meta.insert(key("overrides"), settings_text(&settings[i]));
        match &slot.state {
            ParamState::F32(states) => {
                meta.insert(key("states"), format!("f32:{}", states.len()));
                for (k, s) in states.iter().enumerate() {
                    tensors.push((key(&format!("state{k}")), f32_entry(s)));
                }
            }
            ParamState::Blockwise(states) => {
                meta.insert(key("states"), format!("8bit:{}", states.len()));
                if let Some(first) = states.first() {
                    meta.insert(key("block_size"), first.block_size().to_string());
                }
                for (k, s) in states.iter().enumerate() {
                    let state = key(&format!("state{k}"));
                    tensors.push((
                        format!("{state}.codes"),
                        Entry {
                            dtype: Dtype::U8,
                            shape: vec![s.len()],
                            data: Cow::Borrowed(s.codes()),
                        },
                    ));
                    tensors.push((format!("{state}.absmax"), f32_entry(s.absmax())));
                    tensors.push((format!("{state}.map"), f32_entry(s.map().values())));
                }
            }
        }
        tensors.push((
            key("grad_norms"),
            Entry {
                dtype: Dtype::F64,
                shape: vec![slot.grad_norms.len()],
                data: Cow::Owned(
                    slot.grad_norms
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
            },
        ));
    }
    for (name, entry) in &tensors {
        meta.insert(checksum_key(name), checksum_text(&entry.data));
    }
    let table = metadata_checksum(
        &meta,
        tensors
            .iter()
            .map(|(name, e)| (name.as_str(), e.dtype, e.shape.as_slice())),
    );
    meta.insert(METADATA_CHECKSUM.into(), table);
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(meta), tmp)
            .map_err(|e| Error::Msg(format!("serializing checkpoint: {e}")))
    })
}

/// Runs `write` on a temporary path next to `path`, fsyncs it and renames it over `path`
/// (then fsyncs the folder, so the rename itself survives a crash). The temporary file is
/// removed on failure.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |what: &str, p: &Path, e: std::io::Error| {
        Error::Msg(format!(
            "checkpoint {}: {what} {}: {e}",
            path.display(),
            p.display()
        ))
    };
    let file_name = path.file_name().ok_or_else(|| {
        Error::Msg(format!(
            "checkpoint path {} has no file name",
            path.display()
        ))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        write(&tmp)?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("flushing", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("renaming", &tmp, e))?;
        // Persist the rename; folders cannot be opened for syncing on every platform.
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The metadata and tensors of an open checkpoint, with errors that name the file and key.
struct Reader<'a> {
    path: &'a Path,
    file: SafeTensors<'a>,
    meta: &'a HashMap<String, String>,
    /// The tensors read so far: any other tensor in the file is refused.
    read: std::cell::RefCell<HashSet<String>>,
}

impl<'a> Reader<'a> {
    fn fail<T>(&self, msg: impl std::fmt::Display) -> Result<T> {
        bail!("checkpoint {}: {msg}", self.path.display())
    }

    fn meta(&self, key: &str) -> Result<&'a str> {
        match self.meta.get(key) {
            Some(v) => Ok(v),
            None => self.fail(format!("metadata {key:?} is missing")),
        }
    }

    fn meta_num<T: std::str::FromStr>(&self, key: &str) -> Result<T> {
        let v = self.meta(key)?;
        match v.parse() {
            Ok(x) => Ok(x),
            Err(_) => self.fail(format!("metadata {key:?} = {v:?} is not a number")),
        }
    }

    /// A step count: at most [`MAX_STEPS`].
    fn meta_steps(&self, key: &str) -> Result<u64> {
        let v: u64 = self.meta_num(key)?;
        if v > MAX_STEPS {
            return self.fail(format!(
                "metadata {key:?} = {v} is beyond any plausible step count ({MAX_STEPS})"
            ));
        }
        Ok(v)
    }

    /// The tensor `key`, 1-dimensional, of `dtype` and (when given) `len` elements, whose bytes
    /// match their checksum.
    fn tensor(&self, key: &str, dtype: Dtype, len: Option<usize>) -> Result<TensorView<'a>> {
        let t = match self.file.tensor(key) {
            Ok(t) => t,
            Err(e) => return self.fail(format!("tensor {key:?}: {e}")),
        };
        if t.dtype() != dtype || t.shape().len() != 1 || len.is_some_and(|n| t.shape()[0] != n) {
            return self.fail(format!(
                "tensor {key:?} is {:?} {:?}, expected {dtype:?} [{}]",
                t.dtype(),
                t.shape(),
                len.map_or("_".to_string(), |n| n.to_string())
            ));
        }
        let stored = self.meta(&checksum_key(key))?;
        let actual = checksum_text(t.data());
        if stored != actual {
            return self.fail(format!(
                "tensor {key:?} is corrupted: its checksum is {actual}, the file says {stored}"
            ));
        }
        self.read.borrow_mut().insert(key.to_string());
        Ok(t)
    }

    /// The 8-bit state stored under `key` (`.codes`, `.absmax`, `.map`), validated: its map must
    /// be `map`, the one this optimizer uses for that state.
    fn blockwise(
        &self,
        key: &str,
        len: usize,
        block_size: usize,
        map: &QuantMap,
    ) -> Result<BlockwiseState> {
        let codes = self
            .tensor(&format!("{key}.codes"), Dtype::U8, Some(len))?
            .data()
            .to_vec();
        let absmax = self.f32s(&format!("{key}.absmax"), len.div_ceil(block_size))?;
        let values: [f32; QUANT_MAP_LEN] = self
            .f32s(&format!("{key}.map"), QUANT_MAP_LEN)?
            .try_into()
            .expect("checked length");
        let context = |e: Error| e.context(format!("checkpoint {}: {key}", self.path.display()));
        let stored = QuantMap::from_values(&values).map_err(context)?;
        if let Some((j, (a, b))) = values
            .iter()
            .zip(map.values())
            .enumerate()
            .find(|(_, (a, b))| a.to_bits() != b.to_bits())
        {
            return self.fail(format!(
                "{key}.map is not the map this state is quantized with: entry {j} is {a:e}, not {b:e}"
            ));
        }
        BlockwiseState::from_parts(codes, absmax, stored, block_size).map_err(context)
    }

    fn f32s(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(key, Dtype::F32, Some(len))?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }

    /// The f32 state `key` of `len` values, each finite and, unless `signed`, >= 0.
    fn f32_state(&self, key: &str, len: usize, signed: bool) -> Result<Vec<f32>> {
        let values = self.f32s(key, len)?;
        if let Some((j, v)) = values
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && (signed || **v >= 0.0)))
        {
            return self.fail(format!(
                "{key}[{j}] is {v}; this state holds {} values",
                if signed {
                    "finite"
                } else {
                    "finite non-negative"
                }
            ));
        }
        Ok(values)
    }
}

/// Reads the checkpoint at `path` and checks it against `tracked` without changing them.
/// `signed[i]` tells, per state of parameter `i`, whether it may hold negative values
/// ([`candle_bnb_kernels::UpdateRule::signed_states`]).
pub(crate) fn load(
    path: &Path,
    kind: &str,
    tracked: &TrackedParams,
    settings: &[Vec<(String, String)>],
    signed: &[&[bool]],
) -> Result<Loaded> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Msg(format!("checkpoint {}: reading: {e}", path.display())))?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::Msg(format!(
            "checkpoint {}: not a complete safetensors file: {e}",
            path.display()
        ))
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Msg(format!("checkpoint {}: {e}", path.display())))?;
    let empty = HashMap::new();
    let meta = header.metadata().as_ref().unwrap_or(&empty);
    let r = Reader {
        path,
        file,
        meta,
        read: Default::default(),
    };

    let format = r.meta("format")?;
    if format != FORMAT {
        return r.fail(format!("format {format:?} is not {FORMAT:?}"));
    }
    let version: u32 = r.meta_num("version")?;
    if version != VERSION {
        return r.fail(format!(
            "format version {version}; this build reads version {VERSION}"
        ));
    }
    let stored = r.meta(METADATA_CHECKSUM)?;
    let names = r.file.names();
    let mut table = Vec::with_capacity(names.len());
    for &name in &names {
        let t = r.file.tensor(name).map_err(|e| {
            Error::Msg(format!(
                "checkpoint {}: tensor {name:?}: {e}",
                path.display()
            ))
        })?;
        table.push((name, t.dtype(), t.shape().to_vec()));
    }
    let actual = metadata_checksum(meta, table.iter().map(|(k, d, s)| (*k, *d, s.as_slice())));
    if stored != actual {
        return r.fail(format!(
            "the metadata is corrupted: its checksum is {actual}, the file says {stored}"
        ));
    }
    let file_kind = r.meta("kind")?;
    if file_kind != kind {
        return r.fail(format!("kind {file_kind:?}, this optimizer is {kind:?}"));
    }
    let count: usize = r.meta_num("params")?;
    if count != tracked.params.len() {
        return r.fail(format!(
            "{count} parameters, this optimizer has {}",
            tracked.params.len()
        ));
    }
    let steps = r.meta_steps("steps")?;
    let skipped = r.meta_steps("skipped")?;
    let mut states = Vec::with_capacity(count);
    let mut grad_norms = Vec::with_capacity(count);
    let mut param_steps = Vec::with_capacity(count);
    for (i, slot) in tracked.params.iter().enumerate() {
        let key = |field: &str| param_key(i, field);
        let name = r.meta(&key("name"))?;
        if name != slot.name {
            return r.fail(format!(
                "parameter {i} is {name:?}, this optimizer's is {:?}",
                slot.name
            ));
        }
        let shape = r.meta(&key("shape"))?;
        if shape != shape_text(slot.var.dims()) {
            return r.fail(format!(
                "parameter {name:?} has shape [{shape}], this optimizer's has {:?}",
                slot.var.dims()
            ));
        }
        let dtype = r.meta(&key("dtype"))?;
        if dtype != dtype_name(slot.var.dtype()) {
            return r.fail(format!(
                "parameter {name:?} has dtype {dtype}, this optimizer's has {}",
                dtype_name(slot.var.dtype())
            ));
        }
        let own_steps = r.meta_steps(&key("steps"))?;
        if own_steps > steps {
            return r.fail(format!(
                "parameter {name:?} took {own_steps} steps, more than the optimizer's {steps}"
            ));
        }
        param_steps.push(own_steps);
        let stored = r.meta(&key("overrides"))?;
        let ours = settings_text(&settings[i]);
        if stored != ours {
            return r.fail(format!(
                "parameter {name:?} was saved with overrides [{stored}], this optimizer has [{ours}]"
            ));
        }
        let n = slot.var.elem_count();
        let stored = r.meta(&key("states"))?;
        let expected = match &slot.state {
            ParamState::F32(s) => format!("f32:{}", s.len()),
            ParamState::Blockwise(s) => format!("8bit:{}", s.len()),
        };
        if stored != expected {
            return r.fail(format!(
                "parameter {name:?} has state {stored}, this optimizer keeps {expected}"
            ));
        }
        let state = match &slot.state {
            ParamState::F32(s) => ParamState::F32(
                (0..s.len())
                    .map(|k| {
                        let is_signed = signed[i].get(k).copied().unwrap_or(true);
                        r.f32_state(&key(&format!("state{k}")), n, is_signed)
                    })
                    .collect::<Result<_>>()?,
            ),
            ParamState::Blockwise(s) => ParamState::Blockwise(match s.first() {
                None => Vec::new(),
                Some(first) => {
                    let bs: usize = r.meta_num(&key("block_size"))?;
                    if bs != first.block_size() {
                        return r.fail(format!(
                            "parameter {name:?} has block size {bs}, this optimizer uses {}",
                            first.block_size()
                        ));
                    }
                    s.iter()
                        .enumerate()
                        .map(|(k, ours)| r.blockwise(&key(&format!("state{k}")), n, bs, ours.map()))
                        .collect::<Result<_>>()?
                }
            }),
        };
        states.push(state);
        let norms_key = key("grad_norms");
        let norms = r.tensor(&norms_key, Dtype::F64, None)?;
        let norms: VecDeque<f64> = norms
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        if norms.len() > GRAD_NORM_HISTORY {
            return r.fail(format!(
                "{norms_key} holds {} norms, at most {GRAD_NORM_HISTORY} are kept",
                norms.len()
            ));
        }
        if let Some((j, v)) = norms
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return r.fail(format!(
                "{norms_key}[{j}] is {v}; squared norms are finite and >= 0"
            ));
        }
        grad_norms.push(norms);
    }
    let read = r.read.borrow();
    if let Some(extra) = names.iter().find(|n| !read.contains(**n)) {
        return r.fail(format!("tensor {extra:?} belongs to no parameter"));
    }
    let config = meta
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("config.")?.to_string(), v.clone())))
        .collect();
    let extra = meta
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("optimizer.")?.to_string(), v.clone())))
        .collect();
    Ok(Loaded {
        state: TrackedState {
            states,
            grad_norms,
            param_steps,
            steps,
            skipped,
        },
        config,
        extra,
    })
}
