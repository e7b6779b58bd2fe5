//! Canonical JSON for manifests, configs and indexes: keys sorted at every level, no whitespace.
//! Going through `serde_json::Value` sorts keys (its map is a BTreeMap), including those of the
//! HashMaps that oci-spec uses for annotations, so the same content always gives the same bytes.

use serde::Serialize;

pub fn to_canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&serde_json::to_value(value)?)
}

/// RFC 3339 (UTC, whole seconds) for a SOURCE_DATE_EPOCH value.
pub fn rfc3339(epoch_seconds: i64) -> Option<String> {
    chrono::DateTime::from_timestamp(epoch_seconds, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn keys_are_sorted_at_every_level() {
        let mut inner = HashMap::new();
        for k in ["z", "a", "m", "b", "y"] {
            inner.insert(k, 1);
        }
        let outer = serde_json::json!({"zeta": inner, "alpha": [ {"y": 1, "x": 2} ]});
        let bytes = to_canonical_json(&outer).unwrap();
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            r#"{"alpha":[{"x":2,"y":1}],"zeta":{"a":1,"b":1,"m":1,"y":1,"z":1}}"#
        );
    }

    #[test]
    fn epoch_formats_as_rfc3339() {
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000).unwrap(), "2023-11-14T22:13:20Z");
    }
}
