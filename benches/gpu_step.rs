//! One 8-bit AdamW step over LLaMA-7B's tensor shapes on a CUDA GPU, next to a device-to-device
//! copy of the same bytes, to a CAME8bit step and to `candle_nn::AdamW`, in one run (issue 5;
//! CAME8bit: issue 16).
//!
//! ```text
//! cargo bench --features cuda --bench gpu_step -- [--dtype bf16|f32|both] [--layers 32]
//!     [--steps 20] [--candle-layers 2] [--out DIR]
//! ```
//!
//! Shapes: per layer q/k/v/o 4096×4096, gate/up 11008×4096, down 4096×11008 and two 4096 norms;
//! the embeddings and the head 32000×4096 and the final norm (6.74 B parameters at 32 layers).
//! Reported per dtype: ms per step (CUDA events around `steps` back-to-back steps after 3 warm-up
//! steps), the host time of one `step` call made while the device is idle (the enqueue cost: a
//! call that waited for its kernels would take as long as the step), achieved GB/s counting the
//! minimum bytes an 8-bit Adam step moves (read param, grad and two 1-byte states; write param and
//! both states; the absmax scales; our step also reads every gradient in its pre-pass, which this
//! count leaves out), the same bytes moved by one device-to-device copy (read half, write half,
//! timed first, alone in memory) and the ratio of the two, and the same step with
//! `candle_nn::AdamW` on the first `candle-layers` layers (its f32 state does not fit next to the
//! whole model), scaled per parameter. The bitsandbytes figure comes from
//! `benches/bnb_adamw8bit.py` on the same GPU (`scripts/gpu-bench.sh` runs both).
//!
//! Without the `cuda` feature or without a GPU this prints why and exits.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_step: built without the `cuda` feature; run with --features cuda");
}

#[cfg(feature = "cuda")]
fn main() {
    if let Err(e) = cuda_bench::run() {
        eprintln!("gpu_step: {e}");
        std::process::exit(1);
    }
}

#[cfg(feature = "cuda")]
mod cuda_bench {
    use std::io::Write;
    use std::time::Instant;

    use candle_bnb::optim::{
        AdamW8bit, AdamW8bitConfig, CAME8bit, CAME8bitConfig, Optim, OptimizerConfig,
    };
    use candle_core::backprop::GradStore;
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    use candle_core::cuda_backend::cudarc::driver::CudaEvent;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use candle_nn::Optimizer;

    const HIDDEN: usize = 4096;
    const FFN: usize = 11008;
    const VOCAB: usize = 32000;

    struct Args {
        dtypes: Vec<DType>,
        layers: usize,
        steps: usize,
        candle_layers: usize,
        out: Option<std::path::PathBuf>,
    }

    fn args() -> Result<Args> {
        let mut a = Args {
            dtypes: vec![DType::BF16, DType::F32],
            layers: 32,
            steps: 20,
            candle_layers: 2,
            out: std::env::var_os("OUT").map(Into::into),
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| candle_core::Error::Msg(format!("{flag} needs a value")))
            };
            match flag.as_str() {
                "--dtype" => {
                    a.dtypes = match value()?.as_str() {
                        "bf16" => vec![DType::BF16],
                        "f32" => vec![DType::F32],
                        "both" => vec![DType::BF16, DType::F32],
                        v => candle_core::bail!("--dtype: bf16, f32 or both, got {v:?}"),
                    }
                }
                "--layers" => a.layers = parse(&flag, &value()?)?,
                "--steps" => a.steps = parse(&flag, &value()?)?.max(1),
                "--candle-layers" => a.candle_layers = parse(&flag, &value()?)?,
                "--out" => a.out = Some(value()?.into()),
                // cargo bench passes --bench to harness=false targets.
                "--bench" => {}
                other => candle_core::bail!("unknown argument {other:?}"),
            }
        }
        Ok(a)
    }

    fn parse(flag: &str, v: &str) -> Result<usize> {
        v.parse()
            .map_err(|e| candle_core::Error::Msg(format!("{flag}: {v:?}: {e}")))
    }

    /// LLaMA-7B's parameter shapes for `layers` layers (all of them with `with_ends`: embeddings,
    /// head and final norm).
    fn shapes(layers: usize, with_ends: bool) -> Vec<Vec<usize>> {
        let mut s = Vec::new();
        if with_ends {
            s.push(vec![VOCAB, HIDDEN]);
        }
        for _ in 0..layers {
            for _ in 0..4 {
                s.push(vec![HIDDEN, HIDDEN]);
            }
            s.push(vec![FFN, HIDDEN]);
            s.push(vec![FFN, HIDDEN]);
            s.push(vec![HIDDEN, FFN]);
            s.push(vec![HIDDEN]);
            s.push(vec![HIDDEN]);
        }
        if with_ends {
            s.push(vec![HIDDEN]);
            s.push(vec![VOCAB, HIDDEN]);
        }
        s
    }

    /// Random parameters of `shapes` and a gradient store holding a random gradient for each.
    fn setup(dev: &Device, shapes: &[Vec<usize>], dtype: DType) -> Result<(Vec<Var>, GradStore)> {
        // A GradStore to fill: backward of a tensor no var feeds is empty.
        let mut grads = Tensor::zeros(1, DType::F32, dev)?.sum_all()?.backward()?;
        let mut vars = Vec::with_capacity(shapes.len());
        for shape in shapes {
            let p = Tensor::randn(0f32, 0.02, shape.as_slice(), dev)?.to_dtype(dtype)?;
            let var = Var::from_tensor(&p)?;
            let g = Tensor::randn(0f32, 1e-3, shape.as_slice(), dev)?.to_dtype(dtype)?;
            grads.insert(var.as_tensor(), g);
            vars.push(var);
        }
        Ok((vars, grads))
    }

    fn timing_event(dev: &candle_core::CudaDevice) -> Result<CudaEvent> {
        use candle_core::cuda_backend::WrapErr;
        dev.cuda_stream()
            .context()
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()
    }

    /// Device ms per call of `f` over `steps` back-to-back calls after 3 warm-up calls (CUDA
    /// events), and the host ms of one call made while the device is idle (the median of
    /// `steps`): the enqueue cost alone. A call that waited for its own kernels would take as
    /// long as the device time; back-to-back host time would not tell, since each optimizer step
    /// reads the previous step's outcome first.
    fn time(
        dev: &candle_core::CudaDevice,
        steps: usize,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<(f64, f64)> {
        use candle_core::cuda_backend::WrapErr;
        for _ in 0..3 {
            f()?;
        }
        let stream = dev.cuda_stream();
        let (start, end) = (timing_event(dev)?, timing_event(dev)?);
        stream.synchronize().w()?;
        start.record(&stream).w()?;
        for _ in 0..steps {
            f()?;
        }
        end.record(&stream).w()?;
        end.synchronize().w()?;
        let ms = start.elapsed_ms(&end).w()? as f64 / steps as f64;
        let mut host = Vec::with_capacity(steps);
        for _ in 0..steps {
            stream.synchronize().w()?;
            let t = Instant::now();
            f()?;
            host.push(t.elapsed().as_secs_f64() * 1e3);
        }
        stream.synchronize().w()?;
        host.sort_by(f64::total_cmp);
        Ok((ms, host[host.len() / 2]))
    }

    struct Row {
        what: String,
        params: usize,
        ms: f64,
        host_ms: f64,
        gbps: f64,
        vs_copy: f64,
        note: String,
    }

    fn print_row(r: &Row, out: &mut String) {
        let line = format!(
            "| {} | {:.1} M | {:.2} | {:.3} | {:.0} | {:.2} | {} |\n",
            r.what,
            r.params as f64 / 1e6,
            r.ms,
            r.host_ms,
            r.gbps,
            r.vs_copy,
            r.note
        );
        print!("{line}");
        let _ = std::io::stdout().flush();
        out.push_str(&line);
    }

    /// Times `opt` over `grads` and prints its row (`bytes`: the step's minimum traffic; `note`
    /// from its ms and state bytes); returns its ms.
    #[allow(clippy::too_many_arguments)]
    fn bench_optimizer<C: OptimizerConfig, const BITS: u32>(
        dev: &candle_core::CudaDevice,
        steps: usize,
        what: String,
        opt: &mut Optim<C, BITS>,
        grads: &GradStore,
        (params, bytes, copy_gbps): (usize, usize, f64),
        note: impl FnOnce(f64, usize) -> String,
        table: &mut String,
    ) -> Result<f64> {
        let (ms, host_ms) = time(dev, steps, || opt.step(grads))?;
        let gbps = bytes as f64 / (ms * 1e6);
        print_row(
            &Row {
                what,
                params,
                ms,
                host_ms,
                gbps,
                vs_copy: gbps / copy_gbps,
                note: note(ms, opt.state_bytes()),
            },
            table,
        );
        Ok(ms)
    }

    /// The rows of one dtype, printed as they are measured.
    fn bench_dtype(device: &Device, args: &Args, dtype: DType, table: &mut String) -> Result<()> {
        let Device::Cuda(dev) = device else {
            unreachable!("a CUDA device")
        };
        let size = dtype.size_in_bytes();
        let shapes = shapes(args.layers, true);
        let params: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
        let cfg = AdamW8bitConfig::default();
        let blocks: usize = shapes
            .iter()
            .map(|s| {
                s.iter()
                    .product::<usize>()
                    .div_ceil(cfg.settings.block_size)
            })
            .sum();
        // The minimum bytes of a fused 8-bit Adam step: read p, g, m, v; write p, m, v; each
        // state's absmax read and written. (Our step reads each gradient twice: once in the
        // pre-pass, once in the update.)
        let bytes = params * (3 * size + 4) + blocks * 2 * 2 * 4;
        // The anchor first, alone in memory: one device-to-device copy moving the same bytes
        // (read half, write half).
        let half = bytes / 2;
        let copy_ms = {
            let src = dev.alloc_zeros::<u8>(half)?;
            let mut dst = dev.alloc_zeros::<u8>(half)?;
            time(dev, args.steps, || dev.memcpy_dtod(&src, &mut dst))?.0
        };
        let copy_gbps = bytes as f64 / (copy_ms * 1e6);
        print_row(
            &Row {
                what: format!("device copy of the same bytes ({dtype:?})"),
                params,
                ms: copy_ms,
                host_ms: f64::NAN,
                gbps: copy_gbps,
                vs_copy: 1.0,
                note: format!("{:.2} GB moved", bytes as f64 / 1e9),
            },
            table,
        );
        let ms = {
            let (vars, grads) = setup(device, &shapes, dtype)?;
            let mut opt = AdamW8bit::new(vars.clone(), cfg)?;
            bench_optimizer(
                dev,
                args.steps,
                format!("candle-bnb AdamW8bit ({dtype:?})"),
                &mut opt,
                &grads,
                (params, bytes, copy_gbps),
                |_, state| format!("{} tensors; state {:.2} GB", vars.len(), state as f64 / 1e9),
                table,
            )?
        };
        {
            // CAME8bit over the same tensors: its minimum bytes read p, g and the 1-byte
            // momentum and write p and the momentum (the statistics are O(rows + cols)).
            let (vars, grads) = setup(device, &shapes, dtype)?;
            let came = CAME8bitConfig {
                lr: 1e-4,
                ..Default::default()
            };
            let mut opt = CAME8bit::new(vars, came)?;
            let came_bytes = params * (3 * size + 2) + blocks * 2 * 4;
            bench_optimizer(
                dev,
                args.steps,
                format!("candle-bnb CAME8bit ({dtype:?})"),
                &mut opt,
                &grads,
                (params, came_bytes, copy_gbps),
                |came_ms, state| {
                    format!(
                        "{:.2}x AdamW8bit's time; state {:.2} GB",
                        came_ms / ms,
                        state as f64 / 1e9
                    )
                },
                table,
            )?;
        }
        if args.candle_layers > 0 {
            let shapes = self::shapes(args.candle_layers, false);
            let (vars, grads) = setup(device, &shapes, dtype)?;
            let sub: usize = vars.iter().map(|v| v.elem_count()).sum();
            let mut opt = candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW::default())?;
            let (cms, chost) = time(dev, args.steps.min(5), || opt.step(&grads))?;
            let scaled = cms * params as f64 / sub as f64;
            print_row(
                &Row {
                    what: format!("candle_nn::AdamW ({dtype:?}), scaled to all params"),
                    params: sub,
                    ms: scaled,
                    host_ms: chost * params as f64 / sub as f64,
                    gbps: bytes as f64 / (scaled * 1e6),
                    vs_copy: copy_ms / scaled,
                    note: format!(
                        "{cms:.2} ms on {:.0} M params; candle-bnb is {:.1}x faster",
                        sub as f64 / 1e6,
                        scaled / ms
                    ),
                },
                table,
            );
        }
        Ok(())
    }

    pub fn run() -> Result<()> {
        let args = args()?;
        let device = match Device::new_cuda(0) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("gpu_step: skipped, no CUDA device ({e})");
                return Ok(());
            }
        };
        let gpu = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader"])
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .unwrap_or_else(|| "unknown GPU".into());
        let mut table = format!(
            "gpu_step: {} layers, {} timed steps, GPU {}\n| what | params | ms/step | host ms/call (device idle) | GB/s (min bytes) | vs copy | note |\n|---|---|---|---|---|---|---|\n",
            args.layers,
            args.steps,
            gpu.trim()
        );
        print!("{table}");
        let mut failed = None;
        for &dtype in &args.dtypes {
            // One dtype failing (out of memory, say) keeps the rows measured so far.
            if let Err(e) = bench_dtype(&device, &args, dtype, &mut table) {
                eprintln!("gpu_step: {dtype:?}: {e}");
                table += &format!("| {dtype:?} failed: {e} | | | | | | |\n");
                failed = Some(e);
            }
        }
        if let Some(dir) = &args.out {
            std::fs::create_dir_all(dir)?;
            std::fs::File::create(dir.join("gpu_step.md"))?.write_all(table.as_bytes())?;
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
