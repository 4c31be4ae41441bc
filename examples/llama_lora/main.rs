//! LLaMA LoRA fine-tuning with candle-bnb's 8-bit optimizers.
//!
//! `cargo run --release --example llama_lora` trains a tiny random LLaMA offline;
//! `-- --model-id <hub id>` or `-- --model-dir <dir>` fine-tunes a real checkpoint. `--help`
//! lists every option.

mod args;
mod data;
mod hub;
mod model;
mod output;
mod train;

use clap::Parser;

fn main() {
    let args = args::Args::parse();
    if let Err(e) = train::run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
