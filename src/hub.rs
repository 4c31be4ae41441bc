//! Files of a Hugging Face hub model, through hf-hub into the standard cache (the `hub` feature):
//! what `candle-bnb plan --model-id` and the LoRA example's `--model-id` fetch.
//!
//! hf-hub 0.4's synchronous API downloads over `ureq` with no async runtime. The cache is the one
//! Hugging Face's tools use: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`;
//! with `HF_HUB_OFFLINE=1` files come from the cache only. `HF_TOKEN` (or `HF_HOME/token`) and
//! `HF_ENDPOINT` are honoured.

use std::path::{Path, PathBuf};

use candle_core::{bail, Result};

/// Hugging Face's home folder: `HF_HOME`, else `~/.cache/huggingface`.
fn hf_home() -> PathBuf {
    if let Some(home) = std::env::var_os("HF_HOME") {
        return home.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface")
}

/// The hub cache folder, as Hugging Face's tools resolve it: `HF_HUB_CACHE`, else
/// `HF_HOME/hub`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE"),
        Ok(v) if matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
    )
}

/// Where a repository's files come from.
enum Source {
    /// The cache only (`HF_HUB_OFFLINE`).
    Cache(hf_hub::CacheRepo),
    /// The hub, through the cache.
    Hub(hf_hub::api::sync::ApiRepo),
}

/// One model repository of the hub at one revision.
pub struct HubModel {
    id: String,
    revision: String,
    source: Source,
}

impl HubModel {
    /// Model `id` (e.g. `meta-llama/Llama-2-7b-hf`) at `revision` (branch, tag or commit).
    ///
    /// # Errors
    /// The hub client cannot be built.
    pub fn new(id: &str, revision: &str) -> Result<Self> {
        let repo = hf_hub::Repo::with_revision(
            id.to_string(),
            hf_hub::RepoType::Model,
            revision.to_string(),
        );
        let cache = hf_hub::Cache::new(cache_dir());
        let source = if offline() {
            Source::Cache(cache.repo(repo))
        } else {
            // hf-hub 0.4 looks for the token next to the cache only; honour HF_TOKEN and HF_HOME.
            let token = std::env::var("HF_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .or_else(|| std::fs::read_to_string(hf_home().join("token")).ok())
                .map(|t| t.trim().to_string());
            let mut builder = hf_hub::api::sync::ApiBuilder::from_cache(cache)
                .with_progress(true)
                .with_token(token);
            if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
                builder = builder.with_endpoint(endpoint);
            }
            let api = builder
                .build()
                .map_err(|e| candle_core::Error::msg(format!("hub client: {e}")))?;
            Source::Hub(api.repo(repo))
        };
        Ok(Self {
            id: id.to_string(),
            revision: revision.to_string(),
            source,
        })
    }

    /// The local path of file `name`, downloaded first unless cached.
    ///
    /// # Errors
    /// A file that cannot be fetched, or is not cached when offline (naming it).
    pub fn get(&self, name: &str) -> Result<PathBuf> {
        let (id, revision) = (&self.id, &self.revision);
        match &self.source {
            Source::Cache(cached) => cached.get(name).ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "{name} of {id}@{revision} is not in the hub cache {} and HF_HUB_OFFLINE is set",
                    cache_dir().display()
                ))
            }),
            Source::Hub(api) => api.get(name).map_err(|e| {
                candle_core::Error::msg(format!("fetching {name} of {id}@{revision}: {e}"))
            }),
        }
    }
}

/// The shard file names a `model.safetensors.index.json` lists in its `weight_map`, each once, in
/// first-seen order.
///
/// # Errors
/// An unreadable file, malformed JSON, no `weight_map` object, or an entry that is not a file
/// name (naming the index and the tensor).
pub fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index)
        .map_err(|e| candle_core::Error::msg(format!("cannot read {}: {e}", index.display())))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        candle_core::Error::msg(format!("{}: malformed JSON: {e}", index.display()))
    })?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{}: no \"weight_map\" object", index.display())
    };
    let mut names: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!(
                "{}: weight_map entry {tensor:?} is not a file name",
                index.display()
            )
        };
        if !names.iter().any(|n| n == file) {
            names.push(file.to_string());
        }
    }
    Ok(names)
}
