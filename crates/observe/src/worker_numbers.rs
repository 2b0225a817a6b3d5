//! A worker's record as JSON, written from `pstrain_core::WORKER_FIELDS`: every number under its
//! name, then the staleness histogram. The live page and the metrics file both serialise it, so
//! a number added to the record reaches them with no edit here.

use pstrain_core::{Number, WorkerStats, WORKER_FIELDS};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};

/// A worker's numbers, serialised as a flat map (use with `#[serde(flatten)]`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerNumbers(pub WorkerStats);

impl std::ops::Deref for WorkerNumbers {
    type Target = WorkerStats;
    fn deref(&self) -> &WorkerStats {
        &self.0
    }
}

impl Serialize for WorkerNumbers {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(WORKER_FIELDS.len() + 1))?;
        for field in WORKER_FIELDS {
            match (field.get)(&self.0) {
                Number::Count(n) | Number::Bytes(n) => map.serialize_entry(field.name, &n)?,
                Number::Real(x) => map.serialize_entry(field.name, &x)?,
                Number::Codecs(c) => map.serialize_entry(field.name, &c.to_string())?,
            }
        }
        map.serialize_entry("staleness_histogram", &self.0.staleness_hist)?;
        map.end()
    }
}

/// The record's columns for a table (the live page's): `[name, title]` of each number that has
/// a title, in the record's order.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkerColumns;

impl Serialize for WorkerColumns {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for field in WORKER_FIELDS {
            if let Some(title) = field.title {
                seq.serialize_element(&[field.name, title])?;
            }
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_number_is_written_under_its_name() {
        let stats = WorkerStats {
            applied: 4,
            wait_s: 0.5,
            ..Default::default()
        };
        let json = serde_json::to_value(WorkerNumbers(stats)).unwrap();
        let map = json.as_object().unwrap();
        assert_eq!(map.len(), WORKER_FIELDS.len() + 1);
        assert_eq!(map["gradients_applied"], 4);
        assert_eq!(map["wait_s"], 0.5);
        assert_eq!(map["staleness_histogram"].as_array().unwrap().len(), 8);
        let columns = serde_json::to_value(WorkerColumns).unwrap();
        assert_eq!(
            columns[0],
            serde_json::json!(["gradients_applied", "applied"])
        );
    }
}
