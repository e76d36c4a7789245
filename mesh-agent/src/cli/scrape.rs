//! The agents' Prometheus metrics as `meshctl graph`, `impact` and `dashboard` read them:
//! the text exposition format parsed into samples (agent output is outside input: a
//! malformed line is an error naming its line, never a panic), each agent read twice
//! (at a URL, or through the Kubernetes API: [`Source`]),
//! and what moved between the two readings ([`Window`]) — the `increase()` Prometheus
//! would compute, without a Prometheus server.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    cli::remote::{Remote, RemoteError},
    http::client::{self, ClientError, Transport},
};

/// The agent's metrics port, which a port-forward reaches on its node.
pub const METRICS_PORT: u16 = 15020;

/// Where an agent's metrics are read.
#[derive(Clone)]
pub enum Source {
    /// `http://host:port/path`, reached directly.
    Url(String),
    /// A node's agent, through the Kubernetes API (`meshctl --node`).
    Agent(Arc<Remote>),
}

impl Source {
    /// How readings and errors name the agent.
    pub fn name(&self) -> String {
        match self {
            Source::Url(url) => url.clone(),
            Source::Agent(remote) => format!("node {} ({})", remote.node, remote.pod),
        }
    }
}

/// One sample of the exposition: a metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// The value of `label`, `""` when absent (as PromQL reads a missing label).
    pub fn label(&self, label: &str) -> &str {
        self.labels.get(label).map_or("", String::as_str)
    }
}

/// Why a metrics text could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseError {
    pub line: usize,
    pub reason: String,
}

/// Parses Prometheus' text exposition format (0.0.4): comments and blank lines are
/// skipped, every other line is `name{label="value",…} value [timestamp]`.
pub fn parse(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut samples = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_line(line).map_err(|reason| ParseError {
            line: index + 1,
            reason,
        })?;
        samples.push(sample);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("no metric name in {line:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| format!("{name}: no value"))?;
    let value: f64 = value
        .parse()
        .map_err(|_| format!("{name}: the value {value:?} is not a number"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|_| format!("{name}: the timestamp {timestamp:?} is not an integer"))?;
    }
    if let Some(extra) = fields.next() {
        return Err(format!("{name}: unexpected {extra:?} after the value"));
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `label="value"` pairs up to the closing brace; returns what follows it.
fn parse_labels<'a>(
    mut rest: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok(after);
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or_else(|| format!("a label without a value in {rest:?}"))?;
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid label name {name:?}"));
        }
        let after = after
            .trim_start()
            .strip_prefix('"')
            .ok_or_else(|| format!("label {name}: its value is not quoted"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("label {name}: its value is not closed")),
                Some((at, '"')) => break at,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => {
                        return Err(format!(
                            "label {name}: invalid escape \\{}",
                            other.map_or(String::new(), |(_, c)| c.to_string())
                        ))
                    }
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        rest = &after[end + 1..];
    }
}

/// The samples one agent exported at one moment.
#[derive(Debug, Clone)]
pub struct Reading {
    pub url: String,
    pub at: Instant,
    pub samples: Vec<Sample>,
}

/// One agent between two readings: what its counters and histograms gained, and its
/// gauges at the end.
#[derive(Debug, Clone)]
pub struct Window {
    pub url: String,
    pub seconds: f64,
    /// Counters, histogram buckets, sums and counts: the increase; other samples: their
    /// value in the later reading.
    pub samples: Vec<Sample>,
}

/// Whether a sample only ever grows (a counter, or a part of a histogram).
fn accumulates(name: &str) -> bool {
    ["_total", "_bucket", "_count", "_sum"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// What moved from `before` to `after` (the same agent). A series absent before started
/// from zero (series appear with their first event); one that went down was reset (the
/// agent restarted), so its whole later value is the increase, as Prometheus' `rate`
/// reads a reset.
pub fn window(before: &Reading, after: &Reading) -> Window {
    let earlier: HashMap<(&str, &BTreeMap<String, String>), f64> = before
        .samples
        .iter()
        .map(|s| ((s.name.as_str(), &s.labels), s.value))
        .collect();
    let samples = after
        .samples
        .iter()
        .map(|s| {
            let value = if accumulates(&s.name) {
                let was = earlier
                    .get(&(s.name.as_str(), &s.labels))
                    .copied()
                    .unwrap_or(0.0);
                if s.value >= was {
                    s.value - was
                } else {
                    s.value
                }
            } else {
                s.value
            };
            Sample {
                name: s.name.clone(),
                labels: s.labels.clone(),
                value,
            }
        })
        .collect();
    Window {
        url: after.url.clone(),
        seconds: after.at.saturating_duration_since(before.at).as_secs_f64(),
        samples,
    }
}

/// Why an agent's metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("{url}: not an http:// URL with a host and port")]
    Url { url: String },
    #[error("no metrics at {url}: nothing answers there (is the agent running, and is its metrics port reachable from here?)")]
    Unreachable { url: String, source: ClientError },
    #[error("reading {url}")]
    Exchange { url: String, source: ClientError },
    #[error("the metrics of {url}, through the Kubernetes API")]
    Remote {
        url: String,
        source: Box<RemoteError>,
    },
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: http::StatusCode,
    },
    #[error("{url}: malformed metrics")]
    Malformed { url: String, source: ParseError },
}

impl ScrapeError {
    /// Whether nothing answered at all (meshctl's exit code for an unreachable agent).
    pub fn unreachable(&self) -> bool {
        matches!(
            self,
            ScrapeError::Unreachable { .. } | ScrapeError::Remote { .. }
        )
    }
}

/// `http://host:port/path` → (`host:port`, `/path`).
pub fn split_url(url: &str) -> Result<(String, String), ScrapeError> {
    let bad = || ScrapeError::Url {
        url: url.to_owned(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (address, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/metrics"),
    };
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok((address.to_owned(), path.to_owned()))
}

/// How large an agent's metrics may be.
const MAX_METRICS_BYTES: usize = 64 << 20;

/// Reads one agent's metrics.
pub async fn read(source: &Source) -> Result<Reading, ScrapeError> {
    let url = &source.name();
    let response = match source {
        Source::Url(url) => {
            let (address, path) = split_url(url)?;
            client::send(&Transport::Plain, metrics_request(address, path))
                .await
                .map_err(|source| match source {
                    ClientError::Connect { .. } => ScrapeError::Unreachable {
                        url: url.to_owned(),
                        source,
                    },
                    source => ScrapeError::Exchange {
                        url: url.to_owned(),
                        source,
                    },
                })?
        }
        Source::Agent(remote) => {
            let request = metrics_request(format!("{}:{METRICS_PORT}", remote.pod), "/metrics");
            remote
                .send(METRICS_PORT, request)
                .await
                .map_err(|source| ScrapeError::Remote {
                    url: url.to_owned(),
                    source: Box::new(source),
                })?
        }
    };
    let at = Instant::now();
    if response.status != http::StatusCode::OK {
        return Err(ScrapeError::Status {
            url: url.to_owned(),
            status: response.status,
        });
    }
    let samples = parse(&response.text()).map_err(|source| ScrapeError::Malformed {
        url: url.to_owned(),
        source,
    })?;
    Ok(Reading {
        url: url.to_owned(),
        at,
        samples,
    })
}

fn metrics_request(address: String, path: impl Into<String>) -> client::Request {
    let mut request = client::Request::get(address, path);
    request.max_body = MAX_METRICS_BYTES;
    request.timeout = Duration::from_secs(10);
    request
}

/// Reads every agent's metrics at once.
pub async fn read_all(sources: &[Source]) -> Result<Vec<Reading>, ScrapeError> {
    futures::future::join_all(sources.iter().map(read))
        .await
        .into_iter()
        .collect()
}

/// Reads every agent, waits `window`, reads them again: each agent's [`Window`].
/// `started` is told once the first readings are in.
pub async fn measure(
    sources: &[Source],
    length: Duration,
    started: impl FnOnce(),
) -> Result<Vec<Window>, ScrapeError> {
    let before = read_all(sources).await?;
    started();
    tokio::time::sleep(length).await;
    let after = read_all(sources).await?;
    Ok(before
        .iter()
        .zip(&after)
        .map(|(before, after)| window(before, after))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn samples_with_labels_escapes_special_values_and_timestamps_are_read() {
        let text = "# HELP x_total X.\n# TYPE x_total counter\n\
                    x_total{a=\"1\",b=\"say \\\"hi\\\"\\\\ \\n\",} 3 1700000000000\n\
                    \n\
                    y 2.5\n\
                    z_bucket{le=\"+Inf\"} +Inf\n\
                    w{ a = \"x,y}\" } NaN\n";
        let samples = parse(text).expect("parsed");
        assert_eq!(samples.len(), 4);
        assert_eq!(samples[0].name, "x_total");
        assert_eq!(
            samples[0].labels,
            labels(&[("a", "1"), ("b", "say \"hi\"\\ \n")])
        );
        assert_eq!(samples[0].value, 3.0);
        assert_eq!(
            (
                samples[1].name.as_str(),
                samples[1].labels.len(),
                samples[1].value
            ),
            ("y", 0, 2.5)
        );
        assert_eq!(samples[2].label("le"), "+Inf");
        assert!(samples[2].value.is_infinite());
        assert_eq!(samples[3].label("a"), "x,y}");
        assert!(samples[3].value.is_nan());
    }

    #[test]
    fn a_malformed_line_is_named_by_its_number() {
        for (text, reason) in [
            ("ok 1\nbad{a=\"1\" 2\n", "without a value"),
            ("ok 1\nbad{a=1} 2\n", "not quoted"),
            ("ok 1\nbad 1 2 3\n", "unexpected"),
            ("ok 1\nbad one\n", "not a number"),
            ("ok 1\nbad{a=\"\\x\"} 1\n", "invalid escape"),
            ("ok 1\n{a=\"1\"} 1\n", "no metric name"),
            ("ok 1\nbad{=\"1\"} 1\n", "invalid label name"),
            ("ok 1\nbad\n", "no value"),
            ("ok 1\nbad 1 soon\n", "timestamp"),
        ] {
            let err = parse(text).expect_err(text);
            assert_eq!(err.line, 2, "{text}");
            assert!(err.reason.contains(reason), "{text}: {err}");
        }
    }

    fn reading(text: &str, at: Instant) -> Reading {
        Reading {
            url: "http://10.0.0.1:15020/metrics".into(),
            at,
            samples: parse(text).expect("parsed"),
        }
    }

    #[test]
    fn a_window_holds_increases_of_counters_and_the_last_value_of_gauges() {
        let start = Instant::now();
        let before = reading(
            "a_total{x=\"1\"} 10\nreset_total 50\nh_bucket{le=\"1\"} 4\nh_sum 2\nh_count 4\ng 7\n",
            start,
        );
        let after = reading(
            "a_total{x=\"1\"} 25\nreset_total 3\nh_bucket{le=\"1\"} 6\nh_sum 2.5\nh_count 6\ng 5\nnew_total 2\n",
            start + Duration::from_millis(2500),
        );
        let window = window(&before, &after);
        assert_eq!(window.seconds, 2.5);
        let values: Vec<(&str, f64)> = window
            .samples
            .iter()
            .map(|s| (s.name.as_str(), s.value))
            .collect();
        assert_eq!(
            values,
            vec![
                ("a_total", 15.0),
                ("reset_total", 3.0),
                ("h_bucket", 2.0),
                ("h_sum", 0.5),
                ("h_count", 2.0),
                ("g", 5.0),
                ("new_total", 2.0),
            ]
        );
    }

    #[test]
    fn metrics_urls_are_http_with_a_host_and_port() {
        assert_eq!(
            split_url("http://10.200.0.1:15020/metrics").expect("url"),
            ("10.200.0.1:15020".into(), "/metrics".into())
        );
        assert_eq!(
            split_url("http://127.0.0.1:15020").expect("url"),
            ("127.0.0.1:15020".into(), "/metrics".into())
        );
        for bad in [
            "https://a:1/metrics",
            "http://a/metrics",
            "http://:1/",
            "a:1",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
