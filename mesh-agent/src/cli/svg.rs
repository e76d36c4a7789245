//! The service graph drawn as SVG, with no Graphviz: a layered layout (clients left,
//! what they call to the right, each node one column past its furthest caller; cycles
//! broken where a depth-first walk finds them), nodes ordered within a column by the
//! mean row of their callers, edges as curves coloured by health with their figures and
//! a lock where the traffic is mutual TLS.

use std::collections::{BTreeMap, HashMap};

use crate::cli::graph::{edge_colour, edge_figures, Graph, NodeKind};

const COLUMN: f64 = 320.0;
const ROW: f64 = 120.0;
const MARGIN_X: f64 = 90.0;
const MARGIN_TOP: f64 = 80.0;
const RADIUS: f64 = 24.0;

/// Node fills: workloads blue, Services purple, unknown peers grey.
pub fn node_colour(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Workload => "#4c78a8",
        NodeKind::Service => "#9467bd",
        NodeKind::Unknown => "#7f7f7f",
    }
}

/// Each node's column: 0 for nodes nobody calls, else one past the furthest caller,
/// over the edges that are not back edges of a depth-first walk (which would loop).
fn columns(ids: &[&str], edges: &[(usize, usize)]) -> Vec<usize> {
    let n = ids.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(from, to) in edges {
        out[from].push(to);
    }
    // 0 unvisited, 1 on the walk's stack, 2 done.
    let mut state = vec![0u8; n];
    let mut forward = Vec::new();
    for root in 0..n {
        if state[root] != 0 {
            continue;
        }
        let mut stack = vec![(root, 0usize)];
        state[root] = 1;
        while let Some((node, next)) = stack.pop() {
            if let Some(&to) = out[node].get(next) {
                stack.push((node, next + 1));
                match state[to] {
                    0 => {
                        forward.push((node, to));
                        state[to] = 1;
                        stack.push((to, 0));
                    }
                    2 => forward.push((node, to)),
                    _ => {}
                }
            } else {
                state[node] = 2;
            }
        }
    }
    // Longest path over the acyclic edges: at most n rounds.
    let mut column = vec![0usize; n];
    for _ in 0..n {
        let mut moved = false;
        for &(from, to) in &forward {
            if column[to] < column[from] + 1 {
                column[to] = column[from] + 1;
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    column
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The graph as a standalone SVG document.
pub fn render(graph: &Graph) -> String {
    let ids: Vec<&str> = graph.nodes.iter().map(|n| n.id.as_str()).collect();
    let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let links: Vec<(usize, usize)> = graph
        .edges
        .iter()
        .filter_map(|e| {
            Some((
                *index.get(e.source.as_str())?,
                *index.get(e.destination.as_str())?,
            ))
        })
        .collect();
    let column = columns(&ids, &links);
    // Rows: column by column, ordered by the mean row of the callers already placed.
    let mut row = vec![0f64; ids.len()];
    let mut by_column: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (node, c) in column.iter().enumerate() {
        by_column.entry(*c).or_default().push(node);
    }
    for members in by_column.values_mut() {
        let weight = |node: usize| {
            let callers: Vec<f64> = links
                .iter()
                .filter(|(from, to)| *to == node && column[*from] < column[node])
                .map(|(from, _)| row[*from])
                .collect();
            if callers.is_empty() {
                node as f64
            } else {
                callers.iter().sum::<f64>() / callers.len() as f64
            }
        };
        let mut weighted: Vec<(f64, usize)> = members.iter().map(|&n| (weight(n), n)).collect();
        weighted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (position, (_, node)) in weighted.iter().enumerate() {
            row[*node] = position as f64;
        }
        *members = weighted.into_iter().map(|(_, n)| n).collect();
    }
    let columns_used = by_column.len().max(1);
    let tallest = by_column.values().map(Vec::len).max().unwrap_or(0).max(1);
    let width = MARGIN_X * 2.0 + COLUMN * (columns_used - 1) as f64 + 120.0;
    let height = MARGIN_TOP + ROW * tallest as f64 + 20.0;
    let at = |node: usize| {
        (
            MARGIN_X + COLUMN * column[node] as f64,
            MARGIN_TOP + ROW * row[node],
        )
    };
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n\
         <text x=\"16\" y=\"24\" font-size=\"15\" font-weight=\"bold\">Service graph: {}, {:.1} s window</text>\n",
        crate::cli::graph::agents(graph.agents.len()),
        graph.window_seconds
    );
    if graph.edges.is_empty() {
        svg.push_str("<text x=\"16\" y=\"56\" fill=\"#555\">No traffic in the window.</text>\n");
    }
    for edge in &graph.edges {
        let (Some(&from), Some(&to)) = (
            index.get(edge.source.as_str()),
            index.get(edge.destination.as_str()),
        ) else {
            continue;
        };
        let ((x1, y1), (x2, y2)) = (at(from), at(to));
        let colour = edge_colour(edge);
        let (sx, ex) = if x2 > x1 {
            (x1 + RADIUS, x2 - RADIUS - 6.0)
        } else {
            (x1 - RADIUS, x2 + RADIUS + 6.0)
        };
        // A curve bowing down when both ends share a column (a call back or to itself).
        let bow = if (x2 - x1).abs() < 1.0 {
            ROW * 0.6
        } else {
            0.0
        };
        let mid = (sx + ex) / 2.0;
        svg.push_str(&format!(
            "<g class=\"edge\" data-source=\"{}\" data-destination=\"{}\">\n\
             <path d=\"M{sx:.1},{y1:.1} C{mid:.1},{:.1} {mid:.1},{:.1} {ex:.1},{y2:.1}\" fill=\"none\" \
             stroke=\"{colour}\" stroke-width=\"4\"/>\n\
             <polygon points=\"{ex:.1},{:.1} {:.1},{y2:.1} {ex:.1},{:.1}\" fill=\"{colour}\"/>\n",
            escape(&edge.source),
            escape(&edge.destination),
            y1 + bow,
            y2 + bow,
            y2 - 6.0,
            ex + if x2 > x1 { 9.0 } else { -9.0 },
            y2 + 6.0,
        ));
        // The figures above the curve's middle, a line each, the lock left of the first.
        let lines = edge_figures(edge);
        let (lx, ly) = (
            (sx + ex) / 2.0,
            (y1 + y2) / 2.0 + bow * 0.75 - 8.0 - 14.0 * (lines.len() - 1) as f64,
        );
        if edge.mutual_tls {
            let first = lines.first().map_or(0, |l| l.chars().count());
            let offset = first as f64 * 3.4 + 16.0;
            svg.push_str(&format!(
                "<g class=\"lock\" transform=\"translate({:.1},{:.1})\"><title>mutual TLS</title>\
                 <path d=\"M2,6 V4 a3,3 0 0 1 6,0 V6\" fill=\"none\" stroke=\"#333\" stroke-width=\"1.6\"/>\
                 <rect x=\"0\" y=\"6\" width=\"10\" height=\"8\" rx=\"1\" fill=\"#333\"/></g>\n",
                lx - offset,
                ly - 12.0
            ));
        }
        svg.push_str(&format!(
            "<text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"middle\" fill=\"#222\">"
        ));
        for (index, line) in lines.iter().enumerate() {
            svg.push_str(&format!(
                "<tspan x=\"{lx:.1}\" dy=\"{}\">{}</tspan>",
                if index == 0 { 0 } else { 14 },
                escape(line)
            ));
        }
        svg.push_str("</text>\n</g>\n");
    }
    for (node, info) in graph.nodes.iter().enumerate() {
        let (x, y) = at(node);
        let fill = node_colour(info.kind);
        let shape = match info.kind {
            NodeKind::Service => format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"6\" fill=\"{fill}\"/>",
                x - RADIUS,
                y - RADIUS,
                RADIUS * 2.0,
                RADIUS * 2.0
            ),
            _ => format!("<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{RADIUS}\" fill=\"{fill}\"/>"),
        };
        svg.push_str(&format!(
            "<g class=\"node\" data-id=\"{}\">{shape}\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{}</text></g>\n",
            escape(&info.id),
            y + RADIUS + 15.0,
            escape(&info.name),
            y + RADIUS + 29.0,
            escape(&info.namespace),
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_follow_callers_and_a_cycle_does_not_loop() {
        // a → s → b → s2 → c, and c → s (a call back).
        let ids = ["a", "s", "b", "s2", "c"];
        let edges = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 1)];
        assert_eq!(columns(&ids, &edges), vec![0, 1, 2, 3, 4]);
        // Two clients of one Service, one of them also called by the other.
        let ids = ["x", "y", "s"];
        assert_eq!(columns(&ids, &[(0, 2), (1, 2), (0, 1)]), vec![0, 1, 2]);
        // Nobody calls anybody.
        assert_eq!(columns(&["p", "q"], &[]), vec![0, 0]);
    }

    #[test]
    fn the_svg_has_every_node_and_edge_with_its_colours_and_lock() {
        use crate::cli::{
            graph::build,
            scrape::{parse, Window},
        };
        let text = "istio_requests_total{reporter=\"source\",source_workload=\"client-a\",\
            source_workload_namespace=\"demo\",destination_service=\"reviews.demo.svc.cluster.local\",\
            destination_service_name=\"reviews\",destination_service_namespace=\"demo\",\
            destination_workload=\"reviews-v2\",destination_workload_namespace=\"demo\",\
            response_code=\"500\",connection_security_policy=\"mutual_tls\"} 2\n";
        let graph = build(&[Window {
            url: "http://a:1/metrics".into(),
            seconds: 1.0,
            samples: parse(text).expect("parsed"),
        }]);
        let svg = render(&graph);
        assert!(
            svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""),
            "{svg}"
        );
        assert!(svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("class=\"node\"").count(), 3);
        assert_eq!(svg.matches("class=\"edge\"").count(), 2);
        assert_eq!(svg.matches("class=\"lock\"").count(), 2);
        assert!(svg.contains("fill=\"#4c78a8\""), "workloads");
        assert!(svg.contains("fill=\"#9467bd\""), "the Service");
        assert!(svg.contains("stroke=\"#d62728\""), "all errors: red");
        assert!(
            svg.contains(
                ">2.0 rps · 100.0% 5xx</tspan><tspan x=\"247.0\" dy=\"14\">p99 - ms</tspan>"
            ),
            "{svg}"
        );
        let empty = render(&build(&[]));
        assert!(empty.contains("No traffic in the window."), "{empty}");
    }
}
