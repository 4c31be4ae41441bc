//! Compiles the CUDA kernels in `kernels/` to PTX when the `cuda` feature is on; the PTX is
//! embedded in the library and loaded through Candle's `CudaDevice` at run time. The default
//! build does nothing here and needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on `PATH`. The target is
//! `$CUDA_COMPUTE_CAP` (e.g. `90` for H100/H200, `80` for A100): no GPU and no `nvidia-smi` are
//! needed at build time. Without it the PTX targets compute capability 8.0, which newer GPUs
//! compile on load.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Compute capability used when `CUDA_COMPUTE_CAP` is not set.
const DEFAULT_COMPUTE_CAP: &str = "80";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "CUDA_HOME", "CUDA_COMPUTE_CAP", "PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let kernels = Path::new("kernels");
    let cap = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) => cap.trim().replace('.', ""),
        Err(_) => {
            println!(
                "cargo:warning=CUDA_COMPUTE_CAP is not set; building PTX for compute capability {DEFAULT_COMPUTE_CAP}"
            );
            DEFAULT_COMPUTE_CAP.to_string()
        }
    };
    if cap.is_empty() || !cap.chars().all(|c| c.is_ascii_digit()) {
        panic!("CUDA_COMPUTE_CAP must be a number such as 90 or 8.0, got {cap:?}");
    }
    let nvcc = nvcc();
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
        .expect("candle-bnb-kernels/kernels exists")
        .map(|e| e.expect("readable kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 name");
        let ptx = out_dir.join(format!("{stem}.ptx"));
        // Exact IEEE division and square root and no contraction into fused multiply-adds: the
        // kernels must round exactly as the CPU kernels (Rust never contracts either).
        let status = Command::new(&nvcc)
            .args(["--ptx", "-std=c++17", "-O3", "--fmad=false", "-prec-div=true"])
            .args(["-prec-sqrt=true", "-ftz=false", "-Werror", "all-warnings"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-I")
            .arg(kernels)
            .arg(src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nvcc ({}): {e}; install CUDA, set CUDA_HOME, or run `eval \"$(scripts/cuda-toolchain.sh)\"`",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn nvcc() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if nvcc.exists() {
            return nvcc;
        }
    }
    "nvcc".into()
}
