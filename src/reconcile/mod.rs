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
//! - a key policy write is checked by reading it back (beside the shares), and merged again if a
//!   concurrent writer replaced it (KMS has no conditional write), a bounded number of times.
//!
//! `observe` holds the reads, `apply` the writes; this module the flow between them.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use futures::future::join_all;

use crate::aws::{Aws, AwsError, ImageLookup};
use crate::config::Config;
use crate::key_policy::{self, KeyGrantees};
use crate::keys::{self, KeyArn, KeyRef};
use crate::markers;
use crate::markers::CopyKind;
use crate::observed::CreatedBy;
use crate::observed::{
    ImageState, KeyManager, Observed, ObservedCopies, ObservedImage, ObservedKey,
    ObservedParameter, OtherImages, SnapshotFacts, Tags,
};
pub use crate::outcome::Outcome;
use crate::plan::{self, Action, ImageCopy, desired_for_copy, keys_to_read, reads_needed};
use crate::provenance::{self, Provenance, provenance};
use crate::rules::{Desired, ImageFacts, desired_for};
use crate::time::Timestamp;
use crate::trigger::{EventKind, ImageEvent};

mod apply;
mod observe;
mod shared_reads;

use shared_reads::{KeyReads, KeyReadsOf, SharedReads};

/// Whether to make the planned calls, or only report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    DryRun,
}

/// How a key policy write is confirmed. KMS's PutKeyPolicy has no condition: two writers that read the
/// same policy each write their own version, and the later one drops the other's grant. So after writing,
/// ami-share reads the policy back (beside the shares, with no pause) and merges again while its
/// grantees are missing, up to `max_writes` writes. A writer whose write lands after that read is met
/// by a re-check: the function sends itself one per written key, delayed ([`crate::recheck`]); without
/// a queue (the CLI), the policy is read again `recheck_after` the shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicyWrites {
    pub max_writes: u32,
    /// `None`: the caller re-checks the written keys later (the function, through its queue).
    pub recheck_after: Option<Duration>,
}

impl Default for KeyPolicyWrites {
    fn default() -> Self {
        Self {
            max_writes: 5,
            recheck_after: Some(Duration::from_secs(1)),
        }
    }
}

/// The configured core for one run: what to reconcile against, through which AWS, how.
pub struct Reconciler<'a, A> {
    config: &'a Config,
    aws: &'a A,
    /// Used when the event names no region.
    home_region: &'a str,
    mode: Mode,
    key_policy_writes: KeyPolicyWrites,
    /// After CopyImage answers with a copy EC2 does not list, how long to wait before each further look.
    copy_read_back: &'static [Duration],
    /// What a sweep reads once for every image (the snapshots, the keys); nothing on the event path.
    shared: SharedReads,
}

/// At most this many dead answers to one copy's CopyImage in one reconciliation (a dead answer makes no
/// copy: EC2 answers a spent token at once); past that, a person should look at what keeps ending them.
pub const MAX_LOST_COPIES: usize = 10;

/// EC2 is eventually consistent: a copy made this instant may not be listed yet. Before a copy CopyImage
/// answered with is taken for deregistered, it is looked for again after these waits (3¼ s in all; only
/// on that path, which a copy EC2 lists at once never takes).
pub const COPY_READ_BACK: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(2),
];

impl<'a, A: Aws> Reconciler<'a, A> {
    /// The core for `config`, through `aws`, in `mode`; events that name no region are of `home_region`.
    pub fn new(config: &'a Config, aws: &'a A, home_region: &'a str, mode: Mode) -> Self {
        Self {
            config,
            aws,
            home_region,
            mode,
            key_policy_writes: KeyPolicyWrites::default(),
            copy_read_back: &COPY_READ_BACK,
            shared: SharedReads::default(),
        }
    }

    /// A sweep's listing of the account's snapshots in `region` (DescribeSnapshots OwnerIds=self, all
    /// pages): observe reads snapshots from it from now on.
    pub(crate) fn know_snapshots(&self, region: &str, snapshots: BTreeMap<String, SnapshotFacts>) {
        self.shared.know_snapshots(region, snapshots);
    }

    /// From now on each key is read once (by the first image on it), not once per image: for a sweep.
    pub(crate) fn read_keys_once(&self) {
        self.shared.read_keys_once();
    }

    /// The facts of `snapshot_ids` in `region`: from a sweep's listing when it holds them all, else
    /// DescribeSnapshots.
    pub(super) async fn snapshots_of(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        match self.shared.snapshots(region, snapshot_ids) {
            Some(found) => Ok(found),
            None => self.aws.describe_snapshots(region, snapshot_ids).await,
        }
    }

    /// Other waits before a copy CopyImage answered with and EC2 does not list is taken for deregistered
    /// (the in-memory AWS of the unit tests lists at once).
    #[cfg(test)]
    pub(crate) fn with_copy_read_back(mut self, waits: &'static [Duration]) -> Self {
        self.copy_read_back = waits;
        self
    }

    /// Confirms key policy writes so (tests shorten the pause).
    pub fn with_key_policy_writes(mut self, writes: KeyPolicyWrites) -> Self {
        self.key_policy_writes = writes;
        self
    }

    /// The AWS it works through.
    pub fn aws(&self) -> &'a A {
        self.aws
    }
}

impl<A: Aws> Reconciler<'_, A> {
    /// Reconciles the image an event names.
    pub async fn reconcile(&self, event: &ImageEvent) -> Outcome {
        let region = event.image.region.as_deref().unwrap_or(self.home_region);
        let image_id = event.image.image_id.as_str();
        let outcome = Outcome::new(image_id, region);

        // A terminal state reported by the event needs no look: there is nothing left to tag or share.
        if let EventKind::StateChange { state } = &event.kind
            && state.is_terminal()
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
            Ok(ImageLookup::NotFound)
                if !matches!(event.kind, EventKind::Direct | EventKind::TagsChanged) =>
            {
                return outcome.retry_later(format!(
                    "EC2 does not show {image_id} in {region} yet (it is eventually consistent); if it persists, the image was deregistered or the event names another region"
                ));
            }
            // An image that could be tagged was visible: gone now, it was deregistered since.
            Ok(ImageLookup::NotFound) => {
                return outcome.skipped(format!("no such image in {region}"));
            }
            Err(e) => return outcome.failed(e),
        };
        let lagging = matches!(&event.kind, EventKind::StateChange { state } if *state == ImageState::Available)
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
    pub(super) async fn reconcile_described(
        &self,
        image: ObservedImage,
        kind: &EventKind,
        mut outcome: Outcome,
    ) -> Outcome {
        let created_by = match kind {
            EventKind::ApiCall(created_by) => *created_by,
            EventKind::StateChange { .. } | EventKind::TagsChanged | EventKind::Direct => {
                image.created_by
            }
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
    pub(super) async fn reconcile_image(
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
    pub(super) async fn reconcile_copy(
        &self,
        copy: ObservedImage,
        source: ObservedImage,
        kind: CopyKind,
        mut outcome: Outcome,
    ) -> Outcome {
        outcome.copy_of = Some(format!("{} in {}", source.image_id, source.region));
        outcome.created_by = Some(source.created_by);
        // The source's rules, but the copy's own exclusive mark: the source may have been taken out of
        // an exclusive rule (and its mark turned false) before this copy's grants were taken back.
        let mut tags = source.tags.clone();
        match copy.tags.get(markers::EXCLUSIVE) {
            Some(value) => tags.insert(markers::EXCLUSIVE.to_string(), value.clone()),
            None => tags.remove(markers::EXCLUSIVE),
        };
        let facts = ImageFacts {
            tags: &tags,
            ..facts_of(&source, source.created_by)
        };
        let desired = desired_for(self.config, &facts);
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
    pub(super) async fn reconcile_desired(
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
        outcome.limits.extend(plan.limits);
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
}

/// What the rules select on, read from a described image.
fn facts_of(image: &ObservedImage, created_by: CreatedBy) -> ImageFacts<'_> {
    ImageFacts {
        name: image.name.as_deref(),
        tags: &image.tags,
        owner_id: &image.owner_id,
        created_by,
        creation_date: image.creation_date,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    use crate::markers;

    use crate::outcome::{RegionStatus, Status};

    use crate::trigger::ImageRef;

    use crate::test_support::fake_aws::*;

    #[tokio::test]
    async fn apply_then_reapply_writes_once() {
        let aws = FakeAws::new(ImageState::Available, None);
        let first = apply(&aws, &sharing_config()).await;
        assert_eq!(first.done.len(), 2, "{}", first.headline());
        assert_eq!(first.status(), Status::Done);
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
        assert_eq!(outcome.status(), Status::Done, "{}", outcome.headline());
        let calls = aws.calls();
        // The share goes out once the key policy is written: beside its read-back, with no pause; the
        // policy is read once more after the shares (no queue here to re-check it later).
        let put = calls.iter().position(|c| *c == "PutKeyPolicy").unwrap();
        let share = calls
            .iter()
            .position(|c| *c == "ModifyImageAttribute")
            .unwrap();
        assert!(put < share, "{calls:?}");
        assert_eq!(
            calls[..put]
                .iter()
                .filter(|c| **c == "GetKeyPolicy")
                .count(),
            1,
            "the write merges into the planning read: {calls:?}"
        );
        assert_eq!(
            calls[put + 1..]
                .iter()
                .filter(|c| **c == "GetKeyPolicy")
                .count(),
            2,
            "{calls:?}"
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
        assert_eq!(outcome.status(), Status::Done, "{}", outcome.headline());
        assert_eq!(
            aws.calls().iter().filter(|c| **c == "PutKeyPolicy").count(),
            2
        );
        let admitted = key_policy::admitted(&aws.policy(CMK), "aws").unwrap();
        assert_eq!(admitted.accounts.len(), 1);
    }

    #[tokio::test]
    async fn a_policy_that_keeps_being_replaced_is_a_retryable_failure_and_no_status() {
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
        // The share went out when the key admitted the partner (the other writer took that back after):
        // the status claims nothing, and the delivery is retried.
        assert!(aws.calls().contains(&"ModifyImageAttribute"));
        assert!(!aws.image(IMAGE).tags.contains_key(markers::STATUS));
    }

    #[tokio::test]
    async fn an_aws_managed_key_is_not_shared_and_the_image_says_why() {
        let mut aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        // The policy of an AWS managed key is not needed: failing to read it is no failure.
        aws.failing = vec!["GetKeyPolicy"];
        let outcome = apply(&aws, &sharing_config()).await;
        assert_eq!(outcome.status(), Status::Blocked, "{}", outcome.headline());
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
        assert_eq!(again.status(), Status::Blocked);
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
                    state: ImageState::Available,
                },
            ),
            Mode::Apply,
        )
        .await;
        assert_eq!(
            outcome.status(),
            Status::Blocked,
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
    async fn a_copy_deregistered_before_its_source_recorded_it_is_made_again_under_a_new_token() {
        let aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        let config = reencrypting_config();
        apply(&aws, &config).await;
        let lost = aws.only_copy();
        // Deregistered before the source named it: nothing on the source says a copy was ever made,
        // so the plan repeats the first token, and EC2 answers with the dead copy.
        aws.deregister(&lost);
        let calls = aws.calls().len();
        let outcome = apply(&aws, &config).await;
        assert!(outcome.failures.is_empty(), "{}", outcome.headline());
        let copy = aws.only_copy();
        assert_ne!(copy, lost, "a new copy");
        let made: Vec<&str> = aws.calls()[calls..]
            .iter()
            .copied()
            .filter(|c| *c == "CopyImage")
            .collect();
        assert_eq!(made.len(), 2, "{:?}", aws.calls());
        assert_eq!(aws.image(&copy).tags[markers::SOURCE_IMAGE], IMAGE);
        assert_ne!(aws.image(&copy).name, Some("golden-1-reencrypted".into()));
        // The next events find the new copy: no third.
        for _ in 0..2 {
            apply(&aws, &config).await;
        }
        assert_eq!(aws.only_copy(), copy);
    }

    #[tokio::test]
    async fn a_new_copy_ec2_does_not_list_at_once_is_looked_for_again_not_copied_twice() {
        let aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        aws.state.lock().unwrap().unlisted_reads = 2;
        let config = reencrypting_config();
        let outcome = reconciler(&aws, &config, Mode::Apply)
            .with_copy_read_back(&[Duration::ZERO, Duration::ZERO, Duration::ZERO])
            .reconcile(&event(EventKind::Direct))
            .await;
        assert!(outcome.failures.is_empty(), "{}", outcome.headline());
        let count = |op| aws.calls().iter().filter(|c| **c == op).count();
        assert_eq!(count("CopyImage"), 1, "{:?}", aws.calls());
        aws.only_copy();
    }

    #[tokio::test]
    async fn a_client_token_spent_with_other_parameters_is_chained_not_retried_for_ever() {
        let aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        let config = reencrypting_config();
        apply(&aws, &config).await;
        let lost = aws.only_copy();
        aws.deregister(&lost);
        // The source is renamed: the copy's name changes, its first token does not.
        aws.state
            .lock()
            .unwrap()
            .images
            .get_mut(IMAGE)
            .unwrap()
            .name = Some("golden-2".into());
        let outcome = apply(&aws, &config).await;
        assert!(outcome.failures.is_empty(), "{}", outcome.headline());
        let copy = aws.only_copy();
        assert_ne!(copy, lost);
        assert!(
            aws.image(&copy)
                .name
                .is_some_and(|n| n.starts_with("golden-2-reencrypted-"))
        );
    }

    #[tokio::test]
    async fn a_copy_loses_what_an_exclusive_rule_granted_once_its_source_is_out_of_that_rule() {
        let aws = with_west_copy();
        let partner: LaunchPermission = LaunchPermission::Account("210987654321".parse().unwrap());
        let stranger: LaunchPermission = LaunchPermission::Account("444455556666".parse().unwrap());
        {
            let mut state = aws.state.lock().unwrap();
            // The source no longer has the tag the exclusive rule selects, and was taken back already
            // (its mark is false); the copy still has the partner's grant, and a hand-made share.
            let source = state.images.get_mut(IMAGE).unwrap();
            source
                .tags
                .insert(markers::EXCLUSIVE.into(), "false".into());
            let copy = state.images.get_mut("ami-0west").unwrap();
            copy.tags.insert(markers::EXCLUSIVE.into(), "true".into());
            copy.launch_permissions = Some([partner.clone(), stranger.clone()].into());
        }
        let config = config(
            "[keys]\napproved = [\"alias/ami-share\"]\n[[rule]]\nname = \"partner-only\"\nmatch.tags = { share = \"partner\" }\nshare.accounts = [\"210987654321\"]\nshare.exclusive = true\n[[rule]]\nname = \"tags\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\n",
        );
        let outcome = run(&aws, &config, &west_event("ami-0west"), Mode::Apply).await;
        assert!(outcome.failures.is_empty(), "{}", outcome.headline());
        let copy = aws.image("ami-0west");
        assert_eq!(
            copy.launch_permissions,
            Some([stranger].into()),
            "the exclusive rule's grant goes, the hand-made share stays: {}",
            outcome.headline()
        );
        assert_eq!(copy.tags[markers::EXCLUSIVE], "false");
    }

    #[tokio::test]
    async fn copies_that_keep_vanishing_end_in_a_final_error_naming_them() {
        let aws = FakeAws::new(ImageState::Available, Some(AWS_EBS));
        aws.state.lock().unwrap().lose_copies = true;
        let outcome = apply(&aws, &reencrypting_config()).await;
        let count = aws.calls().iter().filter(|c| **c == "CopyImage").count();
        assert_eq!(count, MAX_LOST_COPIES, "{:?}", aws.calls());
        let failure = &outcome.failures[0];
        assert_eq!(failure.operation, "CopyImage");
        assert!(!failure.retryable);
        assert!(
            failure
                .message
                .contains("ami-c0000001 (gone (deregistered))")
                && failure.message.contains("ami-c0000010"),
            "{failure}"
        );
    }

    #[tokio::test]
    async fn no_copy_is_looked_for_when_a_copy_would_not_help() {
        let aws = FakeAws::new(ImageState::Available, Some(CMK));
        aws.state.lock().unwrap().keys.get_mut(CMK).unwrap().state = "Disabled".into();
        let outcome = apply(&aws, &reencrypting_config()).await;
        assert_eq!(outcome.status(), Status::Blocked, "{}", outcome.headline());
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
            state: ImageState::Failed,
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
            state: ImageState::Available,
        });
        let outcome = run(&aws, &c, &by_image, Mode::DryRun).await;
        assert_eq!(outcome.created_by, Some(CreatedBy::CreateImage));
        assert!(outcome.rules.is_empty());
    }

    #[tokio::test]
    async fn a_key_patch_failing_in_one_region_holds_back_that_regions_share_and_parameter_only() {
        let mut aws = with_west_copy();
        aws.failing_in = vec![("PutKeyPolicy", WEST)];
        let outcome = apply(&aws, &distributing_config()).await;
        assert_eq!(outcome.status(), Status::Failed, "{}", outcome.headline());
        assert!(outcome.retryable(), "throttled: worth a retry");
        // The source, in its region: shared and its parameter set.
        assert_eq!(aws.image(IMAGE).launch_permissions, Some(partner()));
        assert_eq!(
            aws.parameter(REGION, "/ami-share/golden/latest").as_deref(),
            Some(IMAGE)
        );
        // The copy, in WEST: its key could not admit the receivers, so no share and no parameter there.
        assert_eq!(
            aws.image("ami-0west").launch_permissions,
            Some(BTreeSet::new())
        );
        assert_eq!(aws.parameter(WEST, "/ami-share/golden/latest"), None);
        assert_eq!(outcome.regions[WEST].status, RegionStatus::Failed);
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
        assert_eq!(again.status(), Status::Done, "{}", again.headline());
        assert_eq!(aws.image("ami-0west").launch_permissions, Some(partner()));
        assert!(
            again.done.iter().all(|a| a.region() == WEST),
            "{}",
            again.headline()
        );
        assert_eq!(again.regions[WEST].status, RegionStatus::Done);
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
                state: ImageState::Available,
            },
            account: None,
            event_id: None,
        };
        let outcome = run(&aws, &distributing_config(), &event, Mode::Apply).await;
        assert_eq!(outcome.status(), Status::Done, "{}", outcome.headline());
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
            assert_eq!(outcome.status(), Status::Skipped, "{}", outcome.headline());
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
            RegionStatus::Copying,
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
