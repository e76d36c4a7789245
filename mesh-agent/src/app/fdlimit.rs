//! The process's file-descriptor limit. Every connection the agent carries costs it two
//! descriptors (the pod's and the upstream one) and the soft limit a process inherits is
//! often 1024, so one busy pod could otherwise exhaust it for the whole node: the soft
//! limit is raised to the hard limit at start.

use std::io;

/// Below this many descriptors the agent serves a node's pods only while they are quiet:
/// a few thousand concurrent connections, each two descriptors, would exhaust it.
pub const LOW_FD_LIMIT: u64 = 65_536;

/// The soft limit before and after raising it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    pub before: u64,
    pub after: u64,
}

impl FdLimit {
    /// Whether the limit reached is too low for a node's worth of connections.
    pub fn is_low(&self) -> bool {
        self.after < LOW_FD_LIMIT
    }
}

fn get() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given, which lives on this stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

fn set(limit: &libc::rlimit) -> io::Result<()> {
    // SAFETY: setrlimit only reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (no privilege needed for that).
pub fn raise() -> io::Result<FdLimit> {
    let mut limit = get()?;
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        set(&limit)?;
    }
    Ok(FdLimit {
        before,
        after: get()?.rlim_cur,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        let mut limit = get().expect("getrlimit");
        // Make sure there is something to raise, without ever lowering the limit far
        // enough to disturb the tests running beside this one.
        if limit.rlim_cur == limit.rlim_max {
            limit.rlim_cur = limit.rlim_max - 1;
            set(&limit).expect("setrlimit");
        }
        let raised = raise().expect("raise");
        assert_eq!(raised.before, limit.rlim_cur);
        assert_eq!(raised.after, limit.rlim_max);
        assert_eq!(get().expect("getrlimit").rlim_cur, limit.rlim_max);
    }

    #[test]
    fn a_limit_of_a_few_thousand_is_low() {
        let limit = |after| FdLimit {
            before: 1024,
            after,
        };
        assert!(limit(1024).is_low());
        assert!(limit(20_000).is_low());
        assert!(!limit(LOW_FD_LIMIT).is_low());
        assert!(!limit(1 << 20).is_low());
    }
}
