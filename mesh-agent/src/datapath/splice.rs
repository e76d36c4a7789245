//! In-kernel splicing of same-node flows that need neither TLS nor L7 processing: after
//! the policy decision, the agent's two sockets of the flow (accepted from the client,
//! opened to the server as the client) are paired, and the kernel's stream verdict
//! program sends what arrives on one out of the other. User space only watches for the
//! end of each direction.
//!
//! Ordering: a direction is spliced from its first byte or not at all. Both sockets
//! first join `MESH_SPLICE_TARGETS` (no program: their receive paths are untouched),
//! then their cookies are paired, then each joins `MESH_SPLICE_SOURCES`, whose stream
//! verdict redirects to the peer; so no byte can arrive on a source before its target
//! is there. Bytes queued before a socket became a source go through the verdict first,
//! in order (`SO_RCVLOWAT` re-runs the data-ready callback that is now the verdict's),
//! and the agent never reads a spliced socket. A socket that cannot become a source
//! (it closed meanwhile) has its direction copied by the agent from the start.
//! A FIN is carried by the agent: when a spliced direction's sender finishes, it waits
//! until every byte received there is queued on the other socket, then shuts that
//! socket's write side.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use tokio::{
    io::{Interest, Ready},
    net::TcpStream,
};

/// How long a spliced direction's FIN waits while none of its received bytes move on
/// (the receiver stopped reading) before the flow is given up.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// How many times a spliced direction's FIN re-checks at once, yielding in between,
/// whether its bytes moved on, before it waits on the timer.
const FIN_RECHECKS: u32 = 64;

/// The maps the verdict program uses; the program is attached to `sources`.
pub struct Splicer {
    sources: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<BpfHashMap<MapData, u64, u64>>,
    stall_limit: Duration,
}

fn map_error(err: aya::maps::MapError) -> io::Error {
    io::Error::other(err.to_string())
}

fn get_option<T: Copy>(fd: BorrowedFd, level: i32, name: i32, value: &mut T) -> io::Result<()> {
    let mut len = std::mem::size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a valid, writable `T` of `len` bytes for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cookie(socket: &TcpStream) -> io::Result<u64> {
    let mut cookie = 0u64;
    get_option(
        socket.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_COOKIE,
        &mut cookie,
    )?;
    Ok(cookie)
}

/// `SO_RCVLOWAT` re-runs the data-ready callback, which now is the verdict's: bytes that
/// arrived before the socket joined the sockhash are sent on at once.
fn nudge(socket: &TcpStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the option value is one int, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct TcpCounters {
    /// Sequence space received: data, and 1 for a FIN.
    received: u64,
    /// Sequence space acknowledged by the peer: data, and 1 for the SYN of an active
    /// opener.
    acked: u64,
    /// Bytes written but not yet acknowledged.
    unacked: u64,
    state: u8,
}

fn counters(socket: &TcpStream) -> io::Result<TcpCounters> {
    // SAFETY: tcp_info is plain data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    get_option(socket.as_fd(), libc::IPPROTO_TCP, libc::TCP_INFO, &mut info)?;
    let mut unacked: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpCounters {
        received: info.tcpi_bytes_received,
        acked: info.tcpi_bytes_acked,
        unacked: u64::try_from(unacked).unwrap_or(0),
        state: info.tcpi_state,
    })
}

const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

/// Data received on `from` after its FIN.
fn received_data(from: &TcpStream) -> io::Result<u64> {
    Ok(counters(from)?.received.saturating_sub(1))
}

/// Data written on `to` so far (acknowledged or still queued); the SYN of the side that
/// connected (`active_open`) is acknowledged too and is not data.
fn queued_data(to: &TcpStream, active_open: bool) -> io::Result<(u64, u8)> {
    let c = counters(to)?;
    Ok((
        c.acked.saturating_sub(u64::from(active_open)) + c.unacked,
        c.state,
    ))
}

/// Waits until every byte `from` received is queued on `to`, then shuts `to`'s
/// write side (its FIN follows the bytes). Gives up when `to` can no longer send or
/// nothing moves for `stall_limit`.
async fn carry_fin(
    from: &TcpStream,
    to: &TcpStream,
    to_active: bool,
    stall_limit: Duration,
) -> io::Result<u64> {
    let target = received_data(from)?;
    let mut last = (0, Instant::now());
    let mut pause = Duration::from_micros(200);
    let mut rechecks = 0;
    loop {
        let (queued, state) = queued_data(to, to_active)?;
        if queued >= target {
            break;
        }
        if state != TCP_ESTABLISHED && state != TCP_CLOSE_WAIT {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the other side closed before the spliced bytes were sent",
            ));
        }
        if queued != last.0 {
            last = (queued, Instant::now());
        } else if last.1.elapsed() > stall_limit {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("spliced bytes stuck at {queued} of {target}"),
            ));
        }
        // The last bytes usually move on within microseconds (the kernel's work queue
        // sends them), far below the timer's millisecond: a FIN held for one would
        // reach the client after it is done with the response, so it closes first and
        // its port stays in TIME_WAIT.
        if rechecks < FIN_RECHECKS {
            rechecks += 1;
            tokio::task::yield_now().await;
            continue;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
    Ok(target)
}

impl Splicer {
    pub fn new(
        sources: SockHash<MapData, u64>,
        targets: SockHash<MapData, u64>,
        peers: BpfHashMap<MapData, u64, u64>,
        stall_limit: Duration,
    ) -> Splicer {
        Splicer {
            sources: Mutex::new(sources),
            targets: Mutex::new(targets),
            peers: Mutex::new(peers),
            stall_limit,
        }
    }

    fn lock<T>(map: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes both sockets redirect targets and pairs them. On an error nothing has
    /// changed for the sockets (a target-only socket behaves as before) and the caller
    /// copies instead.
    pub fn splice<'a>(
        &'a self,
        client: &'a TcpStream,
        server: &'a TcpStream,
    ) -> io::Result<Spliced<'a>> {
        let cookies = (cookie(client)?, cookie(server)?);
        {
            let mut targets = Self::lock(&self.targets);
            targets
                .insert(cookies.0, client.as_raw_fd(), 0)
                .and_then(|()| targets.insert(cookies.1, server.as_raw_fd(), 0))
                .map_err(map_error)?;
        }
        let mut peers = Self::lock(&self.peers);
        peers
            .insert(cookies.0, cookies.1, 0)
            .and_then(|()| peers.insert(cookies.1, cookies.0, 0))
            .map_err(map_error)?;
        Ok(Spliced {
            splicer: self,
            cookies,
            client,
            server,
        })
    }

    /// Makes `socket` a source: from now on the kernel carries what arrives on it.
    fn source(&self, cookie: u64, socket: &TcpStream) -> bool {
        let joined = Self::lock(&self.sources).insert(cookie, socket.as_raw_fd(), 0);
        joined.is_ok() && nudge(socket).is_ok()
    }
}

/// A flow whose sockets are paired; dropping it unpairs them (the sockets leave the
/// sockhashes when they close).
pub struct Spliced<'a> {
    splicer: &'a Splicer,
    cookies: (u64, u64),
    client: &'a TcpStream,
    server: &'a TcpStream,
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        let mut peers = Splicer::lock(&self.splicer.peers);
        let _ = peers.remove(&self.cookies.0);
        let _ = peers.remove(&self.cookies.1);
    }
}

/// How one direction is carried.
enum Direction {
    /// By the kernel: the agent waits for the sender's FIN.
    Spliced,
    /// By the agent, from the first byte.
    Copied,
}

impl Spliced<'_> {
    /// Runs until both directions have ended; returns the bytes carried (client →
    /// server, server → client) and whether both directions were spliced.
    pub async fn run(self) -> io::Result<(u64, u64, bool)> {
        let upstream = self.direction(self.cookies.0, self.client);
        let downstream = self.direction(self.cookies.1, self.server);
        let spliced = matches!(
            (&upstream, &downstream),
            (Direction::Spliced, Direction::Spliced)
        );
        let limit = self.splicer.stall_limit;
        let (sent, received) = tokio::try_join!(
            carry(upstream, self.client, self.server, true, limit),
            carry(downstream, self.server, self.client, false, limit),
        )?;
        Ok((sent, received, spliced))
    }

    fn direction(&self, cookie: u64, socket: &TcpStream) -> Direction {
        if counters(socket).is_ok_and(|c| c.state == TCP_ESTABLISHED)
            && self.splicer.source(cookie, socket)
        {
            Direction::Spliced
        } else {
            Direction::Copied
        }
    }
}

/// Carries one direction, `from` → `to`, to its end; `to_active` says `to` is the
/// socket that connected.
async fn carry(
    direction: Direction,
    from: &TcpStream,
    to: &TcpStream,
    to_active: bool,
    stall_limit: Duration,
) -> io::Result<u64> {
    match direction {
        Direction::Spliced => {
            // The socket is never read: a read could take bytes the verdict has not seen
            // yet. The end shows as the peer's FIN (read-closed readiness).
            loop {
                let ready = from.ready(Interest::READABLE).await?;
                if closed(from, ready)? {
                    return carry_fin(from, to, to_active, stall_limit).await;
                }
            }
        }
        Direction::Copied => {
            let mut buffer = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                from.readable().await?;
                match from.try_read(&mut buffer) {
                    Ok(0) => {
                        socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                        return Ok(total);
                    }
                    Ok(n) => {
                        write_all(to, &buffer[..n]).await?;
                        total += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// Whether `socket`'s peer has finished sending; otherwise clears the readiness that
/// woke us (bytes the kernel carries on its own).
fn closed(socket: &TcpStream, ready: Ready) -> io::Result<bool> {
    if ready.is_error() {
        return Err(socket
            .take_error()?
            .unwrap_or_else(|| io::Error::other("socket error")));
    }
    if ready.is_read_closed() {
        return Ok(true);
    }
    let _ = socket.try_io(Interest::READABLE, || {
        Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
    });
    Ok(false)
}

async fn write_all(socket: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        socket.writable().await?;
        match socket.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
