//! Consistent hashing for a DestinationRule's `loadBalancer.consistentHash`: the hash key of
//! a connection (`useSourceIp`) or of a request (`httpHeaderName`, `httpCookie`,
//! `httpQueryParameterName`), the cookie generated when a `ttl` asks for one (as Envoy
//! generates it), and the lookup tables Envoy offers, `ringHash` (Istio's default) and
//! `maglev`, built once per balancer. Every hash is computed by [`fixed_hash`], which this
//! code alone defines, so agents built by different toolchains agree on every choice.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use http::HeaderMap;
use serde::Serialize;

use crate::config::{
    istio::{ConsistentHashLb, HttpCookie},
    validate::MAX_RING_SIZE,
};

/// Envoy's default ring size (`minimumRingSize`) and Maglev table size.
pub const DEFAULT_RING_SIZE: u64 = 1024;
pub const DEFAULT_MAGLEV_SIZE: u64 = 65_537;

/// FNV-1a over `bytes` from a basis moved by `seed`, then SplitMix64's finaliser to spread
/// the bits: fixed by this code (unlike std's `DefaultHasher`).
pub fn fixed_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// What a consistent hash is computed on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    SourceIp,
    /// A request header, its name lower-cased.
    Header(String),
    Cookie(CookieKey),
    QueryParameter(String),
}

/// `httpCookie`: the cookie's name, and the `Path` and `Max-Age` of a generated one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CookieKey {
    pub name: String,
    pub path: Option<String>,
    /// `None`: a request without the cookie has no hash key (no cookie is generated).
    #[serde(with = "seconds")]
    pub ttl: Option<Duration>,
    /// Further `Set-Cookie` attributes, `name` or `name=value`.
    pub attributes: Vec<String>,
}

mod seconds {
    pub fn serialize<S: serde::Serializer>(
        ttl: &Option<std::time::Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match ttl {
            Some(ttl) => serializer.serialize_str(&format!("{}s", ttl.as_secs())),
            None => serializer.serialize_none(),
        }
    }
}

/// The lookup table a balancer maps hashes to endpoints with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TableKind {
    RingHash { minimum_ring_size: u64 },
    Maglev { table_size: u64 },
}

/// `consistentHash`, translated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConsistentHash {
    pub key: HashKey,
    pub table: TableKind,
}

impl ConsistentHash {
    /// The key and table `settings` ask for; `None` without a key. Ring hash unless
    /// `maglev` is set, as Istio programs Envoy; the deprecated top-level `minimumRingSize`
    /// counts where `ringHash` does not say.
    pub fn from_istio(settings: &ConsistentHashLb) -> Option<ConsistentHash> {
        let key = if let Some(name) = &settings.http_header_name {
            HashKey::Header(name.to_ascii_lowercase())
        } else if let Some(cookie) = &settings.http_cookie {
            HashKey::Cookie(CookieKey::from_istio(cookie))
        } else if let Some(name) = &settings.http_query_parameter_name {
            HashKey::QueryParameter(name.clone())
        } else if settings.use_source_ip == Some(true) {
            HashKey::SourceIp
        } else {
            return None;
        };
        let table = match (&settings.maglev, &settings.ring_hash) {
            (Some(maglev), _) => TableKind::Maglev {
                table_size: maglev.table_size.unwrap_or(DEFAULT_MAGLEV_SIZE),
            },
            (None, ring) => TableKind::RingHash {
                minimum_ring_size: ring
                    .as_ref()
                    .and_then(|r| r.minimum_ring_size)
                    .or(settings.minimum_ring_size)
                    .filter(|size| *size > 0)
                    .unwrap_or(DEFAULT_RING_SIZE),
            },
        };
        Some(ConsistentHash { key, table })
    }
}

impl CookieKey {
    fn from_istio(cookie: &HttpCookie) -> CookieKey {
        CookieKey {
            name: cookie.name.clone(),
            path: cookie.path.clone().filter(|p| !p.is_empty()),
            ttl: cookie.ttl.as_ref().map(|d| d.value),
            attributes: cookie
                .attributes
                .iter()
                .map(|a| match &a.value {
                    Some(value) => format!("{}={value}", a.name),
                    None => a.name.clone(),
                })
                .collect(),
        }
    }

    /// Envoy's `Set-Cookie` for a generated cookie: the value quoted, `Max-Age` unless the
    /// ttl is zero (a session cookie), `Path` when given, the attributes, `HttpOnly`.
    pub fn set_cookie(&self, value: &str) -> String {
        let mut header = format!("{}=\"{value}\"", self.name);
        if let Some(ttl) = self.ttl.filter(|t| t.as_secs() > 0) {
            header.push_str(&format!("; Max-Age={}", ttl.as_secs()));
        }
        if let Some(path) = &self.path {
            header.push_str(&format!("; Path={path}"));
        }
        for attribute in &self.attributes {
            header.push_str(&format!("; {attribute}"));
        }
        header.push_str("; HttpOnly");
        header
    }
}

/// What a request offers to hash on.
#[derive(Debug, Clone, Copy)]
pub struct RequestKeys<'a> {
    pub headers: &'a HeaderMap,
    pub query: Option<&'a str>,
    /// The client's address and the one it connected to: a generated cookie's value is
    /// made from them, as Envoy makes it, so one connection's racing requests agree.
    pub client: SocketAddrV4,
    pub addressed: SocketAddrV4,
}

/// A request's hash, and the `Set-Cookie` to answer with when the cookie was generated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestHash {
    pub hash: Option<u64>,
    pub set_cookie: Option<String>,
}

impl HashKey {
    /// The hash of a connection from `client`: only the source address is known.
    pub fn connection_hash(&self, client: Ipv4Addr) -> Option<u64> {
        match self {
            HashKey::SourceIp => Some(fixed_hash(0, &client.octets())),
            _ => None,
        }
    }

    /// The hash of a request; no hash (Envoy then picks at random) when the request lacks
    /// the key and no cookie is to be generated.
    pub fn request_hash(&self, request: &RequestKeys) -> RequestHash {
        let on = |value: &str| Some(fixed_hash(0, value.as_bytes()));
        match self {
            HashKey::SourceIp => RequestHash {
                hash: self.connection_hash(*request.client.ip()),
                set_cookie: None,
            },
            HashKey::Header(name) => {
                // Several values hash as one, in a fixed order, as Envoy hashes them.
                let mut values: Vec<&[u8]> = request
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect();
                values.sort_unstable();
                RequestHash {
                    hash: (!values.is_empty()).then(|| fixed_hash(0, &values.join(&b","[..]))),
                    set_cookie: None,
                }
            }
            HashKey::QueryParameter(name) => RequestHash {
                hash: crate::model::query::query_param(request.query, name).and_then(|v| on(&v)),
                set_cookie: None,
            },
            HashKey::Cookie(cookie) => match cookie_value(request.headers, &cookie.name) {
                Some(value) => RequestHash {
                    hash: on(value),
                    set_cookie: None,
                },
                None if cookie.ttl.is_some() => {
                    let value = generated_cookie(request.client, request.addressed);
                    RequestHash {
                        hash: on(&value),
                        set_cookie: Some(cookie.set_cookie(&value)),
                    }
                }
                None => RequestHash::default(),
            },
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers, its quotes removed.
fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then(|| {
                value
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(value)
            })
        })
}

/// A cookie value for a request without one: 16 hex digits of the hash of both ends of
/// the client's connection.
fn generated_cookie(client: SocketAddrV4, addressed: SocketAddrV4) -> String {
    let ends = format!("{client}{addressed}");
    format!("{:016x}", fixed_hash(0, ends.as_bytes()))
}

/// A ring or Maglev table over a balancer's endpoints (their positions in its list).
#[derive(Debug)]
pub enum HashTable {
    /// Sorted by hash: a key goes to the first entry at or after its hash.
    Ring(Vec<(u64, u32)>),
    /// A key goes to the entry at its hash modulo the size.
    Maglev(Vec<u32>),
}

impl HashTable {
    /// The table of `kind` over `endpoints`, where endpoint `i` is entry value `i`.
    pub fn build(kind: TableKind, endpoints: &[SocketAddrV4]) -> HashTable {
        match kind {
            TableKind::RingHash { minimum_ring_size } => ring(minimum_ring_size, endpoints),
            TableKind::Maglev { table_size } => maglev(table_size, endpoints),
        }
    }

    /// The endpoint for `hash`: the first entry from the hash's place on that `usable`
    /// allows. Walking on past an endpoint that cannot take the request (ejected, or
    /// already tried) is what a ring rebuilt without it would answer; a Maglev table
    /// rebuilt without it would spread its entries over the permutations instead, so
    /// there the walk only approximates Envoy (the keys of the others stay put either way).
    pub fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        match self {
            HashTable::Ring(entries) if !entries.is_empty() => {
                let start = entries.partition_point(|(h, _)| *h < hash) % entries.len();
                (0..entries.len())
                    .map(|step| entries[(start + step) % entries.len()].1 as usize)
                    .find(|i| usable(*i))
            }
            HashTable::Maglev(table) if !table.is_empty() => {
                let size = table.len() as u64;
                let start = (hash % size) as usize;
                (0..table.len())
                    .map(|step| table[(start + step) % table.len()] as usize)
                    .find(|i| usable(*i))
            }
            _ => None,
        }
    }
}

/// Envoy's ketama ring: as many points per endpoint as make at least `minimum` in all
/// (at most [`MAX_RING_SIZE`]), each the hash of `address_n`.
fn ring(minimum: u64, endpoints: &[SocketAddrV4]) -> HashTable {
    let count = endpoints.len() as u64;
    if count == 0 {
        return HashTable::Ring(Vec::new());
    }
    let per_endpoint = minimum.div_ceil(count).clamp(1, MAX_RING_SIZE / count);
    let mut entries: Vec<(u64, u32)> = endpoints
        .iter()
        .enumerate()
        .flat_map(|(i, addr)| {
            (0..per_endpoint)
                .map(move |n| (fixed_hash(0, format!("{addr}_{n}").as_bytes()), i as u32))
        })
        .collect();
    entries.sort_unstable();
    HashTable::Ring(entries)
}

/// The Maglev paper's population: each endpoint takes, in turn, the next free slot of its
/// own permutation of the table (offset and skip from two hashes of its address).
fn maglev(size: u64, endpoints: &[SocketAddrV4]) -> HashTable {
    if endpoints.is_empty() || size < 2 {
        return HashTable::Maglev(Vec::new());
    }
    let permutations: Vec<(u64, u64)> = endpoints
        .iter()
        .map(|addr| {
            let name = addr.to_string();
            let offset = fixed_hash(1, name.as_bytes()) % size;
            let skip = fixed_hash(2, name.as_bytes()) % (size - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut table: Vec<Option<u32>> = vec![None; size as usize];
    let mut next = vec![0u64; endpoints.len()];
    let mut filled = 0u64;
    'fill: loop {
        for (i, (offset, skip)) in permutations.iter().enumerate() {
            let mut slot = (offset + next[i] * skip) % size;
            while table[slot as usize].is_some() {
                next[i] += 1;
                slot = (offset + next[i] * skip) % size;
            }
            table[slot as usize] = Some(i as u32);
            next[i] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
    HashTable::Maglev(table.into_iter().map(|e| e.unwrap_or(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<SocketAddrV4> {
        (0..n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, i as u8 + 1), 8080))
            .collect()
    }

    fn keys_of(headers: &HeaderMap) -> RequestKeys<'_> {
        RequestKeys {
            headers,
            query: Some("a=1&user=carol&b=2"),
            client: "10.244.1.5:40000".parse().expect("addr"),
            addressed: "10.96.0.10:80".parse().expect("addr"),
        }
    }

    #[test]
    fn hashes_are_fixed_by_this_code() {
        // Pinned: a change would send keys to other endpoints than earlier agents do.
        assert_eq!(fixed_hash(0, b"alice"), 0xc5d1_556d_6677_4a5c);
        assert_eq!(fixed_hash(1, b"alice"), fixed_hash(1, b"alice"));
        assert_ne!(fixed_hash(1, b"alice"), fixed_hash(2, b"alice"));
        let ring = HashTable::build(
            TableKind::RingHash {
                minimum_ring_size: 1024,
            },
            &endpoints(3),
        );
        assert_eq!(ring.lookup(fixed_hash(0, b"alice"), |_| true), Some(0));
        let maglev = HashTable::build(TableKind::Maglev { table_size: 101 }, &endpoints(3));
        assert_eq!(maglev.lookup(fixed_hash(0, b"alice"), |_| true), Some(1));
    }

    fn spread(table: &HashTable, n: usize, keys: u32) -> Vec<usize> {
        let mut counts = vec![0; n];
        for key in 0..keys {
            let hash = fixed_hash(0, &key.to_be_bytes());
            counts[table.lookup(hash, |_| true).expect("an endpoint")] += 1;
        }
        counts
    }

    #[test]
    fn ring_and_maglev_spread_keys_and_move_only_a_leaving_endpoints_keys() {
        for kind in [
            TableKind::RingHash {
                minimum_ring_size: 1024,
            },
            TableKind::Maglev { table_size: 65_537 },
        ] {
            let table = HashTable::build(kind, &endpoints(4));
            let counts = spread(&table, 4, 40_000);
            assert!(
                counts.iter().all(|c| (8_000..=12_000).contains(c)),
                "{kind:?}: {counts:?}"
            );
            for key in 0..2000u32 {
                let hash = fixed_hash(0, &key.to_be_bytes());
                let before = table.lookup(hash, |_| true);
                let without = table.lookup(hash, |i| i != 2);
                if before != Some(2) {
                    assert_eq!(without, before, "{kind:?}: key {key} moved");
                } else {
                    assert_ne!(without, Some(2));
                }
            }
        }
    }

    #[test]
    fn ring_size_follows_the_minimum_and_maglev_fills_every_slot() {
        let HashTable::Ring(entries) = ring(1000, &endpoints(3)) else {
            panic!("a ring");
        };
        assert_eq!(entries.len(), 3 * 334);
        let HashTable::Maglev(table) = maglev(13, &endpoints(3)) else {
            panic!("a table");
        };
        assert_eq!(table.len(), 13);
        let mut per = [0; 3];
        table.iter().for_each(|i| per[*i as usize] += 1);
        assert!(per.iter().all(|n| (4..=5).contains(n)), "{per:?}");
        assert!(HashTable::build(TableKind::Maglev { table_size: 13 }, &[])
            .lookup(1, |_| true)
            .is_none());
    }

    #[test]
    fn request_keys_come_from_headers_cookies_and_query_parameters() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", "alice".parse().expect("value"));
        headers.insert(
            http::header::COOKIE,
            "a=b; session=\"s1\"".parse().expect("value"),
        );
        let keys = keys_of(&headers);
        let alice = Some(fixed_hash(0, b"alice"));
        assert_eq!(
            HashKey::Header("x-user".into()).request_hash(&keys).hash,
            alice
        );
        assert_eq!(
            HashKey::Header("x-other".into()).request_hash(&keys).hash,
            None
        );
        assert_eq!(
            HashKey::QueryParameter("user".into())
                .request_hash(&keys)
                .hash,
            Some(fixed_hash(0, b"carol"))
        );
        let cookie = |ttl: Option<u64>| {
            HashKey::Cookie(CookieKey {
                name: "session".into(),
                path: Some("/".into()),
                ttl: ttl.map(Duration::from_secs),
                attributes: vec!["SameSite=Strict".into()],
            })
        };
        assert_eq!(
            cookie(None).request_hash(&keys),
            RequestHash {
                hash: Some(fixed_hash(0, b"s1")),
                set_cookie: None
            }
        );
        assert_eq!(
            HashKey::SourceIp.request_hash(&keys).hash,
            HashKey::SourceIp.connection_hash(Ipv4Addr::new(10, 244, 1, 5))
        );
        assert_eq!(
            HashKey::Header("x-user".into()).connection_hash(Ipv4Addr::LOCALHOST),
            None
        );
    }

    #[test]
    fn a_missing_cookie_with_a_ttl_is_generated_and_its_replay_hashes_the_same() {
        let empty = HeaderMap::new();
        let key = HashKey::Cookie(CookieKey {
            name: "session".into(),
            path: Some("/shop".into()),
            ttl: Some(Duration::from_secs(60)),
            attributes: Vec::new(),
        });
        let generated = key.request_hash(&keys_of(&empty));
        let set_cookie = generated.set_cookie.clone().expect("a Set-Cookie");
        let value = generated_cookie(
            "10.244.1.5:40000".parse().expect("addr"),
            "10.96.0.10:80".parse().expect("addr"),
        );
        assert_eq!(
            set_cookie,
            format!("session=\"{value}\"; Max-Age=60; Path=/shop; HttpOnly")
        );
        let mut replayed = HeaderMap::new();
        let cookie = set_cookie.split(';').next().expect("pair");
        replayed.insert(http::header::COOKIE, cookie.parse().expect("value"));
        let again = key.request_hash(&keys_of(&replayed));
        assert_eq!(again.hash, generated.hash);
        assert_eq!(again.set_cookie, None);
        let session = CookieKey {
            name: "s".into(),
            path: None,
            ttl: Some(Duration::ZERO),
            attributes: Vec::new(),
        };
        assert_eq!(session.set_cookie("v"), "s=\"v\"; HttpOnly");
        let no_ttl = HashKey::Cookie(CookieKey {
            ttl: None,
            ..session
        });
        assert_eq!(
            no_ttl.request_hash(&keys_of(&empty)),
            RequestHash::default()
        );
    }

    #[test]
    fn istio_settings_choose_the_key_and_ring_hash_by_default() {
        let parse = |yaml: &str| {
            let settings: ConsistentHashLb = serde_norway::from_str(yaml).expect("yaml");
            ConsistentHash::from_istio(&settings)
        };
        assert_eq!(
            parse("httpHeaderName: X-User"),
            Some(ConsistentHash {
                key: HashKey::Header("x-user".into()),
                table: TableKind::RingHash {
                    minimum_ring_size: 1024
                }
            })
        );
        assert_eq!(
            parse("{useSourceIp: true, minimumRingSize: 2048}").map(|c| c.table),
            Some(TableKind::RingHash {
                minimum_ring_size: 2048
            })
        );
        assert_eq!(
            parse("{httpQueryParameterName: u, maglev: {}}").map(|c| c.table),
            Some(TableKind::Maglev { table_size: 65_537 })
        );
        assert_eq!(parse("useSourceIp: false"), None);
    }
}
