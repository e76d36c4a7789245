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

pub fn b64(text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| format!("invalid base64url: {e}"))
}

pub fn parse_jwks(text: &str) -> Result<Jwks, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let keys = value
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" array")?;
    let mut jwks = Jwks::default();
    for (index, key) in keys.iter().enumerate() {
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let text = key
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("keys[{index}] has no {name:?}"))?;
            b64(text).map_err(|e| format!("keys[{index}].{name}: {e}"))
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
