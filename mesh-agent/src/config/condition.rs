//! The condition keys of an AuthorizationPolicy's `when`, as Istio spells them, parsed
//! once: validation reports the ones it does not know, the policy engine matches on the
//! typed key.

/// A condition key of `when`, as Istio spells them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConditionKey {
    RequestHeader(String),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// `request.auth.claims[a][b]`: the path into nested claims.
    AuthClaims(Vec<String>),
    DestinationIp,
    DestinationPort,
    ConnectionSni,
}

/// A `when` key Istio does not define, or one whose brackets are malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConditionKeyError {
    #[error("invalid condition key {0:?}: expected request.headers[<name>]")]
    Header(String),
    #[error("invalid condition key {0:?}: expected request.auth.claims[<name>] (nested: [a][b])")]
    Claims(String),
    #[error("unknown condition key {0:?} (supported: request.headers[..], source.ip, remote.ip, source.namespace, source.principal, request.auth.principal, request.auth.audiences, request.auth.presenter, request.auth.claims[..], destination.ip, destination.port, connection.sni)")]
    Unknown(String),
}

impl ConditionKey {
    pub fn parse(key: &str) -> Result<ConditionKey, ConditionKeyError> {
        let bracketed = |rest: &str| -> Option<Vec<String>> {
            let mut parts = Vec::new();
            let mut rest = rest;
            while !rest.is_empty() {
                let inner = rest.strip_prefix('[')?;
                let end = inner.find(']')?;
                if end == 0 {
                    return None;
                }
                parts.push(inner[..end].to_owned());
                rest = &inner[end + 1..];
            }
            (!parts.is_empty()).then_some(parts)
        };
        let key = key.trim();
        if let Some(rest) = key.strip_prefix("request.headers") {
            return match bracketed(rest).as_deref() {
                Some([name]) => Ok(ConditionKey::RequestHeader(name.to_ascii_lowercase())),
                _ => Err(ConditionKeyError::Header(key.to_owned())),
            };
        }
        if let Some(rest) = key.strip_prefix("request.auth.claims") {
            return bracketed(rest)
                .map(ConditionKey::AuthClaims)
                .ok_or_else(|| ConditionKeyError::Claims(key.to_owned()));
        }
        Ok(match key {
            "source.ip" => ConditionKey::SourceIp,
            "remote.ip" => ConditionKey::RemoteIp,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.principal" => ConditionKey::SourcePrincipal,
            "request.auth.principal" => ConditionKey::AuthPrincipal,
            "request.auth.audiences" => ConditionKey::AuthAudiences,
            "request.auth.presenter" => ConditionKey::AuthPresenter,
            "destination.ip" => ConditionKey::DestinationIp,
            "destination.port" => ConditionKey::DestinationPort,
            "connection.sni" => ConditionKey::ConnectionSni,
            _ => return Err(ConditionKeyError::Unknown(key.to_owned())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn condition_keys_parse_as_istio_spells_them() {
        assert_eq!(
            ConditionKey::parse("request.headers[X-Token]"),
            Ok(ConditionKey::RequestHeader("x-token".into()))
        );
        assert_eq!(
            ConditionKey::parse("request.auth.claims[a][b]"),
            Ok(ConditionKey::AuthClaims(vec!["a".into(), "b".into()]))
        );
        assert!(ConditionKey::parse("request.headers").is_err());
        assert!(ConditionKey::parse("request.auth.claims[]").is_err());
        assert!(ConditionKey::parse("source.user").is_err());
    }
}
