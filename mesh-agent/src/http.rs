//! The agent's small HTTP/1.1 servers: Prometheus metrics (15020), readiness (15021) and
//! the localhost admin API (15000). Each maps a GET path to a response.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
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

pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("http accept: {err}");
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let handler = handler.clone();
                async move {
                    let reply = if request.method() == Method::GET {
                        handler(request.uri().path())
                    } else {
                        Reply::text(
                            StatusCode::METHOD_NOT_ALLOWED,
                            "only GET is served\n".into(),
                        )
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
                log::debug!("http connection: {err}");
            }
        });
    }
}
