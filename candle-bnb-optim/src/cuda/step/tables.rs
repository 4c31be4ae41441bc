//! A step's device tables (`GradSlot`s, then one `Slot` table per group), written into pinned
//! host memory and copied to the device in one transfer.

use candle_core::{Result, Tensor};

use super::StepState;
use candle_bnb_kernels::cuda::Backend;
use candle_bnb_kernels::slot_table::{
    dtype_code, slot_bytes, GradSlot, Slot, TableWriter, GRAD_SLOT_BYTES, NORM_CHUNK,
};
use candle_bnb_kernels::CudaRule;

/// Where one group's slot table is in a step's tables, and what it covers this step (only
/// parameters with a gradient are in it).
pub(super) struct GroupTable {
    pub(super) offset: usize,
    pub(super) n_slots: usize,
    pub(super) total_blocks: u64,
}

/// The layout of one step's tables.
pub(super) struct Tables {
    /// Pre-pass chunks over every gradient of the step.
    pub(super) total_chunks: u64,
    /// One entry per group, in group order.
    pub(super) groups: Vec<GroupTable>,
}

/// The pinned host memory a step's tables are written into; two of them alternate, so writing
/// step `t`'s tables waits at most for the copy of step `t - 2`'s.
///
/// cudarc records the pinned buffers' own events only when the context has several streams,
/// and Candle's device uses one, so each buffer has an event of ours, recorded after its copy.
pub(super) struct Staging<B: Backend> {
    pub(super) buffers: [B::Pinned<u8>; 2],
    pub(super) copied: [B::Event; 2],
    pub(super) device: B::Buffer<u8>,
    pub(super) next: usize,
    pub(super) bytes: usize,
}

impl<B: Backend> StepState<B> {
    /// Makes sure the staging buffers hold at least `bytes` (allocated once, or again for a
    /// larger table) and that the next one is free to write.
    pub(super) fn ready_staging(&mut self, bytes: usize) -> Result<()> {
        // At least one byte: CUDA refuses empty allocations (a state without parameters).
        let bytes = bytes.max(1);
        if self.staging.as_ref().is_none_or(|s| s.bytes < bytes) {
            // First step (or a rule with a larger struct): allocated once.
            if let Some(old) = &self.staging {
                // Copies from the old buffers must be done before they are freed.
                for e in &old.copied {
                    self.backend.wait_event(e)?;
                }
            }
            let dev = &self.backend;
            self.staging = Some(Staging {
                buffers: [
                    dev.alloc_pinned::<u8>(bytes)?,
                    dev.alloc_pinned::<u8>(bytes)?,
                ],
                copied: [dev.new_event()?, dev.new_event()?],
                device: dev.alloc_zeros::<u8>(bytes)?,
                next: 0,
                bytes,
            });
        }
        let staging = self.staging.as_ref().expect("allocated above");
        // This buffer was last copied from two table copies ago. When the host has seen an
        // outcome recorded after the latest copy (the optimizers read step t - 1's outcome
        // before building step t's rules), every copy is known to be done and it need not ask.
        if self.seen_after != Some(self.table_copies) {
            self.backend.wait_event(&staging.copied[staging.next])?;
        }
        Ok(())
    }

    /// Copies the staging buffer just written to the device (stream-ordered, no wait) and
    /// records its event.
    pub(super) fn send_staging(&mut self) -> Result<()> {
        let dev = &self.backend;
        let staging = self.staging.as_mut().expect("written before sent");
        let (buffers, device) = (&staging.buffers, &mut staging.device);
        self.table_copies += 1;
        dev.copy_from_pinned(&buffers[staging.next], device)?;
        dev.record(&staging.copied[staging.next])?;
        staging.next = 1 - staging.next;
        Ok(())
    }

    /// Writes the grad-slot table and every group's slot table into the next pinned staging
    /// buffer and copies it to the device (stream-ordered, no wait). Returns where each group's
    /// table is and what it covers, for the launches.
    pub(super) fn write_and_copy_tables<R: CudaRule>(
        &mut self,
        grads: &[Option<(&Tensor, R)>],
        with_grad: &[usize],
        grad_address: &[u64],
        param_address: &[u64],
    ) -> Result<Tables> {
        self.ready_staging((GRAD_SLOT_BYTES + slot_bytes::<R>()) * self.params.len())?;
        let dev = &self.backend;
        let staging = self.staging.as_mut().expect("allocated by ready_staging");
        let host = dev.pinned_mut(&mut staging.buffers[staging.next])?;
        let mut w = TableWriter::new(host);
        let total_chunks = write_grad_slots(&mut w, &self.params, with_grad, grad_address)?;
        let mut groups = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            let offset = w.position();
            let mut n_slots = 0;
            let mut first_block = 0u64;
            for &i in &group.members {
                let Some((_, rule)) = &grads[i] else { continue };
                let n = self.params[i].elem_count() as u64;
                let (state, absmax) = self.state_ptrs[i];
                w.slot(&Slot {
                    param: param_address[i],
                    grad: grad_address[i],
                    state,
                    absmax,
                    n,
                    first_block,
                    scale_index: i as u64,
                    rule,
                });
                n_slots += 1;
                first_block += n.div_ceil(group.block_size as u64);
            }
            groups.push(GroupTable {
                offset,
                n_slots,
                total_blocks: first_block,
            });
        }
        self.send_staging()?;
        Ok(Tables {
            total_chunks,
            groups,
        })
    }

    pub(super) fn table_address(&self, offset: usize) -> u64 {
        let staging = self
            .staging
            .as_ref()
            .expect("tables written before launches");
        self.backend.address(&staging.device) + offset as u64
    }
}

/// Writes the pre-pass's `GradSlot` of each parameter in `with_grad` and moves `w` past the
/// grad-slot table (room for every parameter); returns the chunks over those gradients.
pub(super) fn write_grad_slots(
    w: &mut TableWriter<'_>,
    params: &[Tensor],
    with_grad: &[usize],
    grad_address: &[u64],
) -> Result<u64> {
    let mut first_chunk = 0u64;
    for &i in with_grad {
        let param = &params[i];
        let n = param.elem_count() as u64;
        w.grad_slot(&GradSlot {
            grad: grad_address[i],
            n,
            first_chunk,
            dtype: dtype_code(param.dtype())?,
            index: i as u32,
        });
        first_chunk += n.div_ceil(NORM_CHUNK as u64);
    }
    w.seek(GRAD_SLOT_BYTES * params.len());
    Ok(first_chunk)
}
