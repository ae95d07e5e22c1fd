//! Keeps a proxy's memory to what is in flight.
//!
//! A transfer allocates one buffer per chunk (1 MiB by default) on one thread and frees it on
//! another once the chunk is written. glibc's allocator gives every thread that allocates a
//! heap (arena) of its own, up to eight per core, and a freed chunk stays in the arena it came
//! from for that arena's next allocation: with readers, writers and runtime workers each holding
//! a few chunks' worth, a long transfer keeps tens of MiB it no longer uses. One arena for the
//! process lets every thread reuse the same freed chunks. (Pinning the mmap threshold instead,
//! so chunks are mapped on their own and returned at once, bounds memory as well but costs a
//! page fault and a cleared page per 4 KiB of every chunk: a quarter more CPU in the proxies.)

/// Limits the process to one allocator arena; call it once, as early as possible (threads that
/// already allocated keep their arenas). Returns whether the allocator took it (only glibc has
/// the knob; elsewhere this does nothing).
pub fn bound_chunk_retention() -> bool {
    one_arena()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn one_arena() -> bool {
    // SAFETY: mallopt only changes allocator tuning; M_ARENA_MAX takes a count and may be set
    // at any time from any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_arena() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_limit() {
        assert!(super::bound_chunk_retention());
    }
}
