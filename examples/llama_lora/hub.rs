//! Where the model files come from: a local folder (`--model-dir`) or the Hugging Face hub
//! (`--model-id`) through hf-hub.
//!
//! hf-hub 0.4's synchronous API is used: it downloads over `ureq` with no async runtime, which is
//! all a command-line example needs (1.0's blocking client wraps tokio and reqwest). The cache is
//! the standard one: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; with
//! `HF_HUB_OFFLINE=1` files come from the cache only.

use candle_core::{bail, Result};
use std::path::{Path, PathBuf};

/// The files of a LLaMA checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    /// One file, or the shards named by `model.safetensors.index.json`.
    pub weights: Vec<PathBuf>,
}

/// Shard file names listed in an index's `weight_map`, in first-seen order.
fn shard_names(index: &Path) -> Result<Vec<String>> {
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

/// The files in a local folder.
///
/// # Errors
/// A missing `config.json`, `tokenizer.json`, or weights file (naming it).
pub fn local(dir: &Path) -> Result<ModelFiles> {
    let need = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        if !p.is_file() {
            bail!("{} is missing from --model-dir {}", name, dir.display())
        }
        Ok(p)
    };
    let config = need("config.json")?;
    let tokenizer = need("tokenizer.json")?;
    let weights = if dir.join("model.safetensors.index.json").is_file() {
        shard_names(&dir.join("model.safetensors.index.json"))?
            .iter()
            .map(|n| need(n))
            .collect::<Result<_>>()?
    } else {
        vec![need("model.safetensors")?]
    };
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
    })
}

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
/// `hf_home()/hub`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_home().join("hub"))
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE"),
        Ok(v) if matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
    )
}

/// Fetches one file of the repository by name.
type Fetch<'a> = Box<dyn Fn(&str) -> Result<PathBuf> + 'a>;

/// The files of hub model `id` at `revision`: downloaded into the cache (or taken from it).
///
/// # Errors
/// A file that cannot be fetched, or is not cached when offline (naming it).
pub fn hub(id: &str, revision: &str) -> Result<ModelFiles> {
    let repo = hf_hub::Repo::with_revision(
        id.to_string(),
        hf_hub::RepoType::Model,
        revision.to_string(),
    );
    let cache_path = cache_dir();
    let cache = hf_hub::Cache::new(cache_path.clone());
    let get: Fetch<'_> = if offline() {
        let cached = cache.repo(repo);
        Box::new(move |name: &str| {
            cached.get(name).ok_or_else(|| {
                candle_core::Error::msg(format!(
                    "{name} of {id}@{revision} is not in the hub cache {} and HF_HUB_OFFLINE is set",
                    cache_path.display()
                ))
            })
        })
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
            .map_err(|e| candle_core::Error::msg(format!("hub client: {e}")))?
            .repo(repo);
        Box::new(move |name: &str| {
            api.get(name).map_err(|e| {
                candle_core::Error::msg(format!("fetching {name} of {id}@{revision}: {e}"))
            })
        })
    };
    let config = get("config.json")?;
    let tokenizer = get("tokenizer.json")?;
    let weights = match get("model.safetensors.index.json") {
        Ok(index) => shard_names(&index)?
            .iter()
            .map(|n| get(n))
            .collect::<Result<_>>()?,
        Err(_) => vec![get("model.safetensors")?],
    };
    Ok(ModelFiles {
        config,
        tokenizer,
        weights,
    })
}
