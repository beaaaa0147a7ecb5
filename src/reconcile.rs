//! The flow: observe the image → select rules → observe what the plan needs → plan → apply, with one
//! [`Outcome`] record of it all.
//!
//! Reads are made only when the plan can use them, independent reads and writes run concurrently, and
//! nothing is written that is already there. The outcome always says what was done, even when a write
//! failed half-way, so the summary log is a faithful record.
//!
//! Two orderings matter and are kept here:
//! - an image is shared only after the policies of its snapshots' keys admit the share targets (a share
//!   the receivers cannot launch from helps nobody, and hides the problem);
//! - a key policy write is checked by reading it back after a pause, and merged again if a concurrent
//!   writer replaced it (KMS has no conditional write), a bounded number of times.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;
use serde::Serialize;

use crate::aws::{Aws, AwsError, ImageLookup};
use crate::config::{Config, CreatedBy};
use crate::key_policy::{self, KeyGrantees};
use crate::keys::{self, KeyArn, KeyRef};
use crate::markers::CopyKind;
use crate::observed::{
    ImageState, KeyManager, Observed, ObservedCopies, ObservedImage, ObservedKey,
    ObservedParameter, OtherImages,
};
use crate::plan::{self, Action, Plan, RegionCopy, desired_for_copy, keys_to_read, reads_needed};
use crate::provenance::{self, Provenance, provenance};
use crate::rules::{Desired, ImageFacts, desired_for};
use crate::targets::LaunchPermission;
use crate::trigger::{EventKind, ImageEvent};

/// Whether to make the planned calls, or only report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    DryRun,
}

/// How a key policy write is confirmed. KMS's PutKeyPolicy has no condition: two writers that read the
/// same policy each write their own version, and the later one drops the other's grant. So after writing,
/// ami-share waits `settle` (meant to outlast another writer's read-merge-write; nothing guarantees it),
/// reads the policy back, and merges again if its grantees are missing, up to `max_writes` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicyWrites {
    pub settle: Duration,
    pub max_writes: u32,
}

impl Default for KeyPolicyWrites {
    fn default() -> Self {
        Self {
            settle: Duration::from_secs(1),
            max_writes: 5,
        }
    }
}

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
    /// Planned only ([`Mode::DryRun`]): `not_done` is what an apply would do.
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
    /// AWS calls that failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<AwsError>,
    /// Why the event must be handled again later although no call failed (EC2 has not caught up with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<String>,
    /// Copies made by this run in other regions: region → new image id.
    #[serde(skip)]
    made: BTreeMap<String, String>,
    /// ami-share's copies whose plan was part of this reconciliation (the chosen copy of each kind and
    /// region): a sweep reconciles the others on their own.
    #[serde(skip)]
    pub reached: BTreeSet<String>,
    /// The launch permissions of `image_id` after this reconciliation (in a dry run: as they would be),
    /// when they were read: what a sweep's key audit needs not read again.
    #[serde(skip)]
    pub launch_permissions: Option<BTreeSet<LaunchPermission>>,
}

/// What became of an image's copy in one target region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionOutcome {
    /// `waiting` (the source is not available yet), `copying` (CopyImage done now), `pending` (the copy
    /// is being made), `done` (the copy is available and as configured), `blocked` or `failed`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl RegionOutcome {
    fn new(status: &'static str, image_id: Option<String>, detail: Option<String>) -> Self {
        Self {
            status,
            image_id,
            detail,
        }
    }
}

impl Outcome {
    fn new(image_id: &str, region: &str) -> Self {
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

    fn skipped(mut self, reason: String) -> Self {
        self.skipped = Some(reason);
        self
    }

    fn failed(mut self, error: AwsError) -> Self {
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

    fn retry_later(mut self, reason: String) -> Self {
        self.retry_reason = Some(reason);
        self
    }

    /// One word for logs and answers: `failed`, `retry`, `skipped`, `blocked` (not shared as it is, with
    /// the reason in `blocked`) or `done`.
    pub fn status(&self) -> &'static str {
        match () {
            _ if !self.failures.is_empty() => "failed",
            _ if self.retry_reason.is_some() => "retry",
            _ if self.skipped.is_some() => "skipped",
            _ if !self.blocked.is_empty() => "blocked",
            _ => "done",
        }
    }

    /// The plan this reconciliation made (done and not done).
    pub fn plan(&self) -> Plan {
        Plan {
            actions: self.done.iter().chain(&self.not_done).cloned().collect(),
            deferred: self.deferred.clone(),
            blocked: self.blocked.clone(),
            regions: BTreeMap::new(),
            notes: self.notes.clone(),
        }
    }

    /// Each target region's outcome, from the plan's view of it and what applying did there.
    fn settle_regions(&mut self, planned: BTreeMap<String, RegionCopy>) {
        for (region, copy) in planned {
            let failure = self
                .failures
                .iter()
                .find(|f| f.region == region)
                .map(ToString::to_string);
            let outcome = match (copy, failure) {
                (RegionCopy::Waiting, _) => RegionOutcome::new("waiting", None, None),
                (RegionCopy::Blocked { reason }, _) => {
                    RegionOutcome::new("blocked", None, Some(reason))
                }
                (RegionCopy::Copy { image_id, .. }, Some(failure)) => {
                    RegionOutcome::new("failed", Some(image_id), Some(failure))
                }
                (
                    RegionCopy::Copy {
                        image_id,
                        blocked: Some(reason),
                        ..
                    },
                    None,
                ) => RegionOutcome::new("blocked", Some(image_id), Some(reason)),
                (_, Some(failure)) => RegionOutcome::new("failed", None, Some(failure)),
                (RegionCopy::Unread, None) => {
                    RegionOutcome::new("failed", None, Some("the region could not be read".into()))
                }
                (RegionCopy::ToCopy, None) => match self.made.get(&region) {
                    Some(id) => RegionOutcome::new("copying", Some(id.clone()), None),
                    None => RegionOutcome::new("not_done", None, None),
                },
                (
                    RegionCopy::Copy {
                        image_id, state, ..
                    },
                    None,
                ) if state == "available" => RegionOutcome::new("done", Some(image_id), None),
                (
                    RegionCopy::Copy {
                        image_id, state, ..
                    },
                    None,
                ) => RegionOutcome::new("pending", Some(image_id), Some(state)),
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
        parts.extend(self.deferred.iter().map(|d| format!("deferred: {d}")));
        parts.extend(self.notes.iter().map(|n| format!("note: {n}")));
        parts.extend(self.regions.iter().map(|(region, r)| {
            let mut text = format!("{region}: {}", r.status);
            if let Some(id) = &r.image_id {
                text.push_str(&format!(" {id}"));
            }
            if let Some(detail) = &r.detail
                && r.status != "failed"
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

/// The configured core for one run: what to reconcile against, through which AWS, how.
pub struct Reconciler<'a, A> {
    pub config: &'a Config,
    pub aws: &'a A,
    /// Used when the event names no region.
    pub home_region: &'a str,
    pub mode: Mode,
    pub key_policy_writes: KeyPolicyWrites,
}

impl<A: Aws> Reconciler<'_, A> {
    /// Reconciles the image an event names.
    pub async fn reconcile(&self, event: &ImageEvent) -> Outcome {
        let region = event.image.region.as_deref().unwrap_or(self.home_region);
        let image_id = event.image.image_id.as_str();
        let outcome = Outcome::new(image_id, region);

        // A terminal state reported by the event needs no look: there is nothing left to tag or share.
        if let EventKind::StateChange { state } = &event.kind
            && matches!(state.as_str(), "failed" | "deregistered" | "disabled")
        {
            return outcome.skipped(format!("the state-change event reports the image {state}"));
        }

        let image = match self.aws.describe_image(region, image_id).await {
            Ok(ImageLookup::Owned(image)) => *image,
            Ok(ImageLookup::NotOwned { owner_id }) => {
                return outcome.skipped(format!(
                    "owned by account {owner_id}, not this one: only the owner can tag or share an AMI"
                ));
            }
            // EC2 is eventually consistent: an image an event has just announced may not be visible yet.
            Ok(ImageLookup::NotFound) if event.kind != EventKind::Direct => {
                return outcome.retry_later(format!(
                    "EC2 does not show {image_id} in {region} yet (it is eventually consistent); if it persists, the image was deregistered or the event names another region"
                ));
            }
            Ok(ImageLookup::NotFound) => {
                return outcome.skipped(format!("no such image in {region}"));
            }
            Err(e) => return outcome.failed(e),
        };
        let lagging = matches!(&event.kind, EventKind::StateChange { state } if state == "available")
            && image.state == ImageState::Pending;
        let outcome = self.reconcile_described(image, &event.kind, outcome).await;
        if lagging && !outcome.rules.is_empty() {
            // No later event will come for this image: have this one delivered again.
            return outcome.retry_later(format!(
                "the event says {image_id} is available but DescribeImages still says pending (EC2 is eventually consistent)"
            ));
        }
        outcome
    }

    /// Reconciles an image this account owns, as a listing (DescribeImages) described it: what a sweep
    /// does for each image, without describing it again.
    pub async fn reconcile_listed(&self, image: ObservedImage) -> Outcome {
        let outcome = Outcome::new(&image.image_id, &image.region);
        self.reconcile_described(image, &EventKind::Direct, outcome)
            .await
    }

    /// Everything after the image is described. ami-share's copies go to their source's rules, but only
    /// where EC2 vouches that they are copies of that source and the source is this account's
    /// ([`crate::provenance`]); any other image is governed by the rules that select it, and one whose
    /// marks EC2 does not back is never copied.
    async fn reconcile_described(
        &self,
        image: ObservedImage,
        kind: &EventKind,
        mut outcome: Outcome,
    ) -> Outcome {
        let created_by = match kind {
            EventKind::ApiCall(created_by) => *created_by,
            EventKind::StateChange { .. } | EventKind::Direct => image.created_by,
        };
        // (what EC2 contradicts in its marks, whether it may be a copy all the same)
        let disputed = match provenance(&image) {
            Provenance::Own => None,
            Provenance::Disputed { reason, maybe_copy } => Some((reason, maybe_copy)),
            Provenance::Copy(copy) => {
                let source = &copy.source_image;
                let region = &copy.source_region;
                match self.aws.describe_image(region, source).await {
                    // ami-share never copies its copies: a copy of a copy is not its copy.
                    Ok(ImageLookup::Owned(source)) if provenance(&source) != Provenance::Own => {
                        Some((
                            format!(
                                "EC2 records it as a copy of {}, which carries copy marks itself, and ami-share never copies its copies",
                                source.image_id
                            ),
                            true,
                        ))
                    }
                    Ok(ImageLookup::Owned(source)) => {
                        return match copy.kind {
                            CopyKind::Regional => {
                                self.reconcile_copy(image, *source, CopyKind::Regional, outcome)
                                    .await
                            }
                            // Its source's rules govern it: the source is reconciled, and with it the copy.
                            CopyKind::Reencrypted => {
                                let mut outcome = Outcome::new(&source.image_id, &source.region);
                                outcome.event_image_id = Some(image.image_id.clone());
                                let created_by = source.created_by;
                                self.reconcile_image(*source, created_by, outcome, true)
                                    .await
                            }
                        };
                    }
                    Ok(ImageLookup::NotOwned { owner_id }) => Some((
                        format!(
                            "EC2 records it as a copy of {source} in {region}, which account {owner_id} owns, not this one"
                        ),
                        true,
                    )),
                    Ok(ImageLookup::NotFound) => Some((
                        format!("EC2 records it as a copy of {source} in {region}, which is gone"),
                        true,
                    )),
                    Err(e) => return outcome.failed(e),
                }
            }
        };
        let may_copy = !disputed.as_ref().is_some_and(|(_, maybe_copy)| *maybe_copy);
        if let Some((reason, maybe_copy)) = disputed {
            tracing::warn!(
                image_id = %image.image_id,
                "{} is not taken for ami-share's copy: {reason}",
                image.image_id
            );
            let copies = match maybe_copy {
                true => "and it is never copied (it may be a copy)",
                false => "and may be copied as they say",
            };
            outcome.notes.push(format!(
                "not taken for ami-share's copy: {reason}; its own rules govern it, {copies}"
            ));
        }
        self.reconcile_image(image, created_by, outcome, may_copy)
            .await
    }

    /// Selects the rules for a described image, then observes, plans and (in [`Mode::Apply`]) applies.
    /// `may_copy`: false for an image that claims to be a copy EC2 does not vouch for, which is never
    /// copied (no `copy`, no `reencrypt`).
    async fn reconcile_image(
        &self,
        image: ObservedImage,
        created_by: CreatedBy,
        mut outcome: Outcome,
        may_copy: bool,
    ) -> Outcome {
        outcome.created_by = Some(created_by);
        let mut desired = desired_for(self.config, &facts_of(&image, created_by));
        if desired.is_empty() {
            let name = image.name.as_deref().unwrap_or("(no name)");
            return outcome.skipped(format!("no rule selects it (name {name:?})"));
        }
        if !may_copy {
            desired.copy = None;
            desired.reencrypt_with = None;
        }
        self.reconcile_desired(image, desired, outcome).await
    }

    /// A copy ami-share made of `source`, an image of this account: its source's rules say what it must
    /// have (tags, shares, key grants, deprecation, parameter). It is never copied again: the copy's
    /// wanted state has no `copy`. Only its region is touched, so a stack per region finishes its copies.
    async fn reconcile_copy(
        &self,
        copy: ObservedImage,
        source: ObservedImage,
        kind: CopyKind,
        mut outcome: Outcome,
    ) -> Outcome {
        outcome.copy_of = Some(format!("{} in {}", source.image_id, source.region));
        outcome.created_by = Some(source.created_by);
        let desired = desired_for(self.config, &facts_of(&source, source.created_by));
        if desired.is_empty() {
            return outcome.skipped(format!(
                "no rule of this function's config selects its source {} (any more, or the config here differs from the source region's): the copy is left as it is",
                source.image_id
            ));
        }
        let desired = desired_for_copy(&desired, &source, kind);
        self.reconcile_desired(copy, desired, outcome).await
    }

    /// ami-share's copy (as EC2 vouches) whose source's reconciliation did not reach it (the source no
    /// longer wants a re-encrypted copy, say): finished on its own under its source's rules, so exclusive
    /// mode and changed rules reach it too. What is not ami-share's copy is reconciled as any image.
    pub async fn reconcile_unreached_copy(&self, image: ObservedImage) -> Outcome {
        let outcome = Outcome::new(&image.image_id, &image.region);
        if let Provenance::Copy(copy) = provenance(&image) {
            match self
                .aws
                .describe_image(&copy.source_region, &copy.source_image)
                .await
            {
                Ok(ImageLookup::Owned(source)) if provenance(&source) == Provenance::Own => {
                    return self
                        .reconcile_copy(image, *source, copy.kind, outcome)
                        .await;
                }
                Err(e) => return outcome.failed(e),
                Ok(_) => {}
            }
        }
        self.reconcile_described(image, &EventKind::Direct, outcome)
            .await
    }

    /// Observes what the plan needs, plans and (in [`Mode::Apply`]) applies.
    async fn reconcile_desired(
        &self,
        image: ObservedImage,
        desired: Desired,
        mut outcome: Outcome,
    ) -> Outcome {
        outcome.rules = desired.rules.clone();
        outcome.conflicts = desired.conflicts.clone();
        outcome.notes.extend(desired.notes.iter().cloned());
        let observed = match self.observe(image, &desired, &mut outcome).await {
            Ok(observed) => observed,
            Err(e) => return outcome.failed(e),
        };
        let plan = plan::plan(&desired, &observed);
        outcome.deferred = plan.deferred;
        outcome.blocked = plan.blocked;
        outcome.notes.extend(plan.notes);
        if self.mode == Mode::DryRun {
            outcome.dry_run = true;
            outcome.not_done = plan.actions;
        } else {
            self.apply(plan.actions, &mut outcome).await;
        }
        outcome.settle_regions(plan.regions);
        outcome.launch_permissions = observed.image.launch_permissions.map(|mut permissions| {
            // As they are now (a dry run: as they would be).
            let changed = if outcome.dry_run {
                &outcome.not_done
            } else {
                &outcome.done
            };
            for action in changed {
                match action {
                    Action::AddLaunchPermissions {
                        image_id,
                        permissions: added,
                        ..
                    } if *image_id == observed.image.image_id => {
                        permissions.extend(added.iter().cloned());
                    }
                    Action::RemoveLaunchPermissions {
                        image_id,
                        permissions: removed,
                        ..
                    } if *image_id == observed.image.image_id => {
                        for p in removed {
                            permissions.remove(p);
                        }
                    }
                    _ => {}
                }
            }
            permissions
        });
        outcome
    }

    /// The reads the plan needs, beyond the image itself: its launch permissions, snapshots, keys and
    /// parameters; when it cannot be shared as it is and a rule asks for it, its re-encrypted copy; and its
    /// copies in the rules' other regions. Each region is read concurrently with the others and with the
    /// image's own reads, so the chain of calls is as long for five regions as for one. A region that
    /// cannot be read is recorded in `outcome` and left out; the others go on.
    async fn observe(
        &self,
        image: ObservedImage,
        desired: &Desired,
        outcome: &mut Outcome,
    ) -> Result<Observed, AwsError> {
        let regions = self.regional_targets(&image, desired);
        let copy_desired = desired_for_copy(desired, &image, CopyKind::Regional);
        let (source, regional) = futures::join!(
            async {
                let image = self.observe_image(image.clone(), desired).await?;
                let reencryption = match &desired.reencrypt_with {
                    Some(key) if plan::wants_reencrypted_copy(desired, &image) => {
                        let copies = self
                            .observe_copies(
                                &image.region,
                                &image,
                                CopyKind::Reencrypted,
                                Some(key),
                                &desired_for_copy(desired, &image, CopyKind::Reencrypted),
                            )
                            .await?;
                        Some(copies)
                    }
                    _ => None,
                };
                Ok::<_, AwsError>((image, reencryption))
            },
            join_all(regions.iter().map(|(region, key)| self.observe_copies(
                region,
                &image,
                CopyKind::Regional,
                key.as_ref(),
                &copy_desired
            )))
        );
        let (image, reencryption) = source?;
        let chosen =
            |copies: &ObservedCopies| plan::chosen_copy(&copies.copies).map(|c| c.image_id.clone());
        outcome
            .reached
            .extend(reencryption.as_ref().and_then(chosen));
        outcome.reached.extend(
            regional
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .filter_map(chosen),
        );
        let now = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .ok();
        let mut observed = Observed {
            image,
            reencryption,
            regional: BTreeMap::new(),
            now,
        };
        for ((region, _), result) in regions.into_iter().zip(regional) {
            let copies = match result {
                Ok(copies) => Some(copies),
                Err(e) => {
                    outcome.failures.push(e);
                    None
                }
            };
            observed.regional.insert(region, copies);
        }
        Ok(observed)
    }

    /// The regions to look for copies in: the rules' other regions, once the image is available (before,
    /// no copy can be made, and none looked for).
    fn regional_targets(
        &self,
        image: &ObservedImage,
        desired: &Desired,
    ) -> Vec<(String, Option<KeyRef>)> {
        match &desired.copy {
            Some(wanted) if image.state == ImageState::Available => {
                plan::copy_targets(wanted, image)
                    .into_iter()
                    .map(|(region, key)| (region.clone(), key.clone()))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// ami-share's copies of `source` of one kind in `region`: the chosen one observed as an image (under
    /// `copy_desired`), or, when there is none, the key to make one with.
    async fn observe_copies(
        &self,
        region: &str,
        source: &ObservedImage,
        kind: CopyKind,
        key: Option<&KeyRef>,
        copy_desired: &Desired,
    ) -> Result<ObservedCopies, AwsError> {
        let found = self
            .aws
            .find_copies(region, &source.region, &source.image_id, kind)
            .await?;
        // Found by their marks, which anyone may write: only those EC2 records as copies of the source are
        // taken for its copies. The others are named, and left alone.
        let (mut copies, impostors): (Vec<ObservedImage>, Vec<ObservedImage>) = found
            .into_iter()
            .partition(|c| provenance::is_copy_of(c, kind, &source.region, &source.image_id));
        let ignored = impostors
            .iter()
            .map(|image| match provenance(image) {
                Provenance::Disputed { reason, .. } => reason,
                _ => format!(
                    "{} is no {kind} copy of {}",
                    image.image_id, source.image_id
                ),
            })
            .map(|reason| {
                format!(
                    "ignored as a {kind} copy of {} in {region}: {reason}",
                    source.image_id
                )
            })
            .collect();
        let key = match plan::chosen_copy(&copies).map(|c| c.image_id.clone()) {
            Some(chosen) => {
                let copy = copies.iter_mut().find(|c| c.image_id == chosen);
                let copy = copy.expect("the chosen copy is among the copies");
                *copy = self.observe_image(copy.clone(), copy_desired).await?;
                None
            }
            None => match key {
                Some(key) => Some(self.aws.describe_key(region, key.as_str()).await?),
                None => None,
            },
        };
        Ok(ObservedCopies {
            copies,
            key,
            ignored,
        })
    }

    /// Launch permissions, snapshots, snapshot permissions and parameters (concurrently), then the keys
    /// the snapshots name and the images the parameters name (concurrently).
    async fn observe_image(
        &self,
        mut image: ObservedImage,
        desired: &Desired,
    ) -> Result<ObservedImage, AwsError> {
        let reads = reads_needed(desired, &image);
        let region = image.region.clone();
        let snapshot_ids: Vec<String> = image
            .snapshots
            .iter()
            .map(|s| s.snapshot_id.clone())
            .collect();
        let (permissions, snapshots, volume_permissions, parameters, public_blocked) = futures::join!(
            async {
                match reads.launch_permissions {
                    true => Some(
                        self.aws
                            .describe_launch_permissions(&region, &image.image_id)
                            .await,
                    ),
                    false => None,
                }
            },
            async {
                match reads.snapshots {
                    true => Some(self.aws.describe_snapshots(&region, &snapshot_ids).await),
                    false => None,
                }
            },
            async {
                let (permissions, others) = futures::join!(
                    async {
                        match reads.create_volume_permissions {
                            true => join_all(snapshot_ids.iter().map(|id| {
                                self.aws.describe_create_volume_permissions(&region, id)
                            }))
                            .await
                            .into_iter()
                            .collect::<Result<Vec<_>, _>>()
                            .map(Some),
                            false => Ok(None),
                        }
                    },
                    async {
                        match reads.other_images {
                            true => self
                                .aws
                                .images_on_snapshots(&region, &snapshot_ids)
                                .await
                                .map(Some),
                            false => Ok(None),
                        }
                    }
                );
                Ok::<_, AwsError>((permissions?, others?))
            },
            async {
                match reads.parameters {
                    true => self.observe_parameters(&region, desired).await.map(Some),
                    false => Ok(None),
                }
            },
            async {
                match reads.block_public_access {
                    true => Some(self.aws.image_block_public_access(&region).await),
                    false => None,
                }
            }
        );
        image.public_sharing_blocked = public_blocked.transpose()?;
        image.launch_permissions = permissions.transpose()?;
        if let Some(mut by_id) = snapshots.transpose()? {
            for snapshot in &mut image.snapshots {
                match by_id.remove(&snapshot.snapshot_id) {
                    Some(facts) => {
                        snapshot.tags = Some(facts.tags);
                        snapshot.encrypted = Some(facts.encrypted);
                        snapshot.kms_key_id = facts.kms_key_id;
                    }
                    None => snapshot.tags = Some(Default::default()),
                }
            }
        }
        let (volume_permissions, others) = volume_permissions?;
        if let Some(accounts) = volume_permissions {
            for (snapshot, permissions) in image.snapshots.iter_mut().zip(accounts) {
                snapshot.create_volume_permissions = Some(permissions);
            }
        }
        if let Some(others) = others {
            self.what_other_images_grant(&mut image, &others);
        }
        if let Some(parameters) = parameters? {
            image.parameters = parameters;
        }
        if reads.keys {
            let arns = keys_to_read(&image);
            let keys = join_all(
                arns.iter()
                    .map(|arn| self.observe_key(&region, arn, &desired.approved_keys)),
            )
            .await;
            for (arn, key) in arns.into_iter().zip(keys) {
                image.keys.insert(arn, key?);
            }
        }
        Ok(image)
    }

    /// For each snapshot of `image`, the other AMIs of `others` it backs and the createVolumePermission
    /// their selecting rules grant on it.
    fn what_other_images_grant(&self, image: &mut ObservedImage, others: &[ObservedImage]) {
        for snapshot in &mut image.snapshots {
            let mut found = OtherImages::default();
            for other in others.iter().filter(|o| {
                o.image_id != image.image_id
                    && o.snapshots
                        .iter()
                        .any(|s| s.snapshot_id == snapshot.snapshot_id)
            }) {
                found.image_ids.push(other.image_id.clone());
                let wanted = desired_for(self.config, &facts_of(other, other.created_by));
                found
                    .create_volume_accounts
                    .extend(wanted.create_volume_accounts);
            }
            snapshot.other_images = Some(found);
        }
    }

    /// Each rule parameter's value, and the creation date of the image it names (to never move it back to
    /// an older image).
    async fn observe_parameters(
        &self,
        region: &str,
        desired: &Desired,
    ) -> Result<BTreeMap<String, ObservedParameter>, AwsError> {
        let names: Vec<&String> = desired.ssm_parameters.iter().collect();
        let observed = join_all(names.iter().map(|name| async move {
            let value = self.aws.get_parameter(region, name).await?;
            let value_created = match value.as_deref() {
                Some(id) if id.starts_with("ami-") => {
                    match self.aws.describe_image(region, id).await? {
                        ImageLookup::Owned(image) => self.family_created(&image).await?,
                        _ => None,
                    }
                }
                _ => None,
            };
            Ok::<_, AwsError>(ObservedParameter {
                value,
                value_created,
            })
        }))
        .await;
        names
            .into_iter()
            .zip(observed)
            .map(|(name, p)| Ok((name.clone(), p?)))
            .collect()
    }

    /// When an image's family began, as EC2 dates it: for ami-share's copy (as EC2 vouches), its
    /// source's `CreationDate`, read from the source (`None` when the source is gone or not this
    /// account's); for any other image, its own. Parameters follow the newest family.
    async fn family_created(&self, image: &ObservedImage) -> Result<Option<String>, AwsError> {
        match provenance(image) {
            Provenance::Copy(copy) => Ok(
                match self
                    .aws
                    .describe_image(&copy.source_region, &copy.source_image)
                    .await?
                {
                    ImageLookup::Owned(source) => source.creation_date,
                    _ => None,
                },
            ),
            Provenance::Own | Provenance::Disputed { .. } => Ok(image.creation_date.clone()),
        }
    }

    /// DescribeKey, GetKeyPolicy and what tells whether the key's owner approved ami-share
    /// (ListResourceTags; ListAliases when the config names keys by alias), together, so an encrypted
    /// AMI costs no extra round trip. The policy is kept only of an enabled customer managed key that
    /// is approved: no other key's policy is ever changed, and reading it may be denied by the template's
    /// IAM (as may reading an AWS managed key's tags), which is then no failure.
    async fn observe_key(
        &self,
        region: &str,
        arn: &str,
        approved: &[KeyRef],
    ) -> Result<ObservedKey, AwsError> {
        let parsed = arn.parse::<KeyArn>().ok();
        // A key the config names by ARN or id is approved whatever its tags and aliases.
        let by_arn = parsed
            .as_ref()
            .is_some_and(|a| approved.iter().any(|r| !r.is_alias() && r.names(a, &[])));
        let by_alias = !by_arn && approved.iter().any(KeyRef::is_alias);
        let (key, policy, tags, aliases) = futures::join!(
            self.aws.describe_key(region, arn),
            self.aws.get_key_policy(region, arn),
            async {
                match by_arn {
                    false => Some(self.aws.list_key_tags(region, arn).await),
                    true => None,
                }
            },
            async {
                match by_alias {
                    true => Some(self.aws.list_key_aliases(region, arn).await),
                    false => None,
                }
            }
        );
        let Some(mut key) = key? else {
            return Ok(ObservedKey {
                arn: arn.to_string(),
                manager: KeyManager::Customer,
                state: "not found (deleted?)".into(),
                policy: None,
                tags: None,
                aliases: Vec::new(),
            });
        };
        if key.manager != KeyManager::Customer {
            return Ok(key);
        }
        key.tags = tags.map(tolerate_denied).transpose()?.flatten();
        key.aliases = aliases
            .map(tolerate_denied)
            .transpose()?
            .flatten()
            .unwrap_or_default();
        let is_approved = parsed.is_some_and(|parsed| {
            keys::approval(&parsed, key.tags.as_ref(), &key.aliases, approved).is_some()
        });
        if key.is_enabled() && is_approved {
            key.policy = Some(policy?);
        }
        Ok(key)
    }

    /// Three phases, each concurrent within (at most [`MAX_CONCURRENT_CALLS`] calls at once): tags,
    /// deprecation, key policies, copies, and the shares of regions with no key to patch; then the other
    /// launch and snapshot permissions; then status tags and SSM parameters. Each region is held back on its own: a region whose key policy patch failed gets
    /// no share (receivers could not launch from it), and a region where anything failed gets no status
    /// or parameter (they never claim what did not happen); the other regions go on.
    async fn apply(&self, actions: Vec<Action>, outcome: &mut Outcome) {
        let (last, actions): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::SetStatus { .. } | Action::PutParameter { .. }));
        // A share waits only for the key patches of its region; where none is needed, it goes out with the
        // first phase (one round trip less).
        let patched: Vec<String> = actions
            .iter()
            .filter(|a| matches!(a, Action::PatchKeyPolicy { .. }))
            .map(|a| a.region().to_string())
            .collect();
        let (shares, first): (Vec<Action>, Vec<Action>) = actions.into_iter().partition(|a| {
            matches!(
                a,
                Action::AddLaunchPermissions { .. } | Action::AddCreateVolumePermission { .. }
            ) && patched.iter().any(|r| r == a.region())
        });
        self.apply_phase(first, outcome).await;
        let key_failed: Vec<String> = outcome
            .not_done
            .iter()
            .filter_map(|a| match a {
                Action::PatchKeyPolicy { region, .. } => Some(region.clone()),
                _ => None,
            })
            .collect();
        let (held, shares): (Vec<Action>, Vec<Action>) = shares
            .into_iter()
            .partition(|a| key_failed.contains(&a.region().to_string()));
        if !held.is_empty() {
            let mut regions: Vec<&str> = held.iter().map(Action::region).collect();
            regions.dedup();
            outcome.blocked.push(format!(
                "not shared yet in {}: a key policy there could not be patched (see the failure), and receivers could not launch from it",
                regions.join(", ")
            ));
            outcome.not_done.extend(held);
        }
        self.apply_phase(shares, outcome).await;
        let (held, last): (Vec<Action>, Vec<Action>) = last.into_iter().partition(|a| {
            let region = a.region();
            outcome.failures.iter().any(|f| f.region == region)
        });
        outcome.not_done.extend(held);
        self.apply_phase(last, outcome).await;
    }

    async fn apply_phase(&self, actions: Vec<Action>, outcome: &mut Outcome) {
        let results: Vec<Result<Option<String>, AwsError>> =
            futures::stream::iter(actions.iter().map(|action| self.apply_one(action)))
                .buffered(MAX_CONCURRENT_CALLS)
                .collect()
                .await;
        for (action, result) in actions.into_iter().zip(results) {
            match result {
                Ok(made) => {
                    if let (Action::CopyImage(copy), Some(id)) = (&action, made)
                        && copy.kind == CopyKind::Regional
                    {
                        outcome.made.insert(copy.region.clone(), id);
                    }
                    outcome.done.push(action);
                }
                Err(e) => {
                    outcome.not_done.push(action);
                    outcome.failures.push(e);
                }
            }
        }
    }

    /// Makes the call of one action; for a CopyImage, returns the new image id.
    async fn apply_one(&self, action: &Action) -> Result<Option<String>, AwsError> {
        match action {
            Action::CreateTags {
                region,
                resources,
                tags,
            } => self.aws.create_tags(region, resources, tags).await?,
            Action::SetStatus {
                region,
                image_id,
                tags,
            } => {
                self.aws
                    .create_tags(region, std::slice::from_ref(image_id), tags)
                    .await?
            }
            Action::AddLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                self.aws
                    .add_launch_permissions(region, image_id, permissions)
                    .await?
            }
            Action::PatchKeyPolicy {
                region,
                key_arn,
                grantees,
                ..
            } => self.patch_key_policy(region, key_arn, grantees).await?,
            Action::RemoveLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                self.aws
                    .remove_launch_permissions(region, image_id, permissions)
                    .await?
            }
            Action::AddCreateVolumePermission {
                region,
                snapshot_id,
                accounts,
            } => {
                self.aws
                    .add_create_volume_permissions(region, snapshot_id, accounts)
                    .await?
            }
            Action::RemoveCreateVolumePermission {
                region,
                snapshot_id,
                permissions,
            } => {
                self.aws
                    .remove_create_volume_permissions(region, snapshot_id, permissions)
                    .await?
            }
            Action::DeprecateImage {
                region,
                image_id,
                deprecate_at,
            } => {
                self.aws
                    .enable_image_deprecation(region, image_id, deprecate_at)
                    .await?
            }
            Action::PutParameter {
                region,
                name,
                image_id,
            } => self.aws.put_parameter(region, name, image_id).await?,
            Action::CopyImage(copy) => {
                let copy_id = match self.aws.copy_image(copy).await {
                    // The name is taken there by an image ami-share did not make (its own copies are
                    // found by their marks): the copy gets a name of its own rather than failing for good.
                    // The suffix is random: a name anyone can compute in advance could be taken too.
                    // (A retry finds the copy by its marks, so a new name makes no second copy.)
                    Err(e) if e.code.as_deref() == Some("InvalidAMIName.Duplicate") => {
                        let salt = std::hash::BuildHasher::hash_one(
                            &std::collections::hash_map::RandomState::new(),
                            &copy.client_token,
                        );
                        let renamed = copy.renamed(salt);
                        tracing::warn!(
                            copy_region = %copy.region,
                            "the name {:?} is taken in {}: copying as {:?}",
                            copy.name,
                            copy.region,
                            renamed.name
                        );
                        self.aws.copy_image(&renamed).await?
                    }
                    other => other?,
                };
                tracing::info!(
                    image_id = %copy.source_image_id,
                    copy_id = %copy_id,
                    copy_region = %copy.region,
                    "made {} copy {copy_id} of {} in {}",
                    copy.kind,
                    copy.source_image_id,
                    copy.region
                );
                return Ok(Some(copy_id));
            }
        }
        Ok(None)
    }

    /// Admits `grantees` to the key: reads the policy, merges, writes, and after a pause reads it again to
    /// confirm, merging and writing again while a concurrent writer has dropped them, at most `max_writes`
    /// writes in all. Every write merges into a policy read just before it (not the one planning read), so
    /// what anyone else wrote meanwhile is kept.
    async fn patch_key_policy(
        &self,
        region: &str,
        key_arn: &str,
        grantees: &KeyGrantees,
    ) -> Result<(), AwsError> {
        let error = |message: String, retryable: bool| AwsError {
            operation: "PutKeyPolicy",
            region: region.to_string(),
            resource: key_arn.to_string(),
            code: None,
            message,
            retryable,
        };
        let partition = key_arn
            .parse::<KeyArn>()
            .map_err(|e| error(e, false))?
            .partition()
            .to_string();
        let KeyPolicyWrites { settle, max_writes } = self.key_policy_writes;
        let mut writes = 0;
        loop {
            let current = self.aws.get_key_policy(region, key_arn).await?;
            let merged = match key_policy::merge(&current, grantees, &partition) {
                Ok(None) => return Ok(()),
                Ok(Some(merged)) => merged,
                Err(e) => {
                    return Err(error(
                        format!("the key policy changed into one ami-share cannot merge into: {e}"),
                        false,
                    ));
                }
            };
            if writes == max_writes {
                let lost = match merged.admitted.is_empty() {
                    true => "kms:ViaService limit".to_string(),
                    false => format!("grantees ({})", merged.admitted),
                };
                return Err(error(
                    format!(
                        "the key policy lost ami-share's {lost} after each of {max_writes} writes: another writer keeps replacing it. If CloudFormation, Terraform or a script manages this key's policy, add ami-share's statements there (README, \"Encrypted AMIs\")"
                    ),
                    true,
                ));
            }
            if writes > 0 {
                tracing::warn!(
                    key_arn,
                    writes,
                    missing = %merged.admitted,
                    "the policy of {key_arn} lost ami-share's grantees after write {writes}: another writer replaced it; merging again"
                );
            }
            self.aws
                .put_key_policy(region, key_arn, &merged.policy)
                .await?;
            writes += 1;
            // Longer than another writer's read-merge-write usually takes: it makes a lost write visible
            // to the read that follows. It narrows the race; without a conditional write, nothing closes it.
            tokio::time::sleep(settle).await;
        }
    }
}

/// A read the function's role may be denied (the template scopes KMS reads to approved keys): `None`.
fn tolerate_denied<T>(result: Result<T, AwsError>) -> Result<Option<T>, AwsError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.is_access_denied() => Ok(None),
        Err(e) => Err(e),
    }
}

/// At most this many calls of one apply phase run at once: many regions' copies and shares go out
/// together without meeting EC2's request rate limits all at once.
const MAX_CONCURRENT_CALLS: usize = 8;

/// What the rules select on, read from a described image.
fn facts_of(image: &ObservedImage, created_by: CreatedBy) -> ImageFacts<'_> {
    ImageFacts {
        name: image.name.as_deref(),
        tags: &image.tags,
        owner_id: &image.owner_id,
        created_by,
        creation_date: image.creation_date.as_deref(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    use super::*;
    use crate::aws::Aws;
    use crate::markers;
    use crate::observed::{ObservedSnapshot, SnapshotFacts, SourceImage, Tags};
    use crate::plan::ImageCopy;
    use crate::targets::{LaunchPermission, VolumePermission};
    use crate::trigger::ImageRef;

    const REGION: &str = "eu-west-1";
    const IMAGE: &str = "ami-12345678";
    const CMK: &str = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const AWS_EBS: &str =
        "arn:aws:kms:eu-west-1:123456789012:key/99999999-12ab-34cd-56ef-1234567890ab";
    /// Another region, with its own key under the same alias.
    const WEST: &str = "us-west-2";
    const WEST_KEY: &str =
        "arn:aws:kms:us-west-2:123456789012:key/55555555-12ab-34cd-56ef-1234567890ab";
    const COPY_KEY: &str =
        "arn:aws:kms:eu-west-1:123456789012:key/77777777-12ab-34cd-56ef-1234567890ab";
    const DEFAULT_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Enable IAM User Permissions","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"}]}"#;

    #[derive(Default)]
    struct FakeState {
        images: BTreeMap<String, ObservedImage>,
        snapshots: BTreeMap<String, SnapshotFacts>,
        keys: BTreeMap<String, ObservedKey>,
        /// (region, alias) → key ARN.
        aliases: BTreeMap<(String, String), String>,
        /// Puts after which a "concurrent writer" puts back the policy it read before them.
        overwrites_left: usize,
        /// CopyImage client tokens and the copies they made.
        copy_tokens: BTreeMap<String, String>,
        /// Snapshot id → who has createVolumePermission.
        volume_permissions: BTreeMap<String, BTreeSet<VolumePermission>>,
        /// (region, name) → value.
        parameters: BTreeMap<(String, String), String>,
    }

    /// An in-memory AWS account in one region: images, snapshots, keys. Records every call and can fail
    /// chosen operations.
    struct FakeAws {
        state: Mutex<FakeState>,
        calls: Mutex<Vec<&'static str>>,
        /// The region of each call in `calls`.
        regions_called: Mutex<Vec<String>>,
        failing: Vec<&'static str>,
        /// Regions where every call fails (throttled).
        failing_regions: Vec<&'static str>,
        /// (operation, region): that call fails in that region only.
        failing_in: Vec<(&'static str, &'static str)>,
    }

    impl FakeAws {
        /// One image, `golden-1`, its snapshot `snap-1` encrypted with `key` (`None`: unencrypted).
        fn new(state: ImageState, key: Option<&str>) -> Self {
            let image = ObservedImage {
                image_id: IMAGE.into(),
                region: REGION.into(),
                name: Some("golden-1".into()),
                owner_id: "123456789012".into(),
                state,
                tags: Tags::new(),
                created_by: CreatedBy::CreateImage,
                snapshots: vec![ObservedSnapshot {
                    snapshot_id: "snap-1".into(),
                    encrypted: Some(key.is_some()),
                    kms_key_id: None,
                    tags: None,
                    create_volume_permissions: None,
                    other_images: None,
                }],
                launch_permissions: Some(BTreeSet::new()),
                creation_date: Some("2026-11-25T10:00:00.000Z".into()),
                ..ObservedImage::default()
            };
            let mut fake = FakeState::default();
            fake.images.insert(IMAGE.into(), image);
            fake.snapshots.insert(
                "snap-1".into(),
                SnapshotFacts {
                    tags: Tags::new(),
                    encrypted: key.is_some(),
                    kms_key_id: key.map(str::to_string),
                },
            );
            // CMK's owner tagged it for ami-share; the keys behind alias/ami-share are approved by the
            // configs that name that alias (reencrypt.kms_key, copy.regions).
            let approved: Tags = [(
                crate::keys::APPROVAL_TAG.to_string(),
                crate::keys::APPROVAL_TAG_VALUE.to_string(),
            )]
            .into();
            for (arn, manager, tags) in [
                (CMK, KeyManager::Customer, approved),
                (AWS_EBS, KeyManager::Aws, Tags::new()),
                (COPY_KEY, KeyManager::Customer, Tags::new()),
                (WEST_KEY, KeyManager::Customer, Tags::new()),
            ] {
                fake.keys.insert(
                    arn.into(),
                    ObservedKey {
                        arn: arn.into(),
                        manager,
                        state: "Enabled".into(),
                        policy: Some(DEFAULT_POLICY.into()),
                        tags: Some(tags),
                        aliases: Vec::new(),
                    },
                );
            }
            fake.aliases
                .insert((REGION.into(), "alias/ami-share".into()), COPY_KEY.into());
            fake.aliases
                .insert((WEST.into(), "alias/ami-share".into()), WEST_KEY.into());
            Self {
                state: Mutex::new(fake),
                calls: Mutex::new(Vec::new()),
                regions_called: Mutex::new(Vec::new()),
                failing: Vec::new(),
                failing_regions: Vec::new(),
                failing_in: Vec::new(),
            }
        }

        fn call(&self, operation: &'static str, region: &str) -> Result<(), AwsError> {
            self.calls.lock().unwrap().push(operation);
            self.regions_called.lock().unwrap().push(region.to_string());
            if self.failing.contains(&operation)
                || self.failing_regions.contains(&region)
                || self.failing_in.contains(&(operation, region))
            {
                return Err(AwsError {
                    operation,
                    region: region.into(),
                    resource: "x".into(),
                    code: Some("RequestLimitExceeded".into()),
                    message: "slow down".into(),
                    retryable: true,
                });
            }
            Ok(())
        }

        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }

        fn writes(&self) -> Vec<&'static str> {
            self.calls()
                .into_iter()
                .filter(|c| !["Describe", "Get", "List"].iter().any(|p| c.starts_with(p)))
                .collect()
        }

        fn image(&self, id: &str) -> ObservedImage {
            self.state.lock().unwrap().images[id].clone()
        }

        fn policy(&self, arn: &str) -> String {
            self.state.lock().unwrap().keys[arn].policy.clone().unwrap()
        }

        /// The id of the one image besides IMAGE (the copy a test made).
        fn only_copy(&self) -> String {
            let state = self.state.lock().unwrap();
            let mut others = state.images.keys().filter(|id| *id != IMAGE);
            let copy = others.next().expect("a copy").clone();
            assert!(others.next().is_none(), "one copy");
            copy
        }

        fn set_state(&self, id: &str, state: ImageState) {
            self.state.lock().unwrap().images.get_mut(id).unwrap().state = state;
        }
    }

    impl Aws for FakeAws {
        async fn describe_image(&self, region: &str, id: &str) -> Result<ImageLookup, AwsError> {
            self.call("DescribeImages", region)?;
            let state = self.state.lock().unwrap();
            Ok(match state.images.get(id).filter(|i| i.region == region) {
                Some(image) => {
                    let mut image = image.clone();
                    image.launch_permissions = None;
                    ImageLookup::Owned(Box::new(image))
                }
                None => ImageLookup::NotFound,
            })
        }
        async fn list_owned_images(&self, region: &str) -> Result<Vec<ObservedImage>, AwsError> {
            self.call("DescribeImages", region)?;
            let state = self.state.lock().unwrap();
            Ok(state
                .images
                .values()
                .filter(|i| i.region == region)
                .map(|i| ObservedImage {
                    launch_permissions: None,
                    ..i.clone()
                })
                .collect())
        }
        async fn images_on_snapshots(
            &self,
            region: &str,
            snapshot_ids: &[String],
        ) -> Result<Vec<ObservedImage>, AwsError> {
            self.call("DescribeImages", region)?;
            let state = self.state.lock().unwrap();
            Ok(state
                .images
                .values()
                .filter(|i| {
                    i.region == region
                        && i.snapshots
                            .iter()
                            .any(|s| snapshot_ids.contains(&s.snapshot_id))
                })
                .cloned()
                .collect())
        }
        async fn describe_launch_permissions(
            &self,
            region: &str,
            id: &str,
        ) -> Result<BTreeSet<LaunchPermission>, AwsError> {
            self.call("DescribeImageAttribute", region)?;
            Ok(self.image(id).launch_permissions.unwrap_or_default())
        }
        async fn describe_snapshots(
            &self,
            region: &str,
            ids: &[String],
        ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
            self.call("DescribeSnapshots", region)?;
            let state = self.state.lock().unwrap();
            Ok(ids
                .iter()
                .filter_map(|id| Some((id.clone(), state.snapshots.get(id)?.clone())))
                .collect())
        }
        async fn list_owned_snapshots(
            &self,
            region: &str,
        ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
            self.call("DescribeSnapshots", region)?;
            Ok(self.state.lock().unwrap().snapshots.clone())
        }
        async fn create_tags(
            &self,
            region: &str,
            resources: &[String],
            tags: &Tags,
        ) -> Result<(), AwsError> {
            self.call("CreateTags", region)?;
            let mut state = self.state.lock().unwrap();
            for r in resources {
                if let Some(image) = state.images.get_mut(r) {
                    image.tags.extend(tags.clone());
                } else {
                    state
                        .snapshots
                        .get_mut(r)
                        .unwrap()
                        .tags
                        .extend(tags.clone());
                }
            }
            Ok(())
        }
        async fn add_launch_permissions(
            &self,
            region: &str,
            id: &str,
            permissions: &[LaunchPermission],
        ) -> Result<(), AwsError> {
            self.call("ModifyImageAttribute", region)?;
            let mut state = self.state.lock().unwrap();
            let image = state.images.get_mut(id).unwrap();
            assert_eq!(
                image.state,
                ImageState::Available,
                "EC2 shares only available images"
            );
            image
                .launch_permissions
                .get_or_insert_default()
                .extend(permissions.iter().cloned());
            Ok(())
        }
        async fn image_block_public_access(&self, region: &str) -> Result<bool, AwsError> {
            self.call("GetImageBlockPublicAccessState", region)?;
            Ok(false)
        }
        async fn remove_launch_permissions(
            &self,
            region: &str,
            id: &str,
            permissions: &[LaunchPermission],
        ) -> Result<(), AwsError> {
            self.call("ModifyImageAttribute", region)?;
            let mut state = self.state.lock().unwrap();
            let image = state.images.get_mut(id).unwrap();
            let have = image.launch_permissions.get_or_insert_default();
            for p in permissions {
                have.remove(p);
            }
            Ok(())
        }
        async fn find_copies(
            &self,
            region: &str,
            source_region: &str,
            source: &str,
            kind: CopyKind,
        ) -> Result<Vec<ObservedImage>, AwsError> {
            self.call("DescribeImages", region)?;
            let state = self.state.lock().unwrap();
            let marks = markers::copy_tags(kind, source, source_region);
            Ok(state
                .images
                .values()
                .filter(|i| {
                    i.region == region && marks.iter().all(|(k, v)| i.tags.get(k) == Some(v))
                })
                .map(|i| ObservedImage {
                    launch_permissions: None,
                    ..i.clone()
                })
                .collect())
        }
        async fn copy_image(&self, copy: &ImageCopy) -> Result<String, AwsError> {
            self.call("CopyImage", &copy.region)?;
            let mut state = self.state.lock().unwrap();
            // As EC2: a repeated client token returns the copy it made; AMI names are unique.
            if let Some(id) = state.copy_tokens.get(&copy.client_token) {
                return Ok(id.clone());
            }
            if state
                .images
                .values()
                .any(|i| i.name.as_deref() == Some(&copy.name))
            {
                return Err(AwsError {
                    operation: "CopyImage",
                    region: copy.region.clone(),
                    resource: copy.source_image_id.clone(),
                    code: Some("InvalidAMIName.Duplicate".into()),
                    message: format!("AMI name {} is already in use", copy.name),
                    retryable: false,
                });
            }
            let id = format!("ami-c{:07}", state.images.len());
            state
                .copy_tokens
                .insert(copy.client_token.clone(), id.clone());
            let snapshot = format!("snap-{id}");
            let mut image = state.images[&copy.source_image_id].clone();
            image.image_id = id.clone();
            image.region = copy.region.clone();
            image.name = Some(copy.name.clone());
            image.state = ImageState::Pending;
            image.tags = copy.tags.clone();
            image.created_by = CreatedBy::CopyImage;
            // As EC2 records every copy's source.
            image.source = Some(SourceImage {
                image_id: copy.source_image_id.clone(),
                region: Some(copy.source_region.clone()),
            });
            image.launch_permissions = Some(BTreeSet::new());
            image.snapshots = vec![ObservedSnapshot {
                snapshot_id: snapshot.clone(),
                encrypted: Some(true),
                kms_key_id: None,
                tags: None,
                create_volume_permissions: None,
                other_images: None,
            }];
            state.images.insert(id.clone(), image);
            state.snapshots.insert(
                snapshot,
                SnapshotFacts {
                    tags: copy.snapshot_tags.clone(),
                    encrypted: true,
                    kms_key_id: copy.kms_key_arn.clone(),
                },
            );
            Ok(id)
        }
        async fn describe_create_volume_permissions(
            &self,
            region: &str,
            snapshot_id: &str,
        ) -> Result<BTreeSet<VolumePermission>, AwsError> {
            self.call("DescribeSnapshotAttribute", region)?;
            let state = self.state.lock().unwrap();
            Ok(state
                .volume_permissions
                .get(snapshot_id)
                .cloned()
                .unwrap_or_default())
        }
        async fn remove_create_volume_permissions(
            &self,
            region: &str,
            snapshot_id: &str,
            permissions: &[VolumePermission],
        ) -> Result<(), AwsError> {
            self.call("ModifySnapshotAttribute", region)?;
            let mut state = self.state.lock().unwrap();
            if let Some(have) = state.volume_permissions.get_mut(snapshot_id) {
                for p in permissions {
                    have.remove(p);
                }
            }
            Ok(())
        }
        async fn add_create_volume_permissions(
            &self,
            region: &str,
            snapshot_id: &str,
            accounts: &[String],
        ) -> Result<(), AwsError> {
            self.call("ModifySnapshotAttribute", region)?;
            let mut state = self.state.lock().unwrap();
            let have = state
                .volume_permissions
                .entry(snapshot_id.to_string())
                .or_default();
            have.extend(
                accounts
                    .iter()
                    .map(|a| VolumePermission::Account(a.parse().unwrap())),
            );
            Ok(())
        }
        async fn enable_image_deprecation(
            &self,
            region: &str,
            image_id: &str,
            at: &str,
        ) -> Result<(), AwsError> {
            self.call("EnableImageDeprecation", region)?;
            let mut state = self.state.lock().unwrap();
            state.images.get_mut(image_id).unwrap().deprecation_time = Some(at.to_string());
            Ok(())
        }
        async fn get_parameter(
            &self,
            region: &str,
            name: &str,
        ) -> Result<Option<String>, AwsError> {
            self.call("GetParameter", region)?;
            let state = self.state.lock().unwrap();
            Ok(state
                .parameters
                .get(&(region.to_string(), name.to_string()))
                .cloned())
        }
        async fn put_parameter(
            &self,
            region: &str,
            name: &str,
            image_id: &str,
        ) -> Result<(), AwsError> {
            self.call("PutParameter", region)?;
            let mut state = self.state.lock().unwrap();
            state
                .parameters
                .insert((region.to_string(), name.to_string()), image_id.to_string());
            Ok(())
        }
        async fn describe_key(
            &self,
            region: &str,
            key: &str,
        ) -> Result<Option<ObservedKey>, AwsError> {
            self.call("DescribeKey", region)?;
            let state = self.state.lock().unwrap();
            let arn = state
                .aliases
                .get(&(region.to_string(), key.to_string()))
                .map(String::as_str)
                .unwrap_or(key);
            Ok(state.keys.get(arn).map(|k| ObservedKey {
                policy: None,
                tags: None,
                ..k.clone()
            }))
        }
        async fn list_key_tags(&self, region: &str, arn: &str) -> Result<Tags, AwsError> {
            self.call("ListResourceTags", region)?;
            let state = self.state.lock().unwrap();
            Ok(state.keys[arn].tags.clone().unwrap_or_default())
        }
        async fn list_key_aliases(&self, region: &str, arn: &str) -> Result<Vec<String>, AwsError> {
            self.call("ListAliases", region)?;
            let state = self.state.lock().unwrap();
            Ok(state
                .aliases
                .iter()
                .filter(|((r, _), key)| r == region && key.as_str() == arn)
                .map(|((_, alias), _)| alias.clone())
                .collect())
        }
        async fn get_key_policy(&self, region: &str, arn: &str) -> Result<String, AwsError> {
            self.call("GetKeyPolicy", region)?;
            Ok(self.policy(arn))
        }
        async fn put_key_policy(
            &self,
            region: &str,
            arn: &str,
            policy: &str,
        ) -> Result<(), AwsError> {
            self.call("PutKeyPolicy", region)?;
            let mut state = self.state.lock().unwrap();
            let before = state.keys[arn].policy.clone();
            let overwritten = state.overwrites_left > 0;
            if overwritten {
                state.overwrites_left -= 1;
            }
            let key = state.keys.get_mut(arn).unwrap();
            // A concurrent writer that read the policy before this write lands its own after it.
            key.policy = if overwritten {
                before
            } else {
                Some(policy.into())
            };
            Ok(())
        }
    }

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    fn sharing_config() -> Config {
        config(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\n",
        )
    }

    fn reencrypting_config() -> Config {
        config(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\nreencrypt.kms_key = \"alias/ami-share\"\n",
        )
    }

    fn event(kind: EventKind) -> ImageEvent {
        event_for(IMAGE, kind)
    }

    fn event_for(image_id: &str, kind: EventKind) -> ImageEvent {
        ImageEvent {
            image: ImageRef {
                region: None,
                image_id: image_id.into(),
            },
            kind,
            account: None,
            event_id: None,
        }
    }

    async fn run(aws: &FakeAws, config: &Config, event: &ImageEvent, mode: Mode) -> Outcome {
        reconciler(aws, config, mode).reconcile(event).await
    }

    async fn apply(aws: &FakeAws, config: &Config) -> Outcome {
        run(aws, config, &event(EventKind::Direct), Mode::Apply).await
    }

    fn partner() -> BTreeSet<LaunchPermission> {
        [LaunchPermission::Account("210987654321".parse().unwrap())].into()
    }

    #[tokio::test]
    async fn apply_then_reapply_writes_once() {
        let aws = FakeAws::new(ImageState::Available, None);
        let first = apply(&aws, &sharing_config()).await;
        assert_eq!(first.done.len(), 2, "{}", first.headline());
        assert_eq!(first.status(), "done");
        let writes_before = aws.writes().len();
        let second = apply(&aws, &sharing_config()).await;
        assert!(second.done.is_empty() && second.not_done.is_empty());
        assert_eq!(aws.writes().len(), writes_before);
        assert!(
            second.headline().contains("nothing to do"),
            "{}",
            second.headline()
        );
    }

    fn reconciler<'a>(aws: &'a FakeAws, config: &'a Config, mode: Mode) -> Reconciler<'a, FakeAws> {
        Reconciler {
            config,
            aws,
            home_region: REGION,
            mode,
            key_policy_writes: KeyPolicyWrites {
                settle: Duration::ZERO,
                max_writes: 3,
            },
        }
    }

    #[tokio::test]
    async fn a_sweep_reconciles_each_listed_image_once_and_a_second_sweep_changes_nothing() {
        use crate::sweep::{SweepOptions, SweepProgress, sweep};
        let aws = FakeAws::new(ImageState::Available, None);
        let config = sharing_config();
        let options = SweepOptions {
            regions: vec![REGION.into()],
            concurrency: 4,
            stop_starting_at: None,
        };
        let mut seen = Vec::new();
        let first = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |p| {
            seen.push(match p {
                SweepProgress::Listed { to_reconcile } => format!("listed {to_reconcile}"),
                SweepProgress::Reconciled(outcome) => outcome.image_id.clone(),
                SweepProgress::Rechecked(outcome) => format!("rechecked {}", outcome.image_id),
            })
        })
        .await;
        assert_eq!(seen, ["listed 1", IMAGE]);
        assert_eq!((first.reconciled, first.changed, first.actions), (1, 1, 2));
        assert!(first.is_complete(), "{}", first.headline());
        // The listing described the image: the sweep does not describe it again.
        assert_eq!(
            aws.calls()
                .iter()
                .filter(|c| **c == "DescribeImages")
                .count(),
            1
        );
        let writes = aws.writes().len();
        let second = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |_| {}).await;
        assert_eq!((second.reconciled, second.changed), (1, 0));
        assert_eq!(aws.writes().len(), writes);
    }

    #[tokio::test]
    async fn a_sweep_rechecks_the_images_that_wrote_a_parameter_newest_first() {
        use crate::sweep::{SweepOptions, SweepProgress, sweep};
        let aws = FakeAws::new(ImageState::Available, None);
        {
            let mut state = aws.state.lock().unwrap();
            let mut older = state.images[IMAGE].clone();
            older.image_id = "ami-0000000000000old".into();
            older.name = Some("golden-0".into());
            older.creation_date = Some("2026-01-01T00:00:00.000Z".into());
            state.images.insert(older.image_id.clone(), older);
        }
        let config = config(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\nssm_parameter = \"/ami-share/{rule}/latest\"\n",
        );
        let options = SweepOptions {
            regions: vec![REGION.into()],
            concurrency: 2,
            stop_starting_at: None,
        };
        let mut rechecked = Vec::new();
        let report = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |p| {
            if let SweepProgress::Rechecked(outcome) = p {
                rechecked.push(outcome.image_id.clone());
            }
        })
        .await;
        // Newest first: the newest wrote the parameter, the older found a newer value and left it.
        assert_eq!(report.parameter_rechecks, 1, "{}", report.headline());
        assert!(rechecked.is_empty(), "nothing left to do: {rechecked:?}");
        // The recheck describes the image afresh: the tags written by the first pass are not written
        // again (a stale listing would say they are missing).
        let tag_writes = aws.writes().iter().filter(|w| **w == "CreateTags").count();
        assert_eq!(tag_writes, 2, "{:?}", aws.writes());
        assert_eq!(
            aws.state.lock().unwrap().parameters
                [&(REGION.to_string(), "/ami-share/golden/latest".to_string())],
            IMAGE
        );
        assert!(report.is_complete(), "{}", report.headline());
    }

    #[tokio::test]
    async fn a_sweep_past_its_deadline_starts_nothing_and_says_so() {
        use crate::sweep::{SweepOptions, sweep};
        let aws = FakeAws::new(ImageState::Available, None);
        let config = sharing_config();
        let options = SweepOptions {
            regions: vec![REGION.into()],
            concurrency: 4,
            stop_starting_at: Some(std::time::Instant::now()),
        };
        let report = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |_| {}).await;
        assert_eq!((report.reconciled, report.not_started), (0, 1));
        assert!(!report.is_complete());
        assert!(aws.writes().is_empty());
        assert!(
            report
                .headline()
                .contains("1 not started before the deadline")
        );
    }

    #[tokio::test]
    async fn a_failed_listing_is_reported_and_the_other_regions_are_swept() {
        use crate::sweep::{SweepOptions, sweep};
        let mut aws = FakeAws::new(ImageState::Available, None);
        aws.failing_regions.push(WEST);
        let config = sharing_config();
        let options = SweepOptions {
            regions: vec![REGION.into(), WEST.into()],
            concurrency: 2,
            stop_starting_at: None,
        };
        let report = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |_| {}).await;
        assert_eq!(report.reconciled, 1);
        assert_eq!(report.listing_failures.len(), 1);
        assert_eq!(report.listing_failures[0].region, WEST);
        assert!(!report.is_complete());
        assert!(
            report.headline().contains("not swept: DescribeImages"),
            "{}",
            report.headline()
        );
    }

    #[tokio::test]
    async fn a_dry_run_reads_but_never_writes() {
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        let outcome = run(
            &aws,
            &sharing_config(),
            &event(EventKind::Direct),
            Mode::DryRun,
        )
        .await;
        assert_eq!(
            outcome.not_done.len(),
            3,
            "tag, key, share: {}",
            outcome.headline()
        );
        assert!(outcome.done.is_empty());
        assert!(aws.writes().is_empty(), "{:?}", aws.calls());
        assert_eq!(outcome.plan().actions.len(), 3);
        let headline = outcome.headline();
        assert!(
            headline.contains("would: tag ami-12345678, snap-1"),
            "{headline}"
        );
        assert!(
            headline.contains(&format!(
                "would: let account 210987654321 use KMS key {CMK}"
            )),
            "{headline}"
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_recorded_beside_what_succeeded() {
        let mut aws = FakeAws::new(ImageState::Available, None);
        aws.failing = vec!["CreateTags"];
        let outcome = apply(&aws, &sharing_config()).await;
        assert!(outcome.is_incomplete() && outcome.retryable());
        assert!(matches!(
            outcome.done.as_slice(),
            [Action::AddLaunchPermissions { .. }]
        ));
        assert!(matches!(
            outcome.not_done.as_slice(),
            [Action::CreateTags { .. }]
        ));
        let headline = outcome.headline();
        assert!(
            headline.contains("done: share") && headline.contains("not done: tag"),
            "{headline}"
        );
        assert!(headline.contains("RequestLimitExceeded"), "{headline}");
    }

    #[tokio::test]
    async fn reads_the_plan_cannot_use_are_not_made() {
        // Tags only, snapshots untagged: no DescribeImageAttribute, no DescribeSnapshots, no KMS.
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        let c = config("[[rule]]\nname = \"t\"\ntags = { t = \"1\" }\ntag_snapshots = false\n");
        apply(&aws, &c).await;
        assert_eq!(aws.calls(), ["DescribeImages", "CreateTags"]);
        // A pending image: no launch permission read, no key read either.
        let aws = FakeAws::new(ImageState::Pending, Some(CMK));
        let outcome = apply(&aws, &sharing_config()).await;
        assert_eq!(
            aws.calls(),
            ["DescribeImages", "DescribeSnapshots", "CreateTags"]
        );
        assert_eq!(outcome.deferred.len(), 1);
        // Unencrypted and shared: no KMS call.
        let aws = FakeAws::new(ImageState::Available, None);
        apply(&aws, &sharing_config()).await;
        assert!(
            !aws.calls().iter().any(|c| c.contains("Key")),
            "{:?}",
            aws.calls()
        );
    }

    #[tokio::test]
    async fn an_encrypted_image_is_shared_only_after_its_key_admits_the_targets_and_once() {
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        let outcome = apply(&aws, &sharing_config()).await;
        assert_eq!(outcome.status(), "done", "{}", outcome.headline());
        let calls = aws.calls();
        // Sharing comes last, after the key policy was written and read back.
        assert_eq!(calls.last(), Some(&"ModifyImageAttribute"), "{calls:?}");
        let put = calls.iter().position(|c| *c == "PutKeyPolicy").unwrap();
        assert_eq!(
            calls[put + 1..]
                .iter()
                .filter(|c| **c == "GetKeyPolicy")
                .count(),
            1
        );
        let admitted = key_policy::admitted(&aws.policy(CMK), "aws").unwrap();
        assert_eq!(admitted.accounts, ["210987654321".to_string()].into());
        assert!(aws.policy(CMK).contains("Enable IAM User Permissions"));
        assert_eq!(aws.image(IMAGE).launch_permissions, Some(partner()));

        let writes = aws.writes().len();
        let again = apply(&aws, &sharing_config()).await;
        assert!(again.done.is_empty(), "{}", again.headline());
        assert_eq!(aws.writes().len(), writes, "a duplicate makes no write");
    }

    #[tokio::test]
    async fn a_failed_key_patch_leaves_the_image_unshared() {
        let mut aws = FakeAws::new(ImageState::Available, Some(CMK));
        aws.failing = vec!["PutKeyPolicy"];
        let outcome = apply(&aws, &sharing_config()).await;
        assert!(
            !aws.calls().contains(&"ModifyImageAttribute"),
            "{:?}",
            aws.calls()
        );
        assert!(outcome.is_incomplete());
        assert!(
            matches!(
                outcome.not_done.as_slice(),
                [
                    Action::PatchKeyPolicy { .. },
                    Action::AddLaunchPermissions { .. }
                ]
            ),
            "{}",
            outcome.headline()
        );
        assert!(outcome.blocked[0].contains("a key policy there could not be patched"));
        assert!(aws.image(IMAGE).launch_permissions.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_concurrent_writer_that_drops_the_grant_is_merged_with_again() {
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        aws.state.lock().unwrap().overwrites_left = 1;
        let outcome = apply(&aws, &sharing_config()).await;
        assert_eq!(outcome.status(), "done", "{}", outcome.headline());
        assert_eq!(
            aws.calls().iter().filter(|c| **c == "PutKeyPolicy").count(),
            2
        );
        let admitted = key_policy::admitted(&aws.policy(CMK), "aws").unwrap();
        assert_eq!(admitted.accounts.len(), 1);
    }

    #[tokio::test]
    async fn a_policy_that_keeps_being_replaced_is_a_retryable_failure_and_no_share() {
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        aws.state.lock().unwrap().overwrites_left = usize::MAX;
        let outcome = apply(&aws, &sharing_config()).await;
        assert_eq!(
            aws.calls().iter().filter(|c| **c == "PutKeyPolicy").count(),
            3,
            "max_writes"
        );
        assert!(outcome.is_incomplete() && outcome.retryable());
        let failure = outcome.failures[0].to_string();
        assert!(
            failure.contains("after each of 3 writes") && failure.contains("another writer"),
            "{failure}"
        );
        assert!(!aws.calls().contains(&"ModifyImageAttribute"));
    }

    #[tokio::test]
    async fn an_aws_managed_key_is_not_shared_and_the_image_says_why() {
        let mut aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        // The policy of an AWS managed key is not needed: failing to read it is no failure.
        aws.failing = vec!["GetKeyPolicy"];
        let outcome = apply(&aws, &sharing_config()).await;
        assert_eq!(outcome.status(), "blocked", "{}", outcome.headline());
        assert!(outcome.failures.is_empty());
        assert_eq!(
            aws.writes(),
            ["CreateTags", "CreateTags"],
            "the image's tags and status; the snapshot's tags"
        );
        let tags = aws.image(IMAGE).tags;
        assert_eq!(tags[markers::STATUS], "not-shared");
        assert!(
            tags[markers::STATUS_REASON].contains("AWS managed key aws/ebs"),
            "{tags:?}"
        );
        assert!(aws.image(IMAGE).launch_permissions.unwrap().is_empty());
        assert_eq!(aws.policy(AWS_EBS), DEFAULT_POLICY, "never written");
        // Again: nothing more to do, and it stays blocked.
        let writes = aws.writes().len();
        let again = apply(&aws, &sharing_config()).await;
        assert_eq!(again.status(), "blocked");
        assert_eq!(aws.writes().len(), writes);
    }

    #[tokio::test]
    async fn a_re_encrypted_copy_is_made_once_then_finished_through_its_own_events() {
        let aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        let config = reencrypting_config();
        let first = apply(&aws, &config).await;
        assert_eq!(
            aws.writes(),
            ["CreateTags", "CopyImage", "CreateTags"],
            "the rule's tags and the copy, then the status: {}",
            first.headline()
        );
        let copy_id = aws.only_copy();
        let copy = aws.image(&copy_id);
        assert_eq!(copy.name.as_deref(), Some("golden-1-reencrypted"));
        assert_eq!(copy.tags[markers::SOURCE_IMAGE], IMAGE);
        assert_eq!(copy.tags["t"], "1");
        assert_eq!(aws.image(IMAGE).tags[markers::STATUS], "shared-as-copy");

        // A duplicate of the source's event, and the copy's CopyImage event while it is pending: no new
        // copy; the source only records its copy's id, once.
        let writes = aws.writes().len();
        apply(&aws, &config).await;
        assert_eq!(aws.writes()[writes..], ["CreateTags"]);
        assert_eq!(aws.image(IMAGE).tags[markers::REENCRYPTED_COPY], copy_id);
        let writes = aws.writes().len();
        let outcome = run(
            &aws,
            &config,
            &event_for(&copy_id, EventKind::ApiCall(CreatedBy::CopyImage)),
            Mode::Apply,
        )
        .await;
        assert_eq!(outcome.event_image_id.as_deref(), Some(copy_id.as_str()));
        assert_eq!(outcome.image_id, IMAGE, "the source is reconciled");
        assert!(
            outcome
                .deferred
                .iter()
                .any(|d| d.contains(&format!("sharing {copy_id} waits"))),
            "{}",
            outcome.headline()
        );
        assert_eq!(aws.writes().len(), writes, "{:?}", aws.writes());

        // The copy becomes available: its key is opened and it is shared; the source never is.
        aws.set_state(&copy_id, ImageState::Available);
        let outcome = run(
            &aws,
            &config,
            &event_for(
                &copy_id,
                EventKind::StateChange {
                    state: "available".into(),
                },
            ),
            Mode::Apply,
        )
        .await;
        assert_eq!(
            outcome.status(),
            "blocked",
            "the source stays unshared: {}",
            outcome.headline()
        );
        assert!(outcome.failures.is_empty(), "{}", outcome.headline());
        assert_eq!(aws.image(&copy_id).launch_permissions, Some(partner()));
        assert!(aws.image(IMAGE).launch_permissions.unwrap().is_empty());
        let admitted = key_policy::admitted(&aws.policy(COPY_KEY), "aws").unwrap();
        assert_eq!(admitted.accounts, ["210987654321".to_string()].into());

        let writes = aws.writes().len();
        apply(&aws, &config).await;
        run(
            &aws,
            &config,
            &event_for(&copy_id, EventKind::Direct),
            Mode::Apply,
        )
        .await;
        assert_eq!(aws.writes().len(), writes, "converged: {:?}", aws.writes());
    }

    #[tokio::test]
    async fn a_sweep_finishes_a_copy_its_source_no_longer_reaches_and_an_exclusive_rule_revokes_there()
     {
        let aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        apply(&aws, &reencrypting_config()).await;
        let copy_id = aws.only_copy();
        aws.set_state(&copy_id, ImageState::Available);
        apply(&aws, &reencrypting_config()).await;
        assert_eq!(aws.image(&copy_id).launch_permissions, Some(partner()));
        // The rule stops re-encrypting and turns exclusive with another target: the source's
        // reconciliation looks for no copy any more, but the copy is still shared with the partner.
        // (The copy's key stays approved by name.)
        let exclusive = config(
            "[keys]\napproved = [\"alias/ami-share\"]\n[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"444455556666\"]\nshare.exclusive = true\n",
        );
        let report = crate::sweep::sweep(
            &reconciler(&aws, &exclusive, Mode::Apply),
            &crate::sweep::SweepOptions {
                regions: vec![REGION.into()],
                concurrency: 2,
                stop_starting_at: None,
            },
            |_| {},
        )
        .await;
        assert_eq!(report.left_to_source, 1);
        assert_eq!(report.unreached_copies, 1, "{report:?}");
        assert_eq!(
            aws.image(&copy_id).launch_permissions,
            Some([LaunchPermission::Account("444455556666".parse().unwrap())].into()),
            "the partner dropped from the exclusive rule lost the copy too"
        );
    }

    #[tokio::test]
    async fn no_copy_is_looked_for_when_a_copy_would_not_help() {
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        aws.state.lock().unwrap().keys.get_mut(CMK).unwrap().state = "Disabled".into();
        let outcome = apply(&aws, &reencrypting_config()).await;
        assert_eq!(outcome.status(), "blocked", "{}", outcome.headline());
        let count = |op| aws.calls().iter().filter(|c| **c == op).count();
        assert_eq!(
            count("DescribeImages"),
            1,
            "no copy lookup: {:?}",
            aws.calls()
        );
        assert_eq!(
            count("DescribeKey"),
            1,
            "no re-encryption key read: {:?}",
            aws.calls()
        );
        assert_eq!(count("CopyImage"), 0);
        assert_eq!(aws.image(IMAGE).tags[markers::STATUS], "not-shared");
    }

    #[tokio::test]
    async fn a_terminal_state_event_makes_no_call_and_no_rule_means_no_write() {
        let aws = FakeAws::new(ImageState::Available, None);
        let failed = event(EventKind::StateChange {
            state: "failed".into(),
        });
        let outcome = run(&aws, &sharing_config(), &failed, Mode::Apply).await;
        assert!(
            outcome
                .skipped
                .unwrap()
                .contains("reports the image failed")
        );
        assert!(aws.calls().is_empty());
        let c = config(
            "[[rule]]\nname = \"other\"\nmatch.name = [\"other-*\"]\ntags = { t = \"1\" }\n",
        );
        let outcome = apply(&aws, &c).await;
        assert!(
            outcome
                .skipped
                .unwrap()
                .contains("no rule selects it (name \"golden-1\")")
        );
        assert_eq!(aws.calls(), ["DescribeImages"]);
    }

    #[tokio::test]
    async fn created_by_comes_from_the_event_before_the_image() {
        let aws = FakeAws::new(ImageState::Available, None);
        let c = config(
            "[[rule]]\nname = \"reg\"\nmatch.created_by = [\"RegisterImage\"]\ntags = { t = \"1\" }\n",
        );
        let by_event = event(EventKind::ApiCall(CreatedBy::RegisterImage));
        let outcome = run(&aws, &c, &by_event, Mode::DryRun).await;
        assert_eq!(outcome.rules, ["reg"]);
        let by_image = event(EventKind::StateChange {
            state: "available".into(),
        });
        let outcome = run(&aws, &c, &by_image, Mode::DryRun).await;
        assert_eq!(outcome.created_by, Some(CreatedBy::CreateImage));
        assert!(outcome.rules.is_empty());
    }

    /// The source in REGION, unencrypted, and ami-share's available copy of it in WEST, encrypted with the
    /// WEST key, not yet shared.
    fn with_west_copy() -> FakeAws {
        let aws = FakeAws::new(ImageState::Available, None);
        let mut state = aws.state.lock().unwrap();
        let mut copy = state.images[IMAGE].clone();
        copy.image_id = "ami-0west".into();
        copy.region = WEST.into();
        copy.tags = markers::copy_tags(CopyKind::Regional, IMAGE, REGION);
        copy.created_by = CreatedBy::CopyImage;
        copy.source = Some(SourceImage {
            image_id: IMAGE.into(),
            region: Some(REGION.into()),
        });
        copy.snapshots[0].snapshot_id = "snap-west".into();
        copy.snapshots[0].encrypted = Some(true);
        state.images.insert("ami-0west".into(), copy);
        state.snapshots.insert(
            "snap-west".into(),
            SnapshotFacts {
                tags: Tags::new(),
                encrypted: true,
                kms_key_id: Some(WEST_KEY.into()),
            },
        );
        drop(state);
        aws
    }

    fn distributing_config() -> Config {
        config(&format!(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.accounts = [\"210987654321\"]\nssm_parameter = \"/ami-share/{{rule}}/latest\"\ncopy.regions = [{{ region = \"{WEST}\", kms_key = \"alias/ami-share\" }}]\n"
        ))
    }

    #[tokio::test]
    async fn a_key_patch_failing_in_one_region_holds_back_that_regions_share_and_parameter_only() {
        let mut aws = with_west_copy();
        aws.failing_in = vec![("PutKeyPolicy", WEST)];
        let outcome = apply(&aws, &distributing_config()).await;
        assert_eq!(outcome.status(), "failed", "{}", outcome.headline());
        assert!(outcome.retryable(), "throttled: worth a retry");
        // The source, in its region: shared and its parameter set.
        assert_eq!(aws.image(IMAGE).launch_permissions, Some(partner()));
        let parameters = aws.state.lock().unwrap().parameters.clone();
        assert_eq!(
            parameters.get(&(REGION.to_string(), "/ami-share/golden/latest".to_string())),
            Some(&IMAGE.to_string())
        );
        // The copy, in WEST: its key could not admit the receivers, so no share and no parameter there.
        assert_eq!(
            aws.image("ami-0west").launch_permissions,
            Some(BTreeSet::new())
        );
        assert!(
            !parameters.contains_key(&(WEST.to_string(), "/ami-share/golden/latest".to_string()))
        );
        assert_eq!(outcome.regions[WEST].status, "failed");
        assert!(
            outcome
                .blocked
                .iter()
                .any(|b| b.contains("not shared yet in us-west-2")),
            "{:?}",
            outcome.blocked
        );
        // Once the key can be written, the next delivery finishes WEST only.
        aws.failing_in.clear();
        let again = apply(&aws, &distributing_config()).await;
        assert_eq!(again.status(), "done", "{}", again.headline());
        assert_eq!(aws.image("ami-0west").launch_permissions, Some(partner()));
        assert!(
            again.done.iter().all(|a| a.region() == WEST),
            "{}",
            again.headline()
        );
        assert_eq!(again.regions[WEST].status, "done");
    }

    #[tokio::test]
    async fn a_copy_event_finishes_the_copy_in_its_region_only_and_never_copies_it() {
        let aws = with_west_copy();
        let event = ImageEvent {
            image: ImageRef {
                region: Some(WEST.into()),
                image_id: "ami-0west".into(),
            },
            kind: EventKind::StateChange {
                state: "available".into(),
            },
            account: None,
            event_id: None,
        };
        let outcome = run(&aws, &distributing_config(), &event, Mode::Apply).await;
        assert_eq!(outcome.status(), "done", "{}", outcome.headline());
        assert_eq!(
            outcome.copy_of.as_deref(),
            Some("ami-12345678 in eu-west-1")
        );
        assert!(
            outcome.done.iter().all(|a| a.region() == WEST),
            "{}",
            outcome.headline()
        );
        assert!(!aws.calls().contains(&"CopyImage"));
        assert_eq!(aws.image("ami-0west").launch_permissions, Some(partner()));
        assert_eq!(
            aws.image(IMAGE).launch_permissions,
            Some(BTreeSet::new()),
            "the source is its own event's"
        );
    }

    fn west_event(image_id: &str) -> ImageEvent {
        ImageEvent {
            image: ImageRef {
                region: Some(WEST.into()),
                image_id: image_id.into(),
            },
            kind: EventKind::StateChange {
                state: "available".into(),
            },
            account: None,
            event_id: None,
        }
    }

    /// `with_west_copy`, but the copy in WEST is a scratch AMI someone tagged with the copy's marks: EC2
    /// records `source` (`None`: none) as what it was made from.
    fn with_forged_west_copy(source: Option<&str>) -> FakeAws {
        let aws = with_west_copy();
        let mut state = aws.state.lock().unwrap();
        let forged = state.images.get_mut("ami-0west").unwrap();
        forged.name = Some("scratch-1".into());
        // Registered from a snapshot (no source), or a copy of another image.
        forged.created_by = match source {
            None => CreatedBy::RegisterImage,
            Some(_) => CreatedBy::CopyImage,
        };
        forged.source = source.map(|id| SourceImage {
            image_id: id.into(),
            region: Some(REGION.into()),
        });
        drop(state);
        aws
    }

    #[tokio::test]
    async fn forged_copy_marks_borrow_no_rule_and_the_log_says_what_ec2_records() {
        for (source, contradiction) in [
            (None, "EC2 records no source image for ami-0west"),
            (
                Some("ami-87654321"),
                "EC2 records ami-0west as made from ami-87654321",
            ),
        ] {
            let aws = with_forged_west_copy(source);
            let outcome = run(
                &aws,
                &distributing_config(),
                &west_event("ami-0west"),
                Mode::Apply,
            )
            .await;
            assert_eq!(outcome.status(), "skipped", "{}", outcome.headline());
            assert!(
                outcome.skipped.as_deref().unwrap().contains("scratch-1"),
                "judged by its own name: {}",
                outcome.headline()
            );
            assert_eq!(outcome.copy_of, None);
            assert!(
                outcome.notes.iter().any(|n| n.contains(contradiction)),
                "{:?}",
                outcome.notes
            );
            assert!(aws.writes().is_empty(), "{:?}", aws.writes());
            assert_eq!(
                aws.image("ami-0west").launch_permissions,
                Some(BTreeSet::new())
            );
        }
    }

    #[tokio::test]
    async fn a_forged_copy_is_not_taken_for_the_sources_copy_and_a_real_one_is_made() {
        let aws = with_forged_west_copy(None);
        let outcome = apply(&aws, &distributing_config()).await;
        assert!(
            aws.calls().contains(&"CopyImage"),
            "the forgery is no copy: {}",
            outcome.headline()
        );
        assert_eq!(
            outcome.regions[WEST].status,
            "copying",
            "{}",
            outcome.headline()
        );
        assert_eq!(
            aws.image("ami-0west").launch_permissions,
            Some(BTreeSet::new()),
            "the forgery is never shared"
        );
        assert!(
            outcome
                .notes
                .iter()
                .any(|n| n.contains("ignored as a regional copy of ami-12345678")
                    && n.contains("EC2 records no source image")),
            "{:?}",
            outcome.notes
        );
    }

    #[tokio::test]
    async fn a_copy_whose_source_is_gone_or_another_accounts_is_an_image_of_its_own() {
        let aws = with_west_copy();
        aws.state.lock().unwrap().images.remove(IMAGE);
        let outcome = run(
            &aws,
            &distributing_config(),
            &west_event("ami-0west"),
            Mode::Apply,
        )
        .await;
        // Its own name is the source's ("golden-1"): the rule selects it as an image of its own, shares
        // it, and never copies it.
        assert_eq!(outcome.copy_of, None);
        assert!(
            outcome
                .notes
                .iter()
                .any(|n| n.contains("which is gone")
                    && n.contains("never copied (it may be a copy)")),
            "{:?}",
            outcome.notes
        );
        assert!(!aws.calls().contains(&"CopyImage"));
    }
}
