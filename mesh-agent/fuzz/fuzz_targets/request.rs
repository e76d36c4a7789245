//! The request head normalisation (`policy::request::normalise`, with `policy::path`):
//! HTTP/1 heads as hyper's parser hands them over and HTTP/2 heads as the h2 crate does
//! (see the crate's lib.rs for the text forms). Besides not panicking, a head it accepts
//! must be one the policy and the workload read alike: what is forwarded is what was
//! judged, and judging the forwarded head again gives the same view.

#![no_main]

use http::{header, Version};
use libfuzzer_sys::fuzz_target;
use mesh_agent::policy::{path::normalize_path, request::normalise};
use mesh_agent_fuzz::head;

fuzz_target!(|data: &[u8]| {
    let Some(mut parts) = head(data) else {
        return;
    };
    let raw_path = parts.uri.path().to_owned();
    let Ok(view) = normalise(&mut parts) else {
        return;
    };
    // RFC 3986 §2.1: an escape is `%` and two hex digits; a path with anything else after a
    // `%` is refused, as the backend could decode it another way.
    for (at, _) in raw_path.match_indices('%') {
        let hex = raw_path.as_bytes().get(at + 1..at + 3);
        assert!(
            hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
            "accepted the escape at {at} of {raw_path:?}"
        );
    }
    // The judged path is in normal form, and it is the path forwarded, with the query.
    assert_eq!(
        normalize_path(&view.path),
        Some((view.path.clone(), None)),
        "the judged path is not in normal form"
    );
    assert_eq!(parts.uri.path(), view.path, "forwarded path differs");
    assert_eq!(
        parts.uri.query(),
        view.query.as_deref(),
        "forwarded query differs"
    );
    // One authority, the judged one, where the version carries it.
    let hosts: Vec<_> = parts.headers.get_all(header::HOST).iter().collect();
    if parts.version >= Version::HTTP_2 {
        assert!(hosts.is_empty(), "HTTP/2 forwards host beside :authority");
        assert_eq!(
            parts.uri.authority().map(|a| a.as_str()),
            Some(view.host.as_str()),
            "forwarded :authority differs"
        );
    } else {
        assert_eq!(
            hosts.len(),
            1,
            "HTTP/1 forwards {} Host headers",
            hosts.len()
        );
        assert_eq!(
            hosts[0].as_bytes(),
            view.host.as_bytes(),
            "forwarded Host differs"
        );
        assert!(
            parts.uri.authority().is_none(),
            "HTTP/1 forwards absolute-form"
        );
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "transfer-encoding",
            "upgrade",
        ] {
            assert!(!parts.headers.contains_key(name), "{name} is forwarded");
        }
    }
    for (name, value) in &parts.headers {
        assert!(
            std::str::from_utf8(value.as_bytes()).is_ok(),
            "{name} is forwarded with a value the policy cannot read"
        );
    }
    // The forwarded head, judged again, is judged the same.
    let mut again = parts.clone();
    assert_eq!(
        normalise(&mut again).as_ref(),
        Ok(&view),
        "the forwarded head is judged differently"
    );
    let _ = view.into_facts(&parts.headers, None);
});
