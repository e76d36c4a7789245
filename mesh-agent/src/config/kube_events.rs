//! Invalid objects reported where their authors look: a Kubernetes Event on the object
//! (`kubectl describe`, `kubectl get events`), besides the agent's log, metric and status.
//!
//! Every node's agent judges the same objects, so each names the Event after the object
//! and the problem: the first agent creates it, the others find it there (409), and one
//! Event stands for one problem of the object, however often it is edited.

use std::collections::HashSet;

use k8s_openapi::{
    api::core::v1::{Event, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use kube::{
    api::{Api, PostParams},
    Client,
};
use ring::digest::{digest, SHA256};

use super::Diagnostic;

/// The Events' `reason`, as `kubectl get events --field-selector reason=…` filters.
pub const REASON: &str = "InvalidConfiguration";
const COMPONENT: &str = "mesh-agent";
/// The API server refuses longer messages.
const MAX_MESSAGE: usize = 1024;
/// An Event's name is the object's, a dot and 16 hex digits, within the 253 characters
/// of a name.
const MAX_OBJECT_NAME: usize = 253 - 17;
/// Events remembered as sent; past it the memory starts over (a repeat is then a 409).
const MAX_REPORTED: usize = 4096;

/// The Event reporting that `diagnostic` made the agent skip the object `document` (its
/// name in the source, `Kind/namespace/name` or `Kind/name`, and its text).
pub fn invalid_object_event(document: (&str, &str), diagnostic: &Diagnostic) -> Option<Event> {
    let (name, text) = document;
    let object: serde_norway::Value = serde_norway::from_str(text).ok()?;
    let meta = &object["metadata"];
    let string = |value: &serde_norway::Value| value.as_str().map(str::to_owned);
    let (kind, rest) = name.split_once('/')?;
    let (namespace, object_name) = match rest.split_once('/') {
        Some((namespace, object_name)) => (Some(namespace.to_owned()), object_name),
        None => (None, rest),
    };
    let uid = string(&meta["uid"]);
    let version = string(&meta["resourceVersion"]);
    let mut message = match &diagnostic.field {
        Some(field) => format!("{field}: {}", diagnostic.message),
        None => diagnostic.message.clone(),
    };
    if message.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    let identity = format!("{name}\n{}\n{message}", uid.as_deref().unwrap_or_default());
    let hash: String = digest(&SHA256, identity.as_bytes()).as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    Some(Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{hash}",
                &object_name[..object_name.len().min(MAX_OBJECT_NAME)]
            )),
            namespace: Some(namespace.clone().unwrap_or_else(|| "default".to_owned())),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: string(&object["apiVersion"]),
            kind: Some(kind.to_owned()),
            name: Some(object_name.to_owned()),
            namespace,
            uid,
            resource_version: version,
            ..ObjectReference::default()
        },
        reason: Some(REASON.to_owned()),
        message: Some(message),
        type_: Some("Warning".to_owned()),
        source: Some(EventSource {
            component: Some(COMPONENT.to_owned()),
            host: None,
        }),
        reporting_component: Some(COMPONENT.to_owned()),
        count: Some(1),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        ..Event::default()
    })
}

/// Creates the Events of skipped objects, each once.
pub struct EventReporter {
    client: Client,
    reported: HashSet<String>,
}

impl EventReporter {
    pub fn new(client: Client) -> EventReporter {
        EventReporter {
            client,
            reported: HashSet::new(),
        }
    }

    /// Reports the objects `skipped` names (their documents in `documents`) that were not
    /// reported yet, in the background.
    pub fn report(&mut self, skipped: &[Diagnostic], documents: &super::admission::Objects) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        for diagnostic in skipped {
            let Some(name) = diagnostic.file.to_str() else {
                continue;
            };
            let Some(text) = documents.get(name) else {
                continue;
            };
            let Some(event) = invalid_object_event((name, text), diagnostic) else {
                continue;
            };
            let (Some(event_name), Some(namespace)) = (
                event.metadata.name.clone(),
                event.metadata.namespace.clone(),
            ) else {
                continue;
            };
            if self.reported.len() >= MAX_REPORTED {
                self.reported.clear();
            }
            if !self.reported.insert(event_name) {
                continue;
            }
            let events: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
            runtime.spawn(async move {
                match events.create(&PostParams::default(), &event).await {
                    Ok(_) => {}
                    // Another node's agent reported it first.
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(err) => tracing::warn!("reporting an invalid object in an Event: {err}"),
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::Severity;

    fn diagnostic(message: &str) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: PathBuf::from("VirtualService/foo/broken"),
            line: Some(3),
            resource: Some("VirtualService foo/broken".into()),
            field: Some("spec.http[0].route[0].weight".into()),
            message: message.into(),
        }
    }

    const BROKEN: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
        metadata: {name: broken, namespace: foo, uid: u-1, resourceVersion: '42'}\nspec: {}\n";

    #[test]
    fn a_skipped_object_gets_a_warning_event_on_itself() {
        let event = invalid_object_event(
            ("VirtualService/foo/broken", BROKEN),
            &diagnostic("must be at most 100 (object skipped)"),
        )
        .expect("an event");
        assert_eq!(event.metadata.namespace.as_deref(), Some("foo"));
        let name = event.metadata.name.clone().expect("name");
        assert!(
            name.starts_with("broken.") && name.len() == "broken.".len() + 16,
            "{name}"
        );
        let about = &event.involved_object;
        assert_eq!(about.kind.as_deref(), Some("VirtualService"));
        assert_eq!(about.api_version.as_deref(), Some("networking.istio.io/v1"));
        assert_eq!(about.name.as_deref(), Some("broken"));
        assert_eq!(about.uid.as_deref(), Some("u-1"));
        assert_eq!(about.resource_version.as_deref(), Some("42"));
        assert_eq!(event.reason.as_deref(), Some(REASON));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(
            event.message.as_deref(),
            Some("spec.http[0].route[0].weight: must be at most 100 (object skipped)")
        );
    }

    #[test]
    fn every_agent_names_the_same_problem_alike_and_another_problem_otherwise() {
        let long_name = "v".repeat(253);
        let long = BROKEN.replace("name: broken", &format!("name: {long_name}"));
        let event = invalid_object_event(
            (&format!("VirtualService/foo/{long_name}"), &long),
            &diagnostic("a"),
        )
        .expect("event");
        assert_eq!(event.metadata.name.expect("name").len(), 253);
        let name = |text: &str, message: &str| {
            invalid_object_event(("VirtualService/foo/broken", text), &diagnostic(message))
                .and_then(|e| e.metadata.name)
                .expect("name")
        };
        assert_eq!(name(BROKEN, "a"), name(BROKEN, "a"));
        assert_ne!(name(BROKEN, "a"), name(BROKEN, "b"));
        // An edit that keeps the problem keeps its Event.
        let next_version = BROKEN.replace("'42'", "'43'");
        assert_eq!(name(BROKEN, "a"), name(&next_version, "a"));
        let long = "x".repeat(5000);
        let event = invalid_object_event(("VirtualService/foo/broken", BROKEN), &diagnostic(&long))
            .expect("event");
        assert_eq!(event.message.expect("message").len(), MAX_MESSAGE);
    }
}
