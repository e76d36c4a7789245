//! OpenAPI v3 schemas of the configuration model, for the structural schemas of the
//! CustomResourceDefinitions in `deploy/istio-crds.yaml`. They are drawn from the very
//! types the loader reads into, so the API server refuses what the loader would refuse
//! by shape — an unknown field, a value of the wrong type, an enum value Istio does not
//! have, a malformed duration — and the two cannot drift apart. What a schema cannot say
//! (one of several fields, ranges that depend on each other, references to other
//! objects) the agent still checks and reports.

use std::collections::BTreeMap;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_json::{json, Value};

/// A type of the configuration model with an OpenAPI v3 schema.
pub trait OpenApi {
    fn schema() -> Value;
}

impl OpenApi for String {
    fn schema() -> Value {
        json!({"type": "string"})
    }
}

impl OpenApi for bool {
    fn schema() -> Value {
        json!({"type": "boolean"})
    }
}

impl OpenApi for f64 {
    fn schema() -> Value {
        json!({"type": "number"})
    }
}

impl OpenApi for i32 {
    fn schema() -> Value {
        json!({"type": "integer", "format": "int32"})
    }
}

impl OpenApi for u32 {
    fn schema() -> Value {
        json!({"type": "integer", "format": "int64", "minimum": 0, "maximum": u32::MAX})
    }
}

impl OpenApi for u64 {
    fn schema() -> Value {
        json!({"type": "integer", "format": "int64", "minimum": 0})
    }
}

impl OpenApi for i64 {
    fn schema() -> Value {
        json!({"type": "integer", "format": "int64"})
    }
}

/// Absent and unset are the same in the model, so an optional field has its value's
/// schema (the API server drops a `null` it is given for such a field).
impl<T: OpenApi> OpenApi for Option<T> {
    fn schema() -> Value {
        T::schema()
    }
}

impl<T: OpenApi> OpenApi for Vec<T> {
    fn schema() -> Value {
        json!({"type": "array", "items": T::schema()})
    }
}

/// A map by name, or by port number (JSON writes every key as a string).
impl<K, V: OpenApi> OpenApi for BTreeMap<K, V> {
    fn schema() -> Value {
        json!({"type": "object", "additionalProperties": V::schema()})
    }
}

/// The schema of a message: its fields by the names serde reads them under (renames
/// included), each with the schema of its type, in the order the struct declares them.
pub fn message<T: for<'de> Deserialize<'de>>(field_schemas: Vec<Value>) -> Value {
    let names = field_names::<T>();
    debug_assert_eq!(
        names.len(),
        field_schemas.len(),
        "{}",
        std::any::type_name::<T>()
    );
    let properties: serde_json::Map<String, Value> = names
        .iter()
        .map(|name| (*name).to_owned())
        .zip(field_schemas)
        .collect();
    json!({"type": "object", "properties": properties})
}

/// The schema of an enumeration: a string, one of the names serde writes its variants as.
pub fn enumeration<T: serde::Serialize>(variants: &[T]) -> Value {
    let names: Vec<Value> = variants
        .iter()
        .filter_map(|variant| serde_json::to_value(variant).ok())
        .collect();
    json!({"type": "string", "enum": names})
}

/// The field names a struct's `Deserialize` asks for, in declaration order: a deserializer
/// that records what `deserialize_struct` is called with and goes no further.
fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    let mut recorder = FieldRecorder::default();
    // The recorder always refuses, once it has the names.
    let _ = T::deserialize(&mut recorder);
    recorder.fields
}

#[derive(Default)]
struct FieldRecorder {
    fields: &'static [&'static str],
}

impl<'de> Deserializer<'de> for &mut FieldRecorder {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.fields = fields;
        Err(de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::istio;

    #[test]
    fn a_message_has_its_fields_by_the_names_serde_reads() {
        let route = istio::HttpRoute::schema();
        assert_eq!(route["type"], "object");
        let matches = &route["properties"]["match"];
        assert_eq!(matches["type"], "array");
        let uri = &matches["items"]["properties"]["uri"];
        assert_eq!(uri["properties"]["prefix"], json!({"type": "string"}));
        assert_eq!(
            matches["items"]["properties"]["ignoreUriCase"],
            json!({"type": "boolean"})
        );
        assert_eq!(route["properties"]["timeout"]["type"], "string");
        let outlier = istio::OutlierDetection::schema();
        assert_eq!(
            outlier["properties"]["consecutive5xxErrors"]["type"],
            "integer"
        );
    }

    #[test]
    fn an_enumeration_is_one_of_the_names_serde_writes() {
        assert_eq!(
            istio::ClientTlsMode::schema(),
            json!({"type": "string", "enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]})
        );
        let protocols = istio::TlsProtocol::schema();
        assert!(protocols["enum"]
            .as_array()
            .is_some_and(|names| names.contains(&json!("TLSV1_2"))));
    }

    #[test]
    fn maps_by_name_and_by_port_are_objects_of_their_values() {
        let peer = istio::PeerAuthentication::schema();
        let by_port = &peer["properties"]["portLevelMtls"];
        assert_eq!(by_port["type"], "object");
        assert_eq!(
            by_port["additionalProperties"]["properties"]["mode"]["enum"][3],
            "STRICT"
        );
        let selector = &peer["properties"]["selector"]["properties"]["matchLabels"];
        assert_eq!(
            *selector,
            json!({"type": "object", "additionalProperties": {"type": "string"}})
        );
    }

    #[test]
    fn a_duration_pattern_takes_what_the_loader_reads() {
        let pattern = istio::Duration::schema()["pattern"]
            .as_str()
            .map(|p| regex::Regex::new(p).expect("pattern"))
            .expect("a pattern");
        for good in ["1s", "250ms", "1h30m", "0.5s", "10us", "3µs", "1ns"] {
            assert!(istio::parse_duration(good).is_ok(), "{good}");
            assert!(pattern.is_match(good), "{good} refused by the schema");
        }
        for bad in ["", "1", "s", "1x", "-1s", "10 s", "1d"] {
            assert!(!pattern.is_match(bad), "{bad:?} passed the schema");
        }
    }
}
