//! What the emulated device records of the operations it is asked to do.

/// One operation the emulated device was asked to do, in issue order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceOp {
    /// A device allocation of this many bytes.
    Alloc {
        /// Bytes.
        bytes: usize,
    },
    /// A device buffer of this many bytes freed.
    Free {
        /// Bytes.
        bytes: usize,
    },
    /// A pinned host allocation of this many bytes.
    AllocPinned {
        /// Bytes.
        bytes: usize,
    },
    /// A copy from pageable host memory into device memory.
    Upload {
        /// Bytes.
        bytes: usize,
    },
    /// A copy from device memory into pageable host memory; the host waits for the device.
    Download {
        /// Bytes.
        bytes: usize,
    },
    /// A stream-ordered copy from pinned host memory into device memory.
    CopyFromPinned {
        /// Bytes.
        bytes: usize,
    },
    /// A stream-ordered copy from device memory into pinned host memory.
    CopyToPinned {
        /// Bytes.
        bytes: usize,
    },
    /// An event recorded in the stream.
    RecordEvent {
        /// The event (numbered from 0 per device).
        event: u64,
    },
    /// The host asked whether an event has completed (no wait).
    QueryEvent {
        /// The event.
        event: u64,
    },
    /// The host waited for an event.
    WaitEvent {
        /// The event.
        event: u64,
    },
    /// The host waited for the whole stream.
    Synchronize,
    /// A kernel launch with the grid the host asked for (the emulator runs at most
    /// [`MAX_EMULATED_GRID`] blocks of it).
    Launch {
        /// The kernel's name.
        kernel: String,
        /// CUDA blocks asked for.
        grid: u32,
    },
}

impl DeviceOp {
    /// Whether the host waits for the device here.
    pub fn waits(&self) -> bool {
        matches!(
            self,
            Self::Download { .. } | Self::WaitEvent { .. } | Self::Synchronize
        )
    }

    /// Whether the operation may be issued while a CUDA graph is being captured (stream-ordered
    /// copies between device and pinned memory, event records and launches; not allocations,
    /// copies from pageable memory, event queries or any wait).
    pub fn capturable(&self) -> bool {
        matches!(
            self,
            Self::CopyFromPinned { .. }
                | Self::CopyToPinned { .. }
                | Self::RecordEvent { .. }
                | Self::Launch { .. }
        )
    }
}
