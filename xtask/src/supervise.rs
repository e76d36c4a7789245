//! The sandbox's stand-in for the agents' DaemonSet: a supervisor per node runs the node's
//! agent and starts a new one when it exits, as the kubelet restarts a crashed container;
//! on [`SUCCESSOR_SIGNAL`] it starts a successor beside the running agent, as a rolling
//! update with `maxSurge: 1` does (the agents hand over between themselves); on SIGTERM it
//! stops the agent as deleting the pod would. The sandbox's `restart-agent` and
//! `stop-agent` send those signals.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::daemon::RUN_DIR;

/// Set by the signal handlers, read by the supervisor's loop.
static SUCCESSOR_WANTED: AtomicBool = AtomicBool::new(false);
static STOP_WANTED: AtomicBool = AtomicBool::new(false);

extern "C" fn want_successor(_: libc::c_int) {
    SUCCESSOR_WANTED.store(true, Ordering::SeqCst);
}

extern "C" fn want_stop(_: libc::c_int) {
    STOP_WANTED.store(true, Ordering::SeqCst);
}

/// The signal asking a supervisor for a successor agent (a rolling update).
pub const SUCCESSOR_SIGNAL: libc::c_int = libc::SIGUSR1;
/// How often the supervisor looks at its agents and its signals.
pub const TICK: Duration = Duration::from_millis(20);
/// An agent that lived shorter than this and exited is restarted after a growing pause
/// (as the kubelet's crash-loop back-off), so a broken agent does not spin.
const QUICK_EXIT: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The file naming the pid of a node's current agent.
pub fn pid_file(node: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("agent-{node}.pid"))
}

/// The unix socket through which a node's agents hand over.
pub fn handover_socket(node: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("agent-{node}.sock"))
}

/// The pid of the node's current agent (0 when there is none).
pub fn agent_pid(node: &str) -> u32 {
    fs::read_to_string(pid_file(node))
        .ok()
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or(0)
}

fn write_pid(path: &Path, pid: u32) -> Result<()> {
    let partial = path.with_extension("pid.new");
    fs::write(&partial, pid.to_string())?;
    fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}

/// The supervisor's life: runs `agent` (a command line) and keeps one running until told
/// to stop (SIGTERM), starting a successor on [`SUCCESSOR_SIGNAL`].
pub fn supervise(pid_path: &Path, agent: &[String]) -> Result<()> {
    let Some((program, args)) = agent.split_first() else {
        bail!("supervise: no agent command");
    };
    // SAFETY: the handlers only store to atomics, which is async-signal-safe.
    unsafe {
        libc::signal(
            SUCCESSOR_SIGNAL,
            want_successor as *const () as libc::sighandler_t,
        );
        libc::signal(libc::SIGTERM, want_stop as *const () as libc::sighandler_t);
    }
    let start = || -> Result<(Child, Instant)> {
        let child = Command::new(program)
            .args(args)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        write_pid(pid_path, child.id())?;
        eprintln!("supervisor: agent {} started", child.id());
        Ok((child, Instant::now()))
    };
    // The newest is the current agent; older ones are draining after a handover.
    let mut agents = vec![start()?];
    let mut backoff = Duration::ZERO;
    let mut restart_at: Option<Instant> = None;
    loop {
        if STOP_WANTED.load(Ordering::SeqCst) {
            for (agent, _) in &mut agents {
                // SAFETY: plain kill(2) on a child of this process.
                unsafe { libc::kill(agent.id() as libc::pid_t, libc::SIGTERM) };
            }
            for (agent, _) in &mut agents {
                let _ = agent.wait();
            }
            let _ = fs::remove_file(pid_path);
            return Ok(());
        }
        if SUCCESSOR_WANTED.swap(false, Ordering::SeqCst) {
            agents.push(start()?);
        }
        let newest = agents.len().saturating_sub(1);
        let mut current_exited = false;
        let mut index = 0;
        agents.retain_mut(|(agent, started)| {
            let this = index;
            index += 1;
            match agent.try_wait() {
                Ok(None) => true,
                Ok(Some(status)) => {
                    eprintln!("supervisor: agent {} exited ({status})", agent.id());
                    if this == newest {
                        current_exited = true;
                        backoff = if started.elapsed() < QUICK_EXIT {
                            (backoff * 2).clamp(Duration::from_millis(100), MAX_BACKOFF)
                        } else {
                            Duration::ZERO
                        };
                    }
                    false
                }
                Err(err) => {
                    eprintln!("supervisor: agent {}: {err}", agent.id());
                    false
                }
            }
        });
        if current_exited {
            restart_at = Some(Instant::now() + backoff);
        }
        if restart_at.is_some_and(|at| Instant::now() >= at) {
            restart_at = None;
            agents.push(start()?);
        }
        std::thread::sleep(TICK);
    }
}
