//! Reading a checkpoint: every entry checked against the optimizer before anything changes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use candle_bnb_kernels::{
    BlockwiseState, FactoredState, Momentum, ParamState, QuantMap, QUANT_MAP_LEN,
};
use candle_core::{bail, Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::engine::{TrackedParams, TrackedState};
use crate::GRAD_NORM_HISTORY;

use super::{
    checksum_key, checksum_text, dtype_name, metadata_checksum, param_key, settings_text,
    shape_text, Buffers, Loaded, FORMAT, MAX_STEPS, METADATA_CHECKSUM, VERSION,
};

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

/// The per-element buffers read from a file.
enum ReadBuffers {
    F32(Vec<Vec<f32>>),
    Blockwise(Vec<BlockwiseState>),
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
        let ours = Buffers::of(&slot.state);
        let expected = ours.text();
        if stored != expected {
            return r.fail(format!(
                "parameter {name:?} has state {stored}, this optimizer keeps {expected}"
            ));
        }
        let signed = |k: usize| signed[i].get(k).copied().unwrap_or(true);
        let buffers = match &ours {
            Buffers::F32(s) => ReadBuffers::F32(
                (0..s.len())
                    .map(|k| r.f32_state(&key(&format!("state{k}")), n, signed(k)))
                    .collect::<Result<_>>()?,
            ),
            Buffers::Blockwise(s) => ReadBuffers::Blockwise(match s.first() {
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
        let state = match (&slot.state, buffers) {
            (ParamState::Factored(factored), buffers) => {
                let names: Vec<&str> = factored.stats().iter().map(|(name, _)| *name).collect();
                let stored = r.meta(&key("stats"))?;
                if stored != names.join(",") {
                    return r.fail(format!(
                        "parameter {name:?} has the statistics [{stored}], this optimizer keeps [{}]",
                        names.join(",")
                    ));
                }
                let stats = factored
                    .stats()
                    .iter()
                    .map(|(stat, values)| {
                        r.f32_state(&key(&format!("stat.{stat}")), values.len(), false)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let momentum = match buffers {
                    ReadBuffers::F32(mut m) => m.pop().map(Momentum::F32),
                    ReadBuffers::Blockwise(mut q) => {
                        q.pop().map(|q| Momentum::Blockwise(Box::new(q)))
                    }
                };
                let context = |e: Error| {
                    e.context(format!("checkpoint {}: parameter {name:?}", path.display()))
                };
                ParamState::Factored(
                    FactoredState::from_parts(factored.factoring(), stats, momentum)
                        .map_err(context)?,
                )
            }
            (_, ReadBuffers::F32(s)) => ParamState::F32(s),
            (_, ReadBuffers::Blockwise(s)) => ParamState::Blockwise(s),
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
