//! `splice_verdict` on real loopback sockets (stream verdicts have no BPF_PROG_TEST_RUN):
//! bytes arriving on a source socket leave through its paired peer without user space
//! reading them, both ways; a source without a peer, or whose peer is not a target,
//! keeps its bytes for the agent to read. And the agent's `Splicer` around it: each
//! direction's FIN carried after its last byte, whichever side finishes first, with
//! exact byte counts; a server's reset ends the client's stream and fails the flow.

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
use mesh_agent::datapath::splice::{Splicer, STALL_LIMIT};
use mesh_common::{pins, programs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// A spliced flow as the agent holds it: the client's connection accepted (`a`), the
/// connection to the server opened (`u`); returns (client, a, u, server).
async fn flow() -> [tokio::net::TcpStream; 4] {
    async fn connected() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let (connecting, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(address), listener.accept());
        (connecting.expect("connect"), accepted.expect("accept").0)
    }
    let (client, a) = connected().await;
    let (u, server) = connected().await;
    [client, a, u, server]
}

fn splicer(loaded: &mut Loaded) -> Splicer {
    splicer_stalling_after(loaded, STALL_LIMIT)
}

fn splicer_stalling_after(loaded: &mut Loaded, stall_limit: Duration) -> Splicer {
    let maps = maps(loaded);
    Splicer::new(maps.sources, maps.targets, maps.peers, stall_limit)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Reads to the end of the stream: everything the peer sent before its FIN.
async fn read_to_end(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    socket.read_to_end(&mut all).await.expect("read to the FIN");
    all
}

#[test]
fn when_the_server_finishes_first_each_fin_follows_its_last_byte_and_bytes_are_exact() {
    let mut loaded = load();
    let splicer = splicer(&mut loaded);
    runtime().block_on(async {
        let [mut client, a, u, mut server] = flow().await;
        let spliced = splicer.splice(&a, &u).expect("paired");
        let reply = vec![b'r'; 100_000];
        let request = vec![b'q'; 3_000];
        let server_side = async {
            // The server answers and half-closes before the client is done.
            server.write_all(&reply).await.expect("server writes");
            server.shutdown().await.expect("server half-closes");
            read_to_end(&mut server).await
        };
        let client_side = async {
            let received = read_to_end(&mut client).await;
            // Still open the other way: the request follows the server's FIN.
            client.write_all(&request).await.expect("client writes");
            client.shutdown().await.expect("client half-closes");
            received
        };
        let deadline = Duration::from_secs(30);
        let (carried, at_server, at_client) = tokio::time::timeout(deadline, async {
            tokio::join!(spliced.run(), server_side, client_side)
        })
        .await
        .expect("the flow ends");
        assert_eq!(at_client, reply);
        assert_eq!(at_server, request);
        assert_eq!(
            carried.expect("carried"),
            (3_000, 100_000, true),
            "client → server, server → client, both spliced"
        );
    });
}

/// Closes `socket` with a reset (SO_LINGER 0) instead of a FIN.
fn reset(socket: tokio::net::TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value is one `linger`, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(socket);
}

#[test]
fn a_server_reset_mid_splice_ends_the_clients_stream_and_the_flow_fails() {
    let mut loaded = load();
    let splicer = splicer(&mut loaded);
    runtime().block_on(async {
        let [mut client, a, u, mut server] = flow().await;
        let spliced = splicer.splice(&a, &u).expect("paired");
        let exchange = async {
            client.write_all(b"ping").await.expect("client writes");
            let mut ping = [0u8; 4];
            server
                .read_exact(&mut ping)
                .await
                .expect("spliced to the server");
            assert_eq!(&ping, b"ping");
            reset(server);
            // The agent's side sees the reset as the end of the server's stream and
            // carries it to the client as one (a FIN: the spliced socket cannot be
            // reset from here), with no byte after it.
            let after = read_to_end(&mut client).await;
            client.shutdown().await.expect("client half-closes");
            after
        };
        let (carried, after) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(spliced.run(), exchange)
        })
        .await
        .expect("the flow ends");
        assert_eq!(after, b"");
        // The client's FIN has nowhere to go (every byte before it reached the server,
        // and the server's socket is gone): the flow is not counted as a clean end.
        let failed = carried.expect_err("the flow fails");
        assert_eq!(failed.kind(), std::io::ErrorKind::NotConnected, "{failed}");
    });
}

#[test]
fn a_fin_behind_bytes_the_server_never_reads_gives_the_flow_up_after_the_stall_limit() {
    let mut loaded = load();
    let splicer = splicer_stalling_after(&mut loaded, Duration::from_secs(1));
    runtime().block_on(async {
        let [mut client, a, u, server] = flow().await;
        // The server never reads, and has little room: the spliced bytes pile up in the
        // kernel between the two agent sockets and stop moving.
        let small: libc::c_int = 4096;
        // SAFETY: the option value is one int, valid for the call.
        let rc = unsafe {
            libc::setsockopt(
                server.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let spliced = splicer.splice(&a, &u).expect("paired");
        let sending = async {
            client
                .write_all(&vec![b's'; 16 << 20])
                .await
                .expect("the agent's side takes every byte");
            client.shutdown().await.expect("client half-closes");
        };
        let (carried, ()) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(spliced.run(), sending)
        })
        .await
        .expect("the flow is given up");
        let failed = carried.expect_err("the flow fails");
        assert_eq!(failed.kind(), std::io::ErrorKind::TimedOut, "{failed}");
        drop(server);
    });
}
