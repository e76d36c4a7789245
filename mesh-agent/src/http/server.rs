//! The agent's small HTTP/1.1 servers: Prometheus metrics (15020), readiness (15021) and
//! the localhost admin API (15000). Each maps a GET path, or a POST path and its JSON
//! body, to a response. 15020 and 15021 are reachable from every pod of the node, so a
//! connection that never finishes its request head is let go after a deadline.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
};

use crate::http::{accept_loop, serve_until_drained, ConnectionDrain, Intake};

pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn ok(content_type: &'static str, body: String) -> Reply {
        Reply {
            status: StatusCode::OK,
            content_type,
            body,
        }
    }

    pub fn json(value: &impl serde::Serialize) -> Reply {
        match serde_json::to_string_pretty(value) {
            Ok(body) => Reply::ok("application/json", body),
            Err(err) => Reply::text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding JSON: {err}\n"),
            ),
        }
    }

    pub fn text(status: StatusCode, body: String) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

/// Called with the path, and the body of a POST (`None` for a GET).
pub type Handler = Arc<dyn Fn(&str, Option<&[u8]>) -> Reply + Send + Sync>;

/// Request bodies larger than this are refused.
const MAX_BODY_BYTES: usize = 1 << 20;

/// How long a client may take to send a request head (and, on a kept-alive connection,
/// the next one): a Prometheus scrape or a kubelet probe sends it at once, so this only
/// lets go of connections held open idle.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, intake: Intake, handler: Handler) {
    let draining = intake.clone();
    accept_loop("http", listener, intake, move |stream, _| {
        connection(
            stream,
            handler.clone(),
            HEADER_READ_TIMEOUT,
            draining.connection_drain(),
        )
    })
    .await;
}

/// Serves one connection, letting it go when a request head takes longer than
/// `header_timeout`, and taking part in the agent's drain.
async fn connection<S>(
    stream: S,
    handler: Handler,
    header_timeout: Duration,
    drain: ConnectionDrain,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answering = drain.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let (handler, drain) = (handler.clone(), answering.clone());
        async move {
            let version = request.version();
            let path = request.uri().path().to_owned();
            let reply = match *request.method() {
                Method::GET => handler(&path, None),
                Method::POST => {
                    match Limited::new(request.into_body(), MAX_BODY_BYTES)
                        .collect()
                        .await
                    {
                        Ok(body) => handler(&path, Some(&body.to_bytes())),
                        Err(err) => Reply::text(
                            StatusCode::BAD_REQUEST,
                            format!("reading the request body: {err}\n"),
                        ),
                    }
                }
                _ => Reply::text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "only GET and POST are served\n".into(),
                ),
            };
            let mut response = Response::builder()
                .status(reply.status)
                .header("content-type", reply.content_type)
                .body(Full::new(Bytes::from(reply.body)))
                .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
            drain.answer(version, &mut response);
            Ok::<_, Infallible>(response)
        }
    });
    let served = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    if let Err(err) = serve_until_drained(served, drain).await {
        tracing::debug!("http connection: {err}");
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn hello() -> Handler {
        Arc::new(|path, _| Reply::ok("text/plain", format!("{path}\n")))
    }

    async fn let_go(served: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("the server let the connection go")
            .expect("served");
    }

    #[tokio::test]
    async fn a_connection_that_sends_no_request_head_is_let_go() {
        let short = Duration::from_millis(100);

        // Connected, then silent.
        let (_client, server) = tokio::io::duplex(4096);
        let_go(tokio::spawn(connection(
            server,
            hello(),
            short,
            ConnectionDrain::never(),
        )))
        .await;

        // Half a request head, then silent.
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(connection(server, hello(), short, ConnectionDrain::never()));
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            .await
            .expect("write");
        let_go(served).await;
    }

    #[tokio::test]
    async fn a_prompt_request_is_answered() {
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(connection(
            server,
            hello(),
            Duration::from_secs(10),
            ConnectionDrain::never(),
        ));
        client
            .write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("/healthz/ready\n"), "{answer}");
        let_go(served).await;
    }

    #[tokio::test]
    async fn while_draining_an_answer_closes_its_connection_and_an_idle_one_waits() {
        let (mut client, server) = tokio::io::duplex(4096);
        let intake = Intake::default();
        let served = tokio::spawn(connection(
            server,
            hello(),
            Duration::from_secs(3600),
            intake.connection_drain(),
        ));
        let mut answer = vec![0; 4096];
        client
            .write_all(b"GET /before HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let read = client.read(&mut answer).await.expect("read");
        let before = String::from_utf8_lossy(&answer[..read]).into_owned();
        assert!(!before.contains("connection: close"), "{before}");
        // Idle when the drain starts: kept, as the client may be sending right now.
        intake.stop.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!served.is_finished());
        client
            .write_all(b"GET /during HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut during = Vec::new();
        client
            .read_to_end(&mut during)
            .await
            .expect("read to the end");
        let during = String::from_utf8_lossy(&during);
        assert!(during.starts_with("HTTP/1.1 200 OK\r\n"), "{during}");
        assert!(during.contains("connection: close\r\n"), "{during}");
        assert!(during.ends_with("/during\n"), "{during}");
        let_go(served).await;
    }
}
