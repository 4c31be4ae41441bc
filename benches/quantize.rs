//! Blockwise quantization throughput on 16.8 M f32 elements, next to a memory-bandwidth anchor.
//!
//! `cargo bench --bench quantize` measures, in one run:
//! - `copy`: `copy_from_slice` of the same f32 tensor into a buffer allocated beforehand;
//! - `quantize`: `quantize_blockwise` (dynamic signed map, blocks of 256);
//! - `dequantize_into`: `Quantized::dequantize_into` a preallocated f32 tensor, like the copy;
//! - `dequantize`: `Quantized::dequantize`, which allocates its 64 MiB output on every call (for
//!   information: the page faults of a fresh buffer cost about as much as the work).
//!
//! Throughput counts bytes read + bytes written (copy: 8 B/element; quantize and dequantize:
//! 4 + 1 B/element + 4 B/block). After criterion's report a table gives each GB/s and its ratio
//! to the copy (targets on a 2-core machine: quantize >= 0.5x, dequantize >= 0.7x).
//! `CANDLE_BNB_CPU_ISA=portable|avx2` caps the instruction set to compare paths.

mod common;

use candle_bnb::kernels::{quantize_blockwise, Isa, QuantMap};
use candle_core::{DType, Device, Tensor};
use common::{mean_ns, output_dir};
use criterion::{Criterion, Throughput};

const ELEMENTS: usize = 1 << 24;
const BLOCK_SIZE: usize = 256;
const GROUP: &str = "blockwise_16.8M_f32";

fn bench(c: &mut Criterion) {
    let x = Tensor::randn(0f32, 1.0, ELEMENTS, &Device::Cpu).unwrap();
    let map = QuantMap::dynamic_signed();
    let quantized_bytes = (ELEMENTS * 5 + ELEMENTS.div_ceil(BLOCK_SIZE) * 4) as u64;
    let mut group = c.benchmark_group(GROUP);
    group.sample_size(20);

    let src = x.to_vec1::<f32>().unwrap();
    let mut dst = vec![1f32; ELEMENTS];
    group.throughput(Throughput::Bytes(8 * ELEMENTS as u64));
    group.bench_function("copy", |b| {
        b.iter(|| dst.copy_from_slice(std::hint::black_box(&src)))
    });

    group.throughput(Throughput::Bytes(quantized_bytes));
    group.bench_function("quantize", |b| {
        b.iter(|| quantize_blockwise(&x, &map, BLOCK_SIZE).unwrap())
    });

    let q = quantize_blockwise(&x, &map, BLOCK_SIZE).unwrap();
    let out = Tensor::zeros(ELEMENTS, DType::F32, &Device::Cpu).unwrap();
    group.bench_function("dequantize_into", |b| {
        b.iter(|| q.dequantize_into(&out).unwrap())
    });
    group.bench_function("dequantize", |b| {
        b.iter(|| q.dequantize(DType::F32).unwrap())
    });
    group.finish();
}

fn report() {
    let bytes = [
        ("copy", 8.0 * ELEMENTS as f64),
        (
            "quantize",
            (ELEMENTS * 5 + ELEMENTS.div_ceil(BLOCK_SIZE) * 4) as f64,
        ),
        (
            "dequantize_into",
            (ELEMENTS * 5 + ELEMENTS.div_ceil(BLOCK_SIZE) * 4) as f64,
        ),
        (
            "dequantize",
            (ELEMENTS * 5 + ELEMENTS.div_ceil(BLOCK_SIZE) * 4) as f64,
        ),
    ];
    let Some(copy_ns) = mean_ns(GROUP, "copy") else {
        eprintln!(
            "no criterion estimates found under {}",
            output_dir().display()
        );
        return;
    };
    let copy_gbs = bytes[0].1 / copy_ns;
    println!(
        "\n{} elements, blocks of {BLOCK_SIZE}, CPU kernels {}",
        ELEMENTS,
        Isa::selected().name()
    );
    println!(
        "{:<16} {:>8} {:>8} {:>14}",
        "op", "ms", "GB/s", "ratio to copy"
    );
    for (name, b) in bytes {
        if let Some(ns) = mean_ns(GROUP, name) {
            let gbs = b / ns;
            println!(
                "{name:<16} {:>8.2} {gbs:>8.2} {:>14.2}",
                ns / 1e6,
                gbs / copy_gbs
            );
        }
    }
}

fn main() {
    common::run(bench, report);
}
