//! Variables marked at creation to keep 32-bit optimizer state (what [`crate::nn::Embedding`]
//! and [`crate::nn::StableEmbedding`] do to their weight).
//!
//! Why a mark on the variable's identity and not a marker entry in the `VarMap`: a marker entry
//! would be written by `VarMap::save` and, worse, demanded by `VarMap::load`, so a model with an
//! embedding could no longer load a pretrained checkpoint. The mark is a fixed property of one
//! variable, set once when the variable is created and never changed or removed, so it has none
//! of the order problems of a settings registry: configuration stays a value
//! ([`crate::Overrides`]), and any override of `optim_bits` wins over the mark.
//!
//! Why a process-wide set: a Candle variable carries no metadata of its own, and an optimizer
//! built `from_varmap` sees nothing but the map's variables, so the mark lives beside them, keyed
//! by the tensor id (bitsandbytes' `StableEmbedding` records the same in its global
//! `GlobalOptimManager`).

use candle_core::{Tensor, TensorId, Var};
use std::collections::HashSet;
use std::sync::{LazyLock, Mutex};

/// Ids of marked tensors. Tensor ids are never reused within a process, so an id left behind by
/// a dropped variable can never match another one (it costs 8 bytes).
static MARKED: LazyLock<Mutex<HashSet<TensorId>>> = LazyLock::new(Default::default);

fn marked() -> std::sync::MutexGuard<'static, HashSet<TensorId>> {
    // The set is only ever inserted into, so a panic elsewhere cannot leave it inconsistent.
    MARKED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Marks `var` so that every optimizer of this crate keeps its state in 32 bits, whatever the
/// config's `optim_bits`, unless an [`Overrides`](crate::Overrides) entry sets `optim_bits` for
/// it. This is bitsandbytes' recipe for embeddings (8-bit state on embedding rows destabilises
/// training); the embedding modules of [`crate::nn`] call it on their weight.
pub fn keep_32bit_state(var: &Var) {
    mark_tensor(var.as_tensor());
}

/// Whether `var` was marked with [`keep_32bit_state`].
pub fn keeps_32bit_state(var: &Var) -> bool {
    marked().contains(&var.as_tensor().id())
}

/// Marks the variable behind `tensor` (a tensor returned by a `VarBuilder` backed by a `VarMap`
/// shares its variable's id); a tensor that is not a variable is left alone.
pub(crate) fn mark_tensor(tensor: &Tensor) {
    if tensor.is_variable() {
        marked().insert(tensor.id());
    }
}
