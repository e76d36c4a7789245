//! Request paths as policies judge them and workloads receive them.

/// The path as policies see it and the workload receives it: percent-encoded unreserved
/// characters and `/` `\` decoded, `\` turned into `/`, repeated slashes merged, dot
/// segments removed, remaining escapes in upper case. So `/a/../b`, `/a%2Fb`, `//a` and
/// `/A%2e%2E/b` cannot pass a rule written for their normal form. The query is kept
/// apart. `None` for a path that is not a valid origin-form path.
pub fn normalize_path(raw: &str) -> Option<(String, Option<String>)> {
    let raw = raw.split('#').next().unwrap_or_default();
    let (path, query) = match raw.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (raw, None),
    };
    if !path.starts_with('/') && !path.starts_with('\\') && !path.starts_with('%') {
        return None;
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let byte = escaped_byte(&bytes[i + 1..])?;
                match byte {
                    0 => return None,
                    b'/' | b'\\' => decoded.push('/'),
                    b if b.is_ascii_alphanumeric() || b"-._~".contains(&b) => {
                        decoded.push(char::from(b))
                    }
                    b => decoded.push_str(&format!("%{b:02X}")),
                }
                i += 3;
            }
            b'\\' => {
                decoded.push('/');
                i += 1;
            }
            b if b.is_ascii_graphic() => {
                decoded.push(char::from(b));
                i += 1;
            }
            _ => return None,
        }
    }
    if !decoded.starts_with('/') {
        return None;
    }
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = parts.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (index, segment) in parts.iter().enumerate() {
        match *segment {
            "" => trailing_slash = index == last,
            "." => trailing_slash = index == last,
            ".." => {
                segments.pop();
                trailing_slash = index == last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for segment in &segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || normal.is_empty() {
        normal.push('/');
    }
    Some((normal, query))
}

/// The byte a percent-escape names, from what follows its `%`: `None` unless that starts
/// with two hex digits (RFC 3986 §2.1). `u8::from_str_radix` alone would also take a sign
/// and read `%+1` as byte 1, an escape no backend decodes that way.
pub fn escaped_byte(after_percent: &[u8]) -> Option<u8> {
    let digit = |b: &u8| char::from(*b).to_digit(16);
    match after_percent {
        [high, low, ..] => u8::try_from(digit(high)? * 16 + digit(low)?).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_before_matching() {
        let n = |p: &str| normalize_path(p).map(|(p, _)| p);
        assert_eq!(n("/a/../b").as_deref(), Some("/b"));
        assert_eq!(n("/a/./b/").as_deref(), Some("/a/b/"));
        assert_eq!(n("//admin//x").as_deref(), Some("/admin/x"));
        assert_eq!(n("/admin%2Fx").as_deref(), Some("/admin/x"));
        assert_eq!(n("/admin%2fx").as_deref(), Some("/admin/x"));
        assert_eq!(n("/%61dmin").as_deref(), Some("/admin"));
        assert_eq!(n("/a%2e%2E/admin").as_deref(), Some("/a../admin"));
        assert_eq!(n("/x/%2e%2e/admin").as_deref(), Some("/admin"));
        assert_eq!(n("\\admin\\x").as_deref(), Some("/admin/x"));
        assert_eq!(n("/a%3fb?q=1").as_deref(), Some("/a%3Fb"));
        assert_eq!(n("/../..").as_deref(), Some("/"));
        assert_eq!(n("/a%zz"), None);
        assert_eq!(n("/a%00b"), None);
        // Found by the `request` fuzz target: a sign is not a hex digit.
        for bad in ["/a%+1", "/a%-1", "/%+2e%+2e/admin", "/a%+", "/a%1", "/a%"] {
            assert_eq!(n(bad), None, "{bad:?}");
        }
        assert_eq!(n("relative"), None);
        assert_eq!(
            normalize_path("/p?x=1&y").map(|(_, q)| q),
            Some(Some("x=1&y".into()))
        );
    }

    #[test]
    fn escapes_are_exactly_two_hex_digits() {
        assert_eq!(escaped_byte(b"2f"), Some(b'/'));
        assert_eq!(escaped_byte(b"FFx"), Some(0xff));
        for bad in [&b"+1"[..], b"-1", b" 1", b"1", b"", b"g0", b"0x"] {
            assert_eq!(escaped_byte(bad), None, "{bad:?}");
        }
    }
}
