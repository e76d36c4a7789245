//! The server name (SNI) of a TLS ClientHello, read from the first bytes a client sent
//! without decrypting or consuming anything (Envoy's `tls_inspector` does the same for
//! its filter chain match). The bytes come from a pod that may be hostile: every length
//! is checked against what is there, nothing is read past [`HELLO_LIMIT`], and a
//! malformed hello is simply TLS without a name.

/// The most bytes of a ClientHello looked at, record header included: a hello with
/// post-quantum key shares is under 2 KiB; this is one full TLS record (16 KiB of
/// fragment behind its 5-byte header).
pub const HELLO_LIMIT: usize = 16 * 1024 + RECORD_HEADER;

const RECORD_HEADER: usize = 5;
const HANDSHAKE_RECORD: u8 = 0x16;
const CLIENT_HELLO: u8 = 0x01;
const SERVER_NAME_EXTENSION: u16 = 0;
const HOST_NAME: u8 = 0;

/// What the first bytes of a connection are, as far as TLS is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hello {
    /// Not a TLS handshake.
    NotTls,
    /// A TLS handshake whose ClientHello has not all come yet.
    Incomplete,
    /// A ClientHello, with the host name it asks for (lower-cased, without a trailing
    /// dot) when it names a valid one.
    ClientHello { sni: Option<String> },
}

/// Reads `first` (the bytes peeked so far, at most [`HELLO_LIMIT`] of them).
pub fn read_hello(first: &[u8]) -> Hello {
    match first {
        [] => return Hello::Incomplete,
        [record, ..] if *record != HANDSHAKE_RECORD => return Hello::NotTls,
        [_] => return Hello::Incomplete,
        // The record layer's major version is 3 for SSL 3.0 to TLS 1.3.
        [_, major, ..] if *major != 3 => return Hello::NotTls,
        _ => {}
    }
    // The handshake message may span several records: their fragments joined.
    let mut handshake = Vec::new();
    let mut rest = first;
    loop {
        let Some(header) = rest.get(..RECORD_HEADER) else {
            return incomplete_or_unnamed(first);
        };
        if header[0] != HANDSHAKE_RECORD || header[1] != 3 {
            return Hello::ClientHello { sni: None };
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(fragment) = rest.get(RECORD_HEADER..RECORD_HEADER + length) else {
            return incomplete_or_unnamed(first);
        };
        handshake.extend_from_slice(fragment);
        rest = &rest[RECORD_HEADER + length..];
        match handshake.as_slice() {
            [kind, ..] if *kind != CLIENT_HELLO => return Hello::NotTls,
            [_, a, b, c, body @ ..] => {
                let length = usize::from(*a) << 16 | usize::from(*b) << 8 | usize::from(*c);
                if let Some(hello) = body.get(..length) {
                    return Hello::ClientHello {
                        sni: server_name(hello),
                    };
                }
            }
            _ => {}
        }
    }
}

/// A hello cut short: more may come, unless the limit is reached (then it is TLS whose
/// name is not looked for further).
fn incomplete_or_unnamed(first: &[u8]) -> Hello {
    if first.len() >= HELLO_LIMIT {
        Hello::ClientHello { sni: None }
    } else {
        Hello::Incomplete
    }
}

/// A cursor over a hello's bytes; every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one- or two-byte length.
    fn vector(&mut self, length_bytes: usize) -> Option<&'a [u8]> {
        let length = match length_bytes {
            1 => usize::from(self.u8()?),
            _ => usize::from(self.u16()?),
        };
        self.take(length)
    }
}

/// The `host_name` of the ClientHello body `hello`'s server_name extension.
fn server_name(hello: &[u8]) -> Option<String> {
    let mut reader = Reader(hello);
    reader.take(2 + 32)?; // legacy_version, random
    reader.vector(1)?; // legacy_session_id
    reader.vector(2)?; // cipher_suites
    reader.vector(1)?; // legacy_compression_methods
    let mut extensions = Reader(reader.vector(2)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vector(2)?;
        if kind != SERVER_NAME_EXTENSION {
            continue;
        }
        let mut names = Reader(Reader(data).vector(2)?);
        while !names.0.is_empty() {
            let name_type = names.u8()?;
            let name = names.vector(2)?;
            if name_type == HOST_NAME {
                return host_name(name);
            }
        }
        return None;
    }
    None
}

/// A DNS host name as routes compare it; anything else (empty, too long, bytes outside
/// letters, digits, `-`, `_` and `.`) names nothing.
fn host_name(raw: &[u8]) -> Option<String> {
    let name = std::str::from_utf8(raw).ok()?;
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    valid.then(|| name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello body naming `name` (when given), with one other extension before it.
    fn hello_body(name: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0]); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut extensions = vec![0x00, 0x2b, 0, 3, 2, 3, 4]; // supported_versions
        if let Some(name) = name {
            let mut list = vec![HOST_NAME];
            list.extend_from_slice(&(name.len() as u16).to_be_bytes());
            list.extend_from_slice(name);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend_from_slice(&list);
            extensions.extend_from_slice(&[0, 0]);
            extensions.extend_from_slice(&(data.len() as u16).to_be_bytes());
            extensions.extend_from_slice(&data);
        }
        body.extend_from_slice(&(extensions.len() as u16).to_be_bytes());
        body.extend_from_slice(&extensions);
        body
    }

    /// The handshake message for `body`, in records of at most `fragment` bytes.
    fn records(body: &[u8], fragment: usize) -> Vec<u8> {
        let mut handshake = vec![CLIENT_HELLO];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(body);
        let mut out = Vec::new();
        for chunk in handshake.chunks(fragment) {
            out.extend_from_slice(&[HANDSHAKE_RECORD, 3, 1]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    fn named(name: &str) -> Hello {
        Hello::ClientHello {
            sni: Some(name.into()),
        }
    }

    #[test]
    fn the_server_name_is_read_from_a_whole_hello_in_one_record_or_several() {
        let hello = records(&hello_body(Some(b"A.Example.")), 1 << 14);
        assert_eq!(read_hello(&hello), named("a.example"));
        let fragmented = records(&hello_body(Some(b"b.example")), 7);
        assert_eq!(read_hello(&fragmented), named("b.example"));
        let unnamed = records(&hello_body(None), 1 << 14);
        assert_eq!(read_hello(&unnamed), Hello::ClientHello { sni: None });
    }

    #[test]
    fn a_hello_cut_short_is_incomplete_at_every_length() {
        let hello = records(&hello_body(Some(b"a.example")), 40);
        for cut in 0..hello.len() {
            assert_eq!(read_hello(&hello[..cut]), Hello::Incomplete, "cut at {cut}");
        }
    }

    #[test]
    fn other_protocols_are_not_tls() {
        assert_eq!(read_hello(b"GET / HTTP/1.1\r\n"), Hello::NotTls);
        assert_eq!(read_hello(b"PRI * HTTP/2.0"), Hello::NotTls);
        assert_eq!(read_hello(&[HANDSHAKE_RECORD, 9, 9]), Hello::NotTls);
        // A handshake record holding a ServerHello is no client's opening.
        assert_eq!(
            read_hello(&[HANDSHAKE_RECORD, 3, 3, 0, 4, 2, 0, 0, 0]),
            Hello::NotTls
        );
    }

    #[test]
    fn garbled_hellos_name_nothing_and_never_read_past_their_bytes() {
        // Lengths that point past the hello, names that are not host names.
        let mut lying = hello_body(Some(b"a.example"));
        let extensions_at = 2 + 32 + 1 + 4 + 2;
        lying[extensions_at] = 0xff;
        assert_eq!(
            read_hello(&records(&lying, 1 << 14)),
            Hello::ClientHello { sni: None }
        );
        for bad in [&b""[..], b"a b", b"evil\0.example", &[0xff, 0xfe]] {
            let hello = records(&hello_body(Some(bad)), 1 << 14);
            assert_eq!(
                read_hello(&hello),
                Hello::ClientHello { sni: None },
                "{bad:?}"
            );
        }
        // A hello longer than the limit is TLS whose name is not looked for.
        let mut huge = vec![HANDSHAKE_RECORD, 3, 1, 0x40, 0];
        huge.extend_from_slice(&[CLIENT_HELLO, 0xff, 0xff, 0xff]);
        huge.resize(HELLO_LIMIT, 0);
        assert_eq!(read_hello(&huge), Hello::ClientHello { sni: None });
        // Every prefix of every byte pattern is handled without a panic.
        for seed in 0u8..=255 {
            let noise: Vec<u8> = (0..64u8)
                .map(|i| i.wrapping_mul(seed).wrapping_add(seed))
                .collect();
            let mut framed = vec![HANDSHAKE_RECORD, 3, 1, 0, 64, CLIENT_HELLO, 0, 0, 58];
            framed.extend_from_slice(&noise);
            for cut in 0..framed.len() {
                let _ = read_hello(&framed[..cut]);
            }
        }
    }
}
