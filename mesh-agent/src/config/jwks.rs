//! JSON Web Key Sets, as RequestAuthentication's inline `jwks` and fetched `jwksUri`
//! documents carry them: the signing keys of supported types, decoded.

use base64::Engine;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum KeyMaterial {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    Ec { p384: bool, point: Vec<u8> },
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Jwk {
    pub kid: Option<String>,
    pub alg: Option<String>,
    pub key: KeyMaterial,
}

/// A JSON Web Key Set; keys of unsupported types are left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

impl Jwks {
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Why a JWKS document was not accepted, naming the key and field at fault.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("JWKS is not JSON")]
    Json(#[source] serde_json::Error),
    #[error("JWKS has no \"keys\" array")]
    NoKeys,
    #[error("keys[{index}] has no {field:?}")]
    Missing { index: usize, field: String },
    #[error("keys[{index}].{field}: invalid base64url")]
    Base64 {
        index: usize,
        field: String,
        #[source]
        source: base64::DecodeError,
    },
}

/// Decodes base64url, with or without padding.
pub fn b64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.trim_end_matches('='))
}

pub fn parse_jwks(text: &str) -> Result<Jwks, JwksError> {
    let value: Value = serde_json::from_str(text).map_err(JwksError::Json)?;
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or(JwksError::NoKeys)?;
    let mut jwks = Jwks::default();
    for (index, key) in keys.iter().enumerate() {
        let field = |name: &str| -> Result<Vec<u8>, JwksError> {
            let text = key
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| JwksError::Missing {
                    index,
                    field: name.to_owned(),
                })?;
            b64(text).map_err(|source| JwksError::Base64 {
                index,
                field: name.to_owned(),
                source,
            })
        };
        let text = |name: &str| key.get(name).and_then(Value::as_str).map(str::to_owned);
        let material = match (text("kty").as_deref(), text("crv").as_deref()) {
            (Some("RSA"), _) => KeyMaterial::Rsa {
                n: field("n")?,
                e: field("e")?,
            },
            (Some("EC"), Some(curve @ ("P-256" | "P-384"))) => {
                let mut point = vec![4];
                point.extend(field("x")?);
                point.extend(field("y")?);
                KeyMaterial::Ec {
                    p384: curve == "P-384",
                    point,
                }
            }
            (Some("OKP"), Some("Ed25519")) => KeyMaterial::Ed25519(field("x")?),
            _ => continue,
        };
        if text("use").is_some_and(|u| u != "sig") {
            continue;
        }
        jwks.keys.push(Jwk {
            kid: text("kid"),
            alg: text("alg"),
            key: material,
        });
    }
    Ok(jwks)
}
