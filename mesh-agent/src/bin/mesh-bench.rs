//! `mesh-bench`: the benchmark's server and load generator, run inside sandbox pods by
//! `cargo xtask bench`.
//!
//! - `serve`: HTTP/1.1 and HTTP/2 (prior knowledge) on one port, 1 KiB responses; with
//!   `--echo`, each response is instead a JSON account of the request head as it arrived
//!   (method, target, version, every header field line), so that what a proxy in
//!   front of it forwarded can be read back, duplicates included. A request whose
//!   content type is `application/grpc` is answered as gRPC: its message echoed, then the
//!   `grpc-status` trailer its path asks for (`/<service>/Unavailable`: 14, `/<service>/
//!   Flaky/<key>`: 14 on every other call of `<key>`, the first failing,
//!   `/<service>/Slow/<ms>`: 0 after `<ms>` milliseconds, any other: 0).
//! - `load`: requests over N keep-alive connections, either at a constant total rate
//!   (latency measured from each request's *scheduled* time, which corrects coordinated
//!   omission as wrk2 does) or as fast as possible; or one new connection per request
//!   (`--churn`, `Connection: close`, done when the server has closed). Prints one JSON object: requests, errors, seconds, rps, latency
//!   percentiles in microseconds.
//! - `hold`: opens N connections, holds them idle until standard input ends, closes them
//!   (the agent's memory and descriptors per connection, and after).

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context as TaskContext, Poll},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

#[derive(Parser)]
#[command(name = "mesh-bench", about = "Benchmark server and load generator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Protocol {
    Http1,
    Http2,
}

#[derive(Subcommand)]
enum Command {
    /// Serve 1 KiB responses over HTTP/1.1 and HTTP/2.
    Serve {
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// Answer each request with the JSON account of its head instead.
        #[arg(long)]
        echo: bool,
    },
    /// Generate load and print the measurement as JSON.
    Load {
        target: SocketAddr,
        #[arg(long, value_enum, default_value_t = Protocol::Http1)]
        protocol: Protocol,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Total requests per second; 0 means as fast as possible.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        #[arg(long, default_value = "5")]
        seconds: f64,
        /// A new TCP connection for every request (HTTP/1.1).
        #[arg(long)]
        churn: bool,
    },
    /// Open connections (HTTP/1.1, one request each, so every hop is open), print
    /// `{"open": N, "seconds": S}` once all are, hold them idle until standard input
    /// ends, then close them all.
    Hold {
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
    },
}

const BODY: [u8; 1024] = [b'x'; 1024];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Thousands of connections need thousands of descriptors, beyond the usual soft
    // limit of 1024.
    mesh_agent::app::fdlimit::raise().context("raising the descriptor limit")?;
    match cli.command {
        Command::Serve { listen, echo } => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(serve(listen, echo)),
        Command::Load {
            target,
            protocol,
            connections,
            rate,
            seconds,
            churn,
        } => {
            let report = load(target, protocol, connections, rate, seconds, churn)?;
            println!("{report}");
            Ok(())
        }
        Command::Hold {
            target,
            connections,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(hold(target, connections)),
    }
}

/// How many connections `hold` opens at a time.
const OPENING_AT_ONCE: usize = 64;

async fn hold(target: SocketAddr, connections: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut open = Vec::with_capacity(connections);
    while open.len() < connections {
        let batch = OPENING_AT_ONCE.min(connections - open.len());
        let mut opening = tokio::task::JoinSet::new();
        for _ in 0..batch {
            opening.spawn(async move {
                let mut client = Client::connect(target, Protocol::Http1).await?;
                client.request(target, false).await?;
                anyhow::Ok(client)
            });
        }
        while let Some(opened) = opening.join_next().await {
            let client = opened?.with_context(|| {
                format!("connection {} of {connections} to {target}", open.len() + 1)
            })?;
            open.push(client);
        }
    }
    println!(
        "{}",
        serde_json::json!({"open": open.len(), "seconds": started.elapsed().as_secs_f64()})
    );
    let mut rest = Vec::new();
    tokio::io::stdin().read_to_end(&mut rest).await?;
    drop(open);
    Ok(())
}

/// A response body: one chunk, then the trailers if there are any (gRPC's status).
struct Reply {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(data) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    /// Exact without trailers, so HTTP/1.1 answers carry a `content-length` (the load
    /// generator reads that framing) rather than chunks.
    fn size_hint(&self) -> SizeHint {
        match (&self.data, &self.trailers) {
            (data, None) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            _ => SizeHint::default(),
        }
    }
}

/// Calls so far of each `Flaky` key.
type FlakyCalls = Arc<Mutex<HashMap<String, u64>>>;

/// The gRPC status `path` asks for (see the module's documentation), after its delay.
async fn grpc_status_for(path: &str, flaky: &FlakyCalls) -> u32 {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        [_, "Unavailable", ..] => 14,
        [_, "Flaky", key, ..] => {
            let mut calls = flaky.lock().unwrap_or_else(|e| e.into_inner());
            let count = calls.entry((*key).to_owned()).or_default();
            *count += 1;
            if *count % 2 == 1 {
                14
            } else {
                0
            }
        }
        [_, "Slow", ms, ..] => {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
            0
        }
        _ => 0,
    }
}

async fn answer(request: Request<Incoming>, echo: bool, flaky: FlakyCalls) -> Response<Reply> {
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if !grpc {
        let body = if echo {
            Bytes::from(echo_head(&request))
        } else {
            Bytes::from_static(&BODY)
        };
        return Response::new(Reply {
            data: Some(body),
            trailers: None,
        });
    }
    let path = request.uri().path().to_owned();
    let message = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let status = grpc_status_for(&path, &flaky).await;
    let mut grpc_status = HeaderMap::new();
    grpc_status.insert("grpc-status", HeaderValue::from(status));
    // A failure is a Trailers-Only response, as gRPC servers answer errors: the status
    // in the head, which is what a proxy's retry policy can read.
    let (mut response, head) = if status == 0 {
        let reply = Reply {
            data: Some(message),
            trailers: Some(grpc_status),
        };
        (Response::new(reply), HeaderMap::new())
    } else {
        let reply = Reply {
            data: None,
            trailers: None,
        };
        (Response::new(reply), grpc_status)
    };
    response.headers_mut().extend(head);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    response
}

async fn serve(listen: SocketAddr, echo: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let flaky = FlakyCalls::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let flaky = flaky.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let flaky = flaky.clone();
                async move { Ok::<_, Infallible>(answer(request, echo, flaky).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The head of `request` as this server received it, as JSON: `method`, `target` (the
/// request target: origin-form on HTTP/1.1; on HTTP/2 the path, with `authority` and
/// `scheme` from the pseudo-headers), `version`, and `headers` as `[name, value]` pairs,
/// one per field line (a repeated field appears as often as it came, next to its first
/// occurrence; values not UTF-8 are shown with replacement characters).
fn echo_head<B>(request: &Request<B>) -> Vec<u8> {
    let uri = request.uri();
    let headers: Vec<(&str, String)> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            (name.as_str(), value)
        })
        .collect();
    let head = serde_json::json!({
        "method": request.method().as_str(),
        "target": uri.path_and_query().map_or(uri.path(), |p| p.as_str()),
        "authority": uri.authority().map(|a| a.as_str()),
        "scheme": uri.scheme_str(),
        "version": format!("{:?}", request.version()),
        "headers": headers,
    });
    head.to_string().into_bytes()
}

/// A client connection that sends one request at a time.
enum Client {
    Http1(TcpStream, Vec<u8>),
    Http2(h2::client::SendRequest<Bytes>),
}

impl Client {
    async fn connect(target: SocketAddr, protocol: Protocol) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(target).await?;
        stream.set_nodelay(true)?;
        Ok(match protocol {
            Protocol::Http1 => Client::Http1(stream, Vec::with_capacity(4096)),
            Protocol::Http2 => {
                let (sender, connection) = h2::client::handshake(stream).await?;
                tokio::spawn(connection);
                Client::Http2(sender)
            }
        })
    }

    async fn request(&mut self, target: SocketAddr, close: bool) -> anyhow::Result<()> {
        match self {
            Client::Http1(stream, buf) => {
                let connection = if close { "close" } else { "keep-alive" };
                let head =
                    format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: {connection}\r\n\r\n");
                stream.write_all(head.as_bytes()).await?;
                buf.clear();
                // The response: headers, then Content-Length bytes.
                let mut chunk = [0u8; 4096];
                loop {
                    let n = stream.read(&mut chunk).await?;
                    if n == 0 {
                        bail!("connection closed mid-response");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .context("response without content-length")?;
                        while buf.len() < end + 4 + length {
                            let n = stream.read(&mut chunk).await?;
                            if n == 0 {
                                bail!("connection closed mid-body");
                            }
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        // Having asked to close, the request ends when the server
                        // closes: a client closing first would hold its port in
                        // TIME_WAIT, and a run of new connections to one server would
                        // run out of ports within a minute, which measures the client.
                        if close && stream.read(&mut chunk).await? != 0 {
                            bail!("bytes after the response");
                        }
                        return Ok(());
                    }
                }
            }
            Client::Http2(sender) => {
                let request = Request::builder()
                    .uri(format!("http://{target}/"))
                    .body(())?;
                let (response, _) = sender.clone().ready().await?.send_request(request, true)?;
                let mut body = response.await?.into_body();
                while let Some(chunk) = body.data().await {
                    let chunk = chunk?;
                    let _ = body.flow_control().release_capacity(chunk.len());
                }
                Ok(())
            }
        }
    }
}

/// One thread per connection, each with its own single-threaded runtime: the thread
/// sleeps (with the OS timer's precision, not the runtime's millisecond wheel) until each
/// request's scheduled time, then drives the request.
fn load(
    target: SocketAddr,
    protocol: Protocol,
    connections: usize,
    rate: u64,
    seconds: f64,
    churn: bool,
) -> anyhow::Result<serde_json::Value> {
    let duration = Duration::from_secs_f64(seconds);
    let start = Instant::now() + Duration::from_millis(50);
    let per_connection_interval =
        (rate > 0).then(|| Duration::from_secs_f64(connections as f64 / rate as f64));
    let mut workers = Vec::new();
    for worker in 0..connections {
        workers.push(std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut client = if churn {
                None
            } else {
                Some(runtime.block_on(Client::connect(target, protocol))?)
            };
            // Stagger the connections' schedules across one interval.
            let offset = per_connection_interval
                .map_or(Duration::ZERO, |i| i * worker as u32 / connections as u32);
            let mut sent = 0u32;
            loop {
                let scheduled = match per_connection_interval {
                    Some(interval) => start + offset + interval * sent,
                    None => Instant::now().max(start),
                };
                if scheduled >= start + duration {
                    break;
                }
                if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                sent += 1;
                let outcome = runtime.block_on(async {
                    match &mut client {
                        Some(client) => client.request(target, false).await,
                        None => {
                            let mut fresh = Client::connect(target, Protocol::Http1).await?;
                            fresh.request(target, true).await
                        }
                    }
                });
                match outcome {
                    Ok(()) => latencies.push(scheduled.elapsed().as_micros() as u64),
                    Err(_) => {
                        errors += 1;
                        if !churn {
                            client = runtime.block_on(Client::connect(target, protocol)).ok();
                        }
                    }
                }
            }
            anyhow::Ok((latencies, errors))
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for worker in workers {
        let (mut l, e) = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a load worker panicked"))??;
        latencies.append(&mut l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    latencies.sort_unstable();
    let percentile = |p: f64| -> u64 {
        if latencies.is_empty() {
            return 0;
        }
        let index =
            ((latencies.len() as f64 * p / 100.0).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[index]
    };
    Ok(serde_json::json!({
        "requests": latencies.len(),
        "errors": errors,
        "seconds": elapsed,
        "rps": latencies.len() as f64 / elapsed,
        "p50_us": percentile(50.0),
        "p90_us": percentile(90.0),
        "p99_us": percentile(99.0),
        "p999_us": percentile(99.9),
    }))
}
