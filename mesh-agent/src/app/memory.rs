//! Handing freed memory back to the system. glibc's allocator gives back on its own only
//! the top of its heaps: once a burst of thousands of connections has closed, the free
//! memory between allocations still in use stays with the agent, whose footprint would
//! sit at its peak. Every few seconds the agent asks the allocator how much it holds
//! free, and past a threshold has `malloc_trim` return those pages.

use std::time::Duration;

/// How often the agent looks at the allocator's free memory.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Free memory the allocator may keep without a trim: small enough that an idle agent
/// returns to its idle size, large enough that a steady load does not trim on every
/// check (the allocator reuses what it keeps).
pub const KEEP_FREE_BYTES: usize = 8 << 20;

/// Whether the allocator holds enough free memory to give some back.
pub fn worth_trimming(free_bytes: usize) -> bool {
    free_bytes > KEEP_FREE_BYTES
}

/// Checks the allocator every [`CHECK_INTERVAL`] and trims it when worthwhile.
pub async fn return_free_memory() {
    let mut ticker = tokio::time::interval(CHECK_INTERVAL);
    loop {
        ticker.tick().await;
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let free = unsafe { libc::mallinfo2() }.fordblks;
        if worth_trimming(free) {
            // SAFETY: malloc_trim only releases memory the allocator holds free.
            unsafe { libc::malloc_trim(0) };
            tracing::debug!("returned up to {free} free bytes to the system");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sizeable_free_pool_is_trimmed() {
        assert!(!worth_trimming(0));
        assert!(!worth_trimming(KEEP_FREE_BYTES));
        assert!(worth_trimming(KEEP_FREE_BYTES + 1));
        assert!(worth_trimming(200 << 20));
    }
}
