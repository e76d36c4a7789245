//! Checks across objects, after every file is read, in the manner of `istioctl analyze`:
//! route weights, subsets, StringMatch one-ofs (errors); unresolved hosts, subsets without
//! a DestinationRule, selectors matching no pod, deprecated fields, and fields that are
//! parsed but not enforced yet (warnings). Each diagnostic names the field and its line.

use std::collections::{BTreeSet, HashSet};

use serde::Serialize;

use super::{
    cel, istio::*, mesh_config, mesh_policy::HttpLocalRateLimitPolicy, ClusterConfig, Diagnostic,
    Resource, Severity,
};

/// Where `match_labels` select workloads, in `namespace` (the root namespace: all).
use crate::config::DEFAULT_ROOT_NAMESPACE as ROOT_NAMESPACE;

pub fn validate(config: &mut ClusterConfig) {
    let mut found = Vec::new();
    let known_hosts = known_hosts(config);
    let istio = &config.istio;
    for vs in &istio.virtual_services {
        check_virtual_service(vs, config, &known_hosts, &mut found);
    }
    for dr in &istio.destination_rules {
        let host = fqdn(&dr.spec.host, dr.namespace());
        if !known_hosts.contains(&host) && !host.contains('*') {
            found.push(warning(
                dr,
                "spec.host",
                format!("host {host} is not a Service or ServiceEntry host of the given files"),
            ));
        }
        if let Some(selector) = &dr.spec.workload_selector {
            check_selector(
                dr,
                "spec.workloadSelector",
                &selector.match_labels,
                config,
                &mut found,
            );
        }
        deprecated_load_balancer(
            dr,
            "spec.trafficPolicy",
            dr.spec.traffic_policy.as_ref(),
            &mut found,
        );
        for (i, subset) in dr.spec.subsets.iter().enumerate() {
            deprecated_load_balancer(
                dr,
                &format!("spec.subsets[{i}].trafficPolicy"),
                subset.traffic_policy.as_ref(),
                &mut found,
            );
        }
    }
    for gateway in &istio.gateways {
        check_selector(
            gateway,
            "spec.selector",
            &gateway.spec.selector,
            config,
            &mut found,
        );
    }
    for se in &istio.service_entries {
        if let Some(selector) = &se.spec.workload_selector {
            check_selector(
                se,
                "spec.workloadSelector",
                &selector.labels,
                config,
                &mut found,
            );
        }
    }
    for sidecar in &istio.sidecars {
        if let Some(selector) = &sidecar.spec.workload_selector {
            check_selector(
                sidecar,
                "spec.workloadSelector",
                &selector.labels,
                config,
                &mut found,
            );
        }
    }
    for pa in &istio.peer_authentications {
        if let Some(selector) = &pa.spec.selector {
            check_selector(
                pa,
                "spec.selector",
                &selector.match_labels,
                config,
                &mut found,
            );
        }
    }
    for ra in &istio.request_authentications {
        check_jwt_rules(ra, &mut found);
        if let Some(selector) = &ra.spec.selector {
            check_selector(
                ra,
                "spec.selector",
                &selector.match_labels,
                config,
                &mut found,
            );
        }
    }
    for ap in &istio.authorization_policies {
        if let Some(selector) = &ap.spec.selector {
            check_selector(
                ap,
                "spec.selector",
                &selector.match_labels,
                config,
                &mut found,
            );
        }
        if ap.spec.action == Some(AuthorizationAction::Custom) {
            found.push(warning(ap, "spec.action", "CUSTOM (external authorizer) is not supported: the requests it selects will be denied".into()));
        }
        check_authorization_rules(ap, &mut found);
    }
    for telemetry in &istio.telemetries {
        if let Some(selector) = &telemetry.spec.selector {
            check_selector(
                telemetry,
                "spec.selector",
                &selector.match_labels,
                config,
                &mut found,
            );
        }
        check_metrics(telemetry, &mut found);
        check_access_logging(telemetry, config, &mut found);
        check_tracing(telemetry, config, &mut found);
    }
    for dr in &istio.destination_rules {
        check_destination_limits(dr, &mut found);
        check_failover_needs_outlier_detection(dr, &mut found);
    }
    let mut rate_limited_targets = HashSet::new();
    for policy in &config.mesh.http_local_rate_limits {
        check_local_rate_limit(policy, config, &mut rate_limited_targets, &mut found);
    }
    not_enforced(config, &mut found);
    config.diagnostics.extend(found);
}

fn diagnostic<T>(
    severity: Severity,
    resource: &Resource<T>,
    field: &str,
    message: String,
) -> Diagnostic {
    let line = locate(&resource.origin.text, field).map(|offset| resource.origin.line + offset);
    Diagnostic {
        severity,
        file: resource.origin.file.clone(),
        line: line.or(Some(resource.origin.line)),
        resource: Some(resource.describe()),
        field: Some(field.to_owned()),
        message,
    }
}

fn error<T>(resource: &Resource<T>, field: &str, message: String) -> Diagnostic {
    diagnostic(Severity::Error, resource, field, message)
}

fn warning<T>(resource: &Resource<T>, field: &str, message: String) -> Diagnostic {
    diagnostic(Severity::Warning, resource, field, message)
}

/// A host as Istio resolves it in `namespace`: a short name is a Service of that namespace.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') || host.contains('*') {
        host.to_owned()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

fn known_hosts(config: &ClusterConfig) -> HashSet<String> {
    let mut hosts: HashSet<String> = config
        .services
        .iter()
        .map(|s| {
            format!(
                "{}.{}.svc.cluster.local",
                s.metadata.name,
                s.metadata.namespace()
            )
        })
        .collect();
    for se in &config.istio.service_entries {
        hosts.extend(se.spec.hosts.iter().map(|h| fqdn(h, se.namespace())));
    }
    hosts
}

/// The VirtualService an `http` route of a VirtualService of `namespace` delegates to
/// (Istio's delegation, one level): it must exist among `virtual_services`, be exported
/// to `namespace`, have no hosts and delegate no further.
pub fn delegate_target<'a>(
    delegate: &Delegate,
    namespace: &str,
    virtual_services: &'a [Resource<VirtualService>],
) -> Result<&'a Resource<VirtualService>, String> {
    let delegate_namespace = delegate.namespace.as_deref().unwrap_or(namespace);
    let named = format!("{delegate_namespace}/{}", delegate.name);
    let target = virtual_services
        .iter()
        .find(|vs| vs.namespace() == delegate_namespace && vs.metadata.name == delegate.name)
        .filter(|vs| exported_to(vs, namespace))
        .ok_or_else(|| {
            format!("delegate {named}: no such VirtualService is visible to namespace {namespace}")
        })?;
    if !target.spec.hosts.is_empty() {
        return Err(format!(
            "delegate {named} has hosts: a delegate VirtualService has none"
        ));
    }
    if target.spec.http.iter().any(|r| r.delegate.is_some()) {
        return Err(format!(
            "delegate {named} delegates again: only one level of delegation is supported"
        ));
    }
    Ok(target)
}

/// Whether `vs`'s `exportTo` makes it visible to `namespace`.
fn exported_to(vs: &Resource<VirtualService>, namespace: &str) -> bool {
    let export = &vs.spec.export_to;
    export.is_empty()
        || export
            .iter()
            .any(|e| e == "*" || e == namespace || (e == "." && vs.namespace() == namespace))
}

fn check_virtual_service(
    vs: &Resource<VirtualService>,
    config: &ClusterConfig,
    known_hosts: &HashSet<String>,
    found: &mut Vec<Diagnostic>,
) {
    let mut destinations: Vec<(String, &Destination)> = Vec::new();
    for (i, route) in vs.spec.http.iter().enumerate() {
        let base = format!("spec.http[{i}]");
        check_weights(vs, &base, route.route.iter().map(|r| r.weight), found);
        for (j, r) in route.route.iter().enumerate() {
            destinations.push((format!("{base}.route[{j}].destination"), &r.destination));
        }
        if let Some(mirror) = &route.mirror {
            destinations.push((format!("{base}.mirror"), mirror));
        }
        for (j, m) in route.mirrors.iter().enumerate() {
            destinations.push((format!("{base}.mirrors[{j}].destination"), &m.destination));
        }
        for (j, m) in route.matches.iter().enumerate() {
            let at = format!("{base}.match[{j}]");
            for (field, value) in [
                ("uri", &m.uri),
                ("scheme", &m.scheme),
                ("method", &m.method),
                ("authority", &m.authority),
            ] {
                if let Some(value) = value {
                    check_string_match(vs, &format!("{at}.{field}"), value, found);
                }
            }
            for (field, map) in [
                ("headers", &m.headers),
                ("queryParams", &m.query_params),
                ("withoutHeaders", &m.without_headers),
            ] {
                for (key, value) in map {
                    check_string_match(vs, &format!("{at}.{field}.{key}"), value, found);
                }
            }
        }
        check_route_actions(vs, &base, route, found);
        if route.mirror_percent.is_some() {
            found.push(warning(
                vs,
                &format!("{base}.mirrorPercent"),
                "deprecated: use mirrorPercentage".into(),
            ));
        }
        if let Some(fault) = &route.fault {
            if fault.delay.as_ref().is_some_and(|d| d.percent.is_some()) {
                found.push(warning(
                    vs,
                    &format!("{base}.fault.delay.percent"),
                    "deprecated: use percentage".into(),
                ));
            }
            if fault.abort.as_ref().is_some_and(|a| a.percent.is_some()) {
                found.push(warning(
                    vs,
                    &format!("{base}.fault.abort.percent"),
                    "deprecated: use percentage".into(),
                ));
            }
        }
        if let Some(cors) = &route.cors_policy {
            if !cors.allow_origin.is_empty() {
                found.push(warning(
                    vs,
                    &format!("{base}.corsPolicy.allowOrigin"),
                    "deprecated: use allowOrigins".into(),
                ));
            }
            for (j, origin) in cors.allow_origins.iter().enumerate() {
                check_string_match(
                    vs,
                    &format!("{base}.corsPolicy.allowOrigins[{j}]"),
                    origin,
                    found,
                );
            }
        }
    }
    for (i, route) in vs.spec.tls.iter().enumerate() {
        if route.matches.is_empty() {
            found.push(error(
                vs,
                &format!("spec.tls[{i}]"),
                "a tls route needs a match block with sniHosts".into(),
            ));
        }
        for (j, m) in route.matches.iter().enumerate() {
            if m.sni_hosts.is_empty() {
                found.push(error(
                    vs,
                    &format!("spec.tls[{i}].match[{j}]"),
                    "sniHosts is required in a tls route".into(),
                ));
            }
        }
    }
    for (i, route) in vs.spec.http.iter().enumerate() {
        if let Some(delegate) = &route.delegate {
            if let Err(problem) =
                delegate_target(delegate, vs.namespace(), &config.istio.virtual_services)
            {
                // Another namespace's change can break a delegation: only this route is
                // left out (as Istio drops it), the VirtualService is kept.
                found.push(warning(
                    vs,
                    &format!("spec.http[{i}].delegate"),
                    format!("{problem}; this route is left out"),
                ));
            }
        }
    }
    for (kind, routes) in [
        (
            "tcp",
            vs.spec.tcp.iter().map(|r| &r.route).collect::<Vec<_>>(),
        ),
        ("tls", vs.spec.tls.iter().map(|r| &r.route).collect()),
    ] {
        for (i, route) in routes.into_iter().enumerate() {
            let base = format!("spec.{kind}[{i}]");
            check_weights(vs, &base, route.iter().map(|r| r.weight), found);
            for (j, r) in route.iter().enumerate() {
                destinations.push((format!("{base}.route[{j}].destination"), &r.destination));
            }
        }
    }
    for (field, destination) in destinations {
        let host = fqdn(&destination.host, vs.namespace());
        if !host.contains('*') && !known_hosts.contains(&host) {
            found.push(warning(
                vs,
                &format!("{field}.host"),
                format!("host {host} is not a Service or ServiceEntry host of the given files"),
            ));
        }
        let Some(subset) = &destination.subset else {
            continue;
        };
        let rules: Vec<&Resource<DestinationRule>> = config
            .istio
            .destination_rules
            .iter()
            .filter(|dr| fqdn(&dr.spec.host, dr.namespace()) == host)
            .collect();
        if rules.is_empty() {
            found.push(warning(vs, &format!("{field}.subset"), format!("subset {subset} of {host}: no DestinationRule for this host in the given files")));
        } else if !rules
            .iter()
            .any(|dr| dr.spec.subsets.iter().any(|s| &s.name == subset))
        {
            let names: Vec<String> = rules.iter().map(|dr| dr.describe()).collect();
            found.push(error(
                vs,
                &format!("{field}.subset"),
                format!(
                    "subset {subset} is not defined for {host} (see {})",
                    names.join(", ")
                ),
            ));
        }
    }
}

/// What an `http` route asks of the proxy, checked as the router will read it: retry
/// conditions, statuses, header names and values.
fn check_route_actions(
    vs: &Resource<VirtualService>,
    base: &str,
    route: &HttpRoute,
    found: &mut Vec<Diagnostic>,
) {
    if let Some(retries) = &route.retries {
        if let Some(text) = &retries.retry_on {
            if let Err(e) = RetryOn::parse(text) {
                found.push(error(vs, &format!("{base}.retries.retryOn"), e));
            }
        }
        if retries.attempts.unwrap_or(0) <= 0 && retries.per_try_timeout.is_some() {
            found.push(error(
                vs,
                &format!("{base}.retries.perTryTimeout"),
                "a per-try timeout needs attempts of at least 1".into(),
            ));
        }
    }
    let set_actions = [
        !route.route.is_empty(),
        route.redirect.is_some(),
        route.direct_response.is_some(),
        route.delegate.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set_actions > 1 {
        found.push(error(
            vs,
            base,
            "only one of route, redirect, directResponse and delegate may be set".into(),
        ));
    }
    if let Some(code) = route.redirect.as_ref().and_then(|r| r.redirect_code) {
        if !(300..400).contains(&code) {
            found.push(error(
                vs,
                &format!("{base}.redirect.redirectCode"),
                format!("{code} is not a redirection status (3xx)"),
            ));
        }
    }
    if let Some(direct) = &route.direct_response {
        if !(200..600).contains(&direct.status) {
            found.push(error(
                vs,
                &format!("{base}.directResponse.status"),
                format!("{} is not an HTTP status", direct.status),
            ));
        }
    }
    if let Some(abort) = route.fault.as_ref().and_then(|f| f.abort.as_ref()) {
        let field = format!("{base}.fault.abort");
        match (abort.http_status, abort.grpc_status.as_deref()) {
            (Some(status), _) if !(200..600).contains(&status) => found.push(error(
                vs,
                &format!("{field}.httpStatus"),
                format!("{status} is not an HTTP status"),
            )),
            (None, Some(name)) if grpc_code(name).is_none() => found.push(error(
                vs,
                &format!("{field}.grpcStatus"),
                format!("{name:?} is not a gRPC status"),
            )),
            (None, None) if abort.http2_error.is_none() => found.push(error(
                vs,
                &field,
                "an abort needs httpStatus or grpcStatus".into(),
            )),
            _ => {}
        }
    }
    let mut operations = vec![(format!("{base}.headers"), route.headers.as_ref())];
    for (j, r) in route.route.iter().enumerate() {
        operations.push((format!("{base}.route[{j}].headers"), r.headers.as_ref()));
    }
    for (field, headers) in operations {
        let Some(headers) = headers else { continue };
        for (side, ops) in [
            ("request", &headers.request),
            ("response", &headers.response),
        ] {
            let Some(ops) = ops else { continue };
            let names = ops
                .set
                .keys()
                .chain(ops.add.keys())
                .chain(ops.remove.iter());
            for name in names {
                if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
                    found.push(error(
                        vs,
                        &format!("{field}.{side}"),
                        format!("{name:?} is not a header name"),
                    ));
                }
            }
            for value in ops.set.values().chain(ops.add.values()) {
                if http::HeaderValue::from_str(value).is_err() {
                    found.push(error(
                        vs,
                        &format!("{field}.{side}"),
                        format!("{value:?} is not a header value"),
                    ));
                }
            }
        }
    }
}

fn check_weights(
    vs: &Resource<VirtualService>,
    base: &str,
    weights: impl Iterator<Item = Option<i32>>,
    found: &mut Vec<Diagnostic>,
) {
    let weights: Vec<Option<i32>> = weights.collect();
    for (j, weight) in weights.iter().enumerate() {
        if weight.is_some_and(|w| !(0..=100).contains(&w)) {
            found.push(error(
                vs,
                &format!("{base}.route[{j}].weight"),
                "weight must be between 0 and 100".into(),
            ));
            return;
        }
    }
    if weights.len() > 1 {
        let total: i32 = weights.iter().map(|w| w.unwrap_or(0)).sum();
        if total != 100 {
            found.push(error(
                vs,
                &format!("{base}.route"),
                format!("route weights sum to {total}, not 100"),
            ));
        }
    }
}

fn check_string_match<T>(
    resource: &Resource<T>,
    field: &str,
    value: &StringMatch,
    found: &mut Vec<Diagnostic>,
) {
    let set = [
        value.exact.is_some(),
        value.prefix.is_some(),
        value.regex.is_some(),
    ]
    .iter()
    .filter(|s| **s)
    .count();
    if set > 1 {
        found.push(error(
            resource,
            field,
            "exactly one of exact, prefix and regex may be set".into(),
        ));
    }
}

fn check_selector<T>(
    resource: &Resource<T>,
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
    config: &ClusterConfig,
    found: &mut Vec<Diagnostic>,
) {
    if labels.is_empty() {
        return;
    }
    let namespace = resource.namespace();
    let matches_pod = config.pods.iter().any(|pod| {
        (namespace == ROOT_NAMESPACE || pod.metadata.namespace() == namespace)
            && labels
                .iter()
                .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
    });
    let matches_entry = config.istio.workload_entries.iter().any(|we| {
        (namespace == ROOT_NAMESPACE || we.namespace() == namespace)
            && labels.iter().all(|(k, v)| we.spec.labels.get(k) == Some(v))
    });
    if !matches_pod && !matches_entry {
        found.push(warning(
            resource,
            field,
            "the selector matches no pod or WorkloadEntry of the given files".into(),
        ));
    }
}

fn deprecated_load_balancer(
    dr: &Resource<DestinationRule>,
    base: &str,
    policy: Option<&TrafficPolicy>,
    found: &mut Vec<Diagnostic>,
) {
    let Some(policy) = policy else {
        return;
    };
    if let Some(lb) = &policy.load_balancer {
        if lb.simple == Some(SimpleLb::LeastConn) {
            found.push(warning(
                dr,
                &format!("{base}.loadBalancer.simple"),
                "LEAST_CONN is deprecated: use LEAST_REQUEST".into(),
            ));
        }
        if lb
            .consistent_hash
            .as_ref()
            .is_some_and(|c| c.minimum_ring_size.is_some())
        {
            found.push(warning(
                dr,
                &format!("{base}.loadBalancer.consistentHash.minimumRingSize"),
                "deprecated: use ringHash.minimumRingSize".into(),
            ));
        }
    }
    if policy
        .outlier_detection
        .as_ref()
        .is_some_and(|o| o.consecutive_errors.is_some())
    {
        found.push(warning(
            dr,
            &format!("{base}.outlierDetection.consecutiveErrors"),
            "deprecated: use consecutive5xxErrors".into(),
        ));
    }
}

fn check_authorization_rules(
    ap: &Resource<crate::config::istio::AuthorizationPolicy>,
    found: &mut Vec<Diagnostic>,
) {
    for (r, rule) in ap.spec.rules.iter().enumerate() {
        for (c, condition) in rule.when.iter().enumerate() {
            let field = format!("spec.rules[{r}].when[{c}]");
            if let Err(err) = crate::config::condition::ConditionKey::parse(&condition.key) {
                found.push(error(ap, &format!("{field}.key"), err.to_string()));
            }
            if condition.values.is_empty() && condition.not_values.is_empty() {
                found.push(error(
                    ap,
                    &field,
                    "a condition needs values or notValues".into(),
                ));
            }
        }
        for (t, to) in rule.to.iter().enumerate() {
            let operation = &to.operation;
            for (list, name) in [
                (&operation.ports, "ports"),
                (&operation.not_ports, "notPorts"),
            ] {
                for (i, port) in list.iter().enumerate() {
                    if port.trim().parse::<u16>().is_err() {
                        found.push(error(
                            ap,
                            &format!("spec.rules[{r}].to[{t}].operation.{name}[{i}]"),
                            format!("{port:?} is not a port number"),
                        ));
                    }
                }
            }
            for (list, name) in [
                (&operation.paths, "paths"),
                (&operation.not_paths, "notPaths"),
            ] {
                for (i, path) in list.iter().enumerate() {
                    if path != "*" && !path.starts_with('/') && !path.starts_with('*') {
                        found.push(error(
                            ap,
                            &format!("spec.rules[{r}].to[{t}].operation.{name}[{i}]"),
                            format!("{path:?} must start with '/' (or be a '*' suffix match)"),
                        ));
                    }
                }
            }
        }
    }
}

fn check_jwt_rules(
    ra: &Resource<crate::config::istio::RequestAuthentication>,
    found: &mut Vec<Diagnostic>,
) {
    for (index, rule) in ra.spec.jwt_rules.iter().enumerate() {
        let field = format!("spec.jwtRules[{index}]");
        if rule.issuer.is_empty() {
            found.push(error(
                ra,
                &format!("{field}.issuer"),
                "issuer is required".into(),
            ));
        }
        match (&rule.jwks, &rule.jwks_uri) {
            (Some(jwks), _) => {
                if let Err(err) = crate::config::jwks::parse_jwks(jwks) {
                    found.push(error(
                        ra,
                        &format!("{field}.jwks"),
                        crate::errors::describe(&err),
                    ));
                }
            }
            (None, Some(uri)) => {
                let scheme = uri.split_once("://").map(|(s, _)| s);
                if !matches!(scheme, Some("http" | "https")) {
                    found.push(error(
                        ra,
                        &format!("{field}.jwksUri"),
                        format!("{uri:?} is not an http or https URL"),
                    ));
                }
            }
            (None, None) => found.push(error(
                ra,
                &field,
                "one of jwks or jwksUri is required".into(),
            )),
        }
    }
}

/// A value the mesh cannot use: its field, below the block that holds it, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSetting {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for InvalidSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

fn check_percent(value: Option<i32>, field: &'static str) -> Result<(), InvalidSetting> {
    match value {
        Some(v) if !(0..=100).contains(&v) => Err(InvalidSetting {
            field,
            message: format!("{v} is not a percentage (0 to 100)"),
        }),
        _ => Ok(()),
    }
}

/// Istio's lower bound for `interval`, `baseEjectionTime` and `connectTimeout`.
fn check_at_least_1ms(value: Option<&Duration>, field: &'static str) -> Result<(), InvalidSetting> {
    match value {
        Some(d) if d.value < std::time::Duration::from_millis(1) => Err(InvalidSetting {
            field,
            message: format!("{:?} is shorter than 1ms", d.text),
        }),
        _ => Ok(()),
    }
}

fn check_not_negative(value: Option<i32>, field: &'static str) -> Result<(), InvalidSetting> {
    match value {
        Some(n) if n < 0 => Err(InvalidSetting {
            field,
            message: format!("{n} is negative"),
        }),
        _ => Ok(()),
    }
}

/// An `outlierDetection` block's values, as Istio's validation checks them.
pub fn check_outlier_detection(detection: &OutlierDetection) -> Result<(), InvalidSetting> {
    check_not_negative(detection.consecutive_errors, "consecutiveErrors")?;
    check_at_least_1ms(detection.interval.as_ref(), "interval")?;
    check_at_least_1ms(detection.base_ejection_time.as_ref(), "baseEjectionTime")?;
    check_percent(detection.max_ejection_percent, "maxEjectionPercent")?;
    check_percent(detection.min_health_percent, "minHealthPercent")
}

/// A `connectionPool` block's values, as Istio's validation checks them.
pub fn check_connection_pool(pool: &ConnectionPoolSettings) -> Result<(), InvalidSetting> {
    if let Some(tcp) = &pool.tcp {
        check_not_negative(tcp.max_connections, "tcp.maxConnections")?;
        check_at_least_1ms(tcp.connect_timeout.as_ref(), "tcp.connectTimeout")?;
    }
    if let Some(http) = &pool.http {
        check_not_negative(
            http.http1_max_pending_requests,
            "http.http1MaxPendingRequests",
        )?;
        check_not_negative(http.http2_max_requests, "http.http2MaxRequests")?;
        check_not_negative(
            http.max_requests_per_connection,
            "http.maxRequestsPerConnection",
        )?;
        check_not_negative(http.max_retries, "http.maxRetries")?;
        check_not_negative(http.max_concurrent_streams, "http.maxConcurrentStreams")?;
    }
    Ok(())
}

/// The largest ring and Maglev table an agent builds. Envoy allows 8M ring points and a
/// 5,000,011-entry table per proxy; a node agent builds one per Service port and subset
/// on every node, again on each configuration change, so it keeps to 2^17 (a ring of
/// 16 bytes a point: 2 MiB), far above Istio's defaults (1024, 65537).
pub const MAX_RING_SIZE: u64 = 1 << 17;
pub const MAX_MAGLEV_SIZE: u64 = 131_071;

/// Whether `n` is prime (trial division; `d <= n / d` cannot overflow, and callers bound
/// `n` first).
pub fn is_prime(n: u64) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| *d <= n / d)
            .all(|d| !n.is_multiple_of(d))
}

/// Why a locality (`region`, `region/zone`, `region/zone/subzone`, a trailing `*` part
/// matching any) is refused.
pub fn check_locality(pattern: &str) -> Result<(), String> {
    let parts: Vec<&str> = pattern.split('/').collect();
    if pattern.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{pattern:?} is not a locality: region, region/zone or region/zone/subzone"
        ));
    }
    let wildcard = parts.iter().position(|p| p.contains('*'));
    if wildcard.is_some_and(|at| parts[at] != "*" || at != parts.len() - 1) {
        return Err(format!(
            "{pattern:?}: a wildcard '*' must be a whole part, and the last one"
        ));
    }
    Ok(())
}

/// A `loadBalancer` block's values, as Istio's validation and Envoy check them: one
/// policy, one hash key, one hash table (a Maglev size prime and at most Envoy's
/// largest), a usable cookie or header name, and a `localityLbSetting` that is either
/// `distribute` (weights of 100 in all per source, localities well formed) or `failover`
/// (between different regions). Each error is `(field below the block, message)`.
pub fn check_load_balancer(lb: &LoadBalancerSettings) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mut error = |field: &str, message: String| errors.push((field.to_owned(), message));
    if let Some(hash) = &lb.consistent_hash {
        if lb.simple.is_some() {
            error(
                "simple",
                "simple and consistentHash are alternatives: set one".into(),
            );
        }
        let keys = [
            hash.http_header_name.is_some(),
            hash.http_cookie.is_some(),
            hash.use_source_ip.is_some(),
            hash.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            error(
                "consistentHash",
                "httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName are \
                 alternatives: set one"
                    .into(),
            );
        }
        if let Some(name) = &hash.http_header_name {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                error(
                    "consistentHash.httpHeaderName",
                    format!("{name:?} is not a header name"),
                );
            }
        }
        if let Some(cookie) = &hash.http_cookie {
            let token = |c: char| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c);
            if cookie.name.is_empty() || !cookie.name.chars().all(token) {
                error(
                    "consistentHash.httpCookie.name",
                    format!("{:?} is not a cookie name", cookie.name),
                );
            }
        }
        if hash.ring_hash.is_some() && hash.maglev.is_some() {
            error(
                "consistentHash",
                "ringHash and maglev are alternatives: set one".into(),
            );
        }
        if let Some(size) = hash.maglev.as_ref().and_then(|m| m.table_size) {
            if size > MAX_MAGLEV_SIZE || !is_prime(size) {
                error(
                    "consistentHash.maglev.tableSize",
                    format!(
                        "{size} is not a prime number up to {} (the agent's largest Maglev table)",
                        MAX_MAGLEV_SIZE
                    ),
                );
            }
        }
        let ring_sizes = [
            (
                "consistentHash.ringHash.minimumRingSize",
                hash.ring_hash.as_ref().and_then(|r| r.minimum_ring_size),
            ),
            ("consistentHash.minimumRingSize", hash.minimum_ring_size),
        ];
        for (field, size) in ring_sizes {
            if let Some(size) = size.filter(|s| *s > MAX_RING_SIZE) {
                error(
                    field,
                    format!("{size} is over the agent's largest ring, {}", MAX_RING_SIZE),
                );
            }
        }
    }
    if let Some(warmup) = &lb.warmup {
        if warmup.duration.is_none() {
            error("warmup.duration", "a warmup needs its duration".into());
        }
        if let Some(percent) = warmup
            .minimum_percent
            .filter(|p| !(0.0..=100.0).contains(p))
        {
            error(
                "warmup.minimumPercent",
                format!("{percent} is not a percentage (0 to 100)"),
            );
        }
        if let Some(aggression) = warmup.aggression.filter(|a| *a <= 0.0) {
            error("warmup.aggression", format!("{aggression} is not positive"));
        }
    }
    let Some(setting) = &lb.locality_lb_setting else {
        return errors;
    };
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        error(
            "localityLbSetting",
            "distribute and failover are alternatives: set one".into(),
        );
    }
    for (i, d) in setting.distribute.iter().enumerate() {
        let at = format!("localityLbSetting.distribute[{i}]");
        if let Err(why) = check_locality(&d.from) {
            error(&format!("{at}.from"), why);
        }
        for to in d.to.keys() {
            if let Err(why) = check_locality(to) {
                error(&format!("{at}.to.{to}"), why);
            }
        }
        let total: u64 = d.to.values().map(|w| u64::from(*w)).sum();
        if total != 100 {
            error(
                &format!("{at}.to"),
                format!("the weights from {} add up to {total}, not 100", d.from),
            );
        }
    }
    for (i, f) in setting.failover.iter().enumerate() {
        let at = format!("localityLbSetting.failover[{i}]");
        for (field, region) in [("from", &f.from), ("to", &f.to)] {
            if region.is_empty() || region.contains('/') || region.contains('*') {
                error(
                    &format!("{at}.{field}"),
                    format!("{region:?} is not a region: failover is between regions"),
                );
            }
        }
        if f.from == f.to {
            error(
                &format!("{at}.to"),
                format!("failover from {} to itself: name another region", f.from),
            );
        }
    }
    for (i, label) in setting.failover_priority.iter().enumerate() {
        let name = label.split_once('=').map_or(label.as_str(), |(n, _)| n);
        if name.is_empty() {
            error(
                &format!("localityLbSetting.failoverPriority[{i}]"),
                format!("{label:?} names no label"),
            );
        }
    }
    errors
}

/// Istio fails over between localities only where outlier detection can move traffic:
/// a `failover` or `failoverPriority` whose cluster has no `outlierDetection` (at its
/// level or inherited from the rule's) is a warning.
fn check_failover_needs_outlier_detection(
    dr: &Resource<DestinationRule>,
    found: &mut Vec<Diagnostic>,
) {
    let top_detects = dr
        .spec
        .traffic_policy
        .as_ref()
        .is_some_and(|p| p.outlier_detection.is_some());
    type Level<'a> = (String, Option<&'a LoadBalancerSettings>, bool);
    fn add<'a>(
        levels: &mut Vec<Level<'a>>,
        base: String,
        policy: &'a TrafficPolicy,
        inherited: bool,
    ) {
        let detects = inherited || policy.outlier_detection.is_some();
        levels.push((base.clone(), policy.load_balancer.as_ref(), detects));
        for (j, port) in policy.port_level_settings.iter().enumerate() {
            levels.push((
                format!("{base}.portLevelSettings[{j}]"),
                port.load_balancer.as_ref(),
                port.outlier_detection.is_some(),
            ));
        }
    }
    let mut levels = Vec::new();
    if let Some(policy) = &dr.spec.traffic_policy {
        add(&mut levels, "spec.trafficPolicy".into(), policy, false);
    }
    for (i, subset) in dr.spec.subsets.iter().enumerate() {
        if let Some(policy) = &subset.traffic_policy {
            add(
                &mut levels,
                format!("spec.subsets[{i}].trafficPolicy"),
                policy,
                top_detects,
            );
        }
    }
    for (at, lb, detects) in levels {
        let Some(setting) = lb.and_then(|lb| lb.locality_lb_setting.as_ref()) else {
            continue;
        };
        let fails_over = !setting.failover.is_empty() || !setting.failover_priority.is_empty();
        if fails_over && !detects && setting.enabled != Some(false) {
            found.push(warning(
                dr,
                &format!("{at}.loadBalancer.localityLbSetting"),
                "failover applies only with outlierDetection, as in Istio: set it on this \
                 cluster"
                    .into(),
            ));
        }
    }
}

/// `outlierDetection`, `connectionPool` and `loadBalancer` values the model cannot use
/// (negative counts, percentages over 100, durations under 1 ms, the checks of
/// [`check_load_balancer`]), wherever a DestinationRule sets them.
fn check_destination_limits(dr: &Resource<DestinationRule>, found: &mut Vec<Diagnostic>) {
    let mut policies: Vec<(String, &TrafficPolicy)> = Vec::new();
    if let Some(policy) = &dr.spec.traffic_policy {
        policies.push(("spec.trafficPolicy".into(), policy));
    }
    for (i, subset) in dr.spec.subsets.iter().enumerate() {
        if let Some(policy) = &subset.traffic_policy {
            policies.push((format!("spec.subsets[{i}].trafficPolicy"), policy));
        }
    }
    for (base, policy) in policies {
        let port_levels = policy.port_level_settings.iter().enumerate().map(|(j, p)| {
            (
                format!("{base}.portLevelSettings[{j}]"),
                p.outlier_detection.as_ref(),
                p.connection_pool.as_ref(),
                p.load_balancer.as_ref(),
            )
        });
        let own = std::iter::once((
            base.clone(),
            policy.outlier_detection.as_ref(),
            policy.connection_pool.as_ref(),
            policy.load_balancer.as_ref(),
        ));
        for (at, outlier, pool, lb) in own.chain(port_levels) {
            for (field, message) in lb.map(check_load_balancer).unwrap_or_default() {
                found.push(error(dr, &format!("{at}.loadBalancer.{field}"), message));
            }
            if let Some(Err(invalid)) = outlier.map(check_outlier_detection) {
                let field = format!("{at}.outlierDetection.{}", invalid.field);
                found.push(error(dr, &field, invalid.message));
            }
            if let Some(Err(invalid)) = pool.map(check_connection_pool) {
                let field = format!("{at}.connectionPool.{}", invalid.field);
                found.push(error(dr, &field, invalid.message));
            }
        }
    }
}

/// An `HTTPLocalRateLimitPolicy`: one target (an existing Service, or a selector), each
/// at most once; positive rates and bursts, client limits within the total; overrides
/// naming service accounts.
/// A `tagOverrides` entry: a Prometheus label name, and for an upsert a CEL value.
fn check_metrics(telemetry: &Resource<Telemetry>, found: &mut Vec<Diagnostic>) {
    for (i, entry) in telemetry.spec.metrics.iter().enumerate() {
        for (j, over) in entry.overrides.iter().enumerate() {
            for (label, tag) in &over.tag_overrides {
                let at = format!("spec.metrics[{i}].overrides[{j}].tagOverrides.{label}");
                if let Err(err) = check_label_name(label) {
                    found.push(error(telemetry, &at, err));
                }
                match (tag.operation.unwrap_or(TagOperation::Upsert), &tag.value) {
                    (TagOperation::Upsert, None) => found.push(error(
                        telemetry,
                        &format!("{at}.value"),
                        "UPSERT needs a value (a CEL expression, e.g. request.host or \"literal\")"
                            .into(),
                    )),
                    (TagOperation::Upsert, Some(value)) => {
                        if let Err(err) = cel::compile(value) {
                            found.push(error(telemetry, &format!("{at}.value"), err));
                        }
                    }
                    (TagOperation::Remove, Some(_)) => found.push(warning(
                        telemetry,
                        &format!("{at}.value"),
                        "REMOVE takes no value: it is ignored".into(),
                    )),
                    (TagOperation::Remove, None) => {}
                }
            }
        }
    }
}

/// Whether `name` may be a Prometheus label: `[a-zA-Z_][a-zA-Z0-9_]*`, not `__`-prefixed
/// (reserved).
fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let starts = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !starts || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
        ));
    }
    if name.starts_with("__") {
        return Err(format!(
            "{name:?} starts with __, which Prometheus reserves"
        ));
    }
    Ok(())
}

/// An access log filter must be CEL; a provider must be one MeshConfig defines.
fn check_access_logging(
    telemetry: &Resource<Telemetry>,
    config: &ClusterConfig,
    found: &mut Vec<Diagnostic>,
) {
    let known = config.mesh_config.access_log_providers();
    for (i, entry) in telemetry.spec.access_logging.iter().enumerate() {
        for (j, provider) in entry.providers.iter().enumerate() {
            if !known.contains(&provider.name.as_str()) {
                found.push(warning(
                    telemetry,
                    &format!("spec.accessLogging[{i}].providers[{j}].name"),
                    format!(
                        "no access log provider {:?} in the MeshConfig (ConfigMap istio-system/istio; known: {}): nothing is logged for it",
                        provider.name,
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    ),
                ));
            }
        }
        if let Some(filter) = &entry.filter {
            if let Err(err) = cel::compile(&filter.expression) {
                found.push(error(
                    telemetry,
                    &format!("spec.accessLogging[{i}].filter.expression"),
                    err,
                ));
            }
        }
    }
}

/// A tracing entry: a sampling percentage, one provider MeshConfig defines as
/// `opentelemetry` (a `zipkin` one is reported as unsupported), custom tags with exactly
/// one source and a valid header name.
fn check_tracing(
    telemetry: &Resource<Telemetry>,
    config: &ClusterConfig,
    found: &mut Vec<Diagnostic>,
) {
    let mesh = &config.mesh_config;
    for (i, entry) in telemetry.spec.tracing.iter().enumerate() {
        let at = |field: &str| format!("spec.tracing[{i}].{field}");
        if let Some(percentage) = entry.random_sampling_percentage {
            if let Err(err) = mesh_config::check_percentage(percentage) {
                found.push(error(telemetry, &at("randomSamplingPercentage"), err));
            }
        }
        if entry.providers.len() > 1 {
            found.push(warning(
                telemetry,
                &at("providers"),
                "only one tracing provider is supported (as in Istio): the first is used".into(),
            ));
        }
        for (j, provider) in entry.providers.iter().enumerate() {
            let defined = mesh.tracing_providers().find(|p| p.name == provider.name);
            let problem = match defined {
                None => Some(format!(
                    "no tracing provider {:?} in the MeshConfig (ConfigMap istio-system/istio; known: {}): no spans are reported for it",
                    provider.name,
                    {
                        let known: Vec<&str> = mesh.tracing_providers().map(|p| p.name.as_str()).collect();
                        if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                    }
                )),
                Some(p) if p.opentelemetry.is_none() => Some(format!(
                    "provider {:?} is a zipkin provider, which is not supported: only opentelemetry (OTLP) is; no spans are reported for it",
                    provider.name
                )),
                Some(_) => None,
            };
            if let Some(message) = problem {
                found.push(warning(
                    telemetry,
                    &at(&format!("providers[{j}].name")),
                    message,
                ));
            }
        }
        for (tag, custom) in &entry.custom_tags {
            let field = at(&format!("customTags.{tag}"));
            let sources = [
                custom.literal.is_some(),
                custom.environment.is_some(),
                custom.header.is_some(),
            ]
            .into_iter()
            .filter(|set| *set)
            .count();
            if sources != 1 {
                found.push(error(
                    telemetry,
                    &field,
                    "set exactly one of literal, environment and header".into(),
                ));
            }
            if let Some(header) = &custom.header {
                if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
                    found.push(error(
                        telemetry,
                        &format!("{field}.header.name"),
                        format!("{:?} is not a header name", header.name),
                    ));
                }
            }
            if custom
                .environment
                .as_ref()
                .is_some_and(|env| env.name.is_empty())
            {
                found.push(error(
                    telemetry,
                    &format!("{field}.environment.name"),
                    "names no environment variable".into(),
                ));
            }
        }
    }
}

fn check_local_rate_limit(
    policy: &Resource<HttpLocalRateLimitPolicy>,
    config: &ClusterConfig,
    targets: &mut HashSet<String>,
    found: &mut Vec<Diagnostic>,
) {
    let spec = &policy.spec;
    let namespace = policy.namespace();
    match (&spec.target_ref, &spec.selector) {
        (Some(_), Some(_)) => found.push(error(
            policy,
            "spec.selector",
            "set targetRef or selector, not both".into(),
        )),
        (None, None) => found.push(error(
            policy,
            "spec",
            "a target is required: targetRef (a Service) or selector".into(),
        )),
        (Some(target), None) => {
            let service_namespace = target.namespace.as_deref().unwrap_or(namespace);
            if target.kind != "Service"
                || !matches!(target.group.as_deref(), None | Some("" | "core"))
            {
                found.push(error(
                    policy,
                    "spec.targetRef.kind",
                    format!(
                        "{:?} cannot be limited: the target must be a Service",
                        target.kind
                    ),
                ));
            } else if service_namespace != namespace {
                found.push(error(
                    policy,
                    "spec.targetRef.namespace",
                    "the Service must be in the policy's namespace".into(),
                ));
            } else if !config
                .services
                .iter()
                .any(|s| s.metadata.name == target.name && s.metadata.namespace() == namespace)
            {
                found.push(error(
                    policy,
                    "spec.targetRef.name",
                    format!(
                        "Service {namespace}/{} is not defined in the given files",
                        target.name
                    ),
                ));
            }
            let key = format!("Service {namespace}/{}", target.name);
            if !targets.insert(key.clone()) {
                found.push(error(
                    policy,
                    "spec.targetRef",
                    format!("{key} is already the target of another HTTPLocalRateLimitPolicy; this one is ignored"),
                ));
            }
        }
        (None, Some(selector)) => {
            check_selector(
                policy,
                "spec.selector",
                &selector.match_labels,
                config,
                found,
            );
        }
    }
    if spec.total.is_none() && spec.identity.is_none() && spec.overrides.is_empty() {
        found.push(warning(
            policy,
            "spec",
            "no total, identity or overrides: the policy limits nothing".into(),
        ));
    }
    // Only a valid total bounds the others (an invalid one has its own error).
    let total = spec
        .total
        .as_ref()
        .map(|t| t.requests_per_second)
        .filter(|rate| *rate >= 1);
    let mut check_rate = |field: String, requests_per_second: i64, burst: Option<i64>| {
        if requests_per_second < 1 {
            found.push(error(
                policy,
                &format!("{field}.requestsPerSecond"),
                format!("{requests_per_second} is not a rate: it must be at least 1"),
            ));
        } else if requests_per_second > i64::from(u32::MAX) {
            found.push(error(
                policy,
                &format!("{field}.requestsPerSecond"),
                format!("{requests_per_second} is more than {}", u32::MAX),
            ));
        } else if total.is_some_and(|total| requests_per_second > total) {
            found.push(error(
                policy,
                &format!("{field}.requestsPerSecond"),
                format!("{requests_per_second} is above total.requestsPerSecond"),
            ));
        }
        if let Some(burst) = burst.filter(|b| !(1..=i64::from(u32::MAX)).contains(b)) {
            found.push(error(
                policy,
                &format!("{field}.burst"),
                format!(
                    "{burst} is not a burst: it must be at least 1 (and at most {})",
                    u32::MAX
                ),
            ));
        }
    };
    if let Some(limit) = &spec.total {
        check_rate("spec.total".into(), limit.requests_per_second, limit.burst);
    }
    if let Some(limit) = &spec.identity {
        check_rate(
            "spec.identity".into(),
            limit.requests_per_second,
            limit.burst,
        );
    }
    for (i, entry) in spec.overrides.iter().enumerate() {
        check_rate(
            format!("spec.overrides[{i}]"),
            entry.requests_per_second,
            entry.burst,
        );
    }
    for (i, entry) in spec.overrides.iter().enumerate() {
        if entry.client_refs.is_empty() {
            found.push(error(
                policy,
                &format!("spec.overrides[{i}].clientRefs"),
                "an override needs at least one client".into(),
            ));
        }
        for (j, client) in entry.client_refs.iter().enumerate() {
            let field = format!("spec.overrides[{i}].clientRefs[{j}]");
            if client.kind != "ServiceAccount" {
                found.push(error(
                    policy,
                    &format!("{field}.kind"),
                    format!(
                        "{:?}: only ServiceAccount clients can be named",
                        client.kind
                    ),
                ));
                continue;
            }
            let sa_namespace = client.namespace.as_deref().unwrap_or(namespace);
            let declared = config.service_accounts.iter().any(|sa| {
                sa.metadata.name == client.name && sa.metadata.namespace() == sa_namespace
            });
            let used = config.pods.iter().any(|pod| {
                pod.metadata.namespace() == sa_namespace
                    && pod
                        .spec
                        .service_account_name
                        .as_deref()
                        .unwrap_or("default")
                        == client.name
            });
            if !declared && !used {
                found.push(warning(
                    policy,
                    &format!("{field}.name"),
                    format!(
                        "ServiceAccount {sa_namespace}/{} is not defined or used by a pod in the given files",
                        client.name
                    ),
                ));
            }
        }
    }
}

/// Fields this version of the mesh gives behaviour to, per kind (paths below `spec`, list
/// indexes as `[]`). Everything else is parsed, kept, and reported as not enforced yet.
fn enforced(kind: &str) -> &'static [&'static str] {
    match kind {
        "HTTPLocalRateLimitPolicy" => &["targetRef", "selector", "total", "identity", "overrides"],
        "Telemetry" => &[
            "selector",
            "targetRef",
            "targetRefs",
            "accessLogging[].providers[]",
            "accessLogging[].disabled",
            "accessLogging[].filter",
            "accessLogging[].match.mode",
            "metrics[].providers[]",
            "metrics[].overrides[].match.metric",
            "metrics[].overrides[].match.mode",
            "metrics[].overrides[].disabled",
            "metrics[].overrides[].tagOverrides",
            "tracing[].match.mode",
            "tracing[].providers[]",
            "tracing[].randomSamplingPercentage",
            "tracing[].disableSpanReporting",
            "tracing[].customTags",
        ],
        "VirtualService" => &[
            "hosts",
            "gateways",
            "exportTo",
            "http[].name",
            "http[].match[].name",
            "http[].match[].uri",
            "http[].match[].scheme",
            "http[].match[].method",
            "http[].match[].authority",
            "http[].match[].headers",
            "http[].match[].withoutHeaders",
            "http[].match[].queryParams",
            "http[].match[].port",
            "http[].match[].sourceLabels",
            "http[].match[].sourceNamespace",
            "http[].match[].ignoreUriCase",
            "http[].route",
            "http[].redirect",
            "http[].directResponse",
            "http[].rewrite",
            "http[].timeout",
            "http[].retries.attempts",
            "http[].retries.perTryTimeout",
            "http[].retries.retryOn",
            "http[].fault.delay.fixedDelay",
            "http[].fault.delay.percentage",
            "http[].fault.delay.percent",
            "http[].fault.abort.httpStatus",
            "http[].fault.abort.grpcStatus",
            "http[].fault.abort.percentage",
            "http[].fault.abort.percent",
            "http[].mirror",
            "http[].mirrors",
            "http[].mirrorPercentage",
            "http[].mirrorPercent",
            "http[].headers",
            "http[].corsPolicy",
            "http[].delegate",
            "tls[].match[].sniHosts[]",
            "tls[].match[].port",
            "tls[].match[].destinationSubnets[]",
            "tls[].match[].sourceLabels",
            "tls[].match[].sourceNamespace",
            "tls[].route[]",
            "tcp[].match[].port",
            "tcp[].match[].sourceLabels",
            "tcp[].match[].destinationSubnets",
            "tcp[].route",
        ],
        "DestinationRule" => &[
            "host",
            "trafficPolicy.loadBalancer.simple",
            "trafficPolicy.loadBalancer.consistentHash.useSourceIp",
            "trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            "trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[]",
            "trafficPolicy.loadBalancer.consistentHash.httpQueryParameterName",
            "trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize",
            "trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
            "trafficPolicy.loadBalancer.localityLbSetting.enabled",
            "trafficPolicy.loadBalancer.localityLbSetting.distribute[]",
            "trafficPolicy.loadBalancer.localityLbSetting.failover[]",
            "trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[]",
            "trafficPolicy.loadBalancer.warmupDurationSecs",
            "trafficPolicy.loadBalancer.warmup",
            "trafficPolicy.portLevelSettings[].loadBalancer.simple",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.useSourceIp",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpHeaderName",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.name",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.path",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.ttl",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.attributes[]",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpQueryParameterName",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.ringHash.minimumRingSize",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.maglev.tableSize",
            "trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.minimumRingSize",
            "trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.enabled",
            "trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.distribute[]",
            "trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.failover[]",
            "trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.failoverPriority[]",
            "trafficPolicy.portLevelSettings[].loadBalancer.warmupDurationSecs",
            "trafficPolicy.portLevelSettings[].loadBalancer.warmup",
            "subsets[].trafficPolicy.loadBalancer.simple",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.useSourceIp",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.httpCookie.attributes[]",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.httpQueryParameterName",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.ringHash.minimumRingSize",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.maglev.tableSize",
            "subsets[].trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
            "subsets[].trafficPolicy.loadBalancer.localityLbSetting.enabled",
            "subsets[].trafficPolicy.loadBalancer.localityLbSetting.distribute[]",
            "subsets[].trafficPolicy.loadBalancer.localityLbSetting.failover[]",
            "subsets[].trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[]",
            "subsets[].trafficPolicy.loadBalancer.warmupDurationSecs",
            "subsets[].trafficPolicy.loadBalancer.warmup",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.simple",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.useSourceIp",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpHeaderName",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.name",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.path",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.ttl",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpCookie.attributes[]",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.httpQueryParameterName",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.ringHash.minimumRingSize",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.maglev.tableSize",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.consistentHash.minimumRingSize",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.enabled",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.distribute[]",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.failover[]",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.localityLbSetting.failoverPriority[]",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.warmupDurationSecs",
            "subsets[].trafficPolicy.portLevelSettings[].loadBalancer.warmup",
            "subsets[].name",
            "subsets[].labels",
            "trafficPolicy.outlierDetection",
            "trafficPolicy.connectionPool.tcp.maxConnections",
            "trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            "trafficPolicy.connectionPool.http.http2MaxRequests",
            "trafficPolicy.connectionPool.http.maxRetries",
            "trafficPolicy.connectionPool.tcp.connectTimeout",
            "trafficPolicy.connectionPool.tcp.tcpKeepalive",
            "trafficPolicy.connectionPool.tcp.idleTimeout",
            "trafficPolicy.connectionPool.tcp.maxConnectionDuration",
            "trafficPolicy.connectionPool.http.maxRequestsPerConnection",
            "trafficPolicy.connectionPool.http.idleTimeout",
            "trafficPolicy.portLevelSettings[].port",
            "trafficPolicy.portLevelSettings[].outlierDetection",
            "trafficPolicy.portLevelSettings[].connectionPool.tcp.maxConnections",
            "trafficPolicy.portLevelSettings[].connectionPool.http.http1MaxPendingRequests",
            "trafficPolicy.portLevelSettings[].connectionPool.http.http2MaxRequests",
            "trafficPolicy.portLevelSettings[].connectionPool.http.maxRetries",
            "trafficPolicy.portLevelSettings[].connectionPool.tcp.connectTimeout",
            "trafficPolicy.portLevelSettings[].connectionPool.tcp.tcpKeepalive",
            "trafficPolicy.portLevelSettings[].connectionPool.tcp.idleTimeout",
            "trafficPolicy.portLevelSettings[].connectionPool.tcp.maxConnectionDuration",
            "trafficPolicy.portLevelSettings[].connectionPool.http.maxRequestsPerConnection",
            "trafficPolicy.portLevelSettings[].connectionPool.http.idleTimeout",
            "subsets[].trafficPolicy.outlierDetection",
            "subsets[].trafficPolicy.connectionPool.tcp.maxConnections",
            "subsets[].trafficPolicy.connectionPool.http.http1MaxPendingRequests",
            "subsets[].trafficPolicy.connectionPool.http.http2MaxRequests",
            "subsets[].trafficPolicy.connectionPool.http.maxRetries",
            "subsets[].trafficPolicy.connectionPool.tcp.connectTimeout",
            "subsets[].trafficPolicy.connectionPool.tcp.tcpKeepalive",
            "subsets[].trafficPolicy.connectionPool.tcp.idleTimeout",
            "subsets[].trafficPolicy.connectionPool.tcp.maxConnectionDuration",
            "subsets[].trafficPolicy.connectionPool.http.maxRequestsPerConnection",
            "subsets[].trafficPolicy.connectionPool.http.idleTimeout",
        ],
        "ServiceEntry" => &[
            "hosts",
            "addresses",
            "ports",
            "endpoints[].address",
            "endpoints[].ports",
            "endpoints[].labels",
            "workloadSelector",
            "resolution",
            "location",
        ],
        "WorkloadEntry" => &["address", "ports", "labels", "serviceAccount"],
        "PeerAuthentication" => &["selector", "mtls", "portLevelMtls"],
        "AuthorizationPolicy" => &["selector", "targetRef", "targetRefs", "rules", "action"],
        "RequestAuthentication" => &[
            "selector",
            "targetRef",
            "targetRefs",
            "jwtRules[].issuer",
            "jwtRules[].audiences",
            "jwtRules[].jwksUri",
            "jwtRules[].jwks",
            "jwtRules[].fromHeaders",
            "jwtRules[].fromParams",
            "jwtRules[].fromCookies",
            "jwtRules[].outputPayloadToHeader",
            "jwtRules[].outputClaimToHeaders",
            "jwtRules[].forwardOriginalToken",
            "jwtRules[].timeout",
        ],
        _ => &[],
    }
}

/// How deep below `spec` "not enforced" warnings go before they summarise a subtree.
const REPORT_DEPTH: usize = 3;

fn not_enforced(config: &ClusterConfig, found: &mut Vec<Diagnostic>) {
    let istio = &config.istio;
    report_unenforced(&istio.virtual_services, found);
    report_unenforced(&istio.destination_rules, found);
    report_unenforced(&istio.gateways, found);
    report_unenforced(&istio.service_entries, found);
    report_unenforced(&istio.sidecars, found);
    report_unenforced(&istio.workload_entries, found);
    report_unenforced(&istio.workload_groups, found);
    report_unenforced(&istio.peer_authentications, found);
    report_unenforced(&istio.request_authentications, found);
    report_unenforced(&istio.authorization_policies, found);
    report_unenforced(&istio.telemetries, found);
    report_unenforced(&config.mesh.http_local_rate_limits, found);
}

fn report_unenforced<T: Serialize>(resources: &[Resource<T>], found: &mut Vec<Diagnostic>) {
    for resource in resources {
        let Ok(spec) = serde_json::to_value(&resource.spec) else {
            continue;
        };
        let allowed = enforced(&resource.kind);
        let mut leaves = Vec::new();
        leaf_paths(&spec, &mut Vec::new(), &mut Vec::new(), &mut leaves);
        let mut reported = BTreeSet::new();
        for (normalized, concrete) in leaves {
            let is_enforced = allowed.iter().any(|a| {
                let a: Vec<&str> = a.split('.').collect();
                normalized.len() >= a.len() && normalized[..a.len()] == a[..]
            });
            if is_enforced {
                continue;
            }
            let keys = REPORT_DEPTH.min(normalized.len());
            let summary = normalized[..keys].join(".");
            if reported.insert(summary.clone()) {
                let concrete = format!("spec.{}", concrete[..keys].join("."));
                found.push(warning(
                    resource,
                    &concrete,
                    "parsed but not enforced yet by this version of the mesh".into(),
                ));
            }
        }
    }
}

/// Paths to every set leaf of `value`: normalised (`http[]`) and concrete (`http[0]`).
fn leaf_paths(
    value: &serde_json::Value,
    normalized: &mut Vec<String>,
    concrete: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, Vec<String>)>,
) {
    match value {
        serde_json::Value::Null => {}
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                normalized.push(key.clone());
                concrete.push(key.clone());
                leaf_paths(child, normalized, concrete, out);
                normalized.pop();
                concrete.pop();
            }
        }
        serde_json::Value::Array(items) if !items.is_empty() => {
            for (index, child) in items.iter().enumerate() {
                let (Some(last_n), Some(last_c)) = (normalized.pop(), concrete.pop()) else {
                    continue;
                };
                normalized.push(format!("{last_n}[]"));
                concrete.push(format!("{last_c}[{index}]"));
                leaf_paths(child, normalized, concrete, out);
                normalized.pop();
                concrete.pop();
                normalized.push(last_n);
                concrete.push(last_c);
            }
        }
        serde_json::Value::Object(_) | serde_json::Value::Array(_) => {}
        _ => out.push((normalized.clone(), concrete.clone())),
    }
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn segments(path: &str) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, rest) = part.split_once('[').unwrap_or((part, ""));
        if !key.is_empty() {
            out.push(Segment::Key(key));
        }
        for index in rest.split('[') {
            if let Some(Ok(i)) = index.strip_suffix(']').map(str::parse) {
                out.push(Segment::Index(i));
            }
        }
    }
    out
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The line (0-based, within the document) of a field given by its path, for YAML in block
/// style; `None` when it cannot be followed (flow style, say).
pub fn locate(text: &str, path: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut cursor = 0;
    let mut parent_indent: Option<usize> = None;
    let mut same_line_allowed = true;
    for segment in segments(path) {
        let within = |line: &str| {
            let blank = line.trim().is_empty() || line.trim_start().starts_with('#');
            blank || parent_indent.is_none_or(|p| indent(line) > p)
        };
        match segment {
            Segment::Key(key) => {
                let start = if same_line_allowed {
                    cursor
                } else {
                    cursor + 1
                };
                let mut found = None;
                for (i, line) in lines.iter().enumerate().skip(start) {
                    if i > cursor && !within(line) {
                        break;
                    }
                    let content = line.trim_start().trim_start_matches("- ");
                    if content.starts_with(&format!("{key}:")) {
                        let column = line.len() - content.len();
                        found = Some((i, column));
                        break;
                    }
                }
                let (line, column) = found?;
                cursor = line;
                parent_indent = Some(column);
                same_line_allowed = false;
            }
            Segment::Index(n) => {
                let mut seen = 0;
                let mut item_indent = None;
                let mut found = None;
                for (i, line) in lines.iter().enumerate().skip(cursor + 1) {
                    let trimmed = line.trim_start();
                    // Items of a block sequence may sit at their key's own indentation.
                    let compact_item = trimmed.starts_with('-')
                        && parent_indent.is_some_and(|p| indent(line) == p);
                    if !within(line) && !compact_item {
                        break;
                    }
                    if trimmed.starts_with("- ") || trimmed == "-" {
                        let at = indent(line);
                        if *item_indent.get_or_insert(at) == at {
                            if seen == n {
                                found = Some((i, at));
                                break;
                            }
                            seen += 1;
                        }
                    }
                }
                let (line, at) = found?;
                cursor = line;
                parent_indent = Some(at);
                same_line_allowed = true;
            }
        }
    }
    Some(cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - uri:
        prefix: /a
    route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v2
      weight: 20
";

    #[test]
    fn fields_are_located_in_block_yaml() {
        assert_eq!(locate(DOC, "spec.hosts"), Some(5));
        assert_eq!(locate(DOC, "spec.http[0].route"), Some(11));
        assert_eq!(locate(DOC, "spec.http[0].route[1].weight"), Some(19));
        assert_eq!(
            locate(DOC, "spec.http[0].route[1].destination.subset"),
            Some(18)
        );
        assert_eq!(locate(DOC, "spec.http[0].match[0].uri.prefix"), Some(10));
        assert_eq!(locate(DOC, "spec.tcp"), None);
    }

    fn load(text: &str) -> Vec<String> {
        crate::config::load_str(std::path::Path::new("test.yaml"), text)
            .diagnostics
            .iter()
            .map(|d| d.to_string())
            .collect()
    }

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
";

    #[test]
    fn rate_limit_policies_are_checked_field_by_field_with_lines() {
        let messages = load(&format!(
            "{SERVICE}\
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: web, namespace: shop}}
spec:
  targetRef:
    kind: Service
    name: web
  total:
    requestsPerSecond: 0
  identity:
    requestsPerSecond: 5
    burst: 0
  overrides:
  - requestsPerSecond: -3
    clientRefs:
    - kind: Group
      name: admins
  - requestsPerSecond: 1
    clientRefs: []
---
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: again, namespace: shop}}
spec:
  targetRef: {{kind: Service, name: web}}
  total:
    requestsPerSecond: 10
  identity:
    requestsPerSecond: 20
---
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {{name: nowhere, namespace: shop}}
spec:
  targetRef:
    kind: Service
    name: missing
  total: {{requestsPerSecond: 10}}
"
        ));
        assert!(
            !messages
                .iter()
                .any(|m| m.contains("is above total") && m.contains("shop/web:")),
            "an invalid total bounds nothing: {messages:#?}"
        );
        let expected = [
            "test.yaml:14: error: HTTPLocalRateLimitPolicy shop/web: spec.total.requestsPerSecond: 0 is not a rate: it must be at least 1",
            "test.yaml:17: error: HTTPLocalRateLimitPolicy shop/web: spec.identity.burst: 0 is not a burst: it must be at least 1 (and at most 4294967295)",
            "test.yaml:19: error: HTTPLocalRateLimitPolicy shop/web: spec.overrides[0].requestsPerSecond: -3 is not a rate: it must be at least 1",
            "test.yaml:24: error: HTTPLocalRateLimitPolicy shop/web: spec.overrides[1].clientRefs: an override needs at least one client",
            "test.yaml:21: error: HTTPLocalRateLimitPolicy shop/web: spec.overrides[0].clientRefs[0].kind: \"Group\": only ServiceAccount clients can be named",
            "test.yaml:30: error: HTTPLocalRateLimitPolicy shop/again: spec.targetRef: Service shop/web is already the target of another HTTPLocalRateLimitPolicy; this one is ignored",
            "test.yaml:34: error: HTTPLocalRateLimitPolicy shop/again: spec.identity.requestsPerSecond: 20 is above total.requestsPerSecond",
            "test.yaml:42: error: HTTPLocalRateLimitPolicy shop/nowhere: spec.targetRef.name: Service shop/missing is not defined in the given files",
        ];
        for line in expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
        let unenforced = messages
            .iter()
            .filter(|m| m.contains("not enforced yet"))
            .count();
        assert!(
            unenforced > 0,
            "reported as not enforced until the router uses it"
        );
    }

    #[test]
    fn connection_pool_settings_are_reported_unenforced_only_where_they_are() {
        let messages = load(&format!(
            "{SERVICE}---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {{maxConnections: 10, connectTimeout: 250ms, tcpKeepalive: {{time: 30s}}, maxConnectionDuration: 1h}}
      http: {{maxRequestsPerConnection: 1, idleTimeout: 5s, h2UpgradePolicy: UPGRADE}}
"
        ));
        assert_eq!(
            messages,
            vec![
                "test.yaml:15: warning: DestinationRule shop/web: spec.trafficPolicy.connectionPool.http: parsed but not enforced yet by this version of the mesh",
            ],
            "only http.h2UpgradePolicy, summarised"
        );
    }

    #[test]
    fn cors_tls_routes_and_delegation_are_checked_and_enforced() {
        let messages = load(&format!(
            "{SERVICE}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: shop}}
spec:
  hosts: [web]
  http:
  - delegate: {{name: missing}}
  - delegate: {{name: hosted}}
  - delegate: {{name: deeper}}
  - delegate: {{name: fine}}
    route: [{{destination: {{host: web}}}}]
  tls:
  - route: [{{destination: {{host: web}}}}]
  - match:
    - port: 443
    route: [{{destination: {{host: web}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: hosted, namespace: shop}}
spec:
  hosts: [web]
  http: [{{route: [{{destination: {{host: web}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: deeper, namespace: shop}}
spec:
  http: [{{delegate: {{name: fine}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: fine, namespace: shop}}
spec:
  http:
  - corsPolicy: {{allowOrigins: [{{exact: 'https://a.example'}}], unmatchedPreflights: IGNORE}}
    route: [{{destination: {{host: web}}}}]
  tls:
  - match: [{{sniHosts: [a.example], port: 443, sourceNamespace: shop}}]
    route: [{{destination: {{host: web}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bad-origin, namespace: shop}}
spec:
  hosts: [web]
  http:
  - corsPolicy:
      allowOrigins: [{{regex: 'https://(unclosed'}}]
    route: [{{destination: {{host: web}}}}]
"
        ));
        let expected = [
            "test.yaml:13: warning: VirtualService shop/web: spec.http[0].delegate: delegate shop/missing: no such VirtualService is visible to namespace shop; this route is left out",
            "test.yaml:14: warning: VirtualService shop/web: spec.http[1].delegate: delegate shop/hosted has hosts: a delegate VirtualService has none; this route is left out",
            "test.yaml:15: warning: VirtualService shop/web: spec.http[2].delegate: delegate shop/deeper delegates again: only one level of delegation is supported; this route is left out",
            "test.yaml:16: error: VirtualService shop/web: spec.http[3]: only one of route, redirect, directResponse and delegate may be set",
            "test.yaml:19: error: VirtualService shop/web: spec.tls[0]: a tls route needs a match block with sniHosts",
            "test.yaml:21: error: VirtualService shop/web: spec.tls[1].match[0]: sniHosts is required in a tls route",
        ];
        for line in expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
        assert!(
            messages
                .iter()
                .any(|m| m.starts_with("test.yaml:55: error: VirtualService shop/bad-origin: spec.http[0].corsPolicy.allowOrigins[0].regex: ")
                    && m.contains("invalid regex")),
            "a CORS origin regex that does not compile: {messages:#?}"
        );
        let unenforced: Vec<&String> = messages
            .iter()
            .filter(|m| m.contains("not enforced"))
            .filter(|m| {
                ["corsPolicy", "delegate", "spec.tls"]
                    .iter()
                    .any(|f| m.contains(f))
            })
            .collect();
        assert!(unenforced.is_empty(), "{unenforced:#?}");
    }

    #[test]
    fn telemetry_tracing_is_checked_field_by_field() {
        let messages = load(
            "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry: {service: collector.obs.svc.cluster.local, port: 4318}
    - name: zipkin
      zipkin: {service: zipkin.obs.svc.cluster.local, port: 9411}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: tracing, namespace: shop}
spec:
  tracing:
  - providers: [{name: otel}, {name: zipkin}]
    randomSamplingPercentage: 101
    useRequestIdForTraceSampling: true
    customTags:
      both:
        literal: {value: a}
        header: {name: x-a}
      badheader:
        header: {name: 'no spaces'}
      noenv:
        environment: {name: ''}
  - providers: [{name: zipkin}]
  - providers: [{name: nowhere}]
",
        );
        let expected = [
            "test.yaml:18: error: Telemetry shop/tracing: spec.tracing[0].randomSamplingPercentage: 101 is not a percentage between 0 and 100",
            "test.yaml:17: warning: Telemetry shop/tracing: spec.tracing[0].providers: only one tracing provider is supported (as in Istio): the first is used",
            "test.yaml:21: error: Telemetry shop/tracing: spec.tracing[0].customTags.both: set exactly one of literal, environment and header",
            "test.yaml:12: error: Telemetry shop/tracing: spec.tracing[0].customTags.badheader.header.name: \"no spaces\" is not a header name",
            "test.yaml:12: error: Telemetry shop/tracing: spec.tracing[0].customTags.noenv.environment.name: names no environment variable",
            "test.yaml:12: warning: Telemetry shop/tracing: spec.tracing[1].providers[0].name: provider \"zipkin\" is a zipkin provider, which is not supported: only opentelemetry (OTLP) is; no spans are reported for it",
            "test.yaml:12: warning: Telemetry shop/tracing: spec.tracing[2].providers[0].name: no tracing provider \"nowhere\" in the MeshConfig (ConfigMap istio-system/istio; known: otel, zipkin): no spans are reported for it",
            "test.yaml:19: warning: Telemetry shop/tracing: spec.tracing[0].useRequestIdForTraceSampling: parsed but not enforced yet by this version of the mesh",
        ];
        for line in expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
        let unenforced: Vec<&String> = messages
            .iter()
            .filter(|m| m.contains("not enforced"))
            .collect();
        assert_eq!(unenforced.len(), 1, "{unenforced:#?}");
    }

    #[test]
    fn telemetry_tag_overrides_are_checked_label_by_label() {
        let messages = load(
            "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: labels, namespace: shop}
spec:
  metrics:
  - overrides:
    - match: {metric: REQUEST_COUNT}
      tagOverrides:
        user: {value: \"request.headers['x-user']\"}
        bad-name: {value: request.host}
        __reserved: {operation: REMOVE}
        broken: {value: 'request.host +'}
        empty: {operation: UPSERT}
        source_principal: {operation: REMOVE, value: x}
",
        );
        let expected = [
            "test.yaml:10: error: Telemetry shop/labels: spec.metrics[0].overrides[0].tagOverrides.bad-name: \"bad-name\" is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)",
            "test.yaml:11: error: Telemetry shop/labels: spec.metrics[0].overrides[0].tagOverrides.__reserved: \"__reserved\" starts with __, which Prometheus reserves",
            "test.yaml:1: error: Telemetry shop/labels: spec.metrics[0].overrides[0].tagOverrides.empty.value: UPSERT needs a value (a CEL expression, e.g. request.host or \"literal\")",
            "test.yaml:1: warning: Telemetry shop/labels: spec.metrics[0].overrides[0].tagOverrides.source_principal.value: REMOVE takes no value: it is ignored",
        ];
        for line in expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
        assert!(
            messages.iter().any(|m| m.starts_with("test.yaml:1: error: Telemetry shop/labels: spec.metrics[0].overrides[0].tagOverrides.broken.value: \"request.host +\" is not a CEL expression")),
            "a malformed expression that panics the CEL parser is an error, not a crash: {messages:#?}"
        );
        assert_eq!(
            messages.len(),
            5,
            "user is valid, nothing is unenforced: {messages:#?}"
        );
    }

    #[test]
    fn a_mesh_config_with_a_broken_tracing_provider_is_refused_with_its_path() {
        let messages = load(
            "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |
    extensionProviders:
    - name: otel
      opentelemetry: {service: collector, port: 70000}
",
        );
        assert!(
            messages.iter().any(|m| m.contains(
                "data.mesh: extensionProviders[0] (otel): opentelemetry.port: 70000 is not a port number"
            )),
            "{messages:#?}"
        );
    }

    #[test]
    fn a_rate_limit_policy_needs_one_target_and_unknown_fields_are_errors() {
        let messages = load(
            "apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: none, namespace: shop}
spec:
  total: {requestsPerSecond: 10}
---
apiVersion: policy.mesh.dev/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata: {name: typo, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  total:
    requestsPerSecnd: 10
---
apiVersion: policy.mesh.dev/v1beta1
kind: HTTPLocalRateLimitPolicy
metadata: {name: version, namespace: shop}
spec: {}
",
        );
        let expected = [
            "test.yaml:4: error: HTTPLocalRateLimitPolicy shop/none: spec: a target is required: targetRef (a Service) or selector",
            "test.yaml:13: error: HTTPLocalRateLimitPolicy shop/typo: spec.total.requestsPerSecnd: spec.total: unknown field `requestsPerSecnd`, expected `requestsPerSecond` or `burst`",
            "test.yaml:15: error: HTTPLocalRateLimitPolicy shop/version: unsupported apiVersion v1beta1: this kind is served as v1alpha1",
        ];
        for line in expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
    }

    #[test]
    fn destination_rule_limits_the_model_cannot_use_are_errors() {
        let messages = load(&format!(
            "{SERVICE}\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    outlierDetection:
      maxEjectionPercent: 150
    portLevelSettings:
    - port: {{number: 80}}
      connectionPool:
        http:
          maxRetries: -1
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      outlierDetection:
        baseEjectionTime: 0s
"
        ));
        let expected = [
            "test.yaml:13: error: DestinationRule shop/web: spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is not a percentage (0 to 100)",
            "test.yaml:18: error: DestinationRule shop/web: spec.trafficPolicy.portLevelSettings[0].connectionPool.http.maxRetries: -1 is negative",
            "test.yaml:24: error: DestinationRule shop/web: spec.subsets[0].trafficPolicy.outlierDetection.baseEjectionTime: \"0s\" is shorter than 1ms",
        ];
        for line in expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
    }

    #[test]
    fn load_balancers_the_model_cannot_use_are_errors_and_the_others_are_enforced() {
        let messages = load(&format!(
            "{SERVICE}\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web, namespace: shop}}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
        ringHash: {{minimumRingSize: 1024}}
        maglev:
          tableSize: 1000
    portLevelSettings:
    - port: {{number: 80}}
      loadBalancer:
        localityLbSetting:
          distribute:
          - from: r1/z-a/*
            to:
              r1/z-a/*: 70
              r1/z*: 20
          failover:
          - from: r1
            to: r1
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {{name: session, ttl: 60s}}
        warmupDurationSecs: 30s
        localityLbSetting:
          failoverPriority: [topology.kubernetes.io/region]
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      loadBalancer:
        simple: LEAST_REQUEST
        warmup:
          duration: 60s
          minimumPercent: 120
"
        ));
        let at = "DestinationRule shop/web: spec.trafficPolicy";
        let expected = [
            format!("test.yaml:13: error: {at}.loadBalancer.consistentHash: ringHash and maglev are alternatives: set one"),
            format!("test.yaml:17: error: {at}.loadBalancer.consistentHash.maglev.tableSize: 1000 is not a prime number up to 131071 (the agent's largest Maglev table)"),
            format!("test.yaml:21: error: {at}.portLevelSettings[0].loadBalancer.localityLbSetting: distribute and failover are alternatives: set one"),
            format!("test.yaml:24: error: {at}.portLevelSettings[0].loadBalancer.localityLbSetting.distribute[0].to: the weights from r1/z-a/* add up to 90, not 100"),
            format!("test.yaml:26: error: {at}.portLevelSettings[0].loadBalancer.localityLbSetting.distribute[0].to.r1/z*: \"r1/z*\": a wildcard '*' must be a whole part, and the last one"),
            format!("test.yaml:29: error: {at}.portLevelSettings[0].loadBalancer.localityLbSetting.failover[0].to: failover from r1 to itself: name another region"),
            "test.yaml:47: error: DestinationRule shop/web: spec.subsets[1].trafficPolicy.loadBalancer.warmup.minimumPercent: 120 is not a percentage (0 to 100)".to_owned(),
        ];
        for line in &expected {
            assert!(
                messages.iter().any(|m| m == line),
                "missing {line}\nin {messages:#?}"
            );
        }
        let errors = messages.iter().filter(|m| m.contains(": error: ")).count();
        assert_eq!(errors, expected.len(), "{messages:#?}");
        assert!(
            messages.contains(&format!(
                "test.yaml:21: warning: {at}.portLevelSettings[0].loadBalancer.localityLbSetting: \
                 failover applies only with outlierDetection, as in Istio: set it on this cluster"
            )),
            "{messages:#?}"
        );
        let subset_warnings = messages
            .iter()
            .filter(|m| m.contains("spec.subsets[0]") && m.contains("outlierDetection"))
            .count();
        assert_eq!(subset_warnings, 1, "{messages:#?}");
        assert!(
            !messages.iter().any(|m| m.contains("not enforced")),
            "{messages:#?}"
        );
    }

    #[test]
    fn locality_patterns_and_table_sizes() {
        assert!(check_locality("r1/z-a/*").is_ok());
        assert!(check_locality("*").is_ok());
        assert!(check_locality("r1/z*").is_err());
        assert!(check_locality("*/z-a").is_err());
        assert!(check_locality("r1//z").is_err());
        assert!(check_locality("a/b/c/d").is_err());
        assert!(check_locality("").is_err());
        assert!(is_prime(65_537) && is_prime(131_071) && is_prime(5_000_011) && is_prime(2));
        assert!(!is_prime(u64::MAX), "no overflow near the top");
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }

    #[test]
    fn short_hosts_resolve_in_the_namespace() {
        assert_eq!(fqdn("reviews", "shop"), "reviews.shop.svc.cluster.local");
        assert_eq!(fqdn("api.example.com", "shop"), "api.example.com");
        assert_eq!(fqdn("*.example.com", "shop"), "*.example.com");
    }
}
