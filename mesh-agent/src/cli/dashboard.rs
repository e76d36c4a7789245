//! `meshctl dashboard`: a local web page with the live service graph, each Service's
//! golden signals and the mesh's measured impact. It reads the agents' metrics window
//! after window (each reading ends one window and starts the next) and serves, on a
//! loopback address only (the page has no authentication): `/` the page, which
//! refreshes its live part every two seconds; `/live` that part alone; `/graph.svg`;
//! `/state.json` the graph and the impact for tools.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http::StatusCode;
use serde::Serialize;

use crate::{
    cli::{
        graph::{self, figure, Graph},
        impact::{self, Impact, Prices},
        scrape::{self, Reading},
        svg,
    },
    http::{
        server::{self, Handler, Reply},
        Intake,
    },
};

/// What the page shows: the last window's figures, and the last error if the latest
/// reading failed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub graph: Option<Graph>,
    pub impact: Option<Impact>,
    /// Seconds since the Unix epoch of the last completed window.
    pub updated: Option<u64>,
    pub error: Option<String>,
}

/// Refuses an address other than loopback: the dashboard shows the mesh's traffic to
/// whoever connects.
pub fn check_listen(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--listen {addr}: the dashboard serves on a loopback address only (127.0.0.0/8 or \
             [::1]), as it has no authentication; reach it from elsewhere through an SSH tunnel \
             or kubectl port-forward"
        ))
    }
}

/// What the dashboard reads and how it projects.
pub struct Settings {
    pub sources: Vec<scrape::Source>,
    pub window: Duration,
    pub rps: Option<f64>,
    pub prices: Prices,
}

/// The figures of one window of every agent.
pub fn view_of(before: &[Reading], after: &[Reading], settings: &Settings) -> View {
    let windows: Vec<_> = before
        .iter()
        .zip(after)
        .map(|(b, a)| scrape::window(b, a))
        .collect();
    let graph = graph::build(&windows);
    let measured = impact::measure(&windows, graph::total_requests_per_second(&graph));
    View {
        impact: Some(impact::project(measured, settings.rps, settings.prices)),
        graph: Some(graph),
        updated: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs()),
        error: None,
    }
}

/// Serves the dashboard on `listener` until the process ends.
pub async fn run(listener: tokio::net::TcpListener, settings: Settings) {
    let view = Arc::new(Mutex::new(View::default()));
    tokio::spawn(refresh(settings, view.clone()));
    server::serve(listener, Intake::default(), handler(view)).await;
}

/// Reads the agents every window, for ever; a failed reading is shown on the page and
/// the next window starts from the next good one.
async fn refresh(settings: Settings, view: Arc<Mutex<View>>) {
    let mut before: Option<Vec<Reading>> = None;
    loop {
        match scrape::read_all(&settings.sources).await {
            Ok(after) => {
                if let Some(before) = &before {
                    let next = view_of(before, &after, &settings);
                    *view.lock().unwrap_or_else(|e| e.into_inner()) = next;
                }
                before = Some(after);
            }
            Err(err) => {
                let mut shown = view.lock().unwrap_or_else(|e| e.into_inner());
                shown.error = Some(crate::errors::describe(&err));
                before = None;
            }
        }
        tokio::time::sleep(settings.window).await;
    }
}

fn handler(view: Arc<Mutex<View>>) -> Handler {
    Arc::new(move |path, _| {
        let view = view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match path {
            "/" => Reply::ok("text/html; charset=utf-8", page(&view)),
            "/live" => Reply::ok("text/html; charset=utf-8", live(&view)),
            "/graph.svg" => match &view.graph {
                Some(graph) => Reply::ok("image/svg+xml", svg::render(graph)),
                None => Reply::text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the first window is not over yet\n".into(),
                ),
            },
            "/state.json" => Reply::json(&view),
            _ => Reply::text(
                StatusCode::NOT_FOUND,
                "try /, /graph.svg or /state.json\n".into(),
            ),
        }
    })
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole page: its frame and the live part, which a small script replaces every two
/// seconds with `/live`.
pub fn page(view: &View) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>mesh dashboard</title>\n<style>\
         body{{font-family:sans-serif;margin:16px;color:#222;background:#f7f7f9}}\
         h1{{font-size:20px}} h2{{font-size:16px;margin-top:20px}}\
         table{{border-collapse:collapse;background:#fff}}\
         td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}\
         .error{{color:#b00}} .graph{{background:#fff;border:1px solid #ccc;display:inline-block}}\
         </style></head>\n<body><h1>Service mesh dashboard</h1>\n<div id=\"live\">{}</div>\n\
         <script>\nsetInterval(async () => {{\n  try {{\n    const answer = await fetch('/live');\n\
             if (answer.ok) document.getElementById('live').innerHTML = await answer.text();\n\
           }} catch (e) {{}}\n}}, 2000);\n</script>\n</body></html>\n",
        live(view)
    )
}

/// The part of the page that changes: the graph, the golden signals, the impact.
pub fn live(view: &View) -> String {
    let mut html = String::new();
    if let Some(error) = &view.error {
        html.push_str(&format!(
            "<p class=\"error\">Reading the agents failed: {}</p>\n",
            escape(error)
        ));
    }
    let (Some(graph), Some(impact)) = (&view.graph, &view.impact) else {
        html.push_str("<p>Waiting for the first window…</p>\n");
        return html;
    };
    html.push_str(&format!(
        "<p>{}, {:.1} s window, {:.1} requests per second through the mesh.</p>\n\
         <div class=\"graph\">{}</div>\n<h2>Golden signals by Service</h2>\n<table id=\"signals\">\
         <tr><th>Service</th><th>requests/s</th><th>errors (5xx)</th><th>p50 ms</th><th>p99 ms</th>\
         <th>TCP bytes/s</th></tr>\n",
        graph::agents(graph.agents.len()),
        graph.window_seconds,
        impact.measured.requests_per_second,
        svg::render(graph),
    ));
    for signals in &graph.services {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{:.2}</td><td>{}%</td><td>{}</td><td>{}</td><td>{:.0}</td></tr>\n",
            escape(&signals.service),
            signals.requests_per_second,
            figure(signals.error_rate.map(|r| r * 100.0), 1),
            figure(signals.p50_ms, 2),
            figure(signals.p99_ms, 2),
            signals.bytes_per_second,
        ));
    }
    html.push_str(
        "</table>\n<h2>Impact</h2>\n<table id=\"impact\"><tr><th></th><th>this mesh (measured)</th>\
         <th>sidecars (Istio's figures)</th></tr>\n",
    );
    for [name, mesh, sidecar] in impact::rows(impact) {
        html.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&name),
            escape(&mesh),
            escape(&sidecar)
        ));
    }
    html.push_str("</table>\n");
    html
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn only_loopback_addresses_are_served() {
        for ok in ["127.0.0.1:20001", "127.0.0.2:1", "[::1]:20001"] {
            assert_eq!(check_listen(ok.parse().expect("addr")), Ok(()), "{ok}");
        }
        for refused in ["0.0.0.0:20001", "10.200.0.1:20001", "[::]:20001"] {
            let err = check_listen(refused.parse().expect("addr")).expect_err(refused);
            assert!(err.starts_with(&format!("--listen {refused}: ")), "{err}");
        }
    }

    #[test]
    fn the_page_shows_the_graph_the_signals_and_the_impact() {
        let reading = |text: &str, at: Instant| Reading {
            url: "http://a:1/metrics".into(),
            at,
            samples: scrape::parse(text).expect("parsed"),
        };
        let start = Instant::now();
        let series = "istio_requests_total{reporter=\"source\",source_workload=\"client-a\",\
            source_workload_namespace=\"demo\",destination_service=\"reviews.demo.svc.cluster.local\",\
            destination_workload=\"reviews-v2\",destination_workload_namespace=\"demo\",\
            response_code=\"200\",connection_security_policy=\"mutual_tls\"}";
        let settings = Settings {
            sources: vec![scrape::Source::Url("http://a:1/metrics".into())],
            window: Duration::from_secs(1),
            rps: None,
            prices: Prices {
                vcpu_hour: 1.0,
                gib_hour: 1.0,
            },
        };
        let view = view_of(
            &[reading(&format!("{series} 1\n"), start)],
            &[reading(
                &format!("{series} 9\n"),
                start + Duration::from_secs(4),
            )],
            &settings,
        );
        let html = page(&view);
        assert!(html.contains("<svg xmlns"), "{html}");
        assert!(
            html.contains("<tr><td>reviews.demo.svc.cluster.local</td><td>2.00</td><td>0.0%</td>"),
            "{html}"
        );
        assert!(html.contains("<tr><td>requests per second</td><td>2.0</td><td>2.0</td></tr>"));
        assert!(html.contains("setInterval"));
        let waiting = live(&View {
            error: Some("no metrics at http://a:1/metrics".into()),
            ..View::default()
        });
        assert_eq!(
            waiting,
            "<p class=\"error\">Reading the agents failed: no metrics at http://a:1/metrics</p>\n\
             <p>Waiting for the first window…</p>\n"
        );
    }
}
