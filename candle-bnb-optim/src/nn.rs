//! Embedding layers for 8-bit training, after bitsandbytes' `bnb.nn.StableEmbedding` and
//! `bnb.nn.Embedding`: their weight is [marked](crate::keep_32bit_state) so that the optimizers
//! of this crate keep its state in 32 bits while the rest of the model uses 8-bit state.

use candle_core::{bail, DType, Result, Tensor, D};
use candle_nn::{Init, Module, VarBuilder};

/// Xavier-uniform bound for a `[num_embeddings, embedding_dim]` table: torch's
/// `xavier_uniform_` with fan-in `embedding_dim` and fan-out `num_embeddings`.
fn xavier_bound(num_embeddings: usize, embedding_dim: usize) -> f64 {
    (6.0 / (num_embeddings + embedding_dim) as f64).sqrt()
}

/// An embedding table (`bnb.nn.Embedding`): a lookup whose weight keeps 32-bit optimizer state.
///
/// Use it in place of `candle_nn::Embedding` when fine-tuning a pretrained model with an 8-bit
/// optimizer; the parameter is named `{prefix}.weight`, like candle-nn's and Hugging Face's, so
/// pretrained weights load into it.
#[derive(Clone, Debug)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    /// A `[num_embeddings, embedding_dim]` table named `weight` under `vb`, marked for 32-bit
    /// optimizer state ([`crate::keep_32bit_state`]) and Xavier-uniform
    /// initialised when `vb` creates it (dtype and device from `vb`).
    ///
    /// # Errors
    /// A zero `num_embeddings` or `embedding_dim`, or a stored weight of another shape.
    pub fn new(num_embeddings: usize, embedding_dim: usize, vb: VarBuilder) -> Result<Self> {
        if num_embeddings == 0 || embedding_dim == 0 {
            bail!(
                "an embedding needs at least one row and one column, got num_embeddings {num_embeddings} and embedding_dim {embedding_dim}"
            )
        }
        let bound = xavier_bound(num_embeddings, embedding_dim);
        let init = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((num_embeddings, embedding_dim), "weight", init)?;
        crate::marks::mark_tensor(&weight);
        Ok(Self { weight })
    }

    /// The `[num_embeddings, embedding_dim]` weight.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Embedding {
    /// Integer ids (u8, u32, i64) of any shape to `[..ids, embedding_dim]` in the weight's
    /// dtype. Errors on a float dtype, another device, or an id out of range.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if !matches!(ids.dtype(), DType::U8 | DType::U32 | DType::I64) {
            bail!(
                "embedding ids must be u8, u32 or i64, got {:?} (shape {:?})",
                ids.dtype(),
                ids.dims()
            )
        }
        if !ids.device().same_device(self.weight.device()) {
            bail!(
                "embedding ids are on {:?} but the weight is on {:?}",
                ids.device(),
                self.weight.device()
            )
        }
        let mut dims = ids.dims().to_vec();
        dims.push(self.weight.dim(1)?);
        let ids = checked_ids(&ids.flatten_all()?, self.weight.dim(0)?)?;
        self.weight.index_select(&ids, 0)?.reshape(dims)
    }
}

/// Flat integer `ids` checked to lie in `0..rows`, in a dtype whose largest value is not a valid
/// id: Candle's `index_select` reads the largest value of the id type as padding and returns a
/// zero row for it (u8 255 on a table of 256 rows or more, `u32::MAX`, `i64::MAX`), so u8 ids
/// are widened to u32. The check reads the ids' minimum and maximum back (a device sync on
/// CUDA).
fn checked_ids(ids: &Tensor, rows: usize) -> Result<Tensor> {
    if ids.elem_count() == 0 {
        return ids.to_dtype(DType::U32);
    }
    let wide = ids.to_dtype(DType::I64)?;
    let min = wide.min(0)?.to_scalar::<i64>()?;
    let max = wide.max(0)?.to_scalar::<i64>()?;
    if min < 0 || max as u64 >= rows as u64 {
        let bad = if min < 0 { min } else { max };
        bail!("embedding id {bad} is out of range for a table of {rows} rows")
    }
    // Every id is below `rows`, so u32 ids never reach u32::MAX unless the table has more rows
    // than that; i64 ids never reach i64::MAX.
    match ids.dtype() {
        DType::U8 => ids.to_dtype(DType::U32),
        DType::U32 if max == u32::MAX as i64 => Ok(wide),
        _ => Ok(ids.clone()),
    }
}

/// An embedding followed by a layer norm computed in f32 (`bnb.nn.StableEmbedding`), the
/// 8-bit-optimizer paper's recipe for stable training of language models from scratch.
///
/// Parameters under `vb`: `weight` `[num_embeddings, embedding_dim]` (Xavier-uniform, 32-bit
/// optimizer state), `norm.weight` and `norm.bias` `[embedding_dim]` (ones and zeros). The output,
/// `[..ids, embedding_dim]`, is `layer_norm(weight[ids]) * norm.weight + norm.bias` with the
/// normalisation (eps 1e-5) in f32 whatever the weight's dtype, cast back to the weight's dtype.
/// The forward pass is built from differentiable tensor ops, so it trains.
#[derive(Clone, Debug)]
pub struct StableEmbedding {
    embedding: Embedding,
    norm_weight: Tensor,
    norm_bias: Tensor,
}

impl StableEmbedding {
    /// The layer norm's epsilon (torch's `LayerNorm` default, as bitsandbytes uses).
    pub const EPS: f64 = 1e-5;

    /// See the type's documentation for the parameters and their initialisation.
    ///
    /// # Errors
    /// A zero `num_embeddings` or `embedding_dim`, or stored parameters of other shapes.
    pub fn new(num_embeddings: usize, embedding_dim: usize, vb: VarBuilder) -> Result<Self> {
        let embedding = Embedding::new(num_embeddings, embedding_dim, vb.clone())?;
        let norm = vb.pp("norm");
        Ok(Self {
            embedding,
            norm_weight: norm.get_with_hints(embedding_dim, "weight", Init::Const(1.0))?,
            norm_bias: norm.get_with_hints(embedding_dim, "bias", Init::Const(0.0))?,
        })
    }

    /// The `[num_embeddings, embedding_dim]` embedding weight.
    pub fn weight(&self) -> &Tensor {
        self.embedding.weight()
    }

    /// The layer norm's `[embedding_dim]` scale and shift.
    pub fn norm(&self) -> (&Tensor, &Tensor) {
        (&self.norm_weight, &self.norm_bias)
    }
}

impl Module for StableEmbedding {
    /// Integer ids (u8, u32, i64) of any shape to `[..ids, embedding_dim]` in the weight's
    /// dtype. Errors on a float dtype, another device, or an id out of range.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embedding.forward(ids)?.to_dtype(DType::F32)?;
        let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(variance + Self::EPS)?.sqrt()?)?;
        normed
            .broadcast_mul(&self.norm_weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.norm_bias.to_dtype(DType::F32)?)?
            .to_dtype(self.weight().dtype())
    }
}
