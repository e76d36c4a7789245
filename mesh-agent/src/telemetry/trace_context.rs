//! Trace context in request headers, decided without I/O: W3C `traceparent` /
//! `tracestate` and B3 (`x-b3-traceid`, `x-b3-spanid`, `x-b3-parentspanid`,
//! `x-b3-sampled`, `x-b3-flags`, and the single `b3` header) read from a request, the
//! sampling decision (an incoming decision is honoured, else a roll against the
//! percentage), and the headers written for the next hop: the trace id kept, this
//! agent's span as the parent. `x-request-id` is generated (UUID v4) when absent and kept
//! when present.
//!
//! Headers come from pods, which may be hostile: anything malformed is ignored as if it
//! were absent (a new trace is started and the malformed headers are replaced), never an
//! error and never a panic.

use http::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A trace context a request arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: u128,
    /// The caller's span: the parent of this agent's span.
    pub span_id: u64,
    /// The caller's decision; `None`: deferred to this hop (B3 without a flag).
    pub sampled: Option<bool>,
}

/// Which propagation formats a request carried (valid or not), so the answer is written
/// in the same ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3_multi: bool,
    pub b3_single: bool,
}

/// What a request's headers say about its trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Extracted {
    /// The valid context, W3C first, then `b3`, then `x-b3-*`.
    pub context: Option<Incoming>,
    /// A sampling decision without ids (`b3: 0`, `b3: 1`, `b3: d`, or `x-b3-sampled`
    /// alone).
    pub sampled_only: Option<bool>,
    pub formats: Formats,
}

impl Extracted {
    /// The decision the request arrived with, if any.
    pub fn decision(&self) -> Option<bool> {
        self.context.and_then(|c| c.sampled).or(self.sampled_only)
    }
}

/// Reads the trace context of `headers`.
pub fn extract(headers: &HeaderMap) -> Extracted {
    let formats = Formats {
        w3c: headers.contains_key(TRACEPARENT),
        b3_multi: headers.contains_key(B3_TRACE_ID)
            || headers.contains_key(B3_SPAN_ID)
            || headers.contains_key(B3_SAMPLED)
            || headers.contains_key(B3_FLAGS),
        b3_single: headers.contains_key(B3),
    };
    let single = only(headers, &B3).map(parse_b3_single);
    let context = only(headers, &TRACEPARENT)
        .and_then(parse_traceparent)
        .or_else(|| single.and_then(|s| s.ok()))
        .or_else(|| parse_b3_multi(headers));
    let sampled_only = match single {
        Some(Err(sampled)) => sampled,
        _ => None,
    }
    .or_else(|| b3_sampled(headers));
    Extracted {
        context,
        sampled_only,
        formats,
    }
}

/// The one value of `name` as text; none when it is absent, repeated or not text.
fn only<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok().map(str::trim)
}

/// Lower-case hexadecimal of exactly `len` digits.
fn hex(text: &str, len: usize) -> Option<u128> {
    if text.len() != len || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

fn trace_id(text: &str) -> Option<u128> {
    hex(text, 32)
        .or_else(|| hex(text, 16))
        .filter(|id| *id != 0)
}

fn span_id(text: &str) -> Option<u64> {
    hex(text, 16)
        .and_then(|id| u64::try_from(id).ok())
        .filter(|id| *id != 0)
}

/// `traceparent` as W3C Trace Context level 1 defines it: `00-<32 hex>-<16 hex>-<2 hex>`;
/// a later version may append fields after a `-`; version `ff` is invalid.
fn parse_traceparent(text: &str) -> Option<Incoming> {
    let version = hex(text.get(..2)?, 2)?;
    if version == 0xff || text.len() < 55 || (version == 0 && text.len() != 55) {
        return None;
    }
    if text.len() > 55 && text.as_bytes()[55] != b'-' {
        return None;
    }
    let fields = text.get(2..55)?;
    let mut parts = fields.split('-');
    let (Some(""), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let flags = hex(flags, 2)?;
    Some(Incoming {
        trace_id: hex(trace, 32).filter(|id| *id != 0)?,
        span_id: span_id(span)?,
        sampled: Some(flags & 1 == 1),
    })
}

/// `b3: {trace}-{span}[-{sampling}[-{parent}]]`, or `b3: {sampling}` alone (`Err`, with
/// its decision). Sampling is `1`, `0` or `d` (debug: sampled).
fn parse_b3_single(text: &str) -> Result<Incoming, Option<bool>> {
    let sampling = |s: &str| match s {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    let mut parts = text.split('-');
    let first = parts.next().unwrap_or_default();
    let Some(span) = parts.next() else {
        return Err(sampling(first));
    };
    let decision = parts.next();
    let parent = parts.next();
    if parts.next().is_some() || parent.is_some_and(|p| span_id(p).is_none()) {
        return Err(None);
    }
    let sampled = match decision {
        None => None,
        Some(d) => Some(sampling(d).ok_or(None)?),
    };
    Ok(Incoming {
        trace_id: trace_id(first).ok_or(None)?,
        span_id: span_id(span).ok_or(None)?,
        sampled,
    })
}

/// `x-b3-sampled` (`1`/`0`, or the legacy `true`/`false`), overridden by
/// `x-b3-flags: 1` (debug).
fn b3_sampled(headers: &HeaderMap) -> Option<bool> {
    if only(headers, &B3_FLAGS) == Some("1") {
        return Some(true);
    }
    match only(headers, &B3_SAMPLED)? {
        "1" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn parse_b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    Some(Incoming {
        trace_id: trace_id(only(headers, &B3_TRACE_ID)?)?,
        span_id: span_id(only(headers, &B3_SPAN_ID)?)?,
        sampled: b3_sampled(headers),
    })
}

/// Whether a request is sampled: the decision it arrived with, else a roll (`roll`
/// uniform in 0..1_000_000) against `percentage`.
pub fn sampled(arrived: Option<bool>, percentage: f64, roll: u32) -> bool {
    arrived.unwrap_or_else(|| f64::from(roll) < percentage * 10_000.0)
}

/// This hop's part in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    pub trace_id: u128,
    /// This agent's span, the parent of the next hop's.
    pub span_id: u64,
    /// The caller's span, if the request came with a context.
    pub parent: Option<u64>,
    pub sampled: bool,
}

/// Random ids for a new trace or span.
pub trait Ids {
    fn trace_id(&mut self) -> u128;
    fn span_id(&mut self) -> u64;
}

/// What this hop does with a request's trace context: `None` when it passes the
/// headers on untouched (the request arrived unsampled with its own ids, so nothing is
/// recorded and nothing needs to change); else the hop, whose headers [`inject`] writes.
pub fn plan_hop(
    extracted: &Extracted,
    percentage: f64,
    roll: u32,
    ids: &mut impl Ids,
) -> Option<Hop> {
    let sampled = sampled(extracted.decision(), percentage, roll);
    match extracted.context {
        Some(context) if !sampled && context.sampled == Some(false) => None,
        Some(context) => Some(Hop {
            trace_id: context.trace_id,
            span_id: ids.span_id(),
            parent: Some(context.span_id),
            sampled,
        }),
        None => Some(Hop {
            trace_id: ids.trace_id(),
            span_id: ids.span_id(),
            parent: None,
            sampled,
        }),
    }
}

/// Writes `hop` into `headers` for the next hop: `traceparent` always (`tracestate` kept
/// only with the context it belongs to), and B3 in the forms the request carried (a
/// trace started here is W3C only, as Envoy's OpenTelemetry tracer writes it).
pub fn inject(headers: &mut HeaderMap, hop: &Hop, extracted: &Extracted) {
    if only(headers, &TRACEPARENT)
        .and_then(parse_traceparent)
        .is_none()
    {
        headers.remove(TRACESTATE);
    }
    let flags = if hop.sampled { "01" } else { "00" };
    set(
        headers,
        TRACEPARENT,
        format!("00-{:032x}-{:016x}-{flags}", hop.trace_id, hop.span_id),
    );
    let formats = extracted.formats;
    let sampled = sampled_value(hop.sampled);
    if formats.b3_multi {
        set(headers, B3_TRACE_ID, format!("{:032x}", hop.trace_id));
        set(headers, B3_SPAN_ID, format!("{:016x}", hop.span_id));
        match hop.parent {
            Some(parent) => set(headers, B3_PARENT_SPAN_ID, format!("{parent:016x}")),
            None => {
                headers.remove(B3_PARENT_SPAN_ID);
            }
        }
        headers.remove(B3_FLAGS);
        headers.insert(B3_SAMPLED, HeaderValue::from_static(sampled));
    }
    if formats.b3_single {
        let parent = hop.parent.map(|p| format!("-{p:016x}")).unwrap_or_default();
        set(
            headers,
            B3,
            format!(
                "{:032x}-{:016x}-{sampled}{parent}",
                hop.trace_id, hop.span_id
            ),
        );
    }
}

fn sampled_value(sampled: bool) -> &'static str {
    if sampled {
        "1"
    } else {
        "0"
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::try_from(value) {
        headers.insert(name, value);
    }
}

/// The request's `x-request-id`: the one it carries, else a new UUID v4 (of the bits
/// `random` draws) written into `headers`.
pub fn ensure_request_id(headers: &mut HeaderMap, random: impl FnOnce() -> u128) -> HeaderValue {
    if let Some(id) = headers.get(REQUEST_ID).filter(|v| !v.is_empty()) {
        return id.clone();
    }
    let id = HeaderValue::try_from(uuid_v4(random())).unwrap_or(HeaderValue::from_static("-"));
    headers.insert(REQUEST_ID, id.clone());
    id
}

/// RFC 9562's version 4 layout of 122 random bits.
fn uuid_v4(random: u128) -> String {
    let bits = (random & !(0xF << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(u128, u64);

    impl Ids for Fixed {
        fn trace_id(&mut self) -> u128 {
            self.0
        }
        fn span_id(&mut self) -> u64 {
            self.1
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("name"),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        map
    }

    fn value<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
        map.get(name).and_then(|v| v.to_str().ok())
    }

    // The W3C specification's example.
    const W3C: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const W3C_TRACE: u128 = 0x4bf92f3577b34da6a3ce929d0e0e4736;
    const W3C_SPAN: u64 = 0x00f067aa0ba902b7;

    #[test]
    fn a_w3c_traceparent_is_read_with_its_sampled_flag() {
        let found = extract(&headers(&[("traceparent", W3C)]));
        assert_eq!(
            found.context,
            Some(Incoming {
                trace_id: W3C_TRACE,
                span_id: W3C_SPAN,
                sampled: Some(true)
            })
        );
        let unsampled = extract(&headers(&[("traceparent", &W3C.replace("-01", "-00"))]));
        assert_eq!(unsampled.decision(), Some(false));
        // A later version may add fields; its first four are read the same way.
        let future = format!("cc-{}-what-the-future-holds", &W3C[3..]);
        assert_eq!(
            extract(&headers(&[("traceparent", &future)])).context,
            found.context
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        let bad = [
            "",
            "00",
            "garbage",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ];
        for text in bad {
            let mut map = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_str(text) {
                map.insert(TRACEPARENT, value);
            }
            assert_eq!(extract(&map).context, None, "{text:?}");
        }
        // Two traceparents: which one is meant is unknowable.
        let twice = headers(&[("traceparent", W3C), ("traceparent", W3C)]);
        assert_eq!(extract(&twice).context, None);
        // Non-UTF-8 bytes.
        let mut opaque = HeaderMap::new();
        opaque.insert(
            TRACEPARENT,
            HeaderValue::from_bytes(b"00-\xff\xfe").expect("opaque value"),
        );
        assert_eq!(extract(&opaque).context, None);
    }

    #[test]
    fn b3_multi_headers_are_read_with_64_and_128_bit_trace_ids() {
        let found = extract(&headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            found.context,
            Some(Incoming {
                trace_id: 0x80f198ee56343ba864fe8b2a57d3eff7,
                span_id: 0xe457b5a2e4d86bd1,
                sampled: Some(true)
            })
        );
        assert!(found.formats.b3_multi && !found.formats.w3c);
        let short = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        assert_eq!(
            short.context,
            Some(Incoming {
                trace_id: 0x463ac35c9f6413ad,
                span_id: 0xa2fb4a1d1a96d312,
                sampled: None
            })
        );
        let debug = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ]));
        assert_eq!(debug.decision(), Some(true));
        let broken = extract(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413adz"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        assert_eq!(broken.context, None);
        assert!(broken.formats.b3_multi);
    }

    #[test]
    fn the_single_b3_header_with_and_without_ids() {
        let full = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]));
        assert_eq!(
            full.context,
            Some(Incoming {
                trace_id: 0x80f198ee56343ba864fe8b2a57d3eff7,
                span_id: 0xe457b5a2e4d86bd1,
                sampled: Some(true)
            })
        );
        let deferred = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1",
        )]));
        assert_eq!(deferred.context.map(|c| c.sampled), Some(None));
        assert_eq!(
            extract(&headers(&[("b3", "0")])),
            Extracted {
                context: None,
                sampled_only: Some(false),
                formats: Formats {
                    b3_single: true,
                    ..Formats::default()
                }
            }
        );
        assert_eq!(extract(&headers(&[("b3", "d")])).decision(), Some(true));
        for bad in [
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-nothex",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-more",
            "-",
            "--",
            "x",
        ] {
            let found = extract(&headers(&[("b3", bad)]));
            assert_eq!((found.context, found.sampled_only), (None, None), "{bad:?}");
        }
    }

    #[test]
    fn w3c_wins_over_b3_when_both_are_valid() {
        let found = extract(&headers(&[
            ("traceparent", W3C),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        assert_eq!(found.context.map(|c| c.trace_id), Some(W3C_TRACE));
        // A broken traceparent falls back to the valid B3 context.
        let fallback = extract(&headers(&[
            ("traceparent", "00-broken"),
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        assert_eq!(
            fallback.context.map(|c| c.trace_id),
            Some(0x463ac35c9f6413ad)
        );
    }

    #[test]
    fn sampling_honours_the_incoming_decision_else_rolls_the_percentage() {
        assert!(sampled(Some(true), 0.0, 999_999));
        assert!(!sampled(Some(false), 100.0, 0));
        // 1% samples rolls 0..10_000 of 1_000_000.
        assert!(sampled(None, 1.0, 9_999));
        assert!(!sampled(None, 1.0, 10_000));
        assert!(sampled(None, 100.0, 999_999));
        assert!(!sampled(None, 0.0, 0));
        assert!(sampled(None, 0.0001, 0));
        assert!(!sampled(None, 0.0001, 1));
    }

    #[test]
    fn a_sampled_w3c_request_continues_its_trace_with_this_hops_span() {
        let mut map = headers(&[("traceparent", W3C), ("tracestate", "congo=t61rcWkgMzE")]);
        let found = extract(&map);
        let hop = plan_hop(&found, 0.0, 999_999, &mut Fixed(7, 0xabc)).expect("a hop");
        assert_eq!(
            hop,
            Hop {
                trace_id: W3C_TRACE,
                span_id: 0xabc,
                parent: Some(W3C_SPAN),
                sampled: true
            }
        );
        inject(&mut map, &hop, &found);
        assert_eq!(
            value(&map, "traceparent"),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000abc-01")
        );
        assert_eq!(value(&map, "tracestate"), Some("congo=t61rcWkgMzE"));
        assert_eq!(value(&map, "x-b3-traceid"), None, "no B3 came in");
    }

    #[test]
    fn an_unsampled_request_with_its_own_context_passes_untouched() {
        let found = extract(&headers(&[("traceparent", &W3C.replace("-01", "-00"))]));
        assert_eq!(plan_hop(&found, 100.0, 0, &mut Fixed(7, 8)), None);
    }

    #[test]
    fn a_request_without_context_starts_a_w3c_trace() {
        let mut map = HeaderMap::new();
        let found = extract(&map);
        let hop = plan_hop(&found, 100.0, 999_999, &mut Fixed(0x1234, 0x56)).expect("hop");
        assert_eq!((hop.parent, hop.sampled), (None, true));
        inject(&mut map, &hop, &found);
        assert_eq!(
            value(&map, "traceparent"),
            Some("00-00000000000000000000000000001234-0000000000000056-01")
        );
        assert_eq!(value(&map, "x-b3-traceid"), None);
        assert_eq!(value(&map, "b3"), None);
        // Unsampled, the decision still travels, so the next hop does not roll again.
        let mut quiet = HeaderMap::new();
        let hop = plan_hop(&extract(&quiet), 1.0, 10_000, &mut Fixed(9, 10)).expect("hop");
        inject(&mut quiet, &hop, &Extracted::default());
        assert_eq!(
            value(&quiet, "traceparent"),
            Some("00-00000000000000000000000000000009-000000000000000a-00")
        );
    }

    #[test]
    fn b3_requests_are_answered_in_b3_with_the_caller_as_parent() {
        let mut map = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
            ("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312"),
        ]);
        let found = extract(&map);
        let hop = plan_hop(&found, 0.0, 0, &mut Fixed(1, 0xff)).expect("hop");
        assert!(hop.sampled, "debug flag");
        inject(&mut map, &hop, &found);
        assert_eq!(
            value(&map, "x-b3-traceid"),
            Some("0000000000000000463ac35c9f6413ad")
        );
        assert_eq!(value(&map, "x-b3-spanid"), Some("00000000000000ff"));
        assert_eq!(value(&map, "x-b3-parentspanid"), Some("a2fb4a1d1a96d312"));
        assert_eq!(value(&map, "x-b3-sampled"), Some("1"));
        assert_eq!(value(&map, "x-b3-flags"), None);
        assert_eq!(
            value(&map, "b3"),
            Some("0000000000000000463ac35c9f6413ad-00000000000000ff-1-a2fb4a1d1a96d312")
        );
        assert_eq!(
            value(&map, "traceparent"),
            Some("00-0000000000000000463ac35c9f6413ad-00000000000000ff-01")
        );
    }

    #[test]
    fn a_malformed_context_is_replaced_by_a_new_trace_and_its_tracestate_dropped() {
        let mut map = headers(&[
            ("traceparent", "00-zzzz"),
            ("tracestate", "poison=1"),
            ("x-b3-traceid", "not-hex"),
        ]);
        let found = extract(&map);
        assert_eq!(found.context, None);
        let hop = plan_hop(&found, 100.0, 0, &mut Fixed(0xaa, 0xbb)).expect("hop");
        inject(&mut map, &hop, &found);
        assert_eq!(
            value(&map, "traceparent"),
            Some("00-000000000000000000000000000000aa-00000000000000bb-01")
        );
        assert_eq!(value(&map, "tracestate"), None);
        assert_eq!(
            value(&map, "x-b3-traceid"),
            Some("000000000000000000000000000000aa")
        );
    }

    #[test]
    fn request_ids_are_kept_or_made_as_uuid_v4() {
        let mut kept = headers(&[("x-request-id", "abc-123")]);
        assert_eq!(
            ensure_request_id(&mut kept, || unreachable!("an id is kept")),
            "abc-123"
        );
        let mut made = HeaderMap::new();
        let id = ensure_request_id(&mut made, || u128::MAX);
        assert_eq!(id, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert_eq!(
            value(&made, "x-request-id"),
            Some("ffffffff-ffff-4fff-bfff-ffffffffffff")
        );
        assert_eq!(
            ensure_request_id(&mut HeaderMap::new(), || 0),
            "00000000-0000-4000-8000-000000000000"
        );
    }
}
