//! What the device decided about a step (taken, or skipped for a non-finite gradient), read
//! back without waiting in a training loop.

use candle_core::Result;

use super::{CudaStepOutcome, StepState};
use candle_bnb_kernels::cuda::Backend;

impl<B: Backend> StepState<B> {
    /// As [`CudaOptimizerState::take_outcome`](super::super::CudaOptimizerState::take_outcome).
    pub(crate) fn take_outcome(&mut self) -> Result<Option<(CudaStepOutcome, Vec<usize>)>> {
        let Some(with_grad) = self.pending.take() else {
            return Ok(None);
        };
        let outcome = self.read_outcome(&with_grad)?;
        Ok(Some((outcome, with_grad)))
    }

    /// As [`CudaOptimizerState::pending_params`](super::super::CudaOptimizerState::pending_params).
    pub(crate) fn pending_params(&self) -> &[usize] {
        self.pending.as_deref().unwrap_or(&[])
    }

    /// As [`CudaOptimizerState::peek_outcome`](super::super::CudaOptimizerState::peek_outcome).
    pub(crate) fn peek_outcome(&self) -> Result<Option<CudaStepOutcome>> {
        match &self.pending {
            None => Ok(None),
            Some(with_grad) => {
                // `&self`: the wait is not remembered in `seen_after`, so the next step may ask
                // about its staging buffer (and find it done).
                self.backend.wait_event(&self.outcome_ready)?;
                let flags = self.backend.pinned_ref(&self.outcome)?;
                Ok(Some(Self::decode(flags, with_grad)))
            }
        }
    }

    pub(super) fn read_outcome(&mut self, with_grad: &[usize]) -> Result<CudaStepOutcome> {
        // A query first: in a training loop the pre-pass is long done and the host does not
        // block (a wait is a synchronisation point a CUDA graph could not hold).
        if !self.backend.is_complete(&self.outcome_ready)? {
            self.backend.wait_event(&self.outcome_ready)?;
        }
        self.seen_after = Some(self.outcome_after);
        let flags = self.backend.pinned_ref(&self.outcome)?;
        Ok(Self::decode(flags, with_grad))
    }

    pub(super) fn decode(flags: &[i32], with_grad: &[usize]) -> CudaStepOutcome {
        if flags[0] == 0 {
            CudaStepOutcome::Taken
        } else {
            let s = usize::try_from(flags[1]).unwrap_or(0);
            CudaStepOutcome::Skipped {
                first_bad: with_grad.get(s).copied().unwrap_or(0),
            }
        }
    }
}
