//! One optimizer step over 16.8 M f32 parameters, next to candle_nn::AdamW in the same run.
//!
//! `cargo bench --bench optim_step` measures `candle_nn::AdamW`, our AdamW with 32-bit state and
//! with 8-bit state (one step each, gradient fixed), then prints M params/s and each ratio to
//! candle_nn::AdamW. Targets on a 2-core machine (issue 3): 8-bit AdamW >= 20x candle_nn::AdamW.

mod common;

use candle_bnb::optim::{AdamW, AdamW8bit, AdamW8bitConfig, AdamWConfig};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use common::{mean_ns, output_dir};
use criterion::{Criterion, Throughput};

const PARAMS: usize = 1 << 24;
const GROUP: &str = "optim_step_16.8M_f32";

/// A var and a gradient store holding a fixed random gradient for it.
fn setup() -> (Var, GradStore) {
    let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, PARAMS, &Device::Cpu).unwrap()).unwrap();
    let g = Tensor::randn(0f32, 1e-2, PARAMS, &Device::Cpu).unwrap();
    let grads = (w.as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    (w, grads)
}

fn bench_optimizer<O: Optimizer>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    config: O::Config,
) {
    let (w, grads) = setup();
    let mut opt = O::new(vec![w], config).unwrap();
    group.bench_function(name, |b| b.iter(|| opt.step(&grads).unwrap()));
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group(GROUP);
    group.sample_size(10);
    group.throughput(Throughput::Elements(PARAMS as u64));
    bench_optimizer::<candle_nn::AdamW>(
        &mut group,
        "candle_nn_adamw",
        candle_nn::ParamsAdamW::default(),
    );
    bench_optimizer::<AdamW>(&mut group, "adamw_32bit", AdamWConfig::default());
    bench_optimizer::<AdamW8bit>(&mut group, "adamw_8bit", AdamW8bitConfig::default());
    group.finish();
}

fn report() {
    let Some(anchor) = mean_ns(GROUP, "candle_nn_adamw") else {
        eprintln!(
            "no criterion estimates found under {}",
            output_dir().display()
        );
        return;
    };
    println!(
        "\n{PARAMS} f32 parameters, one step; CPU kernels {:?}",
        candle_bnb::kernels::Isa::selected()
    );
    println!(
        "{:<18} {:>10} {:>12} {:>18}",
        "optimizer", "ms", "M params/s", "x candle_nn::AdamW"
    );
    for name in ["candle_nn_adamw", "adamw_32bit", "adamw_8bit"] {
        if let Some(ns) = mean_ns(GROUP, name) {
            println!(
                "{name:<18} {:>10.2} {:>12.0} {:>18.2}",
                ns / 1e6,
                PARAMS as f64 / ns * 1e3,
                anchor / ns
            );
        }
    }
}

fn main() {
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    report();
}
