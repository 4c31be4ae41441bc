//! Whole-tensor reductions the optimizers' gradient pre-pass needs.

use candle_core::{bail, CpuStorage, DType, Result, Storage, Tensor};

use crate::cpu::Isa;

/// `Σ x²` over every element of `t`, accumulated in f64 (the squared L2 norm): NaN when some
/// element is NaN or ±inf, so one pass gives both the norm and the finiteness check. The result
/// does not depend on the thread count. Integer tensors are summed too.
///
/// # Errors
/// Only those of reading `t` (a non-CPU tensor is reduced with Candle ops).
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    if !t.device().is_cpu() || !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>();
    }
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("sum_squares: expected a contiguous layout")
    };
    let isa = Isa::selected();
    Ok(match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => crate::cpu::norms::sum_squares(isa, &v[start..end]),
        Storage::Cpu(CpuStorage::F16(v)) => crate::cpu::norms::sum_squares(isa, &v[start..end]),
        Storage::Cpu(CpuStorage::BF16(v)) => crate::cpu::norms::sum_squares(isa, &v[start..end]),
        _ => bail!("sum_squares: unexpected storage for dtype {:?}", t.dtype()),
    })
}
