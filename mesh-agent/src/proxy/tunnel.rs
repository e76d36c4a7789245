//! The agent-to-agent tunnel: one TCP connection per proxied connection, opened by an
//! HTTP/1.1-style `CONNECT` naming the original destination, the original client and the
//! Service, answered by `200` once the destination agent reached the pod.
//!
//! This is the seam where HBONE (HTTP/2 CONNECT over mTLS, pooled) replaces plaintext;
//! callers only see [`open`] and [`accept`].

use std::{io, net::SocketAddrV4, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};

const MAX_HEADER_BYTES: usize = 8 * 1024;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the source agent asks of the destination agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelRequest {
    /// The pod address and port to reach.
    pub target: SocketAddrV4,
    /// The original client, whose address the destination pod must see.
    pub client: SocketAddrV4,
    /// The Service the client addressed, when it addressed one.
    pub service: Option<String>,
}

impl TunnelRequest {
    fn encode(&self) -> String {
        let mut head = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nForwarded: for=\"{client}\"\r\n",
            target = self.target,
            client = self.client
        );
        if let Some(service) = &self.service {
            head.push_str(&format!("X-Mesh-Service: {service}\r\n"));
        }
        head.push_str("\r\n");
        head
    }
}

fn invalid(message: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.into())
}

/// Reads header lines up to the empty line, bounded in size and time.
async fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Vec<String>> {
    let read = async {
        let mut lines = Vec::new();
        let mut total = 0;
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).await?;
            if n == 0 {
                return Err(invalid("tunnel closed inside the header"));
            }
            total += n;
            if total > MAX_HEADER_BYTES {
                return Err(invalid("tunnel header larger than 8 KiB"));
            }
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if line.is_empty() {
                return Ok(lines);
            }
            lines.push(line);
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tunnel header timed out"))?
}

/// Opens a tunnel through the agent at `agent`; returns the stream once the destination
/// agent accepted.
pub async fn open(
    agent: SocketAddrV4,
    request: &TunnelRequest,
) -> io::Result<BufReader<TcpStream>> {
    let mut stream = super::socket::connect(agent).await?;
    stream.write_all(request.encode().as_bytes()).await?;
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader).await?;
    let status = head.first().map(String::as_str).unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("agent {agent} refused the tunnel: {status}"),
        ));
    }
    Ok(reader)
}

/// Reads a tunnel request from a peer agent.
pub async fn accept(stream: TcpStream) -> io::Result<(TunnelRequest, BufReader<TcpStream>)> {
    let mut reader = BufReader::new(stream);
    let head = read_head(&mut reader).await?;
    let request = parse(&head)?;
    Ok((request, reader))
}

fn parse(head: &[String]) -> io::Result<TunnelRequest> {
    let request_line = head
        .first()
        .ok_or_else(|| invalid("empty tunnel request"))?;
    let mut parts = request_line.split(' ');
    let (Some("CONNECT"), Some(target), Some("HTTP/1.1"), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid(format!("not a CONNECT request: {request_line:?}")));
    };
    let target = target
        .parse()
        .map_err(|_| invalid(format!("CONNECT target {target:?} is not ip:port")))?;
    let mut client = None;
    let mut service = None;
    for line in &head[1..] {
        let Some((name, value)) = line.split_once(':') else {
            return Err(invalid(format!("malformed header line {line:?}")));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("forwarded") {
            let addr = value
                .strip_prefix("for=\"")
                .and_then(|v| v.strip_suffix('"'))
                .ok_or_else(|| invalid(format!("malformed Forwarded header {value:?}")))?;
            client = Some(
                addr.parse()
                    .map_err(|_| invalid(format!("Forwarded address {addr:?} is not ip:port")))?,
            );
        } else if name.eq_ignore_ascii_case("x-mesh-service") {
            service = Some(value.to_owned());
        }
    }
    Ok(TunnelRequest {
        target,
        client: client.ok_or_else(|| invalid("tunnel request without Forwarded header"))?,
        service,
    })
}

/// Answers a tunnel request: `200` to go ahead, anything else refuses.
pub async fn respond(stream: &mut BufReader<TcpStream>, status: &str) -> io::Result<()> {
    stream
        .get_mut()
        .write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.split("\r\n")
            .take_while(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn request_round_trips() {
        let request = TunnelRequest {
            target: "10.244.2.3:8080".parse().expect("addr"),
            client: "10.244.1.2:40000".parse().expect("addr"),
            service: Some("web.shop.svc.cluster.local".into()),
        };
        assert_eq!(parse(&lines(&request.encode())).expect("parse"), request);
    }

    #[test]
    fn malformed_requests_are_refused_with_the_reason() {
        for (head, expected) in [
            ("GET / HTTP/1.1\r\n\r\n", "not a CONNECT"),
            ("CONNECT nowhere HTTP/1.1\r\n\r\n", "is not ip:port"),
            ("CONNECT 10.0.0.1:80 HTTP/1.1\r\n\r\n", "without Forwarded"),
            (
                "CONNECT 10.0.0.1:80 HTTP/1.1\r\nForwarded: x\r\n\r\n",
                "malformed Forwarded",
            ),
            (
                "CONNECT 10.0.0.1:80 HTTP/1.1\r\nbogus\r\n\r\n",
                "malformed header",
            ),
        ] {
            let err = parse(&lines(head)).expect_err(head);
            assert!(err.to_string().contains(expected), "{head:?}: {err}");
        }
    }
}
