//! Helpers shared by the benches: where criterion writes, and reading its estimates back.

use std::path::{Path, PathBuf};

use criterion::Criterion;

/// Criterion's output directory, fixed so the summary table can read the estimates.
pub fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("criterion")
}

/// Mean time per iteration in ns of `group/name`, from criterion's saved estimates.
pub fn mean_ns(group: &str, name: &str) -> Option<f64> {
    let path = output_dir()
        .join(group)
        .join(name)
        .join("new")
        .join("estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let mean = &text[text.find("\"mean\"")?..];
    let value = &mean[mean.find("\"point_estimate\":")? + "\"point_estimate\":".len()..];
    value[..value.find([',', '}'])?].trim().parse().ok()
}

/// Runs the criterion benches into [`output_dir`], then prints the bench's summary table.
pub fn run(bench: impl FnOnce(&mut Criterion), report: impl FnOnce()) {
    let mut c = Criterion::default()
        .output_directory(&output_dir())
        .configure_from_args();
    bench(&mut c);
    c.final_summary();
    report();
}
