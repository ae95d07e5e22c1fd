//! Keeps a proxy's memory to what is in flight.
//!
//! A transfer allocates one buffer per chunk (1 MiB by default) on one thread and frees it on
//! another once the chunk is written. glibc's allocator raises its mmap threshold after the
//! first such buffer is freed, after which chunks come from per-thread heaps that keep their
//! freed pages: a long transfer then holds tens of MiB it no longer uses. Pinning the threshold
//! keeps chunk buffers mapped on their own, so freeing one returns it to the system at once.

/// Allocations from this size up are mapped on their own and returned to the system when freed.
pub const SEPARATE_MAPPING_FROM: usize = 128 << 10;

/// Pins the allocator's mmap threshold at [`SEPARATE_MAPPING_FROM`] for this process; call it
/// once at start. Returns whether the allocator took it (only glibc has the knob; elsewhere
/// this does nothing).
pub fn bound_chunk_retention() -> bool {
    pin_mmap_threshold()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn pin_mmap_threshold() -> bool {
    let Ok(threshold) = libc::c_int::try_from(SEPARATE_MAPPING_FROM) else {
        return false;
    };
    // SAFETY: mallopt only changes allocator tuning; M_MMAP_THRESHOLD takes a byte count and
    // may be set at any time from any thread.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin_mmap_threshold() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_threshold() {
        assert!(super::bound_chunk_retention());
    }
}
