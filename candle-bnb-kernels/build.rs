//! Compiles the CUDA kernels in `kernels/` to PTX when the `cuda` feature is on; the PTX is
//! embedded in the library and loaded through Candle's `CudaDevice` at run time. With the
//! `emulator` feature the same kernel files are compiled for the CPU by the system C++ compiler
//! (see `emu/README.md`). The default build does nothing here and needs no CUDA toolkit.
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
    #[cfg(feature = "emulator")]
    emulator::build();
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

/// The kernels compiled for the CPU: each `kernels/*.cu` (and the emulator's own test kernels,
/// `emu/faults.cu`) as one C++ unit, unchanged, with `emu/include/bnb_emu.h` providing the CUDA
/// execution model, plus the emulator's runtime, all in one static library.
#[cfg(feature = "emulator")]
mod emulator {
    use std::path::{Path, PathBuf};

    /// Flags of the kernel units: no contraction into fused multiply-adds (the kernels are built
    /// with `--fmad=false`), no aliasing assumptions the CUDA compiler does not make either, and
    /// every memory access routed through the runtime's bounds check (KASAN-style outline calls,
    /// which need no sanitizer runtime).
    const KERNEL_FLAGS: &[&str] = &[
        "-std=c++17",
        "-fno-strict-aliasing",
        "-ffp-contract=off",
        "-fno-exceptions",
        "-Wno-unknown-pragmas",
        "-fsanitize=kernel-address",
        "--param",
        "asan-instrumentation-with-call-threshold=0",
        "--param",
        "asan-stack=0",
        "--param",
        "asan-globals=0",
    ];

    pub(super) fn build() {
        println!("cargo:rerun-if-changed=emu");
        let out =
            PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("emu");
        std::fs::create_dir_all(&out).expect("OUT_DIR is writable");
        let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
            .expect("candle-bnb-kernels/kernels exists")
            .map(|e| e.expect("readable kernels/ entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "cu"))
            .collect();
        sources.sort();
        sources.push(PathBuf::from("emu/faults.cu"));

        let mut units = cc::Build::new();
        units
            .cpp(true)
            .opt_level(2)
            .warnings(false)
            .include("emu/include")
            .include("emu")
            .include("kernels")
            .include(&out)
            .flag("-include")
            .flag("bnb_emu.h");
        for f in KERNEL_FLAGS {
            units.flag(f);
        }
        let mut registry = String::new();
        for src in &sources {
            let stem = src
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("UTF-8 name");
            let file = src
                .file_name()
                .and_then(|s| s.to_str())
                .expect("UTF-8 name");
            let kernels = kernel_names(&units, src);
            assert!(!kernels.is_empty(), "{} defines no kernel", src.display());
            let list: String = kernels
                .iter()
                .map(|k| format!("BNB_EMU_KERNEL({k})\n"))
                .collect();
            write_if_changed(&out.join(format!("{stem}.kernels.inc")), &list);
            let wrapper = out.join(format!("unit_{stem}.cpp"));
            write_if_changed(
                &wrapper,
                &format!(
                    "#define BNB_EMU_SOURCE \"{file}\"\n#define BNB_EMU_KERNELS \"{stem}.kernels.inc\"\n#define BNB_EMU_UNIT {stem}\n#include \"unit.cpp\"\n"
                ),
            );
            units.file(&wrapper);
            registry.push_str(&format!("BNB_EMU_UNIT({stem})\n"));
        }
        write_if_changed(&out.join("units.inc"), &registry);
        let objects = units.compile_intermediates();

        cc::Build::new()
            .cpp(true)
            .opt_level(2)
            .flag("-std=c++17")
            .include("emu")
            .include(&out)
            .file("emu/runtime.cpp")
            .file("emu/registry.cpp")
            .objects(objects)
            .compile("candle_bnb_emu");
    }

    /// The `extern "C" __global__` functions of `src`: the preprocessed source with `__global__`
    /// spelled `bnb_emu_kernel_marker` (`BNB_EMU_SCAN`), so macro-generated kernels are found too.
    fn kernel_names(units: &cc::Build, src: &Path) -> Vec<String> {
        let mut cmd = units.get_compiler().to_command();
        cmd.args(["-x", "c++", "-E", "-P", "-DBNB_EMU_SCAN"])
            .arg(src);
        let output = cmd.output().unwrap_or_else(|e| {
            panic!("cannot run the C++ preprocessor on {}: {e}", src.display())
        });
        if !output.status.success() {
            panic!(
                "preprocessing {} failed:\n{}",
                src.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let mut names = Vec::new();
        let mut at = 0;
        while let Some(found) = text[at..].find("bnb_emu_kernel_marker") {
            at += found + "bnb_emu_kernel_marker".len();
            let rest = text[at..].trim_start();
            let Some(rest) = rest.strip_prefix("void") else {
                panic!(
                    "{}: a __global__ function that does not return void",
                    src.display()
                )
            };
            let rest = rest.trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                !name.is_empty(),
                "{}: unnamed __global__ function",
                src.display()
            );
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// Writes `text` to `path` unless it already holds it (keeps the C++ objects up to date
    /// without recompiling them for nothing).
    fn write_if_changed(path: &Path, text: &str) {
        if std::fs::read_to_string(path).ok().as_deref() != Some(text) {
            std::fs::write(path, text)
                .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        }
    }
}
