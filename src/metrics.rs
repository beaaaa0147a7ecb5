//! Counters in CloudWatch Embedded Metric Format (EMF): one JSON line per event, which CloudWatch Logs
//! turns into metrics with no API call, no extra permission and no latency (the function already writes
//! its logs). Namespace `AmiShare`, one dimension, `FunctionName`, so each stack's figures stay apart.
//!
//! Pure: [`Counts`] is computed from outcomes and rendered as an EMF document; the Lambda prints it.

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::outcome::Outcome;
use crate::plan::Action;

pub const NAMESPACE: &str = "AmiShare";

/// What one event (or one sweep) did, as metric values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Images reconciled.
    pub images: u64,
    /// Launch permission additions made (one per image and region, whatever the number of targets).
    pub shared: u64,
    /// Launch and create-volume permission removals made (exclusive mode).
    pub unshared: u64,
    /// CopyImage calls made.
    pub copied: u64,
    /// Key policies written.
    pub key_policies_patched: u64,
    /// Reasons an image or a region was not shared as configured (a key that cannot be shared, a
    /// missing copy key, public sharing refused).
    pub blocked: u64,
    /// AWS calls that failed.
    pub failed: u64,
}

impl Counts {
    /// The counts of one reconciliation. Only actions done count: a dry run counts nothing but its
    /// blocks and failures.
    pub fn of(outcome: &Outcome) -> Self {
        let done = |matches: fn(&Action) -> bool| {
            outcome.done.iter().filter(|a| matches(a)).count() as u64
        };
        Self {
            images: 1,
            shared: done(|a| matches!(a, Action::AddLaunchPermissions { .. })),
            unshared: done(|a| {
                matches!(
                    a,
                    Action::RemoveLaunchPermissions { .. }
                        | Action::RemoveCreateVolumePermission { .. }
                )
            }),
            copied: done(|a| matches!(a, Action::CopyImage(_))),
            key_policies_patched: done(|a| matches!(a, Action::PatchKeyPolicy { .. })),
            // A blocked region is one of `outcome.blocked` too ("no copy in <region>: …").
            blocked: outcome.blocked.len() as u64,
            failed: outcome.failures.len() as u64,
        }
    }

    pub fn add(&mut self, other: Self) {
        self.images += other.images;
        self.shared += other.shared;
        self.unshared += other.unshared;
        self.copied += other.copied;
        self.key_policies_patched += other.key_policies_patched;
        self.blocked += other.blocked;
        self.failed += other.failed;
    }

    /// The metric names and values, in a stable order.
    fn metrics(&self) -> [(&'static str, u64); 7] {
        [
            ("Images", self.images),
            ("Shared", self.shared),
            ("Unshared", self.unshared),
            ("Copied", self.copied),
            ("KeyPoliciesPatched", self.key_policies_patched),
            ("Blocked", self.blocked),
            ("Failed", self.failed),
        ]
    }

    /// The EMF document: `_aws` metadata naming each metric (unit Count) and its dimension, then the
    /// values as top-level fields, as the EMF specification requires.
    pub fn emf(&self, function_name: &str, timestamp_ms: u64) -> Value {
        let metrics = self.metrics();
        let definitions: Vec<Value> = metrics
            .iter()
            .map(|(name, _)| json!({"Name": name, "Unit": "Count"}))
            .collect();
        let mut document = Map::new();
        document.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    "Dimensions": [["FunctionName"]],
                    "Metrics": definitions,
                }],
            }),
        );
        document.insert("FunctionName".into(), json!(function_name));
        for (name, value) in metrics {
            document.insert(name.into(), json!(value));
        }
        Value::Object(document)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aws::AwsError;
    use crate::observed::Tags;
    use crate::outcome::{RegionOutcome, RegionStatus};

    fn share() -> Action {
        Action::AddLaunchPermissions {
            region: "us-east-1".into(),
            image_id: "ami-1".into(),
            permissions: Vec::new(),
        }
    }

    #[test]
    fn counts_only_what_was_done_and_every_block_and_failure() {
        let mut outcome = Outcome::default();
        outcome.done.push(share());
        outcome.not_done.push(share());
        outcome.done.push(Action::SetStatus {
            region: "us-east-1".into(),
            image_id: "ami-1".into(),
            tags: Tags::new(),
        });
        outcome.blocked.push("aws/ebs".into());
        outcome.blocked.push("no copy in us-west-2: no key".into());
        outcome.regions.insert(
            "us-west-2".into(),
            RegionOutcome {
                status: RegionStatus::Blocked,
                image_id: None,
                detail: None,
            },
        );
        outcome.regions.insert(
            "eu-west-1".into(),
            RegionOutcome {
                status: RegionStatus::Done,
                image_id: None,
                detail: None,
            },
        );
        outcome.failures.push(AwsError {
            operation: "CopyImage",
            region: "eu-west-1".into(),
            resource: "ami-1".into(),
            code: None,
            message: "x".into(),
            retryable: true,
        });
        assert_eq!(
            Counts::of(&outcome),
            Counts {
                images: 1,
                shared: 1,
                blocked: 2,
                failed: 1,
                ..Counts::default()
            }
        );
    }

    #[test]
    fn the_emf_document_declares_every_metric_and_carries_its_value() {
        let mut counts = Counts {
            images: 1,
            shared: 1,
            ..Counts::default()
        };
        counts.add(Counts {
            images: 2,
            copied: 3,
            key_policies_patched: 1,
            ..Counts::default()
        });
        let document = counts.emf("ami-share-fn", 1_764_000_000_000);
        let metadata = &document["_aws"];
        assert_eq!(metadata["Timestamp"], 1_764_000_000_000u64);
        let directive = &metadata["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "AmiShare");
        assert_eq!(directive["Dimensions"], json!([["FunctionName"]]));
        assert_eq!(document["FunctionName"], "ami-share-fn");
        // Every declared metric has a numeric value at the top level (else CloudWatch drops the line).
        let names: Vec<&str> = directive["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                assert_eq!(m["Unit"], "Count");
                m["Name"].as_str().unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "Images",
                "Shared",
                "Unshared",
                "Copied",
                "KeyPoliciesPatched",
                "Blocked",
                "Failed"
            ]
        );
        for name in names {
            assert!(document[name].is_u64(), "{name}");
        }
        assert_eq!(
            (
                &document["Images"],
                &document["Shared"],
                &document["Copied"],
                &document["KeyPoliciesPatched"]
            ),
            (&json!(3), &json!(1), &json!(3), &json!(1))
        );
    }
}
