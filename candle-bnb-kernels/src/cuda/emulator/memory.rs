//! Device memory, pinned host memory, events and tensor holds of the emulated device.

use super::*;

/// Device memory of the emulated device: `len` elements of `T` at a 256-byte aligned address.
pub struct EmuBuffer<T> {
    pub(super) ptr: NonNull<T>,
    pub(super) len: usize,
    pub(super) owner: Emulator,
}

// SAFETY: the buffer owns its memory (as a Vec would); access goes through &self / &mut self.
unsafe impl<T: Send> Send for EmuBuffer<T> {}
// SAFETY: as above; shared references only read.
unsafe impl<T: Sync> Sync for EmuBuffer<T> {}

impl<T> EmuBuffer<T> {
    pub(super) fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised elements (zeroed, poisoned or copied in; every `T` here is a
        // plain number for which any bit pattern is valid).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The device address of the first element.
    pub fn address(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no element (never: allocations are not empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Element> EmuBuffer<T> {
    /// The elements, copied to a `Vec` (reading device memory directly: not an operation of
    /// the device).
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }
}

impl<T> Drop for EmuBuffer<T> {
    fn drop(&mut self) {
        self.owner
            .free(self.ptr.cast(), self.len * std::mem::size_of::<T>());
    }
}

/// Pinned host memory of the emulated device.
pub struct EmuPinned<T>(pub(super) Vec<T>);

/// An event of the emulated device (every operation has run by the time it returns, so events
/// are complete as soon as they are recorded).
pub struct EmuEvent(pub(super) u64);

/// A held host tensor: its memory stays valid and open to kernels until this is dropped.
pub struct EmuHold {
    pub(super) owner: Emulator,
    pub(super) address: usize,
    pub(super) _tensor: Tensor,
}

impl Drop for EmuHold {
    fn drop(&mut self) {
        let mut s = self.owner.lock();
        if let Some(r) = s.held.get_mut(&self.address) {
            r.holds -= 1;
            if r.holds == 0 {
                s.held.remove(&self.address);
            }
        }
    }
}
