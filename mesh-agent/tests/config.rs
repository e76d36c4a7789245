//! The configuration language: Istio's own examples parse and round-trip, and every class
//! of bad input is reported with file, line, object and field — by the library and by
//! `meshctl validate`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use mesh_agent::config::{load_path, load_str, ClusterConfig, Diagnostic, Severity};

fn corpus() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("corpus directory").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/istio"),
        &mut files,
    );
    files.sort();
    files
}

#[test]
fn every_file_of_the_istio_corpus_parses_without_error() {
    let files = corpus();
    assert_eq!(files.len(), 91, "the corpus's YAML files");
    let mut istio_objects = 0;
    for file in &files {
        let config = load_path(file).expect("readable");
        let errors: Vec<String> = config.errors().map(ToString::to_string).collect();
        assert!(
            errors.is_empty(),
            "{}:\n{}",
            file.display(),
            errors.join("\n")
        );
        let istio = &config.istio;
        istio_objects += istio.virtual_services.len()
            + istio.destination_rules.len()
            + istio.gateways.len()
            + istio.service_entries.len()
            + istio.sidecars.len()
            + istio.workload_entries.len()
            + istio.workload_groups.len()
            + istio.peer_authentications.len()
            + istio.request_authentications.len()
            + istio.authorization_policies.len()
            + istio.telemetries.len();
    }
    assert_eq!(istio_objects, 134, "Istio objects parsed from the corpus");
}

/// Every Istio object, written back as YAML.
fn serialise(config: &ClusterConfig) -> String {
    let istio = &config.istio;
    let mut docs: Vec<String> = Vec::new();
    macro_rules! push {
        ($($kind:ident),*) => {$(
            for resource in &istio.$kind {
                docs.push(serde_norway::to_string(resource).expect("serialise"));
            }
        )*};
    }
    push!(
        virtual_services,
        destination_rules,
        gateways,
        service_entries,
        sidecars,
        workload_entries,
        workload_groups,
        peer_authentications,
        request_authentications,
        authorization_policies,
        telemetries
    );
    docs.join("---\n")
}

#[test]
fn every_outlier_detection_and_connection_pool_of_the_corpus_translates() {
    use mesh_agent::model::{
        circuit::PoolLimits, destination_policy::EffectivePolicy, outlier::OutlierSettings,
    };
    let mut translated = 0;
    for file in corpus() {
        let config = load_path(&file).expect("readable");
        for rule in &config.istio.destination_rules {
            let subsets = std::iter::once(None)
                .chain(rule.spec.subsets.iter().map(|s| Some(s.name.as_str())));
            for subset in subsets {
                let effective = EffectivePolicy::resolve(&rule.spec, subset, 80);
                if let Some(detection) = effective.outlier_detection {
                    if let Err(invalid) = OutlierSettings::from_istio(detection) {
                        panic!("{}: {invalid}", file.display());
                    }
                    translated += 1;
                }
                if let Some(pool) = effective.connection_pool {
                    if let Err(invalid) = PoolLimits::from_istio(pool) {
                        panic!("{}: {invalid}", file.display());
                    }
                    translated += 1;
                }
            }
        }
    }
    // The corpus is fixed: its outlierDetection and connectionPool blocks, per subset.
    assert_eq!(translated, 7, "blocks translated");
    // Istio's circuit-breaking task, as the model reads it.
    let config = load_path(Path::new(
        "tests/testdata/istio/docs/circuit-breaking-1.yaml",
    ))
    .expect("readable");
    let policy = EffectivePolicy::resolve(&config.istio.destination_rules[0].spec, None, 8000);
    let limits = PoolLimits::from_istio(policy.connection_pool.expect("a pool")).expect("valid");
    assert_eq!(
        (
            limits.max_connections,
            limits.max_pending_requests,
            limits.max_requests_per_connection
        ),
        (1, 1, 1)
    );
    let outlier =
        OutlierSettings::from_istio(policy.outlier_detection.expect("detection")).expect("valid");
    assert_eq!(outlier.consecutive_5xx, 1);
    assert_eq!(outlier.interval, std::time::Duration::from_secs(1));
    assert_eq!(
        outlier.base_ejection_time,
        std::time::Duration::from_secs(180)
    );
    assert_eq!(outlier.max_ejection_percent, 100);
}

#[test]
fn the_corpus_round_trips_through_the_model() {
    for file in corpus() {
        let first = load_path(&file).expect("readable");
        let text = serialise(&first);
        let second = load_str(Path::new("round-trip.yaml"), &text);
        assert_eq!(
            second.errors().count(),
            0,
            "{}: {:?}",
            file.display(),
            second.diagnostics
        );
        assert_eq!(
            first.istio,
            second.istio,
            "{} changed in a round trip",
            file.display()
        );
    }
}

fn check(yaml: &str) -> ClusterConfig {
    load_str(Path::new("case.yaml"), yaml)
}

fn only(config: &ClusterConfig, severity: Severity, needle: &str) -> Diagnostic {
    let matching: Vec<&Diagnostic> = config
        .diagnostics
        .iter()
        .filter(|d| d.severity == severity && d.to_string().contains(needle))
        .collect();
    assert_eq!(
        matching.len(),
        1,
        "looking for {needle:?} in {:#?}",
        config.diagnostics
    );
    matching[0].clone()
}

const VS_HEAD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namespace: shop\nspec:\n";

#[test]
fn yaml_syntax_error() {
    let config = check("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: [a\n");
    let d = only(&config, Severity::Error, "YAML syntax");
    assert!(d.line.is_some());
}

#[test]
fn wrong_type_names_field_and_line() {
    let config = check(&format!(
        "{VS_HEAD}  hosts: [r]\n  http:\n  - timeout: 1s\n    retries:\n      attempts: many\n"
    ));
    let d = only(&config, Severity::Error, "invalid type");
    assert_eq!(d.field.as_deref(), Some("spec.http[0].retries.attempts"));
    assert_eq!(d.line, Some(11));
    assert_eq!(d.resource.as_deref(), Some("VirtualService shop/r"));
}

#[test]
fn unknown_field() {
    let config = check(&format!("{VS_HEAD}  hosts: [r]\n  htttp: []\n"));
    let d = only(&config, Severity::Error, "unknown field `htttp`");
    assert_eq!(d.line, Some(8));
}

#[test]
fn bad_enum_value() {
    let config = check(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  mtls:\n    mode: STRICTEST\n",
    );
    let d = only(&config, Severity::Error, "unknown variant `STRICTEST`");
    assert_eq!(d.field.as_deref(), Some("spec.mtls.mode"));
}

#[test]
fn bad_duration() {
    let config = check(&format!(
        "{VS_HEAD}  hosts: [r]\n  http:\n  - timeout: 10 seconds\n"
    ));
    let d = only(&config, Severity::Error, "invalid duration \"10 seconds\"");
    assert_eq!(d.field.as_deref(), Some("spec.http[0].timeout"));
}

#[test]
fn bad_regex() {
    let config = check(&format!(
        "{VS_HEAD}  hosts: [r]\n  http:\n  - match:\n    - uri:\n        regex: \"/api/(v1\"\n"
    ));
    let d = only(&config, Severity::Error, "invalid regex");
    assert_eq!(d.field.as_deref(), Some("spec.http[0].match[0].uri.regex"));
}

#[test]
fn bad_cidr() {
    let config = check(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"10.0.0.0/40\"]\n",
    );
    let d = only(&config, Severity::Error, "invalid CIDR");
    assert_eq!(
        d.field.as_deref(),
        Some("spec.rules[0].from[0].source.ipBlocks[0]")
    );
}

const REVIEWS: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec:\n  selector: {app: reviews}\n  ports: [{port: 9080}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews, namespace: shop}\nspec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels: {version: v1}\n  - name: v2\n    labels: {version: v2}\n---\n";

#[test]
fn route_weights_must_sum_to_100() {
    let config = check(&format!(
        "{REVIEWS}{VS_HEAD}  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: v1}}\n      weight: 80\n    - destination: {{host: reviews, subset: v2}}\n      weight: 30\n"
    ));
    let d = only(&config, Severity::Error, "route weights sum to 110");
    assert_eq!(d.field.as_deref(), Some("spec.http[0].route"));
    assert_eq!(d.line, Some(27));
}

#[test]
fn missing_subset_of_a_host_with_a_destination_rule_is_an_error() {
    let config = check(&format!(
        "{REVIEWS}{VS_HEAD}  hosts: [reviews]\n  http:\n  - route:\n    - destination:\n        host: reviews\n        subset: v3\n"
    ));
    let d = only(
        &config,
        Severity::Error,
        "subset v3 is not defined for reviews.shop.svc.cluster.local",
    );
    assert_eq!(
        d.field.as_deref(),
        Some("spec.http[0].route[0].destination.subset")
    );
    assert_eq!(d.line, Some(30));
}

#[test]
fn unsupported_kinds_are_errors() {
    for (api, kind) in [
        ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("extensions.istio.io/v1alpha1", "WasmPlugin"),
    ] {
        let config = check(&format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: x}}\nspec: {{}}\n"
        ));
        only(
            &config,
            Severity::Error,
            &format!("{kind} is not supported"),
        );
    }
}

#[test]
fn references_the_files_do_not_resolve_are_warnings() {
    let config = check(&format!(
        "{VS_HEAD}  hosts: [ratings]\n  http:\n  - route:\n    - destination: {{host: ratings, subset: v1}}\n---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a, namespace: shop}}\nspec:\n  selector:\n    matchLabels: {{app: nobody}}\n"
    ));
    assert_eq!(config.errors().count(), 0, "{:#?}", config.diagnostics);
    only(
        &config,
        Severity::Warning,
        "host ratings.shop.svc.cluster.local is not a Service",
    );
    only(
        &config,
        Severity::Warning,
        "no DestinationRule for this host",
    );
    only(&config, Severity::Warning, "the selector matches no pod");
}

#[test]
fn deprecated_fields_are_warnings() {
    let config = check(&format!(
        "{REVIEWS}{VS_HEAD}  hosts: [reviews]\n  http:\n  - fault:\n      abort: {{httpStatus: 500, percent: 10}}\n    mirrorPercent: 5\n    route:\n    - destination: {{host: reviews}}\n---\n\
         apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {{name: old, namespace: shop}}\nspec:\n  host: reviews\n  trafficPolicy:\n    outlierDetection: {{consecutiveErrors: 7}}\n"
    ));
    assert_eq!(config.errors().count(), 0, "{:#?}", config.diagnostics);
    only(
        &config,
        Severity::Warning,
        "spec.http[0].fault.abort.percent: deprecated",
    );
    only(
        &config,
        Severity::Warning,
        "spec.http[0].mirrorPercent: deprecated",
    );
    only(
        &config,
        Severity::Warning,
        "outlierDetection.consecutiveErrors: deprecated",
    );
}

#[test]
fn fields_parsed_but_not_enforced_are_warnings() {
    let config = check(&format!(
        "{REVIEWS}apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: pool, namespace: shop}}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {{simple: LEAST_REQUEST}}\n    connectionPool:\n      http: {{maxRequestsPerConnection: 1, h2UpgradePolicy: UPGRADE}}\n"
    ));
    only(
        &config,
        Severity::Warning,
        "spec.trafficPolicy.connectionPool.http: parsed but not enforced",
    );
    assert!(
        !config
            .diagnostics
            .iter()
            .any(|d| d.field.as_deref() == Some("spec.trafficPolicy.loadBalancer.simple")),
        "the load balancer is enforced"
    );
}

fn meshctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .output()
        .expect("meshctl")
}

#[test]
fn meshctl_validate_exit_status_and_json() {
    let dir = std::env::temp_dir().join(format!("meshctl-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let good = dir.join("good.yaml");
    std::fs::write(&good, REVIEWS.trim_end_matches("---\n")).expect("write");
    let out = meshctl(&["validate", "-f", good.to_str().expect("path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        format!("{VS_HEAD}  hosts: [r]\n  http:\n  - timeout: soon\n"),
    )
    .expect("write");
    let out = meshctl(&["validate", "-f", bad.to_str().expect("path"), "-o", "json"]);
    assert_eq!(out.status.code(), Some(2), "invalid input exits with 2");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["errors"], 1);
    let first = &report["diagnostics"][0];
    assert_eq!(first["severity"], "error");
    assert_eq!(first["field"], "spec.http[0].timeout");
    assert_eq!(first["line"], 9);
    assert_eq!(first["resource"], "VirtualService shop/r");

    let warned = dir.join("warned.yaml");
    std::fs::write(&warned, format!("{VS_HEAD}  hosts: [r]\n")).expect("write");
    assert!(meshctl(&["validate", "-f", warned.to_str().expect("path")])
        .status
        .success());
    assert!(
        !meshctl(&["validate", "--strict", "-f", warned.to_str().expect("path")])
            .status
            .success()
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn authorization_conditions_and_ports_are_checked() {
    let config = check(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: shop}\nspec:\n  rules:\n  - to:\n    - operation:\n        ports: [\"http\"]\n    when:\n    - key: source.user\n      values: [x]\n    - key: request.headers[x-a]\n",
    );
    let d = only(
        &config,
        Severity::Error,
        "unknown condition key \"source.user\"",
    );
    assert_eq!(d.field.as_deref(), Some("spec.rules[0].when[0].key"));
    assert_eq!(d.line, Some(10));
    let d = only(&config, Severity::Error, "needs values or notValues");
    assert_eq!(d.field.as_deref(), Some("spec.rules[0].when[1]"));
    let d = only(&config, Severity::Error, "is not a port number");
    assert_eq!(
        d.field.as_deref(),
        Some("spec.rules[0].to[0].operation.ports[0]")
    );
}

#[test]
fn jwt_rules_need_usable_keys() {
    let config = check(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: j, namespace: shop}\nspec:\n  jwtRules:\n  - issuer: a\n    jwks: '{\"no\": []}'\n  - issuer: b\n    jwksUri: ftp://keys\n  - issuer: c\n",
    );
    let d = only(&config, Severity::Error, "JWKS has no \"keys\" array");
    assert_eq!(d.field.as_deref(), Some("spec.jwtRules[0].jwks"));
    assert_eq!(d.line, Some(7));
    only(
        &config,
        Severity::Error,
        "\"ftp://keys\" is not an http or https URL",
    );
    only(
        &config,
        Severity::Error,
        "one of jwks or jwksUri is required",
    );
}
