//! Access log lines as Envoy writes them: the format (Envoy's command operators in a text
//! line, or JSON labels), parsed once, and one [`LogEntry`] per request rendered with it.

use std::{
    fmt::Write as _,
    net::SocketAddrV4,
    time::{Duration, SystemTime},
};

use crate::config::log_format::{
    HeaderPick, Operator, Pattern, Piece, DEFAULT_JSON_LABELS, DEFAULT_TEXT_FORMAT,
};

/// How a provider writes a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogFormat {
    Text(Pattern),
    /// JSON object: each label's pattern rendered as its value.
    Json(Vec<(String, Pattern)>),
}

impl LogFormat {
    pub fn default_text() -> LogFormat {
        LogFormat::Text(Pattern::parse(DEFAULT_TEXT_FORMAT).unwrap_or(Pattern(Vec::new())))
    }

    pub fn default_json() -> LogFormat {
        LogFormat::json(DEFAULT_JSON_LABELS.iter().map(|(k, v)| (*k, *v)))
            .unwrap_or(LogFormat::Json(Vec::new()))
    }

    pub fn json<'a>(
        labels: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<LogFormat, String> {
        labels
            .into_iter()
            .map(|(name, pattern)| {
                Pattern::parse(pattern)
                    .map(|p| (name.to_owned(), p))
                    .map_err(|e| format!("label {name}: {e}"))
            })
            .collect::<Result<_, _>>()
            .map(LogFormat::Json)
    }

    /// The line for `entry`, with its newline.
    pub fn render(&self, entry: &LogEntry) -> String {
        match self {
            LogFormat::Text(pattern) => {
                let mut line = render(pattern, entry);
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                line
            }
            LogFormat::Json(labels) => {
                let object: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .map(|(name, pattern)| (name.clone(), json_value(pattern, entry)))
                    .collect();
                let mut line = serde_json::Value::Object(object).to_string();
                line.push('\n');
                line
            }
        }
    }
}

fn render(pattern: &Pattern, entry: &LogEntry) -> String {
    let mut out = String::new();
    for piece in &pattern.0 {
        match piece {
            Piece::Text(text) => out.push_str(text),
            Piece::Operator(op) => match entry.value(op) {
                Value::Text(text) => out.push_str(&text),
                Value::Number(n) => {
                    let _ = write!(out, "{n}");
                }
                Value::Missing => out.push('-'),
            },
        }
    }
    out
}

/// A JSON label's value: a lone numeric operator stays a number, a lone missing one is
/// null, anything else a string.
fn json_value(pattern: &Pattern, entry: &LogEntry) -> serde_json::Value {
    if let [Piece::Operator(op)] = pattern.0.as_slice() {
        return match entry.value(op) {
            Value::Text(text) => serde_json::Value::String(text),
            Value::Number(n) => serde_json::Value::from(n),
            Value::Missing => serde_json::Value::Null,
        };
    }
    serde_json::Value::String(render(pattern, entry))
}

enum Value {
    Text(String),
    Number(u64),
    Missing,
}

/// What is known of one request when it ends.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub start: SystemTime,
    pub duration: Duration,
    /// `HTTP/1.1`, `HTTP/2`.
    pub protocol: &'static str,
    pub request_headers: http::HeaderMap,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub response_headers: http::HeaderMap,
    /// 0 when no response was sent.
    pub response_code: u16,
    pub response_flags: String,
    pub response_code_details: Option<String>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddrV4>,
    pub upstream_cluster: Option<String>,
    pub downstream_local: Option<SocketAddrV4>,
    pub downstream_remote: Option<SocketAddrV4>,
    pub route_name: Option<String>,
}

impl LogEntry {
    /// A TCP connection's line, as Envoy's TCP proxy fills it: no request, no response,
    /// the bytes each way as seen from downstream (`bytes_received` from the client).
    pub fn connection(
        start: SystemTime,
        duration: Duration,
        (bytes_received, bytes_sent): (u64, u64),
        downstream_remote: SocketAddrV4,
        downstream_local: SocketAddrV4,
        (upstream_host, upstream_cluster): (SocketAddrV4, String),
    ) -> LogEntry {
        LogEntry {
            start,
            duration,
            protocol: "-",
            request_headers: http::HeaderMap::new(),
            method: String::new(),
            path: String::new(),
            authority: String::new(),
            response_headers: http::HeaderMap::new(),
            response_code: 0,
            response_flags: "-".into(),
            response_code_details: None,
            bytes_received,
            bytes_sent,
            upstream_host: Some(upstream_host),
            upstream_cluster: Some(upstream_cluster),
            downstream_local: Some(downstream_local),
            downstream_remote: Some(downstream_remote),
            route_name: None,
        }
    }

    fn value(&self, op: &Operator) -> Value {
        let text = |s: Option<String>| {
            s.filter(|s| !s.is_empty())
                .map_or(Value::Missing, Value::Text)
        };
        match op {
            Operator::StartTime => Value::Text(rfc3339_millis(self.start)),
            Operator::Protocol => Value::Text(self.protocol.to_owned()),
            Operator::ResponseCode => Value::Number(self.response_code.into()),
            Operator::ResponseFlags => Value::Text(self.response_flags.clone()),
            Operator::ResponseCodeDetails => text(self.response_code_details.clone()),
            Operator::BytesReceived => Value::Number(self.bytes_received),
            Operator::BytesSent => Value::Number(self.bytes_sent),
            Operator::Duration => Value::Number(self.duration.as_millis() as u64),
            Operator::UpstreamHost => text(self.upstream_host.map(|a| a.to_string())),
            Operator::UpstreamCluster => text(self.upstream_cluster.clone()),
            Operator::UpstreamLocalAddress | Operator::RequestedServerName => Value::Missing,
            Operator::DownstreamLocalAddress => text(self.downstream_local.map(|a| a.to_string())),
            Operator::DownstreamRemoteAddress => {
                text(self.downstream_remote.map(|a| a.to_string()))
            }
            Operator::DownstreamRemoteAddressWithoutPort => {
                text(self.downstream_remote.map(|a| a.ip().to_string()))
            }
            Operator::RouteName => text(self.route_name.clone()),
            Operator::Unavailable => Value::Missing,
            Operator::Request(pick) => text(self.request_header(pick)),
            Operator::Response(pick) => text(header(&self.response_headers, pick)),
        }
    }

    fn request_header(&self, pick: &HeaderPick) -> Option<String> {
        let pseudo = |name: &str| match name {
            ":method" => Some(self.method.clone()),
            ":path" => Some(self.path.clone()),
            ":authority" => Some(self.authority.clone()),
            _ => None,
        };
        let one = |name: &str| {
            pseudo(name).or_else(|| {
                self.request_headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            })
        };
        let value = one(&pick.name).or_else(|| pick.fallback.as_deref().and_then(one))?;
        Some(truncate(value, pick.max_length))
    }
}

fn header(headers: &http::HeaderMap, pick: &HeaderPick) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let value = get(&pick.name).or_else(|| pick.fallback.as_deref().and_then(get))?;
    Some(truncate(value.to_owned(), pick.max_length))
}

fn truncate(mut value: String, max: Option<usize>) -> String {
    if let Some(max) = max {
        if let Some((cut, _)) = value.char_indices().nth(max) {
            value.truncate(cut);
        }
    }
    value
}

/// `2026-12-02T10:15:53.123Z`, as Envoy's `%START_TIME%`.
fn rfc3339_millis(at: SystemTime) -> String {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let Ok(time) = time::OffsetDateTime::from_unix_timestamp(since.as_secs() as i64) else {
        return "-".into();
    };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        since.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> LogEntry {
        let mut request_headers = http::HeaderMap::new();
        request_headers.insert("user-agent", http::HeaderValue::from_static("curl/8.5.0"));
        request_headers.insert(
            "x-request-id",
            http::HeaderValue::from_static("5f1d3c2a-aaaa-bbbb-cccc-0123456789ab"),
        );
        LogEntry {
            start: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_670_553_123),
            duration: Duration::from_micros(12_700),
            protocol: "HTTP/1.1",
            request_headers,
            method: "GET".into(),
            path: "/reviews/1".into(),
            authority: "reviews:9080".into(),
            response_headers: http::HeaderMap::new(),
            response_code: 503,
            response_flags: "UF,URX".into(),
            response_code_details: None,
            bytes_received: 0,
            bytes_sent: 91,
            upstream_host: Some("10.244.2.4:9080".parse().expect("address")),
            upstream_cluster: Some("outbound|9080|v2|reviews.demo.svc.cluster.local".into()),
            downstream_local: Some("10.96.0.110:9080".parse().expect("address")),
            downstream_remote: Some("10.244.1.2:40000".parse().expect("address")),
            route_name: Some("canary".into()),
        }
    }

    #[test]
    fn istios_default_text_line() {
        let line = LogFormat::default_text().render(&entry());
        assert_eq!(
            line,
            "[2025-12-02T10:15:53.123Z] \"GET /reviews/1 HTTP/1.1\" 503 UF,URX - - \"-\" 0 91 12 - \"-\" \"curl/8.5.0\" \"5f1d3c2a-aaaa-bbbb-cccc-0123456789ab\" \"reviews:9080\" \"10.244.2.4:9080\" outbound|9080|v2|reviews.demo.svc.cluster.local - 10.96.0.110:9080 10.244.1.2:40000 - canary\n"
        );
    }

    #[test]
    fn json_lines_keep_numbers_as_numbers_and_missing_as_null() {
        let line = LogFormat::default_json().render(&entry());
        let value: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(value["response_code"], 503);
        assert_eq!(value["bytes_sent"], 91);
        assert_eq!(value["path"], "/reviews/1");
        assert_eq!(
            value["upstream_cluster"],
            "outbound|9080|v2|reviews.demo.svc.cluster.local"
        );
        assert!(value["x_forwarded_for"].is_null());
        assert_eq!(value.as_object().map(|o| o.len()), Some(24));
    }

    #[test]
    fn custom_formats_take_fallbacks_lengths_and_literal_percents() {
        let pattern =
            Pattern::parse("%REQ(X-ENVOY-ORIGINAL-PATH?:PATH):4% 100%% %REQ(USER-AGENT):4%")
                .expect("pattern");
        assert_eq!(render(&pattern, &entry()), "/rev 100% curl");
    }

    #[test]
    fn bad_formats_say_what_is_wrong() {
        assert!(Pattern::parse("%NOT_AN_OPERATOR%")
            .expect_err("unknown")
            .contains("NOT_AN_OPERATOR"));
        assert!(Pattern::parse("%START_TIME")
            .expect_err("unclosed")
            .contains("unclosed"));
        assert!(Pattern::parse("%REQ(A):x%")
            .expect_err("length")
            .contains("not a number"));
    }
}
