//! The one normalisation of an HTTP request head, done before anything judges it:
//! "normalise once, judge what is forwarded, forward what was judged; reject what is
//! ambiguous with 400".
//!
//! A proxy that judges one reading of a request and forwards bytes the backend reads
//! another way can be walked around: an absolute-form target naming one host while `Host`
//! names another, `:authority` against `host`, two `Host` headers, header values the policy
//! cannot read, a `Connection` header that removes a header after it was judged, a
//! lower-case method. [`normalise`] settles each of these on the head itself, in place,
//! so that the head the proxy forwards is the head the policies judge, and answers what is
//! ambiguous with a [`Rejection`] (400) instead of guessing. It does no I/O.
//!
//! What hyper (h1 and h2) settles before a head reaches us is left to it: `Content-Length`
//! together with `Transfer-Encoding` (hyper's h1 parser keeps the chunked framing, drops
//! `Content-Length` and closes the connection after the response, as RFC 9112 §6.3
//! allows), `Transfer-Encoding` whose last coding is not `chunked` or on HTTP/1.0 and
//! differing `Content-Length`s (400), CR/LF/NUL in header values (refused by
//! `http::HeaderValue` itself). HTTP/2's connection-specific headers and a `te` other than
//! `trailers` (RFC 9113 §8.2.2) are refused by the `h2` crate and again here, so no such
//! head is judged whatever built it. A `#fragment` in the target is dropped by the `http`
//! crate's URI parser, so the judged and the forwarded path are both the path without it;
//! Envoy answers such targets 400 (`http_reject_path_with_fragment`, since its August 2021
//! releases), which we cannot do as the fragment is gone before the head reaches us.

use http::{
    header::{self, HeaderName},
    request::Parts,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderMap, HeaderValue, Method, StatusCode, Uri, Version,
};

use crate::policy::{
    authz::{AuthFacts, RequestFacts},
    path::normalize_path,
};

/// Why a request head is refused. Every variant is answered `400 Bad Request`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("CONNECT is not carried: the connection is served as HTTP requests, not tunnels")]
    Connect,
    #[error("method {0:?} has lower-case letters")]
    LowercaseMethod(String),
    #[error("the request has no Host and no authority")]
    MissingHost,
    #[error("the request has {0} Host headers")]
    DuplicateHost(usize),
    #[error("the authority {0:?} is not a valid host[:port]")]
    InvalidHost(String),
    #[error("the authority {0:?} carries userinfo")]
    HostUserinfo(String),
    #[error(":authority {authority:?} and host {host:?} differ")]
    AuthorityMismatch { authority: String, host: String },
    #[error("the target's scheme {0:?} is not http or https")]
    Scheme(String),
    #[error("the value of header {0} is not UTF-8")]
    HeaderValue(HeaderName),
    #[error("HTTP/2 forbids the connection-specific header {0}")]
    ConnectionSpecific(HeaderName),
    #[error("the Connection header names {0:?}, which is not a header name")]
    ConnectionToken(String),
    #[error("the Connection header names {0}, which every hop needs")]
    ConnectionNamesEndToEnd(HeaderName),
    #[error("the target {0:?} is authority-form, which only CONNECT uses")]
    AuthorityForm(String),
    #[error("the path {0:?} is not a valid origin-form path")]
    InvalidPath(String),
}

impl Rejection {
    /// The status a rejected request is answered with.
    pub fn status(&self) -> StatusCode {
        StatusCode::BAD_REQUEST
    }

    /// The short body of the answer; the `Display` text (with the offending value) is for
    /// the log, not for the client.
    pub fn body(&self) -> &'static str {
        match self {
            Rejection::Connect => "Bad Request: CONNECT is not supported",
            Rejection::LowercaseMethod(_) => "Bad Request: invalid method",
            Rejection::MissingHost => "Bad Request: missing host",
            Rejection::DuplicateHost(_) => "Bad Request: multiple host headers",
            Rejection::InvalidHost(_) | Rejection::HostUserinfo(_) => "Bad Request: invalid host",
            Rejection::AuthorityMismatch { .. } => "Bad Request: :authority and host differ",
            Rejection::Scheme(_) => "Bad Request: invalid scheme",
            Rejection::HeaderValue(_) => "Bad Request: invalid header value",
            Rejection::ConnectionSpecific(_) => "Bad Request: connection-specific header",
            Rejection::ConnectionToken(_) | Rejection::ConnectionNamesEndToEnd(_) => {
                "Bad Request: invalid connection header"
            }
            Rejection::AuthorityForm(_) | Rejection::InvalidPath(_) => "Bad Request: invalid path",
        }
    }
}

/// The request as its policies judge it, after [`normalise`] rewrote the head to match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestView {
    pub method: String,
    /// `host[:port]`, lower case, without a trailing dot: what the forwarded `Host` (HTTP/1)
    /// or `:authority` (HTTP/2) carries.
    pub host: String,
    /// Normalised by [`normalize_path`], without the query.
    pub path: String,
    /// The query as the client sent it (not judged by path rules; read for tokens).
    pub query: Option<String>,
}

impl RequestView {
    /// The facts a request is judged on, read from `headers` as they will be forwarded:
    /// call it after RequestAuthentication edited the head (token header removed, output
    /// headers set), so that the policy sees exactly what the workload receives. The
    /// normalised authority is listed under both `:authority` and `host` (Envoy's header
    /// map answers `host` with `:authority`), whatever the HTTP version.
    pub fn into_facts(self, headers: &HeaderMap, auth: Option<AuthFacts>) -> RequestFacts {
        let mut list: Vec<(String, String)> = headers
            .iter()
            .filter(|(name, _)| *name != header::HOST)
            // After `normalise` every value is UTF-8, and what the proxy sets afterwards
            // comes from `HeaderValue::from_str` (visible ASCII): nothing is lost here.
            .map(|(name, value)| {
                let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
                (name.as_str().to_owned(), value)
            })
            .collect();
        list.push((":authority".into(), self.host.clone()));
        list.push(("host".into(), self.host.clone()));
        RequestFacts {
            method: self.method,
            host: self.host,
            path: self.path,
            headers: list,
            auth,
        }
    }
}

/// Hop-by-hop headers of RFC 9110 §7.6.1 (and the legacy `Proxy-Connection`, `Keep-Alive`),
/// the same set Envoy's connection manager removes from every request. `Trailer` is not in
/// it: it announces end-to-end trailer fields (RFC 9110 §6.6.2).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Normalises the request head `parts` in place and returns what policies judge.
///
/// This is the entry point the proxy calls once per request, before RequestAuthentication
/// and AuthorizationPolicy: on `Ok` the head is ready to forward as it is (origin-form URI
/// with the normalised path and the original query; exactly one authority, `Host` on
/// HTTP/1 and `:authority` on HTTP/2; hop-by-hop headers and the headers `Connection`
/// named removed); on `Err` the request is answered with [`Rejection::status`] and
/// [`Rejection::body`] and not forwarded.
pub fn normalise(parts: &mut Parts) -> Result<RequestView, Rejection> {
    check_method(&parts.method)?;
    // `GET svc:80 HTTP/1.1` parses as a URI with an authority and no path; judging it as
    // `/` would be a guess (RFC 9112 §3.2.3 keeps authority-form for CONNECT).
    if parts.uri.authority().is_some() && parts.uri.scheme().is_none() {
        return Err(Rejection::AuthorityForm(parts.uri.to_string()));
    }
    // Before anything reads a header: a value the policy cannot read as text must not
    // reach the workload either.
    check_values(&parts.headers)?;
    let http2 = parts.version >= Version::HTTP_2;
    if http2 {
        connection_specific_h2(&parts.headers)?;
    } else {
        strip_hop_by_hop(&mut parts.headers)?;
    }
    let host = if http2 {
        authority_h2(parts)?
    } else {
        authority_h1(parts)?
    };
    let raw = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let (path, query) =
        normalize_path(raw).ok_or_else(|| Rejection::InvalidPath(raw.to_owned()))?;
    let target = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    parts.uri = forwarded_uri(&parts.uri, &target, http2.then_some(host.as_str()))
        .ok_or_else(|| Rejection::InvalidPath(target.clone()))?;
    Ok(RequestView {
        method: parts.method.as_str().to_owned(),
        host,
        path,
        query,
    })
}

/// CONNECT (authority-form on HTTP/1, and HTTP/2's CONNECT and extended CONNECT) asks for
/// a tunnel: its bytes would pass without any request being judged, so it is refused
/// (Envoy does not tunnel it either unless CONNECT is configured for the route; its FAQ
/// "Why is Envoy sending 404s to CONNECT requests?").
///
/// Methods are case-sensitive (RFC 9110 §9.1): a rule for `GET` does not match `get`,
/// while some backends treat the two alike. Every registered method is upper case, so a
/// method with lower-case letters is refused rather than judged as a stranger.
fn check_method(method: &Method) -> Result<(), Rejection> {
    if method == Method::CONNECT {
        return Err(Rejection::Connect);
    }
    if method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(Rejection::LowercaseMethod(method.as_str().to_owned()));
    }
    Ok(())
}

/// Control bytes other than HTAB cannot be in a value at all: RFC 9110 §5.5 makes them
/// invalid, and `http::HeaderValue` (which both hyper's parsers build) refuses them,
/// DEL included, as Envoy refuses CR, LF and NUL. Bytes above 0x7F (obs-text) are kept when
/// the value is UTF-8, because policies then see exactly those bytes as text (rejecting
/// them would refuse, say, a UTF-8 name in a header that real clients send). A value that
/// is not UTF-8 cannot be shown to a `request.headers[...]` condition at all (it used to
/// be skipped by the policy and forwarded to the workload), so it is refused.
fn check_values(headers: &HeaderMap) -> Result<(), Rejection> {
    for (name, value) in headers {
        if std::str::from_utf8(value.as_bytes()).is_err() {
            return Err(Rejection::HeaderValue(name.clone()));
        }
    }
    Ok(())
}

/// HTTP/2 has no hop-by-hop headers: a request carrying one is malformed (RFC 9113
/// §8.2.2), and `te` may only be `trailers`. The `h2` crate already refuses these; they
/// are checked again so no such head is ever judged.
fn connection_specific_h2(headers: &HeaderMap) -> Result<(), Rejection> {
    for name in &HOP_BY_HOP {
        let Some(value) = headers.get(name) else {
            continue;
        };
        if *name == header::TE && headers.get_all(name).iter().count() == 1 && value == "trailers" {
            continue;
        }
        return Err(Rejection::ConnectionSpecific(name.clone()));
    }
    Ok(())
}

/// Removes, on HTTP/1, the headers `Connection` names and the hop-by-hop set, before the
/// request is judged: the policy never sees a header the workload will not receive, and
/// since the `Connection` header is gone once the head is normalised, it cannot remove a
/// header later (after RequestAuthentication set its output headers, say). A
/// `Connection: authorization` thus removes the token before authentication, and the
/// request is judged, and forwarded, as one without a token.
///
/// `Connection` may not name `Host` or `Content-Length` (RFC 9110 §7.6.1: a connection
/// option must not name a field meant for all recipients): removing them would change
/// which host or which body the request is. Envoy's discussion of the same attack
/// (envoyproxy/envoy#8700, nominating `X-Forwarded-For`) concluded rejecting is safer than
/// sanitising.
///
/// `TE` is kept, as `trailers`, when it lists `trailers` (what gRPC needs; Envoy's
/// `sanitize_te` does the same), else removed. `Upgrade` is removed: upgrades are not
/// carried (the bytes after a `101` would pass unjudged), and a server may ignore
/// `Upgrade` (RFC 9110 §7.8), so the request is served as the plain request it also is.
/// `Transfer-Encoding` is removed because hyper has already decoded the framing and the
/// upstream client frames the body again.
fn strip_hop_by_hop(headers: &mut HeaderMap) -> Result<(), Rejection> {
    let mut named = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        // `check_values` ran: the value is UTF-8.
        let text = std::str::from_utf8(value.as_bytes()).unwrap_or_default();
        for token in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let name = HeaderName::from_bytes(token.as_bytes())
                .map_err(|_| Rejection::ConnectionToken(token.to_owned()))?;
            if name == header::HOST || name == header::CONTENT_LENGTH {
                return Err(Rejection::ConnectionNamesEndToEnd(name));
            }
            named.push(name);
        }
    }
    let trailers = headers.get_all(header::TE).iter().any(|value| {
        std::str::from_utf8(value.as_bytes())
            .unwrap_or_default()
            .split(',')
            .filter_map(|coding| coding.split(';').next())
            .any(|coding| coding.trim().eq_ignore_ascii_case("trailers"))
    });
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    Ok(())
}

/// The authority of an HTTP/1 request. An absolute-form target's authority wins over
/// `Host`, and `Host` is rewritten to it: RFC 9112 §3.2.2 says a server MUST ignore `Host`
/// then, and Envoy does the same (its HTTP/1 codec turns an absolute URL into origin-form
/// and sets `:authority` from it), so a client using absolute-form is served rather than
/// refused, and the backend, which receives origin-form with the rewritten `Host`, reads
/// the host the policy judged. Two `Host` headers are refused even then: they mean the
/// request was built to confuse. Without absolute-form, exactly one valid `Host` is
/// required (RFC 9112 §3.2; Envoy refuses HTTP/1.0 without one unless configured with a
/// default host).
fn authority_h1(parts: &mut Parts) -> Result<String, Rejection> {
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(Rejection::DuplicateHost(hosts));
    }
    let raw = match parts.uri.authority() {
        Some(authority) => {
            check_scheme(parts.uri.scheme())?;
            authority.as_str().to_owned()
        }
        None => {
            let value = parts
                .headers
                .get(header::HOST)
                .ok_or(Rejection::MissingHost)?;
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        }
    };
    let host = normal_host(&raw)?;
    let value = HeaderValue::from_str(&host).map_err(|_| Rejection::InvalidHost(raw))?;
    parts.headers.insert(header::HOST, value);
    Ok(host)
}

/// The authority of an HTTP/2 request: `:authority`, or `host` when there is no
/// `:authority` (RFC 9113 §8.3.1). When both are present they must name the same host:
/// RFC 9113 §8.3.1 says clients MUST NOT send them different and a server SHOULD treat
/// such a request as malformed. (Envoy instead drops `host` when `:authority` is present,
/// envoyproxy/envoy#30005, runtime guard `http2_discard_host_header`; refusing is
/// stricter, and only a client that breaks the MUST NOT is refused.) The forwarded request carries the authority once, as
/// `:authority`: `host` is removed.
fn authority_h2(parts: &mut Parts) -> Result<String, Rejection> {
    let hosts = parts.headers.get_all(header::HOST).iter().count();
    if hosts > 1 {
        return Err(Rejection::DuplicateHost(hosts));
    }
    let host_header = parts
        .headers
        .get(header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let host = match (parts.uri.authority(), host_header) {
        (Some(authority), host_header) => {
            check_scheme(parts.uri.scheme())?;
            let normal = normal_host(authority.as_str())?;
            if let Some(host) = host_header {
                if normal_host(&host)? != normal {
                    return Err(Rejection::AuthorityMismatch {
                        authority: authority.as_str().to_owned(),
                        host,
                    });
                }
            }
            normal
        }
        (None, Some(host)) => normal_host(&host)?,
        (None, None) => return Err(Rejection::MissingHost),
    };
    parts.headers.remove(header::HOST);
    Ok(host)
}

/// The inbound hop is plaintext HTTP after the mesh's TLS; a target naming another scheme
/// (`ftp://...`) is not a request for this workload.
fn check_scheme(scheme: Option<&Scheme>) -> Result<(), Rejection> {
    match scheme {
        Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => Ok(()),
        Some(s) => Err(Rejection::Scheme(s.as_str().to_owned())),
        None => Ok(()),
    }
}

/// `host[:port]` in the one form policies and the workload see: a DNS name or IPv4 address
/// of unreserved characters, or a bracketed IPv6 address; a decimal port of at most 65535.
/// Lower-cased (hosts are case-insensitive, RFC 9110 §4.2.3), one trailing dot dropped
/// (`a.example.` is the same DNS name as `a.example`; Envoy's `strip_trailing_host_dot`),
/// the port without leading zeros; a name with an empty label (`a..b`, `.a`, `a..`) is
/// refused. `http::uri::Authority` alone accepts userinfo, an empty
/// port and `h:99999`, hence the stricter check here. Userinfo is refused as RFC 9110
/// §4.2.4 asks of an untrusted `http` URI.
fn normal_host(raw: &str) -> Result<String, Rejection> {
    let invalid = || Rejection::InvalidHost(raw.to_owned());
    if raw.contains('@') {
        return Err(Rejection::HostUserinfo(raw.to_owned()));
    }
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (address, after) = rest.split_once(']').ok_or_else(invalid)?;
        address
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| invalid())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(invalid)?),
        };
        (format!("[{}]", address.to_ascii_lowercase()), port)
    } else {
        let (name, port) = match raw.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (raw, None),
        };
        let name = name.strip_suffix('.').unwrap_or(name);
        let unreserved = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        // Every label non-empty: `a.example..` would be judged as `a.example.` (one dot
        // dropped) and read by the workload as `a.example`, two hosts for one request.
        if name.split('.').any(str::is_empty) || !name.bytes().all(unreserved) {
            return Err(invalid());
        }
        (name.to_ascii_lowercase(), port)
    };
    match port {
        None => Ok(host),
        Some(port) => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let port: u16 = port.parse().map_err(|_| invalid())?;
            Ok(format!("{host}:{port}"))
        }
    }
}

/// The URI to forward: origin-form with the normalised target on HTTP/1 (the authority
/// travels in `Host`), and on HTTP/2 the same with the scheme and `:authority`.
fn forwarded_uri(original: &Uri, target: &str, authority: Option<&str>) -> Option<Uri> {
    let mut uri = http::uri::Parts::default();
    uri.path_and_query = Some(target.parse().ok()?);
    if let Some(authority) = authority {
        uri.scheme = Some(original.scheme().cloned().unwrap_or(Scheme::HTTP));
        uri.authority = Some(authority.parse::<Authority>().ok()?);
    }
    Uri::from_parts(uri).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request head as hyper hands it over: `target` as parsed from the request line (or
    /// the HTTP/2 pseudo-headers), headers in order.
    fn head(version: Version, method: &str, target: &str, headers: &[(&str, &[u8])]) -> Parts {
        let mut builder = http::Request::builder()
            .version(version)
            .method(method)
            .uri(target);
        for (name, value) in headers {
            builder = builder.header(*name, HeaderValue::from_bytes(value).expect("value"));
        }
        builder.body(()).expect("request").into_parts().0
    }

    fn h1(target: &str, headers: &[(&str, &[u8])]) -> Parts {
        head(Version::HTTP_11, "GET", target, headers)
    }

    fn h2(target: &str, headers: &[(&str, &[u8])]) -> Parts {
        head(Version::HTTP_2, "GET", target, headers)
    }

    fn view_of(method: &str, host: &str, path: &str, query: Option<&str>) -> RequestView {
        RequestView {
            method: method.into(),
            host: host.into(),
            path: path.into(),
            query: query.map(str::to_owned),
        }
    }

    /// Header names, sorted: removing from a `HeaderMap` may reorder it.
    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn origin_form_is_forwarded_with_the_normalised_path_and_the_original_query() {
        let mut parts = h1(
            "/a/../admin//x?b=%2F..&a=1",
            &[("host", b"Svc.NS:8080"), ("x-user", b"alice")],
        );
        let view = normalise(&mut parts).expect("accepted");
        assert_eq!(
            view,
            view_of("GET", "svc.ns:8080", "/admin/x", Some("b=%2F..&a=1"))
        );
        assert_eq!(parts.uri, "/admin/x?b=%2F..&a=1");
        assert_eq!(parts.headers["host"], "svc.ns:8080");
        assert_eq!(names(&parts.headers), ["host", "x-user"]);
    }

    #[test]
    fn facts_are_read_from_the_head_as_forwarded() {
        let mut parts = h1(
            "/p",
            &[("host", b"svc"), ("x-name", "Jos\u{e9}".as_bytes())],
        );
        let view = normalise(&mut parts).expect("accepted");
        // What RequestAuthentication does between the two calls is what the policy sees.
        parts
            .headers
            .insert("x-jwt-sub", HeaderValue::from_static("alice"));
        let mut facts = view.into_facts(&parts.headers, None);
        assert_eq!(facts.method, "GET");
        assert_eq!(facts.host, "svc");
        assert_eq!(facts.path, "/p");
        facts.headers.sort();
        let expected: Vec<(String, String)> = [
            (":authority", "svc"),
            ("host", "svc"),
            ("x-jwt-sub", "alice"),
            ("x-name", "Jos\u{e9}"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(facts.headers, expected);
    }

    #[test]
    fn absolute_form_authority_wins_and_host_is_rewritten() {
        let mut parts = h1(
            "http://Admin.NS/secret?x=1",
            &[("host", b"public.ns"), ("accept", b"*/*")],
        );
        let view = normalise(&mut parts).expect("accepted");
        assert_eq!(view, view_of("GET", "admin.ns", "/secret", Some("x=1")));
        assert_eq!(parts.uri, "/secret?x=1");
        assert_eq!(parts.uri.authority(), None);
        assert_eq!(parts.headers["host"], "admin.ns");
        assert_eq!(parts.headers.get_all("host").iter().count(), 1);

        // Without any Host header, absolute-form supplies it.
        let mut parts = h1("https://svc:8443/", &[]);
        assert_eq!(normalise(&mut parts).expect("accepted").host, "svc:8443");
        assert_eq!(parts.headers["host"], "svc:8443");
        assert_eq!(parts.uri, "/");
    }

    #[test]
    fn absolute_form_is_refused_when_its_parts_are_ambiguous() {
        let mut parts = h1("http://a.ns/", &[("host", b"a.ns"), ("host", b"b.ns")]);
        assert_eq!(normalise(&mut parts), Err(Rejection::DuplicateHost(2)));
        let mut parts = h1("http://user@a.ns/", &[("host", b"a.ns")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::HostUserinfo("user@a.ns".into()))
        );
        let mut parts = h1("ftp://a.ns/x", &[]);
        assert_eq!(normalise(&mut parts), Err(Rejection::Scheme("ftp".into())));
    }

    #[test]
    fn connect_is_refused_in_both_versions() {
        let mut parts = head(
            Version::HTTP_11,
            "CONNECT",
            "db.ns:5432",
            &[("host", b"db.ns:5432")],
        );
        assert_eq!(normalise(&mut parts), Err(Rejection::Connect));
        let mut parts = head(Version::HTTP_2, "CONNECT", "db.ns:5432", &[]);
        assert_eq!(normalise(&mut parts), Err(Rejection::Connect));
    }

    #[test]
    fn methods_with_lower_case_letters_are_refused() {
        let mut parts = head(Version::HTTP_11, "get", "/", &[("host", b"svc")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::LowercaseMethod("get".into()))
        );
        let mut parts = head(Version::HTTP_11, "Delete", "/", &[("host", b"svc")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::LowercaseMethod("Delete".into()))
        );
        // Upper-case extension methods are methods like any other.
        let mut parts = head(Version::HTTP_11, "PROPFIND", "/", &[("host", b"svc")]);
        assert_eq!(normalise(&mut parts).expect("accepted").method, "PROPFIND");
    }

    #[test]
    fn host_must_be_present_once_and_valid() {
        assert_eq!(normalise(&mut h1("/", &[])), Err(Rejection::MissingHost));
        let mut http10 = head(Version::HTTP_10, "GET", "/", &[]);
        assert_eq!(normalise(&mut http10), Err(Rejection::MissingHost));
        assert_eq!(
            normalise(&mut h1("/", &[("host", b"a"), ("host", b"a")])),
            Err(Rejection::DuplicateHost(2))
        );
        for bad in [
            "",
            " ",
            "a b",
            "a:",
            "a:b",
            "a:99999",
            "a:123456",
            "a,b",
            "[::1",
            "[zz]:80",
            "a/b",
            "%61dmin",
            "a:80:80",
            ".",
            "[::1]x",
            "a..",
            "a.example..",
            "a..b",
            ".a",
            "..",
            "a..:80",
        ] {
            assert_eq!(
                normalise(&mut h1("/", &[("host", bad.as_bytes())])),
                Err(Rejection::InvalidHost(bad.into())),
                "{bad:?}"
            );
        }
        assert_eq!(
            normalise(&mut h1("/", &[("host", b"alice@svc")])),
            Err(Rejection::HostUserinfo("alice@svc".into()))
        );
    }

    #[test]
    fn hosts_are_given_one_form() {
        for (raw, normal) in [
            ("Svc.NS", "svc.ns"),
            ("admin.example.com.", "admin.example.com"),
            ("admin.example.com.:80", "admin.example.com:80"),
            ("svc:0080", "svc:80"),
            ("10.0.0.1:8080", "10.0.0.1:8080"),
            ("[FE80::1]:443", "[fe80::1]:443"),
            ("[::1]", "[::1]"),
        ] {
            let mut parts = h1("/", &[("host", raw.as_bytes())]);
            assert_eq!(normalise(&mut parts).expect(raw).host, normal, "{raw:?}");
            assert_eq!(parts.headers["host"], normal);
        }
    }

    #[test]
    fn http2_carries_one_authority() {
        // `:authority` only: kept, no `host` added.
        let mut parts = h2("http://svc.ns/a?q", &[]);
        let view = normalise(&mut parts).expect("accepted");
        assert_eq!(view, view_of("GET", "svc.ns", "/a", Some("q")));
        assert_eq!(parts.uri, "http://svc.ns/a?q");
        assert!(parts.headers.get("host").is_none());

        // Both, equal up to case: `host` is dropped.
        let mut parts = h2("http://svc.ns/a", &[("host", b"SVC.ns")]);
        assert_eq!(normalise(&mut parts).expect("accepted").host, "svc.ns");
        assert!(parts.headers.get("host").is_none());
        assert_eq!(parts.uri.authority().map(Authority::as_str), Some("svc.ns"));

        // `host` only: it becomes `:authority`.
        let mut parts = h2("/a", &[("host", b"svc.ns:8080")]);
        assert_eq!(normalise(&mut parts).expect("accepted").host, "svc.ns:8080");
        assert!(parts.headers.get("host").is_none());
        assert_eq!(parts.uri, "http://svc.ns:8080/a");
    }

    #[test]
    fn http2_authority_and_host_must_agree() {
        let mut parts = h2("http://public.ns/", &[("host", b"admin.ns")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::AuthorityMismatch {
                authority: "public.ns".into(),
                host: "admin.ns".into()
            })
        );
        let mut parts = h2("http://a.ns/", &[("host", b"a.ns"), ("host", b"a.ns")]);
        assert_eq!(normalise(&mut parts), Err(Rejection::DuplicateHost(2)));
        assert_eq!(normalise(&mut h2("/", &[])), Err(Rejection::MissingHost));
        assert_eq!(
            normalise(&mut h2("http://u@a.ns/", &[])),
            Err(Rejection::HostUserinfo("u@a.ns".into()))
        );
    }

    #[test]
    fn header_values_the_policy_cannot_read_are_refused() {
        // obs-text that is not UTF-8: invisible to `to_str()`, once forwarded unjudged.
        let mut parts = h1("/", &[("host", b"svc"), ("x-user", b"admin\xff")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::HeaderValue(HeaderName::from_static("x-user")))
        );
        // Control bytes cannot even be put in a value.
        assert!(HeaderValue::from_bytes(b"a\x01b").is_err());
        assert!(HeaderValue::from_bytes(b"a\x7fb").is_err());
        assert!(HeaderValue::from_bytes(b"a\rb").is_err());
        // HTAB and UTF-8 text are values policies can read exactly.
        let mut parts = h1(
            "/",
            &[
                ("host", b"svc"),
                ("x-a", b"a\tb"),
                ("x-b", "\u{e9}".as_bytes()),
            ],
        );
        assert!(normalise(&mut parts).is_ok());
    }

    #[test]
    fn headers_named_in_connection_are_removed_before_judging() {
        let mut parts = h1(
            "/",
            &[
                ("host", b"svc"),
                ("connection", b"keep-alive, Authorization , x-jwt-sub"),
                ("connection", b"x-extra"),
                ("authorization", b"Bearer abc"),
                ("x-jwt-sub", b"forged"),
                ("x-extra", b"1"),
                ("keep-alive", b"timeout=5"),
                ("x-kept", b"yes"),
            ],
        );
        let view = normalise(&mut parts).expect("accepted");
        assert_eq!(names(&parts.headers), ["host", "x-kept"]);
        // The policy sees what the workload receives: no token, no forged claim header.
        let facts = view.into_facts(&parts.headers, None);
        assert!(facts.headers.iter().all(|(k, _)| k != "authorization"));
        assert!(facts.headers.iter().all(|(k, _)| k != "connection"));
    }

    #[test]
    fn connection_may_not_name_what_every_hop_needs() {
        let mut parts = h1("/", &[("host", b"svc"), ("connection", b"close, Host")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::ConnectionNamesEndToEnd(header::HOST))
        );
        let mut parts = h1("/", &[("host", b"svc"), ("connection", b"content-length")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::ConnectionNamesEndToEnd(header::CONTENT_LENGTH))
        );
        let mut parts = h1("/", &[("host", b"svc"), ("connection", b"a b")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::ConnectionToken("a b".into()))
        );
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded_on_http1() {
        let mut parts = h1(
            "/",
            &[
                ("host", b"svc"),
                ("connection", b"Upgrade, TE"),
                ("upgrade", b"websocket"),
                ("te", b"trailers;q=1, deflate"),
                ("transfer-encoding", b"chunked"),
                ("proxy-connection", b"keep-alive"),
                ("trailer", b"x-checksum"),
            ],
        );
        normalise(&mut parts).expect("accepted");
        // TE listing trailers is kept as exactly `trailers`; Trailer is end-to-end.
        assert_eq!(names(&parts.headers), ["host", "te", "trailer"]);
        assert_eq!(parts.headers["te"], "trailers");

        let mut parts = h1("/", &[("host", b"svc"), ("te", b"gzip")]);
        normalise(&mut parts).expect("accepted");
        assert!(parts.headers.get("te").is_none());
    }

    #[test]
    fn connection_specific_headers_are_refused_on_http2() {
        for (name, value) in [
            ("connection", &b"close"[..]),
            ("keep-alive", b"1"),
            ("proxy-connection", b"1"),
            ("transfer-encoding", b"chunked"),
            ("upgrade", b"h2c"),
            ("te", b"gzip"),
        ] {
            let mut parts = h2("http://svc/", &[(name, value)]);
            assert_eq!(
                normalise(&mut parts),
                Err(Rejection::ConnectionSpecific(
                    HeaderName::from_bytes(name.as_bytes()).expect("name")
                )),
                "{name}"
            );
        }
        let mut parts = h2("http://svc/", &[("te", b"trailers")]);
        normalise(&mut parts).expect("gRPC's te: trailers");
        assert_eq!(parts.headers["te"], "trailers");
    }

    #[test]
    fn authority_form_is_only_for_connect() {
        let mut parts = h1("svc:80", &[("host", b"svc:80")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::AuthorityForm("svc:80".into()))
        );
    }

    #[test]
    fn paths_are_normalised_once_and_invalid_ones_refused() {
        let mut parts = h1("/x/%2e%2E/admin%2Fdebug?q=%2e%2e", &[("host", b"svc")]);
        let view = normalise(&mut parts).expect("accepted");
        assert_eq!(view.path, "/admin/debug");
        assert_eq!(parts.uri, "/admin/debug?q=%2e%2e");

        let mut parts = h1("/a%zz", &[("host", b"svc")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::InvalidPath("/a%zz".into()))
        );
        // asterisk-form (`OPTIONS *`) names no resource a path rule could judge.
        let mut parts = head(Version::HTTP_11, "OPTIONS", "*", &[("host", b"svc")]);
        assert_eq!(
            normalise(&mut parts),
            Err(Rejection::InvalidPath("*".into()))
        );
    }

    #[test]
    fn a_fragment_never_reaches_the_policy_or_the_workload() {
        // The http crate drops it while parsing the target, for HTTP/1 and HTTP/2 alike.
        let mut parts = h1("/admin#/../public", &[("host", b"svc")]);
        assert_eq!(normalise(&mut parts).expect("accepted").path, "/admin");
        assert_eq!(parts.uri, "/admin");
    }

    #[test]
    fn every_rejection_is_a_400_with_a_short_body() {
        let all = [
            Rejection::Connect,
            Rejection::LowercaseMethod("get".into()),
            Rejection::MissingHost,
            Rejection::DuplicateHost(2),
            Rejection::InvalidHost("a b".into()),
            Rejection::HostUserinfo("u@h".into()),
            Rejection::AuthorityMismatch {
                authority: "a".into(),
                host: "b".into(),
            },
            Rejection::Scheme("ftp".into()),
            Rejection::HeaderValue(header::ACCEPT),
            Rejection::ConnectionSpecific(header::UPGRADE),
            Rejection::ConnectionToken("a b".into()),
            Rejection::ConnectionNamesEndToEnd(header::HOST),
            Rejection::AuthorityForm("svc:80".into()),
            Rejection::InvalidPath("*".into()),
        ];
        for rejection in all {
            assert_eq!(rejection.status(), StatusCode::BAD_REQUEST);
            assert!(rejection.body().starts_with("Bad Request: "), "{rejection}");
            assert!(rejection.body().len() < 60);
        }
    }
}
