//! Quantizes a random tensor blockwise to 8 bits, then reports the round-trip error and the memory
//! saved.
//!
//! ```text
//! cargo run --release --example quantize -- [--elements N] [--block-size B]
//!     [--map signed|unsigned|linear] [--dtype f32|f16|bf16]
//! ```

use std::time::Instant;

use candle_bnb::kernels::{quantize_blockwise, Isa, QuantMap};
use candle_core::{bail, DType, Device, Result, Tensor};

struct Args {
    elements: usize,
    block_size: usize,
    map: String,
    dtype: DType,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        elements: 1 << 24,
        block_size: 256,
        map: "signed".into(),
        dtype: DType::F32,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            bail!("{flag} needs a value")
        };
        match flag.as_str() {
            "--elements" => {
                args.elements = value
                    .parse()
                    .map_err(|e| candle_core::Error::Msg(format!("--elements {value}: {e}")))?
            }
            "--block-size" => {
                args.block_size = value
                    .parse()
                    .map_err(|e| candle_core::Error::Msg(format!("--block-size {value}: {e}")))?
            }
            "--map" => args.map = value,
            "--dtype" => {
                args.dtype = match value.as_str() {
                    "f32" => DType::F32,
                    "f16" => DType::F16,
                    "bf16" => DType::BF16,
                    other => bail!("--dtype must be f32, f16 or bf16, got {other}"),
                }
            }
            other => bail!("unknown argument {other}; see the header of examples/quantize.rs"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let device = Device::Cpu;
    let (map, x) = match args.map.as_str() {
        "signed" => (
            QuantMap::dynamic_signed(),
            Tensor::randn(0f32, 1.0, args.elements, &device)?,
        ),
        "linear" => (
            QuantMap::linear_signed(),
            Tensor::randn(0f32, 1.0, args.elements, &device)?,
        ),
        // The unsigned map is for non-negative data such as Adam's second moment.
        "unsigned" => (
            QuantMap::dynamic_unsigned(),
            Tensor::rand(0f32, 1.0, args.elements, &device)?,
        ),
        other => bail!("--map must be signed, unsigned or linear, got {other}"),
    };
    let x = x.to_dtype(args.dtype)?;

    let start = Instant::now();
    let q = quantize_blockwise(&x, &map, args.block_size)?;
    let quantize_time = start.elapsed();
    let start = Instant::now();
    let back = q.dequantize(args.dtype)?;
    let dequantize_time = start.elapsed();

    let x32 = x.to_dtype(DType::F32)?;
    let err = (&x32 - back.to_dtype(DType::F32)?)?.abs()?;
    let mean_abs = err.mean_all()?.to_scalar::<f32>()?;
    let max_abs = err.max_all()?.to_scalar::<f32>()?;
    let mean_rel = (err / (x32.abs()? + 1e-8)?)?
        .mean_all()?
        .to_scalar::<f32>()?;

    let original = args.elements * args.dtype.size_in_bytes();
    let quantized = q.storage_bytes();
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    println!(
        "quantized {} {:?} values ({}) with the {} map in blocks of {}",
        args.elements,
        args.dtype,
        if args.map == "unsigned" {
            "uniform 0..1"
        } else {
            "standard normal"
        },
        args.map,
        args.block_size
    );
    println!(
        "  error:  mean |err| {mean_abs:.5}, max |err| {max_abs:.5}, mean relative {mean_rel:.5}"
    );
    println!(
        "  memory: {:.2} MiB as {:?} -> {:.2} MiB as codes + absmax ({:.1} % saved)",
        mib(original),
        args.dtype,
        mib(quantized),
        100.0 * (1.0 - quantized as f64 / original.max(1) as f64)
    );
    println!(
        "  time:   quantize {:.1} ms, dequantize {:.1} ms (CPU kernels: {})",
        quantize_time.as_secs_f64() * 1e3,
        dequantize_time.as_secs_f64() * 1e3,
        Isa::selected().name(),
    );
    Ok(())
}
