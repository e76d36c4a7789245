//! `splice_verdict` on real loopback sockets (stream verdicts have no BPF_PROG_TEST_RUN):
//! bytes arriving on a source socket leave through its paired peer without user space
//! reading them, both ways; a source without a peer, or whose peer is not a target,
//! keeps its bytes for the agent to read.

use std::{
    io::{ErrorKind, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};
use bpf_tests::{load, Loaded};
use mesh_common::{pins, programs};

/// The three maps of a splice, with the verdict attached to the sources, as the agent's
/// `Datapath::splicer` sets them up.
struct Maps {
    sources: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
    peers: HashMap<MapData, u64, u64>,
}

fn maps(loaded: &mut Loaded) -> Maps {
    let mut take = |name| loaded.ebpf.take_map(name).expect("map in the object");
    let sources = SockHash::try_from(take(pins::SPLICE_SOURCES)).expect("sockhash");
    let targets = SockHash::try_from(take(pins::SPLICE_TARGETS)).expect("sockhash");
    let peers = HashMap::try_from(take(pins::SPLICE_PEERS)).expect("hash map");
    let verdict: &mut SkSkb = loaded
        .ebpf
        .program_mut(programs::SPLICE_VERDICT)
        .expect("program in the object")
        .try_into()
        .expect("a stream verdict program");
    verdict.load().expect("verifier accepts splice_verdict");
    verdict.attach(sources.fd()).expect("attach to the sources");
    Maps {
        sources,
        targets,
        peers,
    }
}

/// A connected loopback pair: (the connecting end, the accepted end).
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
    let (accepted, _) = listener.accept().expect("accept");
    for socket in [&client, &accepted] {
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
    }
    (client, accepted)
}

fn cookie(socket: &TcpStream) -> u64 {
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a writable u64 of `len` bytes for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    cookie
}

/// Reads exactly `len` bytes (within the socket's 10 s read timeout).
fn read_exactly(socket: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buffer = vec![0u8; len];
    socket.read_exact(&mut buffer).expect("the bytes arrive");
    buffer
}

/// Whether `socket` has no byte to read now.
fn nothing_queued(socket: &TcpStream) -> bool {
    socket.set_nonblocking(true).expect("non-blocking");
    let mut byte = [0u8; 1];
    let empty = matches!(socket.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock);
    socket.set_nonblocking(false).expect("blocking");
    empty
}

#[test]
fn a_paired_source_sends_what_it_receives_out_of_its_peer_both_ways() {
    let mut loaded = load();
    let mut maps = maps(&mut loaded);
    // client → agent's accepted socket A; agent's upstream socket U → server.
    let (mut client, accepted) = pair();
    let (upstream, mut server) = pair();
    let (a, u) = (cookie(&accepted), cookie(&upstream));
    maps.targets
        .insert(a, accepted.as_raw_fd(), 0)
        .expect("target");
    maps.targets
        .insert(u, upstream.as_raw_fd(), 0)
        .expect("target");
    maps.peers.insert(a, u, 0).expect("peer");
    maps.peers.insert(u, a, 0).expect("peer");
    maps.sources
        .insert(a, accepted.as_raw_fd(), 0)
        .expect("source");
    maps.sources
        .insert(u, upstream.as_raw_fd(), 0)
        .expect("source");

    let request = b"GET / HTTP/1.1\r\nhost: web\r\n\r\n";
    client.write_all(request).expect("client writes");
    assert_eq!(read_exactly(&mut server, request.len()), request);
    let reply = vec![7u8; 200_000];
    server.write_all(&reply).expect("server writes");
    assert_eq!(read_exactly(&mut client, reply.len()), reply);
    // User space never saw a byte: both went straight from one socket to the other.
    assert!(nothing_queued(&accepted) && nothing_queued(&upstream));
}

#[test]
fn a_source_without_a_usable_peer_keeps_its_bytes_for_the_agent() {
    let mut loaded = load();
    let mut maps = maps(&mut loaded);
    // No peer at all.
    let (mut lonely_client, mut lonely) = pair();
    maps.sources
        .insert(cookie(&lonely), lonely.as_raw_fd(), 0)
        .expect("source");
    // A peer whose socket is not (or no longer) a target: the redirect fails.
    let (mut orphan_client, mut orphan) = pair();
    let (gone_client, gone) = pair();
    maps.peers
        .insert(cookie(&orphan), cookie(&gone), 0)
        .expect("peer");
    maps.sources
        .insert(cookie(&orphan), orphan.as_raw_fd(), 0)
        .expect("source");

    lonely_client.write_all(b"hello").expect("write");
    orphan_client.write_all(b"world").expect("write");
    assert_eq!(read_exactly(&mut lonely, 5), b"hello");
    assert_eq!(read_exactly(&mut orphan, 5), b"world");
    // Bytes passed to their socket were not also redirected.
    assert!(nothing_queued(&gone_client));
}
