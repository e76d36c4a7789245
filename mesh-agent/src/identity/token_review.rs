//! How the CA knows which node asks, on Kubernetes: the agent presents its ServiceAccount
//! token (projected, bound to the agent's pod and audience-bound to the CA), and the CA
//! has the API server review it (a TokenReview). The token must be the agents'
//! ServiceAccount's, for the CA's audience, and bound to a node: the API server puts the
//! node of a pod-bound (or node-bound) token in the review's `extra`; failing that, the
//! bound pod's `spec.nodeName` says it. A stolen token therefore speaks for one node only,
//! and only until it expires.
//!
//! Verdicts are kept for a short while, keyed by a digest of the token, so that a node
//! renewing many identities costs the API server one review.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use ring::digest::{digest, SHA256};

use crate::config::kube_api::ApiClient;

/// The node a reviewed token speaks for, as the API server's review puts it.
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The pod a pod-bound token belongs to (its namespace is the ServiceAccount's).
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// How long a verdict is kept: long enough to spare the API server a node's burst of
/// renewals, short enough that a revoked token (its pod deleted) stops working soon.
const ACCEPTED_FOR: Duration = Duration::from_secs(30);
const REFUSED_FOR: Duration = Duration::from_secs(5);
/// Verdicts kept at most: a flood of distinct tokens cannot grow the CA's memory.
const MAX_VERDICTS: usize = 4096;
/// A review the API server does not answer within this is an error, not a verdict.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Who may ask: the agents' ServiceAccount, for which audience.
#[derive(Debug, Clone)]
pub struct Expected {
    /// `namespace/name` of the agents' ServiceAccount.
    pub namespace: String,
    pub service_account: String,
    pub audience: String,
}

impl Expected {
    fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// The node a reviewed token speaks for, or why it speaks for none. `pod_node` gives the
/// node a pod (`namespace`, `name`) is scheduled on.
pub fn node_of_review(
    status: &TokenReviewStatus,
    expected: &Expected,
    pod_node: impl Fn(&str, &str) -> Option<String>,
) -> Result<String, String> {
    if status.authenticated != Some(true) {
        return Err(match status.error.as_deref() {
            Some(error) if !error.is_empty() => format!("the token is not valid: {error}"),
            _ => "the token is not valid".to_owned(),
        });
    }
    // The API server answers with the audiences the token is valid for among those asked;
    // none at all means only its own (an authenticator that does not know audiences).
    let audiences = status.audiences.as_deref().unwrap_or_default();
    if !audiences.contains(&expected.audience) {
        return Err(format!(
            "the token is not for audience {:?}",
            expected.audience
        ));
    }
    let empty = Default::default();
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or_default();
    if username != expected.username() {
        return Err(format!(
            "the token is {username:?}'s, not the agents' ServiceAccount {}/{}",
            expected.namespace, expected.service_account
        ));
    }
    let extra: &BTreeMap<String, Vec<String>> =
        user.and_then(|u| u.extra.as_ref()).unwrap_or(&empty);
    let first = |key: &str| {
        extra
            .get(key)
            .and_then(|values| values.first())
            .filter(|value| !value.is_empty())
    };
    if let Some(node) = first(NODE_NAME_EXTRA) {
        return Ok(node.clone());
    }
    if let Some(pod) = first(POD_NAME_EXTRA) {
        return pod_node(&expected.namespace, pod).ok_or_else(|| {
            format!(
                "the token's pod {}/{pod} is not scheduled on any node",
                expected.namespace
            )
        });
    }
    Err("the token is bound to no pod or node: mount a projected ServiceAccount token".into())
}

/// A review's outcome, kept until `until`.
struct Verdict {
    node: Result<String, String>,
    until: Instant,
}

/// Reviews agents' tokens with the API server, keeping recent verdicts.
pub struct TokenReviewer {
    api: ApiClient,
    expected: Expected,
    verdicts: Mutex<HashMap<[u8; 32], Verdict>>,
}

impl TokenReviewer {
    pub fn new(api: ApiClient, expected: Expected) -> TokenReviewer {
        TokenReviewer {
            api,
            expected,
            verdicts: Mutex::new(HashMap::new()),
        }
    }

    fn key(token: &str) -> [u8; 32] {
        let mut key = [0u8; 32];
        key.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
        key
    }

    /// The verdict on `token` still kept, if any.
    pub fn kept(&self, token: &str, now: Instant) -> Option<Result<String, String>> {
        let verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        verdicts
            .get(&Self::key(token))
            .filter(|verdict| verdict.until > now)
            .map(|verdict| verdict.node.clone())
    }

    /// Has the API server review `token`: the node it speaks for, or why it speaks for
    /// none (`Ok(Err(..))`); `Err` when the API server could not be asked.
    pub async fn review(
        &self,
        token: &str,
        pod_node: impl Fn(&str, &str) -> Option<String>,
    ) -> anyhow::Result<Result<String, String>> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                audiences: Some(vec![self.expected.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let reviews: Api<TokenReview> = Api::all(self.api.client.clone());
        let answered = tokio::time::timeout(
            REVIEW_TIMEOUT,
            reviews.create(&PostParams::default(), &review),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} did not answer the TokenReview within {REVIEW_TIMEOUT:?}",
                self.api.server
            )
        })??;
        let status = answered.status.unwrap_or_default();
        let node = node_of_review(&status, &self.expected, pod_node);
        self.keep(token, node.clone(), Instant::now());
        Ok(node)
    }

    fn keep(&self, token: &str, node: Result<String, String>, now: Instant) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.retain(|_, verdict| verdict.until > now);
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.clear();
            }
        }
        let until = now
            + if node.is_ok() {
                ACCEPTED_FOR
            } else {
                REFUSED_FOR
            };
        verdicts.insert(Self::key(token), Verdict { node, until });
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::authentication::v1::UserInfo;

    use super::*;

    fn expected() -> Expected {
        Expected {
            namespace: "mesh-system".into(),
            service_account: "mesh-agent".into(),
            audience: "mesh-ca".into(),
        }
    }

    fn reviewed(username: &str, extra: &[(&str, &str)]) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(true),
            audiences: Some(vec!["mesh-ca".into()]),
            user: Some(UserInfo {
                username: Some(username.into()),
                extra: Some(
                    extra
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), vec![(*v).to_owned()]))
                        .collect(),
                ),
                ..UserInfo::default()
            }),
            error: None,
        }
    }

    const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

    fn no_pods(_: &str, _: &str) -> Option<String> {
        None
    }

    #[test]
    fn a_bound_agent_token_speaks_for_its_node() {
        let status = reviewed(
            AGENT,
            &[
                (POD_NAME_EXTRA, "mesh-agent-x1"),
                (NODE_NAME_EXTRA, "node-a"),
            ],
        );
        assert_eq!(
            node_of_review(&status, &expected(), no_pods),
            Ok("node-a".into())
        );
        // A pod-bound token without the node in the review: the pod's node.
        let status = reviewed(AGENT, &[(POD_NAME_EXTRA, "mesh-agent-x1")]);
        let pods = |ns: &str, name: &str| {
            (ns == "mesh-system" && name == "mesh-agent-x1").then(|| "node-b".to_owned())
        };
        assert_eq!(
            node_of_review(&status, &expected(), pods),
            Ok("node-b".into())
        );
        let refused = node_of_review(&status, &expected(), no_pods).unwrap_err();
        assert!(refused.contains("not scheduled on any node"), "{refused}");
    }

    #[test]
    fn other_tokens_speak_for_no_node() {
        let expect_refusal = |status: &TokenReviewStatus, says: &str| {
            let refused = node_of_review(status, &expected(), no_pods).unwrap_err();
            assert!(refused.contains(says), "{refused}");
        };
        // Another ServiceAccount, even bound to a node.
        expect_refusal(
            &reviewed(
                "system:serviceaccount:shop:web",
                &[(NODE_NAME_EXTRA, "node-a")],
            ),
            "not the agents' ServiceAccount",
        );
        // A legacy (unbound) token of the agents' ServiceAccount.
        expect_refusal(&reviewed(AGENT, &[]), "bound to no pod or node");
        // Another audience.
        let mut status = reviewed(AGENT, &[(NODE_NAME_EXTRA, "node-a")]);
        status.audiences = Some(vec!["https://kubernetes.default.svc".into()]);
        expect_refusal(&status, "not for audience");
        status.audiences = None;
        expect_refusal(&status, "not for audience");
        // Not authenticated: the API server's reason is kept.
        let status = TokenReviewStatus {
            authenticated: Some(false),
            error: Some("token has expired".into()),
            ..TokenReviewStatus::default()
        };
        expect_refusal(&status, "token has expired");
        expect_refusal(&TokenReviewStatus::default(), "not valid");
    }

    #[tokio::test]
    async fn verdicts_are_kept_briefly_and_bounded() {
        let api = ApiClient {
            client: kube::Client::try_from(kube::Config::new(
                "https://127.0.0.1:1".parse().expect("url"),
            ))
            .expect("client"),
            server: "test".into(),
        };
        let reviewer = TokenReviewer::new(api, expected());
        let now = Instant::now();
        reviewer.keep("good", Ok("node-a".into()), now);
        reviewer.keep("bad", Err("expired".into()), now);
        assert_eq!(reviewer.kept("good", now), Some(Ok("node-a".into())));
        assert_eq!(reviewer.kept("bad", now), Some(Err("expired".into())));
        assert_eq!(reviewer.kept("bad", now + REFUSED_FOR), None);
        assert_eq!(
            reviewer.kept("good", now + REFUSED_FOR),
            Some(Ok("node-a".into()))
        );
        assert_eq!(reviewer.kept("good", now + ACCEPTED_FOR), None);
        for i in 0..MAX_VERDICTS * 2 {
            reviewer.keep(&format!("t{i}"), Err("no".into()), now);
        }
        assert!(reviewer.verdicts.lock().expect("lock").len() <= MAX_VERDICTS);
    }
}
