//! The node agent's DNS proxy, as ztunnel's: `tc_from_pod` hands a local pod's DNS
//! (UDP and TCP to port 53, whatever server it names) to the agent's sockets on
//! [`DNS_CAPTURE_PORT`]; the agent answers the mesh's names itself
//! ([`DnsRecords`]: Services, headless Services, ServiceEntry hosts), says NXDOMAIN for
//! other names under the cluster domain, and forwards the rest to the node's resolvers.
//! A reply leaves from the address the pod asked, so its resolver takes it.
//!
//! Only the node's own pods are answered: the sockets listen on every address of the
//! node, and an open resolver would let anyone use the agent to reflect traffic.

use std::{
    collections::HashMap,
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use mesh_common::{AGENT_MARK, DNS_CAPTURE_PORT};
use simple_dns::{
    rdata::RData, Name, Packet, PacketFlag, Question, ResourceRecord, CLASS, OPCODE, QCLASS, QTYPE,
    RCODE, TYPE,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{unix::AsyncFd, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};

use crate::{
    model::{
        dns::{DnsRecords, Resolution},
        SharedState,
    },
    telemetry::metrics::Metrics,
};

/// The DNS port: what pods ask, and where replies come from.
const DNS_PORT: u16 = 53;
/// How long the mesh's answers may be cached: short, since pods and Services come and go.
const ANSWER_TTL: u32 = 30;
/// The largest UDP answer for a client that did not say it takes more (EDNS).
const CLASSIC_UDP_SIZE: usize = 512;
/// How long an upstream resolver gets to answer before the next one is asked.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may take over a query, and how many it may send on a connection.
const TCP_IDLE: Duration = Duration::from_secs(10);
const TCP_QUERIES: usize = 100;
/// Queries handled at once (a forwarded one waits for the node's resolvers), and TCP
/// connections served at once: what a pod flooding its DNS can hold of the agent. Beyond
/// them a datagram is dropped and a connection closed, as an overloaded server does.
const QUERIES_IN_FLIGHT: usize = 256;
const TCP_CONNECTIONS: usize = 256;
/// The share of each limit one pod may hold, so that a pod flooding its DNS does not take
/// its neighbours' away.
const QUERIES_PER_POD: usize = 32;
const TCP_CONNECTIONS_PER_POD: usize = 4;
/// How long a TCP client may keep a connection, however it paces its queries.
const TCP_LIFETIME: Duration = Duration::from_secs(30);

/// What becomes of a query.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// This reply, counted under this result.
    Reply(Vec<u8>, &'static str),
    /// The node's resolvers answer it.
    Forward,
    /// Not a query worth an answer (a reply, or too short to have an ID).
    Drop,
}

/// The answer to `query` from a pod of `namespace` (none: not a known pod), by the mesh's
/// `records`, in at most `max_len` bytes (a longer answer is cut to its header and
/// question, with the truncation flag: the client asks again over TCP).
pub fn answer(
    query: &[u8],
    records: &DnsRecords,
    namespace: Option<&str>,
    max_len: usize,
) -> Outcome {
    let Some(id) = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return Outcome::Drop;
    };
    let failure = |rcode: RCODE, result| {
        let mut reply = Packet::new_reply(id);
        *reply.rcode_mut() = rcode;
        match reply.build_bytes_vec() {
            Ok(bytes) => Outcome::Reply(bytes, result),
            Err(_) => Outcome::Drop,
        }
    };
    let Ok(packet) = Packet::parse(query) else {
        return if query.len() >= 12 {
            failure(RCODE::FormatError, "malformed")
        } else {
            Outcome::Drop
        };
    };
    if packet.has_flags(PacketFlag::RESPONSE) {
        return Outcome::Drop;
    }
    if packet.opcode() != OPCODE::StandardQuery {
        return failure(RCODE::NotImplemented, "unsupported");
    }
    let [question] = packet.questions.as_slice() else {
        return failure(RCODE::FormatError, "malformed");
    };
    if !matches!(question.qclass, QCLASS::CLASS(CLASS::IN) | QCLASS::ANY) {
        return Outcome::Forward;
    }
    let wants_addresses = matches!(question.qtype, QTYPE::TYPE(TYPE::A) | QTYPE::ANY);
    let (rcode, addresses, result) = match records.resolve(&question.qname.to_string(), namespace) {
        Resolution::Forward => return Outcome::Forward,
        Resolution::NoSuchName => (RCODE::NameError, Vec::new(), "nxdomain"),
        // Other records of a Service's name (SRV of its named ports…) are the cluster
        // DNS's; an AAAA question gets the empty answer of an IPv4-only name.
        Resolution::Addresses(_)
            if !wants_addresses && question.qtype != QTYPE::TYPE(TYPE::AAAA) =>
        {
            return Outcome::Forward
        }
        Resolution::Addresses(addresses) => (RCODE::NoError, addresses, "answered"),
    };
    let reply = |with_answers: bool| {
        let mut reply = Packet::new_reply(id);
        *reply.rcode_mut() = rcode;
        reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
        if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED);
        }
        reply.questions.push(Question::new(
            question.qname.clone(),
            question.qtype,
            question.qclass,
            false,
        ));
        if with_answers && wants_addresses {
            reply.answers = addresses
                .iter()
                .map(|ip| {
                    ResourceRecord::new(
                        question.qname.clone(),
                        CLASS::IN,
                        ANSWER_TTL,
                        RData::A((*ip).into()),
                    )
                })
                .collect();
        } else if !with_answers {
            reply.set_flags(PacketFlag::TRUNCATION);
        }
        reply.build_bytes_vec_compressed().ok()
    };
    match reply(true) {
        Some(full) if full.len() <= max_len => Outcome::Reply(full, result),
        Some(_) => reply(false).map_or(Outcome::Drop, |cut| Outcome::Reply(cut, "truncated")),
        None => Outcome::Drop,
    }
}

/// The largest UDP answer `query`'s sender takes: what its EDNS record says, else 512.
fn udp_limit(query: &[u8]) -> usize {
    Packet::parse(query)
        .ok()
        .and_then(|p| p.opt().map(|opt| usize::from(opt.udp_packet_size)))
        .map_or(CLASSIC_UDP_SIZE, |size| size.clamp(CLASSIC_UDP_SIZE, 4096))
}

/// The proxy's state: the mesh's names and where other names are asked.
pub struct DnsProxy {
    state: SharedState,
    /// The node's resolvers (a Service's cluster IP among them is reached at one of its
    /// endpoints: the node may have no kube-proxy).
    upstreams: Vec<SocketAddrV4>,
    node: String,
    metrics: Arc<Metrics>,
    queries: Arc<Semaphore>,
    connections: Arc<Semaphore>,
    queries_per_pod: Arc<PerPod>,
    connections_per_pod: Arc<PerPod>,
}

/// What each pod holds of a limit.
struct PerPod {
    limit: usize,
    held: Mutex<HashMap<Ipv4Addr, usize>>,
}

/// A pod's share of a limit, given back when dropped.
struct PodSlot {
    owner: Arc<PerPod>,
    pod: Ipv4Addr,
}

impl PerPod {
    fn new(limit: usize) -> Arc<PerPod> {
        Arc::new(PerPod {
            limit,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn take(self: &Arc<PerPod>, pod: Ipv4Addr) -> Option<PodSlot> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(pod).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PodSlot {
            owner: self.clone(),
            pod,
        })
    }
}

impl Drop for PodSlot {
    fn drop(&mut self) {
        let mut held = self.owner.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.pod) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.pod);
            }
        }
    }
}

impl DnsProxy {
    pub fn new(
        state: SharedState,
        upstreams: Vec<SocketAddrV4>,
        node: String,
        metrics: Arc<Metrics>,
    ) -> DnsProxy {
        DnsProxy {
            state,
            upstreams,
            node,
            metrics,
            queries: Arc::new(Semaphore::new(QUERIES_IN_FLIGHT)),
            connections: Arc::new(Semaphore::new(TCP_CONNECTIONS)),
            queries_per_pod: PerPod::new(QUERIES_PER_POD),
            connections_per_pod: PerPod::new(TCP_CONNECTIONS_PER_POD),
        }
    }

    /// Whether `client` is one of this node's pods, the only clients answered.
    fn is_local_pod(&self, client: Ipv4Addr) -> bool {
        self.client_namespace(client).is_ok()
    }

    /// The namespace of the local pod at `client`; none when it is not one of this node's
    /// pods, which are the only clients answered.
    fn client_namespace(&self, client: Ipv4Addr) -> Result<Option<String>, ()> {
        let state = self.state.current();
        match state.workloads.get(&client) {
            Some(workload) if workload.node == self.node => Ok(Some(workload.namespace.clone())),
            _ => Err(()),
        }
    }

    /// The reply to `query` from `client`, asking upstream when the mesh does not know the
    /// name; none when there is nothing to send back.
    async fn respond(&self, client: Ipv4Addr, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let Ok(namespace) = self.client_namespace(client) else {
            self.metrics.dns_query("refused");
            return None;
        };
        let limit = if tcp {
            usize::from(u16::MAX)
        } else {
            udp_limit(query)
        };
        let records = self.state.current().dns.clone();
        match answer(query, &records, namespace.as_deref(), limit) {
            Outcome::Reply(reply, result) => {
                self.metrics.dns_query(result);
                Some(reply)
            }
            Outcome::Drop => None,
            Outcome::Forward => match self.forward(query, tcp).await {
                Ok(reply) => {
                    self.metrics.dns_query("forwarded");
                    Some(reply)
                }
                Err(err) => {
                    tracing::debug!("DNS: forwarding a query of {client}: {err}");
                    self.metrics.dns_query("failed");
                    answer_failure(query)
                }
            },
        }
    }

    /// Asks the node's resolvers in turn; the first answer with the query's ID wins.
    async fn forward(&self, query: &[u8], tcp: bool) -> io::Result<Vec<u8>> {
        if self.upstreams.is_empty() {
            return Err(io::Error::other("the node has no resolver"));
        }
        let mut last = io::Error::other("no resolver answered");
        for upstream in &self.upstreams {
            let target = match self
                .state
                .current()
                .dial(&upstream.ip().to_string(), upstream.port())
            {
                Ok(address) => address,
                Err(err) => {
                    last = io::Error::other(err);
                    continue;
                }
            };
            let asked = if tcp {
                tokio::time::timeout(UPSTREAM_TIMEOUT, ask_tcp(&target, query)).await
            } else {
                tokio::time::timeout(UPSTREAM_TIMEOUT, ask_udp(&target, query)).await
            };
            match asked {
                Ok(Ok(reply)) if reply.get(..2) == query.get(..2) => return Ok(reply),
                Ok(Ok(_)) => last = io::Error::other(format!("{target} answered another query")),
                Ok(Err(err)) => last = err,
                Err(_) => last = io::Error::other(format!("{target} did not answer in time")),
            }
        }
        Err(last)
    }
}

impl DnsProxy {
    /// The IPv4 addresses the node's resolvers give `name` (none for a name they do not
    /// know): the agent's own lookups, for the endpoints of `resolution: DNS`
    /// ServiceEntries. A truncated answer is asked again over TCP.
    pub async fn lookup_ipv4(&self, name: &str) -> io::Result<Vec<Ipv4Addr>> {
        let id = crate::model::lb::random(usize::from(u16::MAX) + 1) as u16;
        let query = a_query(id, name).map_err(io::Error::other)?;
        let reply = self.forward(&query, false).await?;
        match a_answers(&reply).map_err(io::Error::other)? {
            Answers::Truncated => {
                let reply = self.forward(&query, true).await?;
                match a_answers(&reply).map_err(io::Error::other)? {
                    Answers::Complete(ips) => Ok(ips),
                    Answers::Truncated => Err(io::Error::other("truncated over TCP")),
                }
            }
            Answers::Complete(ips) => Ok(ips),
        }
    }
}

/// An A query for `name`, recursion desired.
fn a_query(id: u16, name: &str) -> Result<Vec<u8>, String> {
    let mut packet = Packet::new_query(id);
    packet.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname = Name::new(name).map_err(|err| format!("{name:?} is not a DNS name: {err}"))?;
    packet.questions.push(Question::new(
        qname,
        TYPE::A.into(),
        CLASS::IN.into(),
        false,
    ));
    packet
        .build_bytes_vec()
        .map_err(|err| format!("a query for {name:?}: {err}"))
}

/// What an answer to an A query holds.
#[derive(Debug, PartialEq, Eq)]
enum Answers {
    /// Its A records, in order (none: the name does not exist, or has no address).
    Complete(Vec<Ipv4Addr>),
    /// Cut short: to be asked again over TCP.
    Truncated,
}

fn a_answers(reply: &[u8]) -> Result<Answers, String> {
    let packet =
        Packet::parse(reply).map_err(|err| format!("an answer that does not parse: {err}"))?;
    if packet.has_flags(PacketFlag::TRUNCATION) {
        return Ok(Answers::Truncated);
    }
    match packet.rcode() {
        RCODE::NoError | RCODE::NameError => {}
        other => return Err(format!("the resolver answered {other:?}")),
    }
    Ok(Answers::Complete(
        packet
            .answers
            .iter()
            .filter_map(|record| match &record.rdata {
                RData::A(a) => Some(Ipv4Addr::from(a.address)),
                _ => None,
            })
            .collect(),
    ))
}

/// A `--dns-upstream` resolver: `ip` (port 53) or `ip:port`.
pub fn parse_upstream(text: &str) -> Result<SocketAddrV4, String> {
    text.parse::<SocketAddrV4>()
        .or_else(|_| text.parse::<Ipv4Addr>().map(|ip| SocketAddrV4::new(ip, 53)))
        .map_err(|_| format!("{text:?} is not an IPv4 address or address:port"))
}

/// The IPv4 `nameserver`s of a resolv.conf, in order.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddrV4> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<Ipv4Addr>().ok())
        .map(|ip| SocketAddrV4::new(ip, 53))
        .collect()
}

/// SERVFAIL for `query`, when it has an ID to answer.
fn answer_failure(query: &[u8]) -> Option<Vec<u8>> {
    let id = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]))?;
    let mut reply = Packet::new_reply(id);
    *reply.rcode_mut() = RCODE::ServerFailure;
    reply.build_bytes_vec().ok()
}

async fn ask_udp(target: &str, query: &[u8]) -> io::Result<Vec<u8>> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await?;
    socket.connect(target).await?;
    socket.send(query).await?;
    let mut buffer = vec![0u8; usize::from(u16::MAX)];
    let len = socket.recv(&mut buffer).await?;
    buffer.truncate(len);
    Ok(buffer)
}

async fn ask_tcp(target: &str, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(target).await?;
    write_message(&mut stream, query).await?;
    read_message(&mut stream).await
}

/// A DNS message over TCP: two bytes of length, then the message.
async fn read_message(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut message = vec![0u8; usize::from(len)];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

async fn write_message(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len()).map_err(|_| io::Error::other("message too long"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// The proxy's UDP socket: bound to every address on [`DNS_CAPTURE_PORT`] and told each
/// datagram's original destination (`IP_PKTINFO`), the server the pod asked.
pub struct DnsUdpSocket {
    fd: AsyncFd<Socket>,
}

impl DnsUdpSocket {
    pub fn bind() -> io::Result<DnsUdpSocket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_nonblocking(true)?;
        // A new agent binds beside the old one during a rolling update. Not
        // SO_REUSEADDR: with it, any process of the node could bind a more specific
        // address on this port and be handed the pods' queries.
        socket.set_reuse_port(true)?;
        let on: libc::c_int = 1;
        // SAFETY: setting an int option on a socket this function owns.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, DNS_CAPTURE_PORT)).into())?;
        // SAFETY: the socket owns its fd for as long as the AsyncFd owns the socket.
        let fd = unsafe { AsyncFd::register(socket) }?;
        Ok(DnsUdpSocket { fd })
    }

    /// The next datagram: its bytes, its sender and the address it was sent to.
    async fn receive(&self, buffer: &mut [u8]) -> io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| recv_with_destination(fd.get_ref().as_raw_fd(), buffer)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// For the socket lookup, which names this socket for bridged pods' queries.
impl AsRawFd for DnsUdpSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.get_ref().as_raw_fd()
    }
}

/// Sends `reply` to `client` from `from`, port 53: what the pod asked, so its resolver
/// (which may have connected its socket there) takes it. A socket of its own, transparent
/// and bound to that address, since the proxy's own port is not 53.
fn send_reply(reply: &[u8], client: SocketAddrV4, from: Ipv4Addr) -> io::Result<()> {
    let source = SocketAddr::from((from, DNS_PORT)).into();
    let new_socket = || -> io::Result<Socket> {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        socket.set_nonblocking(true)?;
        socket.set_mark(AGENT_MARK)?;
        Ok(socket)
    };
    // First as an ordinary socket: if the address is the node's own and a resolver of the
    // node serves it, the bind fails and the reply is not sent, rather than the agent
    // sharing the resolver's port and taking its datagrams.
    let socket = new_socket()?;
    let socket = match socket.bind(&source) {
        Ok(()) => socket,
        Err(err) if err.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            // Not an address of the node (a Service's, or any the pod chose): concurrent
            // replies from it share it.
            let socket = new_socket()?;
            socket.set_reuse_address(true)?;
            socket.set_ip_transparent_v4(true)?;
            socket.bind(&source)?;
            socket
        }
        Err(err) => return Err(err),
    };
    socket.send_to(reply, &SocketAddr::V4(client).into())?;
    Ok(())
}

/// One `recvmsg` with room for the `IP_PKTINFO` control message.
fn recv_with_destination(
    fd: i32,
    buffer: &mut [u8],
) -> io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
    // SAFETY: zeroed C structs, filled by the kernel; every pointer handed over points
    // into a live local of the size given.
    unsafe {
        let mut source: libc::sockaddr_in = zeroed();
        // Aligned for the `cmsghdr`s the kernel writes into it.
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buffer.as_mut_ptr().cast(),
            iov_len: buffer.len(),
        };
        let mut message: libc::msghdr = zeroed();
        message.msg_name = (&mut source as *mut libc::sockaddr_in).cast();
        message.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = size_of::<[u64; 8]>() as _;
        let len = libc::recvmsg(fd, &mut message, 0);
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut destination = None;
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::IPPROTO_IP && (*header).cmsg_type == libc::IP_PKTINFO {
                let info: libc::in_pktinfo =
                    std::ptr::read_unaligned(libc::CMSG_DATA(header).cast());
                destination = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
        let sender = SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(source.sin_addr.s_addr)),
            u16::from_be(source.sin_port),
        );
        let destination =
            destination.ok_or_else(|| io::Error::other("a datagram without its destination"))?;
        Ok((len as usize, sender, destination))
    }
}

/// Answers the datagrams the tc program hands to `socket`, each query on its own task.
pub async fn serve_udp(socket: DnsUdpSocket, proxy: Arc<DnsProxy>) {
    let mut buffer = vec![0u8; usize::from(u16::MAX)];
    loop {
        let (len, client, asked) = match socket.receive(&mut buffer).await {
            Ok(received) => received,
            Err(err) => {
                tracing::warn!("DNS proxy (UDP): {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !proxy.is_local_pod(*client.ip()) {
            proxy.metrics.dns_query("refused");
            continue;
        }
        let (Some(slot), Ok(permit)) = (
            proxy.queries_per_pod.take(*client.ip()),
            proxy.queries.clone().try_acquire_owned(),
        ) else {
            proxy.metrics.dns_query("overloaded");
            continue;
        };
        let query = buffer[..len].to_vec();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            if let Some(reply) = proxy.respond(*client.ip(), &query, false).await {
                if let Err(err) = send_reply(&reply, client, asked) {
                    tracing::debug!("DNS proxy: answering {client}: {err}");
                }
            }
        });
    }
}

/// The proxy's TCP listener: transparent, so an accepted connection's local address is
/// the server the pod asked.
pub fn tcp_listener() -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_mark(AGENT_MARK)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, DNS_CAPTURE_PORT)).into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// Answers DNS over the TCP connections the tc program hands to `listener`.
pub async fn serve_tcp(listener: TcpListener, proxy: Arc<DnsProxy>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("DNS proxy (TCP): {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let SocketAddr::V4(peer) = peer else {
            continue;
        };
        if !proxy.is_local_pod(*peer.ip()) {
            proxy.metrics.dns_query("refused");
            continue;
        }
        let (Some(slot), Ok(permit)) = (
            proxy.connections_per_pod.take(*peer.ip()),
            proxy.connections.clone().try_acquire_owned(),
        ) else {
            proxy.metrics.dns_query("overloaded");
            continue;
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            let served =
                tokio::time::timeout(TCP_LIFETIME, serve_connection(stream, *peer.ip(), &proxy));
            if let Ok(Err(err)) = served.await {
                tracing::debug!("DNS proxy: TCP client {peer}: {err}");
            }
        });
    }
}

async fn serve_connection(
    mut stream: TcpStream,
    client: Ipv4Addr,
    proxy: &DnsProxy,
) -> io::Result<()> {
    for _ in 0..TCP_QUERIES {
        let query = match tokio::time::timeout(TCP_IDLE, read_message(&mut stream)).await {
            Ok(Ok(query)) => query,
            Ok(Err(err)) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(err)) => return Err(err),
            Err(_) => return Ok(()),
        };
        match proxy.respond(client, &query, true).await {
            Some(reply) => write_message(&mut stream, &reply).await?,
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::config::load_documents;

    fn records() -> DnsRecords {
        let config = load_documents([(
            "c.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {clusterIP: 10.96.0.20, selector: {app: r}, ports: [{port: 80}]}\n",
        )]);
        DnsRecords::of(
            &config,
            &crate::model::discovery::ConfigIndex::of(&config),
            &crate::model::entry_addresses::EntryAddresses::of(&config),
        )
    }

    fn query(id: u16, name: &str, qtype: TYPE) -> Vec<u8> {
        let mut packet = Packet::new_query(id);
        packet.set_flags(PacketFlag::RECURSION_DESIRED);
        packet.questions.push(Question::new(
            Name::new_unchecked(name),
            qtype.into(),
            CLASS::IN.into(),
            false,
        ));
        packet.build_bytes_vec().expect("query")
    }

    fn reply(outcome: &Outcome) -> (Packet<'_>, &'static str) {
        match outcome {
            Outcome::Reply(bytes, result) => (Packet::parse(bytes).expect("reply"), result),
            other => panic!("not a reply: {other:?}"),
        }
    }

    #[test]
    fn the_agent_s_own_lookups_read_a_records_and_tell_truncation_and_failure() {
        let query = a_query(9, "upstream.example.test").expect("query");
        let parsed = Packet::parse(&query).expect("parses");
        assert_eq!(parsed.id(), 9);
        assert_eq!(
            parsed.questions[0].qname.to_string(),
            "upstream.example.test"
        );
        assert_eq!(parsed.questions[0].qtype, QTYPE::TYPE(TYPE::A));
        assert!(a_query(1, &"a".repeat(70)).is_err());

        let answer = |rcode: RCODE, flags: Option<PacketFlag>, ips: &[Ipv4Addr]| {
            let mut reply = Packet::new_reply(9);
            *reply.rcode_mut() = rcode;
            if let Some(flags) = flags {
                reply.set_flags(flags);
            }
            reply.answers = ips
                .iter()
                .map(|ip| {
                    ResourceRecord::new(
                        Name::new_unchecked("upstream.example.test"),
                        CLASS::IN,
                        30,
                        RData::A((*ip).into()),
                    )
                })
                .collect();
            a_answers(&reply.build_bytes_vec().expect("reply"))
        };
        let ips = [
            Ipv4Addr::new(10, 200, 0, 249),
            Ipv4Addr::new(10, 200, 0, 248),
        ];
        assert_eq!(
            answer(RCODE::NoError, None, &ips),
            Ok(Answers::Complete(ips.to_vec()))
        );
        assert_eq!(
            answer(RCODE::NameError, None, &[]),
            Ok(Answers::Complete(Vec::new()))
        );
        assert_eq!(
            answer(RCODE::NoError, Some(PacketFlag::TRUNCATION), &[]),
            Ok(Answers::Truncated)
        );
        assert!(answer(RCODE::ServerFailure, None, &[]).is_err());
        assert!(a_answers(b"\x00").is_err());
    }

    #[test]
    fn a_service_name_is_answered_with_its_cluster_ip() {
        let outcome = answer(&query(7, "reviews", TYPE::A), &records(), Some("shop"), 512);
        let (packet, result) = reply(&outcome);
        assert_eq!(result, "answered");
        assert_eq!(packet.id(), 7);
        assert_eq!(packet.rcode(), RCODE::NoError);
        assert!(packet.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_DESIRED));
        assert_eq!(packet.questions[0].qname.to_string(), "reviews");
        let [record] = packet.answers.as_slice() else {
            panic!("one answer: {:?}", packet.answers);
        };
        assert_eq!(record.ttl, ANSWER_TTL);
        assert_eq!(record.rdata, RData::A(Ipv4Addr::new(10, 96, 0, 20).into()));
        // Other records of the name are the cluster DNS's (SRV of named ports).
        assert_eq!(
            answer(&query(8, "reviews.shop", TYPE::SRV), &records(), None, 512),
            Outcome::Forward
        );
        // The name exists, without IPv6 addresses: no answer, no error.
        let outcome = answer(&query(8, "reviews.shop", TYPE::AAAA), &records(), None, 512);
        let (packet, _) = reply(&outcome);
        assert_eq!(packet.rcode(), RCODE::NoError);
        assert!(packet.answers.is_empty());
    }

    #[test]
    fn unknown_cluster_names_do_not_exist_and_others_are_forwarded() {
        let outcome = answer(
            &query(9, "nope.shop.svc.cluster.local", TYPE::A),
            &records(),
            Some("shop"),
            512,
        );
        let (packet, result) = reply(&outcome);
        assert_eq!((packet.rcode(), result), (RCODE::NameError, "nxdomain"));
        assert_eq!(
            answer(
                &query(9, "example.com", TYPE::A),
                &records(),
                Some("shop"),
                512
            ),
            Outcome::Forward
        );
    }

    #[test]
    fn bad_queries_get_format_errors_and_replies_are_dropped() {
        assert_eq!(answer(&[1], &records(), None, 512), Outcome::Drop);
        let garbage = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff];
        let outcome = answer(&garbage, &records(), None, 512);
        let (packet, result) = reply(&outcome);
        assert_eq!(
            (packet.id(), packet.rcode(), result),
            (0x1234, RCODE::FormatError, "malformed")
        );
        let asked = query(3, "reviews", TYPE::A);
        let mut response = Packet::parse(&asked).expect("q").into_reply();
        response.set_flags(PacketFlag::RESPONSE);
        let bytes = response.build_bytes_vec().expect("bytes");
        assert_eq!(answer(&bytes, &records(), None, 512), Outcome::Drop);
    }

    #[test]
    fn upstreams_come_from_the_flag_or_resolv_conf() {
        assert_eq!(
            parse_upstream("10.0.0.2"),
            Ok("10.0.0.2:53".parse().expect("addr"))
        );
        assert_eq!(
            parse_upstream("10.0.0.2:5353"),
            Ok("10.0.0.2:5353".parse().expect("addr"))
        );
        assert!(parse_upstream("dns.example")
            .unwrap_err()
            .contains("dns.example"));
        let conf = "# generated\nsearch example.com\nnameserver 10.0.0.2\nnameserver ::1\n  nameserver 10.0.0.3 \noptions ndots:5\n";
        assert_eq!(
            nameservers(conf),
            [
                "10.0.0.2:53".parse().expect("a"),
                "10.0.0.3:53".parse().expect("b")
            ]
        );
    }

    #[test]
    fn an_answer_too_long_for_udp_is_truncated_for_a_retry_over_tcp() {
        let outcome = answer(&query(5, "reviews.shop", TYPE::A), &records(), None, 20);
        let (packet, result) = reply(&outcome);
        assert_eq!(result, "truncated");
        assert!(packet.has_flags(PacketFlag::TRUNCATION));
        assert!(packet.answers.is_empty());
    }
}
