//! [`Backend`] on the emulated device.

use super::*;

impl Backend for Emulator {
    type Buffer<T: Element> = EmuBuffer<T>;
    type Pinned<T: Element> = EmuPinned<T>;
    type Event = EmuEvent;
    type Hold = EmuHold;

    fn alloc_zeros<T: Element>(&self, len: usize) -> Result<EmuBuffer<T>> {
        self.alloc(len, 0)
    }

    fn alloc_uninit<T: Element>(&self, len: usize) -> Result<EmuBuffer<T>> {
        self.alloc(len, POISON)
    }

    fn upload<T: Element>(&self, src: &[T]) -> Result<EmuBuffer<T>> {
        let mut b = self.alloc(src.len(), POISON)?;
        self.copy_to_device(src, &mut b)?;
        Ok(b)
    }

    fn copy_to_device<T: Element>(&self, src: &[T], dst: &mut EmuBuffer<T>) -> Result<()> {
        if src.len() > dst.len {
            bail!(
                "emulated CUDA: copying {} elements into a buffer of {}",
                src.len(),
                dst.len
            )
        }
        dst.as_mut_slice()[..src.len()].copy_from_slice(src);
        self.push(DeviceOp::Upload {
            bytes: std::mem::size_of_val(src),
        });
        Ok(())
    }

    fn download<T: Element>(&self, src: &EmuBuffer<T>) -> Result<Vec<T>> {
        self.download_range(src, 0, src.len)
    }

    fn download_range<T: Element>(
        &self,
        src: &EmuBuffer<T>,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>> {
        let Some(part) = src.as_slice().get(start..start + len) else {
            bail!(
                "emulated CUDA: reading {len} elements from {start} of a buffer of {}",
                src.len
            )
        };
        self.push(DeviceOp::Download {
            bytes: std::mem::size_of_val(part),
        });
        Ok(part.to_vec())
    }

    fn address<T: Element>(&self, buf: &EmuBuffer<T>) -> u64 {
        buf.address()
    }

    fn alloc_pinned<T: Element>(&self, len: usize) -> Result<EmuPinned<T>> {
        if len == 0 {
            bail!("emulated CUDA: a pinned allocation of 0 elements")
        }
        self.push(DeviceOp::AllocPinned {
            bytes: len * std::mem::size_of::<T>(),
        });
        Ok(EmuPinned(vec![T::default(); len]))
    }

    fn pinned_mut<'a, T: Element>(&self, p: &'a mut EmuPinned<T>) -> Result<&'a mut [T]> {
        Ok(&mut p.0)
    }

    fn pinned_ref<'a, T: Element>(&self, p: &'a EmuPinned<T>) -> Result<&'a [T]> {
        Ok(&p.0)
    }

    fn copy_from_pinned<T: Element>(
        &self,
        src: &EmuPinned<T>,
        dst: &mut EmuBuffer<T>,
    ) -> Result<()> {
        if src.0.len() > dst.len {
            bail!(
                "emulated CUDA: copying {} pinned elements into a buffer of {}",
                src.0.len(),
                dst.len
            )
        }
        dst.as_mut_slice()[..src.0.len()].copy_from_slice(&src.0);
        self.push(DeviceOp::CopyFromPinned {
            bytes: std::mem::size_of_val(&src.0[..]),
        });
        Ok(())
    }

    fn copy_to_pinned<T: Element>(&self, src: &EmuBuffer<T>, dst: &mut EmuPinned<T>) -> Result<()> {
        if dst.0.len() > src.len {
            bail!(
                "emulated CUDA: copying a buffer of {} into {} pinned elements",
                src.len,
                dst.0.len()
            )
        }
        let n = dst.0.len();
        dst.0.copy_from_slice(&src.as_slice()[..n]);
        self.push(DeviceOp::CopyToPinned {
            bytes: n * std::mem::size_of::<T>(),
        });
        Ok(())
    }

    fn new_event(&self) -> Result<EmuEvent> {
        let mut s = self.lock();
        s.events += 1;
        Ok(EmuEvent(s.events - 1))
    }

    fn record(&self, event: &EmuEvent) -> Result<()> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::RecordEvent { event: event.0 });
        if s.lagging {
            s.unwaited.insert(event.0);
        }
        Ok(())
    }

    fn is_complete(&self, event: &EmuEvent) -> Result<bool> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::QueryEvent { event: event.0 });
        Ok(!s.unwaited.contains(&event.0))
    }

    fn wait_event(&self, event: &EmuEvent) -> Result<()> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::WaitEvent { event: event.0 });
        s.unwaited.remove(&event.0);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        let mut s = self.lock();
        s.trace.push(DeviceOp::Synchronize);
        s.unwaited.clear();
        Ok(())
    }

    unsafe fn launch(
        &self,
        _module: Module,
        kernel: &str,
        grid: u32,
        args: &[KernelArg],
    ) -> Result<()> {
        // SAFETY: the caller's contract.
        unsafe { self.launch_kernel(kernel, grid, THREADS, args) }
    }

    fn tensor_address(&self, t: &Tensor, what: &str) -> Result<(u64, EmuHold)> {
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = contiguous_range(layout, what)?;
        let (base, size) = match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => (v.as_ptr() as usize, 4),
            Storage::Cpu(CpuStorage::F16(v)) => (v.as_ptr() as usize, 2),
            Storage::Cpu(CpuStorage::BF16(v)) => (v.as_ptr() as usize, 2),
            Storage::Cpu(_) => bail!(
                "{what}: dtype must be F32, F16 or BF16, got {:?}",
                t.dtype()
            ),
            _ => bail!(
                "{what}: the emulated CUDA device steps tensors on the CPU, got one on {:?}",
                t.device().location()
            ),
        };
        drop(storage);
        let address = base + start * size;
        let bytes = (end - start) * size;
        let mut s = self.lock();
        let held = s.held.entry(address).or_insert_with(|| Held {
            region: Region {
                bytes,
                name: CString::new(format!("{what} ({} elements)", end - start))
                    .unwrap_or_else(|_| CString::new("host tensor").expect("no NUL")),
            },
            holds: 0,
        });
        held.region.bytes = held.region.bytes.max(bytes);
        held.holds += 1;
        Ok((
            address as u64,
            EmuHold {
                owner: self.clone(),
                address,
                _tensor: t.clone(),
            },
        ))
    }
}
