//! Writing a checkpoint: every tensor and metadata entry with its checksum, atomically.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_bnb_kernels::ParamState;
use candle_core::{Error, Result};
use safetensors::tensor::Dtype;

use crate::engine::TrackedParams;

use super::{
    checksum_key, checksum_text, dtype_name, metadata_checksum, param_key, settings_text,
    shape_text, Buffers, FORMAT, METADATA_CHECKSUM, VERSION,
};

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
        let buffers = Buffers::of(&slot.state);
        meta.insert(key("states"), buffers.text());
        match buffers {
            Buffers::F32(states) => {
                for (k, s) in states.iter().enumerate() {
                    tensors.push((key(&format!("state{k}")), f32_entry(s)));
                }
            }
            Buffers::Blockwise(states) => {
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
        if let ParamState::Factored(factored) = &slot.state {
            let stats = factored.stats();
            let names: Vec<&str> = stats.iter().map(|(name, _)| *name).collect();
            meta.insert(key("stats"), names.join(","));
            for (name, values) in stats {
                tensors.push((key(&format!("stat.{name}")), f32_entry(values)));
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
