//! Stage keys: what makes a stage's result reusable.
//!
//! key = blake3(kind, kind version, canonical JSON of the key parameters, input artifact ids
//! in port order). Paths never enter a key: a path parameter is replaced by the content id of
//! what it names, so two machines with the same bytes get the same key.

use fpipe_cache::ArtifactId;
use serde_json::Value;
use std::collections::BTreeMap;

/// A stage key, 64 hex digits.
pub type StageKey = String;

/// Everything a key is made of, kept so `fpipe status` can say what changed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyParts {
    pub kind: String,
    pub version: u32,
    /// Key parameters after path hashing.
    pub params: BTreeMap<String, Value>,
    /// (port, artifact id) in port order.
    pub inputs: Vec<(String, ArtifactId)>,
}

impl KeyParts {
    /// The key these parts hash to.
    pub fn key(&self) -> StageKey {
        let mut h = blake3::Hasher::new_derive_key("fpipe stage key v1");
        let field = |h: &mut blake3::Hasher, b: &[u8]| {
            h.update(&(b.len() as u64).to_le_bytes());
            h.update(b);
        };
        field(&mut h, self.kind.as_bytes());
        field(&mut h, &self.version.to_le_bytes());
        let params = Value::Object(
            self.params
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        field(&mut h, canonical_json(&params).as_bytes());
        for (port, id) in &self.inputs {
            field(&mut h, port.as_bytes());
            h.update(&id.0);
        }
        h.finalize().to_hex().to_string()
    }
}

/// JSON with object keys sorted at every level and no whitespace: the same value always gives
/// the same bytes, whatever order it was written in.
pub fn canonical_json(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                write_canonical(&m[*k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_ignores_key_order() {
        let a = json!({"b": 1, "a": {"y": [1, 2], "x": "s"}});
        let b = json!({"a": {"x": "s", "y": [1, 2]}, "b": 1});
        assert_eq!(canonical_json(&a), canonical_json(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }

    #[test]
    fn every_part_changes_the_key() {
        let base = KeyParts {
            kind: "train".into(),
            version: 1,
            params: [("lr".to_string(), json!(0.1))].into(),
            inputs: vec![("data".into(), ArtifactId([1; 32]))],
        };
        let k = base.key();
        let mut p = base.clone();
        p.kind = "distil".into();
        assert_ne!(p.key(), k);
        let mut p = base.clone();
        p.version = 2;
        assert_ne!(p.key(), k);
        let mut p = base.clone();
        p.params.insert("lr".into(), json!(0.05));
        assert_ne!(p.key(), k);
        let mut p = base.clone();
        p.inputs[0].1 = ArtifactId([2; 32]);
        assert_ne!(p.key(), k);
        let mut p = base.clone();
        p.inputs[0].0 = "other".into();
        assert_ne!(p.key(), k);
        assert_eq!(base.clone().key(), k);
    }
}
