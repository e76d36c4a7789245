//! Envoy's access log format strings, parsed: text with command operators
//! (`%START_TIME%`, `%REQ(X?Y):N%`, `%RESPONSE_CODE%`, ...) as Istio's `accessLogFormat`
//! and `logFormat` take them. An unknown operator is an error that names it.

/// Istio's default text format (`accessLogFormat` unset).
pub const DEFAULT_TEXT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

/// Istio's default JSON labels (`accessLogEncoding: JSON`).
pub const DEFAULT_JSON_LABELS: [(&str, &str); 24] = [
    ("start_time", "%START_TIME%"),
    ("method", "%REQ(:METHOD)%"),
    ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
    ("protocol", "%PROTOCOL%"),
    ("response_code", "%RESPONSE_CODE%"),
    ("response_flags", "%RESPONSE_FLAGS%"),
    ("response_code_details", "%RESPONSE_CODE_DETAILS%"),
    (
        "connection_termination_details",
        "%CONNECTION_TERMINATION_DETAILS%",
    ),
    (
        "upstream_transport_failure_reason",
        "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    ),
    ("bytes_received", "%BYTES_RECEIVED%"),
    ("bytes_sent", "%BYTES_SENT%"),
    ("duration", "%DURATION%"),
    (
        "upstream_service_time",
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    ),
    ("x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"),
    ("user_agent", "%REQ(USER-AGENT)%"),
    ("request_id", "%REQ(X-REQUEST-ID)%"),
    ("authority", "%REQ(:AUTHORITY)%"),
    ("upstream_host", "%UPSTREAM_HOST%"),
    ("upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"),
    ("upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"),
    ("downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"),
    ("downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"),
    ("requested_server_name", "%REQUESTED_SERVER_NAME%"),
    ("route_name", "%ROUTE_NAME%"),
];

/// One command operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operator {
    StartTime,
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamLocalAddress,
    DownstreamLocalAddress,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    RequestedServerName,
    RouteName,
    /// Operators of Envoy's this mesh has no value for: always `-`.
    Unavailable,
    /// `%REQ(A?B):N%`: the request header `A` (`B` when `A` is absent), at most `N` chars.
    Request(HeaderPick),
    /// `%RESP(...)%`.
    Response(HeaderPick),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderPick {
    pub name: String,
    pub fallback: Option<String>,
    pub max_length: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Operator(Operator),
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(pub Vec<Piece>);

impl Pattern {
    /// Parses Envoy's format string; an unknown operator or an unclosed `%` is an error
    /// naming it.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('%') {
            if start > 0 {
                pieces.push(Piece::Text(rest[..start].to_owned()));
            }
            let after = &rest[start + 1..];
            let end = after
                .find('%')
                .ok_or_else(|| format!("unclosed '%' in {:?}", &rest[start..]))?;
            let token = &after[..end];
            if token.is_empty() {
                // `%%` is a literal percent sign.
                pieces.push(Piece::Text("%".into()));
            } else {
                pieces.push(Piece::Operator(operator(token)?));
            }
            rest = &after[end + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_owned()));
        }
        Ok(Pattern(pieces))
    }
}

fn operator(token: &str) -> Result<Operator, String> {
    let (name, max_length) = match token.rsplit_once("):") {
        Some((head, length)) => {
            let length: usize = length
                .parse()
                .map_err(|_| format!("%{token}%: the length after ':' is not a number"))?;
            (format!("{head})"), Some(length))
        }
        None => (token.to_owned(), None),
    };
    let header = |inner: &str| {
        let (name, fallback) = match inner.split_once('?') {
            Some((a, b)) => (a, Some(b.to_ascii_lowercase())),
            None => (inner, None),
        };
        if name.is_empty() {
            return Err(format!("%{token}%: no header named"));
        }
        Ok(HeaderPick {
            name: name.to_ascii_lowercase(),
            fallback,
            max_length,
        })
    };
    if let Some(inner) = name.strip_prefix("REQ(").and_then(|n| n.strip_suffix(')')) {
        return header(inner).map(Operator::Request);
    }
    if let Some(inner) = name.strip_prefix("RESP(").and_then(|n| n.strip_suffix(')')) {
        return header(inner).map(Operator::Response);
    }
    Ok(match name.as_str() {
        "START_TIME" => Operator::StartTime,
        "PROTOCOL" => Operator::Protocol,
        "RESPONSE_CODE" => Operator::ResponseCode,
        "RESPONSE_FLAGS" => Operator::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Operator::ResponseCodeDetails,
        "BYTES_RECEIVED" => Operator::BytesReceived,
        "BYTES_SENT" => Operator::BytesSent,
        "DURATION" => Operator::Duration,
        "UPSTREAM_HOST" => Operator::UpstreamHost,
        "UPSTREAM_CLUSTER" | "UPSTREAM_CLUSTER_RAW" => Operator::UpstreamCluster,
        "UPSTREAM_LOCAL_ADDRESS" => Operator::UpstreamLocalAddress,
        "DOWNSTREAM_LOCAL_ADDRESS" => Operator::DownstreamLocalAddress,
        "DOWNSTREAM_REMOTE_ADDRESS" | "DOWNSTREAM_PEER_ADDRESS" => {
            Operator::DownstreamRemoteAddress
        }
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Operator::DownstreamRemoteAddressWithoutPort,
        "REQUESTED_SERVER_NAME" => Operator::RequestedServerName,
        "ROUTE_NAME" => Operator::RouteName,
        "CONNECTION_TERMINATION_DETAILS"
        | "UPSTREAM_TRANSPORT_FAILURE_REASON"
        | "RESPONSE_DURATION"
        | "UPSTREAM_SERVICE_TIME"
        | "CONNECTION_ID" => Operator::Unavailable,
        _ => {
            return Err(format!(
                "%{token}% is not a command operator this mesh knows"
            ))
        }
    })
}
