//! The one HTTP client of the agent and meshctl (hyper): the CA client, JWKS fetching,
//! span export (HTTP/1.1, or HTTP/2 without TLS for OTLP over gRPC) and meshctl's calls to
//! the admin API. One request per connection, a bounded response body, a deadline on the
//! whole exchange, and typed errors that keep their source.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {address}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {address}")]
    Tls {
        address: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with {address}")]
    Http {
        address: String,
        source: hyper::Error,
    },
    #[error("invalid request to {address}")]
    Request {
        address: String,
        source: http::Error,
    },
    #[error("the answer of {address} is larger than {limit} bytes or broke off")]
    Body { address: String, limit: usize },
    #[error("{address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

/// How the connection is made: plain TCP, or TLS verified as `config` says against
/// `server_name`.
#[derive(Clone)]
pub enum Transport {
    Plain,
    Tls {
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
    },
}

/// One request: sent to `address` (`host:port`), with `host` as its `Host` header.
pub struct Request {
    pub method: Method,
    pub address: String,
    pub host: String,
    pub path: String,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    /// Answers larger than this are refused.
    pub max_body: usize,
    pub timeout: Duration,
    /// HTTP/2 with prior knowledge (gRPC) rather than HTTP/1.1.
    pub http2: bool,
}

impl Request {
    pub fn get(address: impl Into<String>, path: impl Into<String>) -> Request {
        let address = address.into();
        Request {
            method: Method::GET,
            host: address.clone(),
            address,
            path: path.into(),
            headers: Vec::new(),
            body: Bytes::new(),
            max_body: 1 << 20,
            timeout: Duration::from_secs(10),
            http2: false,
        }
    }

    pub fn post_json(address: impl Into<String>, path: impl Into<String>, body: String) -> Request {
        let mut request = Request::get(address, path);
        request.method = Method::POST;
        request.body = Bytes::from(body);
        request.headers.push((
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ));
        request
    }
}

/// What came back.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// Trailers, when the answer had any (HTTP/2).
    pub trailers: http::HeaderMap,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `request` over a new connection made as `transport` says.
pub async fn send(transport: &Transport, request: Request) -> Result<Response, ClientError> {
    let address = request.address.clone();
    let timeout = request.timeout;
    tokio::time::timeout(timeout, exchange(transport, request))
        .await
        .map_err(|_| ClientError::Timeout { address, timeout })?
}

/// Sends `request` over `io`, a connection made elsewhere (a port-forward through the
/// Kubernetes API); `request.address` only names it in errors.
pub async fn send_over<I>(io: I, request: Request) -> Result<Response, ClientError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let address = request.address.clone();
    let timeout = request.timeout;
    tokio::time::timeout(timeout, over(io, request))
        .await
        .map_err(|_| ClientError::Timeout { address, timeout })?
}

async fn exchange(transport: &Transport, request: Request) -> Result<Response, ClientError> {
    let address = request.address.clone();
    let tcp = TcpStream::connect(address.as_str())
        .await
        .map_err(|source| ClientError::Connect {
            address: address.clone(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    match transport {
        Transport::Plain => over(tcp, request).await,
        Transport::Tls {
            config,
            server_name,
        } => {
            let tls = tokio_rustls::TlsConnector::from(config.clone())
                .connect(server_name.clone(), tcp)
                .await
                .map_err(|source| ClientError::Tls { address, source })?;
            over(tls, request).await
        }
    }
}

async fn over<I>(io: I, request: Request) -> Result<Response, ClientError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let address = request.address.clone();
    let http_error = |source| ClientError::Http {
        address: address.clone(),
        source,
    };
    let mut builder = http::Request::builder().method(request.method);
    builder = if request.http2 {
        builder.uri(format!("http://{}{}", request.host, request.path))
    } else {
        builder.uri(request.path).header(header::HOST, request.host)
    };
    for (name, value) in request.headers {
        builder = builder.header(name, value);
    }
    let outgoing =
        builder
            .body(Full::new(request.body))
            .map_err(|source| ClientError::Request {
                address: address.clone(),
                source,
            })?;
    let response = if request.http2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(io),
        )
        .await
        .map_err(http_error)?;
        tokio::spawn(connection);
        sender.send_request(outgoing).await.map_err(http_error)?
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(http_error)?;
        tokio::spawn(connection);
        sender.send_request(outgoing).await.map_err(http_error)?
    };
    let (parts, body) = response.into_parts();
    let collected = Limited::new(body, request.max_body)
        .collect()
        .await
        .map_err(|_| ClientError::Body {
            address: address.clone(),
            limit: request.max_body,
        })?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn one_shot_server(answer: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let served = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                seen.extend_from_slice(&buf[..n]);
            }
            stream.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&seen).into_owned()
        });
        (address, served)
    }

    #[tokio::test]
    async fn a_request_gets_the_status_and_body_and_sends_host_and_path() {
        let (address, served) =
            one_shot_server("HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello").await;
        let mut request = Request::get(address, "/x?y=1");
        request.host = "example.internal".into();
        let response = send(&Transport::Plain, request).await.expect("response");
        assert_eq!(response.status, StatusCode::CREATED);
        assert_eq!(response.text(), "hello");
        let seen = served.await.expect("server");
        assert!(seen.starts_with("GET /x?y=1 HTTP/1.1\r\n"), "{seen}");
        assert!(seen.to_ascii_lowercase().contains("host: example.internal"));
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_refused() {
        let (address, _served) =
            one_shot_server("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789").await;
        let mut request = Request::get(address, "/");
        request.max_body = 4;
        let err = send(&Transport::Plain, request)
            .await
            .expect_err("too large");
        assert!(matches!(err, ClientError::Body { limit: 4, .. }), "{err}");
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_error_naming_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        drop(listener);
        let err = send(&Transport::Plain, Request::get(address.clone(), "/"))
            .await
            .expect_err("refused");
        assert!(matches!(err, ClientError::Connect { .. }));
        assert!(err.to_string().contains(&address));
    }
}
