//! Where the model files come from: a local folder (`--model-dir`) or the Hugging Face hub
//! (`--model-id`) through hf-hub.
//!
//! The hub goes through `candle_bnb::hub` (hf-hub 0.4's synchronous API over `ureq`, no async
//! runtime; the standard cache; `HF_HUB_OFFLINE=1` for the cache only).

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
        candle_bnb::hub::shard_names(&dir.join("model.safetensors.index.json"))?
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

/// The files of hub model `id` at `revision`: downloaded into the cache (or taken from it; see
/// `candle_bnb::hub`).
///
/// # Errors
/// A file that cannot be fetched, or is not cached when offline (naming it).
pub fn hub(id: &str, revision: &str) -> Result<ModelFiles> {
    let model = candle_bnb::hub::HubModel::new(id, revision)?;
    let get = |name: &str| model.get(name);
    let config = get("config.json")?;
    let tokenizer = get("tokenizer.json")?;
    let weights = match get("model.safetensors.index.json") {
        Ok(index) => candle_bnb::hub::shard_names(&index)?
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
