//! The algorithms of the family, one file each: its typed hyper-parameters with their defaults
//! and checks, and the update rule they make (`candle_bnb_kernels`' rules, shared by the 8-bit
//! and 32-bit paths on every device). Each config names two optimizers, `Optim<Config>` (32-bit
//! state by default) and `Optim<Config, 8>` (the `...8bit` name).

pub(crate) mod adafactor;
pub(crate) mod adagrad;
pub(crate) mod adam;
pub(crate) mod adamw;
pub(crate) mod ademamix;
pub(crate) mod came;
pub(crate) mod lamb;
pub(crate) mod lars;
pub(crate) mod lion;
pub(crate) mod rmsprop;
pub(crate) mod sgd;
