//! The outcome of one reconciliation: what was done, not done, blocked, deferred and why, each region's
//! copy, and the failures. Its summary is the one record an event leaves in the log; the faces decide
//! from it whether to retry (the Lambda) or how to exit (the CLI).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::aws::AwsError;
use crate::observed::{CreatedBy, ImageState};
use crate::plan::{Action, Plan, RegionCopy};
use crate::targets::LaunchPermission;

/// Everything one reconciliation did and decided: the summary record of an event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub image_id: String,
    pub region: String,
    /// The image the event named, when it was ami-share's re-encrypted copy of `image_id` (which was
    /// reconciled instead: the source's rules govern the copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_image_id: Option<String>,
    /// When `image_id` is ami-share's copy in another region: its source, `ami-… in <region>`, whose
    /// rules govern it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_of: Option<String>,
    /// Each target region of the rules' `copy`, and what became of its copy.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, RegionOutcome>,
    /// How the image was made, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<CreatedBy>,
    /// Rules that selected the image.
    pub rules: Vec<String>,
    /// The plan's actions that were carried out (in dry-run mode: none).
    pub done: Vec<Action>,
    /// The plan's actions not carried out: dry-run, or their call failed.
    pub not_done: Vec<Action>,
    /// Planned only (a dry run): `not_done` is what an apply would do.
    pub dry_run: bool,
    /// Work left for later, and why.
    pub deferred: Vec<String>,
    /// Why the image is not shared as it is, when that is the case.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocked: Vec<String>,
    /// Why nothing was done at all, when that is the case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Tag keys rules disagreed on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// What a person should know about how the image was taken: marks EC2 does not back, images found
    /// by marks and ignored, configured targets that need no grant.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// What was left out to stay within one of AWS's limits, and what to change ([`crate::limits`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
    /// AWS calls that failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<AwsError>,
    /// Why the event must be handled again later although no call failed (EC2 has not caught up with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<String>,
    /// Copies made by this run in other regions: region → new image id.
    #[serde(skip)]
    pub(crate) made: BTreeMap<String, String>,
    /// ami-share's copies whose plan was part of this reconciliation (the chosen copy of each kind and
    /// region): a sweep reconciles the others on their own.
    #[serde(skip)]
    pub reached: BTreeSet<String>,
    /// The launch permissions of `image_id` after this reconciliation (in a dry run: as they would be),
    /// when they were read: what a sweep's key audit needs not read again.
    #[serde(skip)]
    pub launch_permissions: Option<BTreeSet<LaunchPermission>>,
}

/// One word for an image's reconciliation, in logs and answers. Declared in the order of the words: a
/// sweep counts by status (`by_status`, its JSON and its headline) in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not shared as it is (`Outcome::blocked` says why), though a re-encrypted copy may be.
    Blocked,
    Done,
    /// A call failed.
    Failed,
    /// EC2 has not caught up with the event: it must be handled again.
    Retry,
    /// Nothing to do, and why (`Outcome::skipped`).
    Skipped,
}

impl Status {
    /// How much a person watching needs to hear of it: a failure most, then what must be retried,
    /// what is blocked, what was done, and last what needed nothing.
    pub fn severity(self) -> u8 {
        match self {
            Self::Failed => 4,
            Self::Retry => 3,
            Self::Blocked => 2,
            Self::Done => 1,
            Self::Skipped => 0,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Retry => "retry",
            Self::Skipped => "skipped",
            Self::Blocked => "blocked",
            Self::Done => "done",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an image's copy in one target region stands after the reconciliation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionStatus {
    /// The source is not available yet.
    Waiting,
    /// CopyImage was called now.
    Copying,
    /// The copy is being made.
    Pending,
    /// The copy is available and as configured.
    Done,
    Blocked,
    Failed,
    /// The copy was to be made, and was not (a dry run).
    NotDone,
}

impl RegionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Copying => "copying",
            Self::Pending => "pending",
            Self::Done => "done",
            Self::Blocked => "blocked",
            Self::Failed => "failed",
            Self::NotDone => "not_done",
        }
    }
}

/// What became of an image's copy in one target region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionOutcome {
    pub status: RegionStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RegionOutcome {
    fn new(status: RegionStatus, image_id: Option<String>, detail: Option<String>) -> Self {
        Self {
            status,
            image_id,
            detail,
        }
    }
}

impl Outcome {
    pub(crate) fn new(image_id: &str, region: &str) -> Self {
        Self {
            image_id: image_id.to_string(),
            region: region.to_string(),
            ..Self::default()
        }
    }

    /// The record of an image ami-share did not reconcile at all, and why.
    pub fn not_reconciled(image_id: &str, region: &str, reason: String) -> Self {
        Self::new(image_id, region).skipped(reason)
    }

    pub(crate) fn skipped(mut self, reason: String) -> Self {
        self.skipped = Some(reason);
        self
    }

    pub(crate) fn failed(mut self, error: AwsError) -> Self {
        self.failures.push(error);
        self
    }

    /// Whether the event was not fully handled: a call failed, or EC2 has not caught up with the event.
    pub fn is_incomplete(&self) -> bool {
        !self.failures.is_empty() || self.retry_reason.is_some()
    }

    /// Whether a retry may complete it: EC2 has not caught up, or some failure is retryable (a retry
    /// redoes only what is still missing, so the other regions' work is not repeated).
    pub fn retryable(&self) -> bool {
        self.retry_reason.is_some() || self.failures.iter().any(|f| f.retryable)
    }

    pub(crate) fn retry_later(mut self, reason: String) -> Self {
        self.retry_reason = Some(reason);
        self
    }

    /// One word for logs and answers.
    pub fn status(&self) -> Status {
        match () {
            _ if !self.failures.is_empty() => Status::Failed,
            _ if self.retry_reason.is_some() => Status::Retry,
            _ if self.skipped.is_some() => Status::Skipped,
            _ if !self.blocked.is_empty() => Status::Blocked,
            _ => Status::Done,
        }
    }

    /// Whether a person watching should hear of it (a sweep's record or line for one image): something
    /// was (or, in a dry run, would be) done, it is blocked, a limit left something out, or it is not
    /// complete.
    pub fn is_noteworthy(&self) -> bool {
        !self.done.is_empty()
            || !self.not_done.is_empty()
            || !self.blocked.is_empty()
            || !self.limits.is_empty()
            || self.is_incomplete()
    }

    /// The plan this reconciliation made (done and not done).
    pub fn plan(&self) -> Plan {
        Plan {
            actions: self.done.iter().chain(&self.not_done).cloned().collect(),
            deferred: self.deferred.clone(),
            blocked: self.blocked.clone(),
            regions: BTreeMap::new(),
            notes: self.notes.clone(),
            limits: self.limits.clone(),
        }
    }

    /// Each target region's outcome, from the plan's view of it and what applying did there.
    pub(crate) fn settle_regions(&mut self, planned: BTreeMap<String, RegionCopy>) {
        for (region, copy) in planned {
            let failure = self
                .failures
                .iter()
                .find(|f| f.region == region)
                .map(ToString::to_string);
            let outcome = match (copy, failure) {
                (RegionCopy::Waiting, _) => RegionOutcome::new(RegionStatus::Waiting, None, None),
                (RegionCopy::Blocked { reason }, _) => {
                    RegionOutcome::new(RegionStatus::Blocked, None, Some(reason))
                }
                (RegionCopy::Copy { image_id, .. }, Some(failure)) => {
                    RegionOutcome::new(RegionStatus::Failed, Some(image_id), Some(failure))
                }
                (
                    RegionCopy::Copy {
                        image_id,
                        blocked: Some(reason),
                        ..
                    },
                    None,
                ) => RegionOutcome::new(RegionStatus::Blocked, Some(image_id), Some(reason)),
                (_, Some(failure)) => RegionOutcome::new(RegionStatus::Failed, None, Some(failure)),
                (RegionCopy::Unread, None) => RegionOutcome::new(
                    RegionStatus::Failed,
                    None,
                    Some("the region could not be read".into()),
                ),
                (RegionCopy::ToCopy, None) => match self.made.get(&region) {
                    Some(id) => RegionOutcome::new(RegionStatus::Copying, Some(id.clone()), None),
                    None => RegionOutcome::new(RegionStatus::NotDone, None, None),
                },
                (
                    RegionCopy::Copy {
                        image_id,
                        state: ImageState::Available,
                        ..
                    },
                    None,
                ) => RegionOutcome::new(RegionStatus::Done, Some(image_id), None),
                (
                    RegionCopy::Copy {
                        image_id, state, ..
                    },
                    None,
                ) => RegionOutcome::new(
                    RegionStatus::Pending,
                    Some(image_id),
                    Some(state.to_string()),
                ),
            };
            self.regions.insert(region, outcome);
        }
    }

    /// One line for a person: what happened to the image and why.
    pub fn headline(&self) -> String {
        let (subject, parts) = self.subject_and_parts();
        match parts {
            Some(parts) => format!("{subject}: {}", parts.join("; ")),
            None => subject,
        }
    }

    /// The same as [`Outcome::headline`], one part per line, for a person at a terminal.
    pub fn report(&self) -> String {
        let (subject, parts) = self.subject_and_parts();
        match parts {
            Some(parts) => format!("{subject}:\n  {}", parts.join("\n  ")),
            None => subject,
        }
    }

    /// The image (and what it is), and each thing done, not done, blocked, deferred, failed; `None`
    /// parts when it was skipped (the subject then says why).
    fn subject_and_parts(&self) -> (String, Option<Vec<String>>) {
        let mut subject = format!("{} in {}", self.image_id, self.region);
        if let Some(copy) = &self.event_image_id {
            subject.push_str(&format!(" (the event named {copy}, its re-encrypted copy)"));
        }
        if let Some(source) = &self.copy_of {
            subject.push_str(&format!(" (ami-share's copy of {source})"));
        }
        if let Some(reason) = &self.skipped {
            return (format!("{subject}: skipped: {reason}"), None);
        }
        let mut parts = vec![format!("rules [{}]", self.rules.join(", "))];
        if self.done.is_empty()
            && self.not_done.is_empty()
            && self.failures.is_empty()
            && self.blocked.is_empty()
        {
            parts.push("already as configured, nothing to do".into());
        }
        parts.extend(self.done.iter().map(|a| format!("done: {a}")));
        let label = if self.dry_run { "would" } else { "not done" };
        parts.extend(self.not_done.iter().map(|a| format!("{label}: {a}")));
        parts.extend(self.blocked.iter().map(|b| format!("blocked: {b}")));
        parts.extend(self.limits.iter().map(|l| format!("over a limit: {l}")));
        parts.extend(self.deferred.iter().map(|d| format!("deferred: {d}")));
        parts.extend(self.notes.iter().map(|n| format!("note: {n}")));
        parts.extend(self.regions.iter().map(|(region, r)| {
            let mut text = format!("{region}: {}", r.status.as_str());
            if let Some(id) = &r.image_id {
                text.push_str(&format!(" {id}"));
            }
            if let Some(detail) = &r.detail
                && r.status != RegionStatus::Failed
            {
                text.push_str(&format!(" ({detail})"));
            }
            text
        }));
        parts.extend(self.failures.iter().map(|f| format!("failed: {f}")));
        parts.extend(self.retry_reason.iter().map(|r| format!("to retry: {r}")));
        (subject, Some(parts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_sort_as_their_words_as_when_they_were_strings() {
        let all = [
            Status::Skipped,
            Status::Done,
            Status::Retry,
            Status::Failed,
            Status::Blocked,
        ];
        let mut by_order = all;
        by_order.sort();
        let mut by_word = all;
        by_word.sort_by_key(|s| s.as_str());
        assert_eq!(by_order, by_word);
        let json: Vec<_> = by_order
            .iter()
            .map(|s| serde_json::to_value(s).unwrap())
            .collect();
        assert_eq!(json, ["blocked", "done", "failed", "retry", "skipped"]);
    }
}
