//! Optimizer checkpoints: the whole state of an optimizer in one safetensors file.
//!
//! Written by `save` on every optimizer (e.g. [`AdamW8bit::save`](crate::AdamW8bit::save)) and
//! read back by `load`. The file holds, for a parameter named `NAME` (its `VarMap` name, the
//! name given to `new_named`, or its position `"0"`, `"1"`, ... for `Optimizer::new`):
//!
//! - `NAME.state{k}`: f32 state `k`, one value per element (32-bit state), or
//!   `NAME.state{k}.codes` (U8, one per element), `NAME.state{k}.absmax` (F32, one per block) and
//!   `NAME.state{k}.map` (F32, the 256 map values) for 8-bit state;
//! - `NAME.grad_norms` (F64): the percentile-clipping history, oldest first;
//!
//! and as safetensors metadata: `format` ([`FORMAT`]), `version` ([`VERSION`]), `kind` (the
//! optimizer family, e.g. `AdamW` for `AdamW` and `AdamW8bit`), `steps`, `skipped`, `params`
//! (the count), `param.{i}` (the i-th name), `NAME.shape`, `NAME.dtype`, `NAME.steps` (the steps
//! this parameter took), `NAME.states`
//! (`f32:K` or `8bit:K`), `NAME.block_size`, `NAME.overrides` (the [`crate::Overrides`]
//! settings that apply to it, `field=value;...`: loading with other overrides is an error naming
//! the parameter), `config.FIELD` for every field of the base config and `optimizer.initial_lr`.
//!
//! Saving is atomic: the file is written under a temporary name in the same folder, flushed to
//! disk (fsync), then renamed over `path`, so a crash leaves either the old file or the new one.
//! Loading reads and checks everything before it changes anything.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_bnb_kernels::{BlockwiseState, ParamState, QuantMap, QUANT_MAP_LEN};
use candle_core::{bail, Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::engine::{Slots, GRAD_NORM_HISTORY};

/// The `format` metadata value of every checkpoint.
pub const FORMAT: &str = "candle-bnb-optimizer";
/// The checkpoint format version this build writes and reads.
pub const VERSION: u32 = 1;

/// A checkpoint read and checked against an optimizer's parameters.
pub(crate) struct Loaded {
    pub(crate) states: Vec<ParamState>,
    pub(crate) grad_norms: Vec<VecDeque<f64>>,
    pub(crate) param_steps: Vec<u64>,
    pub(crate) steps: u64,
    pub(crate) skipped: u64,
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

/// Writes the checkpoint of `slots` to `path` atomically.
pub(crate) fn save(
    path: &Path,
    kind: &str,
    config: &[(&'static str, String)],
    settings: &[Vec<(String, String)>],
    extra: &[(String, String)],
    slots: &Slots,
) -> Result<()> {
    let synced = slots.synced()?;
    let mut meta: HashMap<String, String> = HashMap::new();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("version".into(), VERSION.to_string());
    meta.insert("kind".into(), kind.into());
    meta.insert("steps".into(), slots.step_count().to_string());
    meta.insert("skipped".into(), slots.skipped_count().to_string());
    meta.insert("params".into(), synced.len().to_string());
    for (field, value) in config {
        meta.insert(format!("config.{field}"), value.clone());
    }
    for (key, value) in extra {
        meta.insert(format!("optimizer.{key}"), value.clone());
    }
    let mut tensors: Vec<(String, Entry<'_>)> = Vec::new();
    for (i, slot) in synced.iter().enumerate() {
        let name = &slot.name;
        meta.insert(format!("param.{i}"), name.clone());
        meta.insert(format!("{name}.shape"), shape_text(slot.var.dims()));
        meta.insert(format!("{name}.dtype"), dtype_name(slot.var.dtype()).into());
        meta.insert(format!("{name}.steps"), slot.steps.to_string());
        meta.insert(format!("{name}.overrides"), settings_text(&settings[i]));
        match &slot.state {
            ParamState::F32(states) => {
                meta.insert(format!("{name}.states"), format!("f32:{}", states.len()));
                for (k, s) in states.iter().enumerate() {
                    tensors.push((format!("{name}.state{k}"), f32_entry(s)));
                }
            }
            ParamState::Blockwise(states) => {
                meta.insert(format!("{name}.states"), format!("8bit:{}", states.len()));
                if let Some(first) = states.first() {
                    meta.insert(format!("{name}.block_size"), first.block_size().to_string());
                }
                for (k, s) in states.iter().enumerate() {
                    tensors.push((
                        format!("{name}.state{k}.codes"),
                        Entry {
                            dtype: Dtype::U8,
                            shape: vec![s.len()],
                            data: Cow::Borrowed(s.codes()),
                        },
                    ));
                    tensors.push((format!("{name}.state{k}.absmax"), f32_entry(s.absmax())));
                    tensors.push((format!("{name}.state{k}.map"), f32_entry(s.map().values())));
                }
            }
        }
        tensors.push((
            format!("{name}.grad_norms"),
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
        Ok(t)
    }

    /// The 8-bit state stored under `key` (`.codes`, `.absmax`, `.map`), validated.
    fn blockwise(&self, key: &str, len: usize, block_size: usize) -> Result<BlockwiseState> {
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
        let map = QuantMap::from_values(&values).map_err(context)?;
        BlockwiseState::from_parts(codes, absmax, map, block_size).map_err(context)
    }

    fn f32s(&self, key: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.tensor(key, Dtype::F32, Some(len))?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }
}

/// Reads the checkpoint at `path` and checks it against `slots` without changing them.
pub(crate) fn load(
    path: &Path,
    kind: &str,
    slots: &Slots,
    settings: &[Vec<(String, String)>],
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
    let r = Reader { path, file, meta };

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
    let file_kind = r.meta("kind")?;
    if file_kind != kind {
        return r.fail(format!("kind {file_kind:?}, this optimizer is {kind:?}"));
    }
    let count: usize = r.meta_num("params")?;
    if count != slots.slots.len() {
        return r.fail(format!(
            "{count} parameters, this optimizer has {}",
            slots.slots.len()
        ));
    }
    let mut states = Vec::with_capacity(count);
    let mut grad_norms = Vec::with_capacity(count);
    let mut param_steps = Vec::with_capacity(count);
    for (i, slot) in slots.slots.iter().enumerate() {
        let name = r.meta(&format!("param.{i}"))?;
        if name != slot.name {
            return r.fail(format!(
                "parameter {i} is {name:?}, this optimizer's is {:?}",
                slot.name
            ));
        }
        let shape = r.meta(&format!("{name}.shape"))?;
        if shape != shape_text(slot.var.dims()) {
            return r.fail(format!(
                "parameter {name:?} has shape [{shape}], this optimizer's has {:?}",
                slot.var.dims()
            ));
        }
        let dtype = r.meta(&format!("{name}.dtype"))?;
        if dtype != dtype_name(slot.var.dtype()) {
            return r.fail(format!(
                "parameter {name:?} has dtype {dtype}, this optimizer's has {}",
                dtype_name(slot.var.dtype())
            ));
        }
        param_steps.push(r.meta_num::<u64>(&format!("{name}.steps"))?);
        let stored = r.meta(&format!("{name}.overrides"))?;
        let ours = settings_text(&settings[i]);
        if stored != ours {
            return r.fail(format!(
                "parameter {name:?} was saved with overrides [{stored}], this optimizer has [{ours}]"
            ));
        }
        let n = slot.var.elem_count();
        let stored = r.meta(&format!("{name}.states"))?;
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
                    .map(|k| r.f32s(&format!("{name}.state{k}"), n))
                    .collect::<Result<_>>()?,
            ),
            ParamState::Blockwise(s) => ParamState::Blockwise(match s.first() {
                None => Vec::new(),
                Some(first) => {
                    let bs: usize = r.meta_num(&format!("{name}.block_size"))?;
                    if bs != first.block_size() {
                        return r.fail(format!(
                            "parameter {name:?} has block size {bs}, this optimizer uses {}",
                            first.block_size()
                        ));
                    }
                    (0..s.len())
                        .map(|k| r.blockwise(&format!("{name}.state{k}"), n, bs))
                        .collect::<Result<_>>()?
                }
            }),
        };
        states.push(state);
        let norms_key = format!("{name}.grad_norms");
        let norms = r.tensor(&norms_key, Dtype::F64, None)?;
        let norms: VecDeque<f64> = norms
            .data()
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        if norms.len() > GRAD_NORM_HISTORY || norms.iter().any(|v| !(v.is_finite() && *v >= 0.0)) {
            return r.fail(format!(
                "{norms_key} must hold at most {GRAD_NORM_HISTORY} finite squared norms >= 0"
            ));
        }
        grad_norms.push(norms);
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
        states,
        grad_norms,
        param_steps,
        steps: r.meta_num("steps")?,
        skipped: r.meta_num("skipped")?,
        config,
        extra,
    })
}
