//! The sockops program on real TCP connections of a process in a cgroup: a flow entry
//! while the connection is open, open and close events with the exact bytes each way,
//! for connections closed with FINs and with a reset, and a reader woken only when the
//! event ring fills.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    os::{
        fd::{AsFd, AsRawFd},
        unix::process::CommandExt,
    },
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use aya::{
    maps::{HashMap, MapData, RingBuf},
    programs::{CgroupAttachMode, SockOps},
};
use bpf_tests::{load, Loaded};
use mesh_agent::datapath::{cgroup2_mount, ip_key};
use mesh_common::{
    pins, programs, FlowEvent, FlowKey, FlowStats, FLOW_EVENTS_WAKEUP_BYTES, FLOW_EVENT_CLOSE,
    FLOW_EVENT_OPEN, FLOW_FLAG_DIRECT, FLOW_ROLE_CLIENT, FLOW_ROLE_SERVER,
};

/// A cgroup of its own for the test's client or server process.
struct TestCgroup(PathBuf);

impl TestCgroup {
    fn new(name: &str) -> TestCgroup {
        let root = cgroup2_mount().expect("a cgroup v2 hierarchy");
        let dir = root.join(format!("mesh-tests-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the test cgroup");
        TestCgroup(dir)
    }

    /// A command whose process joins this cgroup before it runs.
    fn command(&self, program: &str) -> Command {
        let procs = self.0.join("cgroup.procs");
        let mut command = Command::new(program);
        // SAFETY: only writes to a file between fork and exec.
        unsafe {
            command.pre_exec(move || std::fs::write(&procs, b"0"));
        }
        command
    }

    /// Runs a Python script in this cgroup to its successful end; its standard output.
    fn run_python(&self, script: &str, args: &[&str]) -> String {
        let output = self
            .command("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .expect("python3");
        succeeded(output)
    }
}

/// The standard output of a process that must have succeeded.
fn succeeded(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn attach(loaded: &mut Loaded, cgroup: &TestCgroup) {
    let prog: &mut SockOps = loaded
        .ebpf
        .program_mut(programs::SOCKOPS)
        .expect("program in the object")
        .try_into()
        .expect("a sockops program");
    prog.load().expect("verifier accepts the sockops program");
    let dir = std::fs::File::open(&cgroup.0).expect("cgroup directory");
    prog.attach(dir, CgroupAttachMode::Single)
        .expect("attach to the cgroup");
}

fn events(loaded: &mut Loaded) -> RingBuf<MapData> {
    RingBuf::try_from(loaded.ebpf.take_map(pins::FLOW_EVENTS).expect("event ring"))
        .expect("ring buffer")
}

/// Collects events for `key` until its close event arrives.
fn wait_for_close(ring: &mut RingBuf<MapData>, key: FlowKey) -> Vec<FlowEvent> {
    wait_for_closes(ring, &[key])
}

/// Collects events for `keys` until each one's close event arrived.
fn wait_for_closes(ring: &mut RingBuf<MapData>, keys: &[FlowKey]) -> Vec<FlowEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        while let Some(item) = ring.next() {
            // SAFETY: the program writes whole FlowEvent records.
            let event = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const FlowEvent) };
            if keys.contains(&event.key) {
                seen.push(event);
            }
        }
        let closed = |key: &FlowKey| {
            seen.iter()
                .any(|e: &FlowEvent| e.key == *key && e.kind == FLOW_EVENT_CLOSE)
        };
        if keys.iter().all(closed) {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no close event for each of {keys:?}; saw {seen:?}");
}

const CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
s.sendall(b"x" * 300000)
s.shutdown(socket.SHUT_WR)
got = 0
while chunk := s.recv(65536):
    got += len(chunk)
print(got, flush=True)
"#;

#[test]
fn client_connection_reports_open_close_and_exact_bytes() {
    let mut loaded = load();
    let cgroup = TestCgroup::new("client");
    attach(&mut loaded, &cgroup);
    let mut ring = events(&mut loaded);

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server_port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut received = Vec::new();
        conn.read_to_end(&mut received).expect("read");
        conn.write_all(&[7u8; 70000]).expect("write");
        received.len()
    });
    let stdout = cgroup.run_python(CLIENT, &[&server_port.to_string()]);
    let mut lines = stdout.lines();
    let client_port: u16 = lines
        .next()
        .and_then(|l| l.parse().ok())
        .expect("client port");
    assert_eq!(lines.next(), Some("70000"));
    assert_eq!(server.join().expect("server"), 300000);

    let localhost = ip_key("127.0.0.1".parse().expect("ip"));
    let key = FlowKey {
        local_ip: localhost,
        remote_ip: localhost,
        local_port: client_port,
        remote_port: server_port,
    };
    let seen = wait_for_close(&mut ring, key);
    let open = seen
        .iter()
        .find(|e| e.kind == FLOW_EVENT_OPEN)
        .expect("an open event");
    let close = seen
        .iter()
        .find(|e| e.kind == FLOW_EVENT_CLOSE)
        .expect("a close event");
    assert_eq!(open.stats.role, FLOW_ROLE_CLIENT);
    assert_eq!(close.stats.role, FLOW_ROLE_CLIENT);
    assert_eq!(close.stats.bytes_sent, 300000);
    assert_eq!(close.stats.bytes_received, 70000);
    assert!(close.stats.opened_ns <= close.stats.updated_ns);

    let flows: HashMap<_, FlowKey, FlowStats> =
        HashMap::try_from(loaded.ebpf.map(pins::FLOWS).expect("flow map")).expect("hash map");
    assert!(flows.get(&key, 0).is_err(), "a closed flow leaves the map");
}

const BOUND_CLIENT: &str = r#"
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[2])))
s.connect(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"x" * 1000)
s.close()
"#;

#[test]
fn a_connection_the_kernel_carries_directly_is_flagged_so() {
    let mut loaded = load();
    let cgroup = TestCgroup::new("direct");
    attach(&mut loaded, &cgroup);
    let mut ring = events(&mut loaded);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server_port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut received = Vec::new();
            conn.read_to_end(&mut received).expect("read");
        }
    });
    let localhost = ip_key("127.0.0.1".parse().expect("ip"));
    let key = |client_port| FlowKey {
        local_ip: localhost,
        remote_ip: localhost,
        local_port: client_port,
        remote_port: server_port,
    };
    // Two ports free a moment ago; tc would have written the first one's entry from
    // its SYN.
    let free_port = || {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    };
    let (direct, carried) = (free_port(), free_port());
    let mut flows: HashMap<_, FlowKey, u32> = HashMap::try_from(
        loaded
            .ebpf
            .map_mut(pins::DIRECT_FLOWS)
            .expect("direct flows"),
    )
    .expect("hash map");
    flows.insert(key(direct), 1, 0).expect("insert");
    for client_port in [direct, carried] {
        cgroup.run_python(
            BOUND_CLIENT,
            &[&server_port.to_string(), &client_port.to_string()],
        );
    }
    server.join().expect("server");
    let seen = wait_for_closes(&mut ring, &[key(direct), key(carried)]);
    for (client_port, flagged) in [(direct, true), (carried, false)] {
        let mine: Vec<_> = seen.iter().filter(|e| e.key == key(client_port)).collect();
        assert_eq!(mine.len(), 2, "an open and a close event: {mine:?}");
        for event in mine {
            assert_eq!(
                event.stats.flags & FLOW_FLAG_DIRECT != 0,
                flagged,
                "port {client_port}: {event:?}"
            );
        }
    }
}

const SERVER: &str = r#"
import socket
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen()
print(l.getsockname()[1], flush=True)
c, _ = l.accept()
data = b""
while len(data) < 5000:
    data += c.recv(65536)
c.sendall(data)
while c.recv(65536):
    pass
c.close()
"#;

#[test]
fn server_connection_is_tracked_while_open_and_reports_bytes_on_close() {
    let mut loaded = load();
    let cgroup = TestCgroup::new("server");
    attach(&mut loaded, &cgroup);
    let mut ring = events(&mut loaded);

    let mut server = cgroup
        .command("python3")
        .args(["-c", SERVER])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 server");
    let mut port_line = String::new();
    BufReader::new(server.stdout.as_mut().expect("stdout"))
        .read_line(&mut port_line)
        .expect("server port");
    let server_port: u16 = port_line.trim().parse().expect("port number");

    let mut client = TcpStream::connect(("127.0.0.1", server_port)).expect("connect");
    client.write_all(&[1u8; 5000]).expect("send");
    let mut echoed = [0u8; 5000];
    client.read_exact(&mut echoed).expect("echo");
    let client_port = client.local_addr().expect("addr").port();
    let localhost = ip_key("127.0.0.1".parse().expect("ip"));
    let key = FlowKey {
        local_ip: localhost,
        remote_ip: localhost,
        local_port: server_port,
        remote_port: client_port,
    };
    {
        let flows: HashMap<_, FlowKey, FlowStats> =
            HashMap::try_from(loaded.ebpf.map(pins::FLOWS).expect("flow map")).expect("hash map");
        let live = flows
            .get(&key, 0)
            .expect("the open connection is in the flow map");
        assert_eq!(live.role, FLOW_ROLE_SERVER);
    }
    drop(client);
    assert!(server.wait().expect("server exit").success());

    let seen = wait_for_close(&mut ring, key);
    let close = seen
        .iter()
        .find(|e| e.kind == FLOW_EVENT_CLOSE)
        .expect("a close event");
    assert_eq!(close.stats.role, FLOW_ROLE_SERVER);
    assert_eq!(close.stats.bytes_received, 5000);
    assert_eq!(close.stats.bytes_sent, 5000);
}

/// Connects, sends 1000 bytes, half-closes when `argv[2]` is "half-close", then waits
/// for the server's reset (its 2000 bytes are received whether or not they are read).
const RESET_CLIENT: &str = r#"
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
s.sendall(b"x" * 1000)
if sys.argv[2] == "half-close":
    s.shutdown(socket.SHUT_WR)
try:
    while s.recv(65536):
        pass
except ConnectionResetError:
    pass
"#;

/// A connection the server ends with a reset after reading the client's 1000 bytes (to
/// the client's FIN when it half-closes) and sending 2000: the client's (bytes sent,
/// bytes received) in its close event.
fn reset_flow(half_close: bool) -> (u64, u64) {
    let mut loaded = load();
    let cgroup = TestCgroup::new(if half_close { "reset-half" } else { "reset" });
    attach(&mut loaded, &cgroup);
    let mut ring = events(&mut loaded);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server_port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut request = Vec::new();
        if half_close {
            // To the client's FIN: the client is in FIN_WAIT2 when reset.
            conn.read_to_end(&mut request).expect("read");
        } else {
            request.resize(1000, 0);
            conn.read_exact(&mut request).expect("read");
        }
        assert_eq!(request.len(), 1000);
        conn.write_all(&[7u8; 2000]).expect("write");
        // Close with a reset (SO_LINGER 0) instead of a FIN.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: the option value is one `linger`, valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&conn),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    });
    let mut client = cgroup
        .command("python3")
        .args(["-c", RESET_CLIENT, &server_port.to_string()])
        .arg(if half_close { "half-close" } else { "open" })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 client");
    let mut port_line = String::new();
    BufReader::new(client.stdout.as_mut().expect("stdout"))
        .read_line(&mut port_line)
        .expect("client port");
    let client_port: u16 = port_line.trim().parse().expect("port number");
    server.join().expect("server");
    succeeded(client.wait_with_output().expect("client exit"));
    let localhost = ip_key("127.0.0.1".parse().expect("ip"));
    let key = FlowKey {
        local_ip: localhost,
        remote_ip: localhost,
        local_port: client_port,
        remote_port: server_port,
    };
    let seen = wait_for_close(&mut ring, key);
    let close = seen
        .iter()
        .find(|e| e.kind == FLOW_EVENT_CLOSE)
        .expect("a close event");
    (close.stats.bytes_sent, close.stats.bytes_received)
}

#[test]
fn a_connection_ended_by_a_reset_reports_exact_bytes_with_no_fin_taken_off() {
    // No FIN either way.
    assert_eq!(reset_flow(false), (1000, 2000));
}

#[test]
fn a_half_closed_connection_then_reset_takes_off_only_its_own_fin() {
    // The client's FIN was sent and acknowledged; the server's never came.
    assert_eq!(reset_flow(true), (1000, 2000));
}

const CONNECTIONS: &str = r#"
import socket, sys
for _ in range(int(sys.argv[2])):
    socket.create_connection(("127.0.0.1", int(sys.argv[1]))).close()
"#;

/// Opens and closes `count` connections from a process in `cgroup` to a local listener.
fn connect_times(cgroup: &TestCgroup, count: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = std::thread::spawn(move || {
        for _ in 0..count {
            drop(listener.accept().expect("accept"));
        }
    });
    cgroup.run_python(CONNECTIONS, &[&port.to_string(), &count.to_string()]);
    server.join().expect("server");
}

/// How long a reader blocked on the ring waits, up to `timeout`, while `write` runs.
fn reader_blocked_while(
    ring: &RingBuf<MapData>,
    timeout: Duration,
    write: impl FnOnce(),
) -> Duration {
    let fd = ring.as_fd().as_raw_fd();
    let reader = std::thread::spawn(move || {
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let started = Instant::now();
        // SAFETY: one valid pollfd; the ring outlives this thread (joined below).
        let ready = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as i32) };
        assert!(ready >= 0, "poll: {}", std::io::Error::last_os_error());
        started.elapsed()
    });
    // The reader must be asleep in poll before the events are written.
    std::thread::sleep(Duration::from_millis(200));
    write();
    reader.join().expect("reader")
}

fn drain(ring: &mut RingBuf<MapData>) -> usize {
    let mut count = 0;
    while ring.next().is_some() {
        count += 1;
    }
    count
}

#[test]
fn events_wait_for_the_reader_until_the_ring_fills_past_the_wakeup_mark() {
    let mut loaded = load();
    let cgroup = TestCgroup::new("wakeup");
    attach(&mut loaded, &cgroup);
    let mut ring = events(&mut loaded);

    // A few connections: their events are written, the sleeping reader is not woken.
    let timeout = Duration::from_secs(2);
    let waited = reader_blocked_while(&ring, timeout, || connect_times(&cgroup, 3));
    assert!(
        waited >= timeout - Duration::from_millis(100),
        "the reader was woken after {waited:?} for a few events"
    );
    assert_eq!(drain(&mut ring), 6, "an open and a close per connection");

    // Past FLOW_EVENTS_WAKEUP_BYTES of events (80-byte records), the reader is woken
    // long before its timeout.
    let record = (8 + std::mem::size_of::<FlowEvent>()).next_multiple_of(8) as u64;
    let connections = (FLOW_EVENTS_WAKEUP_BYTES / record / 2 + 100) as usize;
    let timeout = Duration::from_secs(60);
    let waited = reader_blocked_while(&ring, timeout, || connect_times(&cgroup, connections));
    assert!(
        waited < timeout / 2,
        "the reader slept {waited:?} with the ring past the wakeup mark"
    );
    assert_eq!(drain(&mut ring), 2 * connections);
}
