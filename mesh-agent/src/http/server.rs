//! The agent's small HTTP/1.1 servers: Prometheus metrics (15020), readiness (15021) and
//! the localhost admin API (15000). Each maps a GET path, or a POST path and its JSON
//! body, to a response.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

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

pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!("http accept: {err}");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
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
                    let response = Response::builder()
                        .status(reply.status)
                        .header("content-type", reply.content_type)
                        .body(Full::new(Bytes::from(reply.body)))
                        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                    Ok::<_, Infallible>(response)
                }
            });
            if let Err(err) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("http connection: {err}");
            }
        });
    }
}
