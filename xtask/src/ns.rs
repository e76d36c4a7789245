//! Running things inside the sandbox's network namespaces and cgroups: processes (the
//! agents, the pods' commands, `sandbox exec`) and, for xtask's own probes, a closure on a
//! thread that entered the namespace.

use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command},
};

use anyhow::{bail, Context, Result};

/// Where a process runs: a network namespace and, for pods and agents, a cgroup.
pub struct Placement {
    pub netns: String,
    pub cgroup: Option<PathBuf>,
    /// Start a new session, so the process outlives xtask.
    pub detach: bool,
    /// A pod's resolver configuration, bind-mounted over /etc/resolv.conf in a mount
    /// namespace of the process's own (as the kubelet gives each pod its own).
    pub resolv_conf: Option<PathBuf>,
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

fn netns_file(name: &str) -> Result<File> {
    let path = Path::new("/run/netns").join(name);
    File::open(&path).with_context(|| format!("network namespace {name} ({})", path.display()))
}

/// Makes `command` start inside `placement` (joined between fork and exec).
pub fn place(command: &mut Command, placement: &Placement) -> Result<()> {
    let netns = netns_file(&placement.netns)?;
    let procs = match &placement.cgroup {
        Some(dir) => Some(
            CString::new(dir.join("cgroup.procs").to_string_lossy().into_owned())
                .context("cgroup path with a NUL byte")?,
        ),
        None => None,
    };
    let detach = placement.detach;
    // A machine without /etc/resolv.conf has nothing to mount over.
    let resolv_conf = match &placement.resolv_conf {
        Some(path) if Path::new(RESOLV_CONF).exists() => Some((
            CString::new(path.to_string_lossy().into_owned())
                .context("resolv.conf path with a NUL byte")?,
            CString::new(RESOLV_CONF).context("resolv.conf")?,
        )),
        _ => None,
    };
    // SAFETY: the closure only makes async-signal-safe system calls (setsid, close_range,
    // open, write, close, setns, unshare, mount) on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if detach && libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A daemon must not keep descriptors it inherited open past exec: one holding
            // the `flock` a caller wrapped `sandbox up` in would hold that lock for as long
            // as the sandbox runs, and the `sandbox down` waiting for it would wait forever.
            if detach
                && libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as i32) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if written != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some((source, target)) = &resolv_conf {
                // Private mounts first, so the bind mount stays in this namespace.
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Ok(())
}

pub fn spawn(command: &mut Command, placement: &Placement) -> Result<Child> {
    place(command, placement)?;
    command
        .spawn()
        .with_context(|| format!("starting {command:?} in {}", placement.netns))
}

/// Runs `f` on a thread that joined the network namespace `name`.
pub fn within<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let netns = netns_file(name)?;
    let thread = std::thread::spawn(move || {
        // SAFETY: setns on this thread only; the fd is valid for the call.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(f())
    });
    match thread.join() {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => bail!("entering network namespace {name}: {err}"),
        Err(_) => bail!("thread in network namespace {name} panicked"),
    }
}
