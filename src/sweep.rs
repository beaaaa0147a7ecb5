//! The sweep: reconcile every AMI this account owns in some regions. It backfills the AMIs made before
//! ami-share was deployed and catches the events that were missed (a rule added later, an event that
//! went to the dead-letter queue), and it is how a config change reaches existing images.
//!
//! Each image goes through the same reconciler as an event, so a sweep of images already as configured
//! makes no mutating call. What is swept, and in what order, is decided by [`selection`], a pure
//! function; the rest streams the images through the reconciler a bounded number at a time (each
//! reconciliation runs its own calls concurrently too), stopping to start new ones at a deadline.
//!
//! One write is not safe to make concurrently: a rule's SSM parameter ("the latest AMI") is read, then
//! written, and two images of one rule reconciled together could leave the older one. So the images that
//! wrote a parameter are reconciled again, one at a time, newest first: the newest sets it if it lost,
//! the others then find a newer value and leave it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;

use crate::aws::{Aws, AwsError};
use crate::key_audit::{self, StaleKey};
use crate::markers::CopyKind;
use crate::observed::ObservedImage;
use crate::outcome::{Outcome, Status};
use crate::plan::Action;
use crate::provenance::{Provenance, provenance};
use crate::reconcile::Reconciler;
use crate::targets::LaunchPermission;
use crate::trigger::{EventKind, ImageEvent, ImageRef};

/// How to sweep.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// The regions whose images are swept.
    pub regions: Vec<String>,
    /// Images reconciled at once (each makes at most a few calls at once).
    pub concurrency: usize,
    /// No image is started after this instant (a Lambda's deadline less a margin); those left are
    /// counted in [`SweepReport::not_started`] for the next sweep.
    pub stop_starting_at: Option<Instant>,
}

/// What a sweep tells its caller while it runs.
#[derive(Debug)]
pub enum SweepProgress<'a> {
    /// The listing is done: this many images will be reconciled.
    Listed { to_reconcile: usize },
    /// One image's reconciliation is done.
    Reconciled(&'a Outcome),
    /// An image was reconciled again, after the others, for its SSM parameter, and something was done
    /// or failed.
    Rechecked(&'a Outcome),
}

/// The images a sweep reconciles, newest first, and those it leaves to their source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub to_reconcile: Vec<ObservedImage>,
    /// ami-share's copies whose source's reconciliation covers them, and why.
    pub left_to_source: Vec<(ObservedImage, String)>,
}

/// Chooses what to reconcile among the listed images. ami-share's copies whose source was listed too
/// (as EC2 vouches: marks alone are not believed, see [`crate::provenance`]) are left out: their source's
/// reconciliation finishes them, and reconciling both at once would only race. The newest images go
/// first, so a sweep cut short by its deadline has done the ones most likely to be wanted.
pub fn selection(listed: Vec<ObservedImage>) -> Selection {
    // Sources: the listed images of their own (ami-share never copies its copies).
    let listed_ids: BTreeSet<(String, String)> = listed
        .iter()
        .filter(|i| provenance(i) == Provenance::Own)
        .map(|i| (i.region.clone(), i.image_id.clone()))
        .collect();
    let mut selection = Selection::default();
    for image in listed {
        let reason = match provenance(&image) {
            Provenance::Copy(copy)
                if listed_ids
                    .contains(&(copy.source_region.clone(), copy.source_image.clone())) =>
            {
                Some(match copy.kind {
                    CopyKind::Reencrypted => format!(
                        "ami-share's re-encrypted copy of {}: reconciled with its source",
                        copy.source_image
                    ),
                    CopyKind::Regional => format!(
                        "ami-share's copy of {} in {}: finished by its source's reconciliation",
                        copy.source_image, copy.source_region
                    ),
                })
            }
            _ => None,
        };
        match reason {
            Some(reason) => selection.left_to_source.push((image, reason)),
            None => selection.to_reconcile.push(image),
        }
    }
    // ISO 8601 dates in UTC sort as text; images without one go last.
    selection.to_reconcile.sort_by(|a, b| {
        b.creation_date
            .cmp(&a.creation_date)
            .then_with(|| a.image_id.cmp(&b.image_id))
    });
    selection
}

/// What a sweep did, for the operator and the summary log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Images this account owns, per swept region.
    pub listed: BTreeMap<String, usize>,
    /// Images reconciled, by outcome status (`done`, `skipped`, `blocked`, `retry`, `failed`).
    pub by_status: BTreeMap<Status, usize>,
    /// Images reconciled.
    pub reconciled: usize,
    /// Images for which something was done (in a dry run: would be done).
    pub changed: usize,
    /// Calls made (in a dry run: planned) over all images.
    pub actions: usize,
    /// ami-share's copies left to their source's reconciliation.
    pub left_to_source: usize,
    /// Of those, the ones it did not reach, reconciled on their own (counted in `reconciled` too).
    pub unreached_copies: usize,
    /// Images not started before the deadline.
    pub not_started: usize,
    /// Those images, where they are (the work queue's consumer sends them on).
    #[serde(skip)]
    pub unstarted: Vec<ImageRef>,
    /// Images reconciled again, one at a time, because they wrote an SSM parameter (see the module).
    pub parameter_rechecks: usize,
    /// Regions whose listing failed: nothing there was swept.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub listing_failures: Vec<AwsError>,
    /// `image id: headline` of every image whose reconciliation failed or must be retried.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub incomplete: Vec<String>,
    /// Keys whose ami-share statements admit grantees no AMI on the key is shared with any more
    /// ([`crate::key_audit`]): reported, never removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stale_keys: Vec<StaleKey>,
    /// Reads the key audit could not make (the sweep itself is not the worse for it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key_audit_failures: Vec<AwsError>,
    /// The deadline came before the key audit could run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub key_audit_skipped: bool,
    #[serde(serialize_with = "seconds")]
    pub elapsed: Duration,
}

fn seconds<S: serde::Serializer>(elapsed: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((elapsed.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// The one word of a sweep's own record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SweepStatus {
    /// A region could not even be listed (logged at ERROR, so the failure alarm sees it).
    Failed,
    /// Images were left, or failed.
    Incomplete,
    Swept,
}

impl SweepStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Incomplete => "sweep_incomplete",
            Self::Swept => "swept",
        }
    }
}

impl SweepReport {
    pub fn status(&self) -> SweepStatus {
        match () {
            _ if !self.listing_failures.is_empty() => SweepStatus::Failed,
            _ if self.is_complete() => SweepStatus::Swept,
            _ => SweepStatus::Incomplete,
        }
    }

    /// An image not started before the deadline.
    pub fn left_unstarted(&mut self, image: &ObservedImage) {
        self.not_started += 1;
        self.unstarted.push(ImageRef {
            region: Some(image.region.clone()),
            image_id: image.image_id.clone(),
        });
    }

    /// Adds one image's outcome.
    pub fn count(&mut self, outcome: &Outcome) {
        self.reconciled += 1;
        *self.by_status.entry(outcome.status()).or_default() += 1;
        let actions = if outcome.dry_run {
            outcome.not_done.len()
        } else {
            outcome.done.len()
        };
        self.actions += actions;
        if actions > 0 {
            self.changed += 1;
        }
        if outcome.is_incomplete() {
            self.incomplete
                .push(format!("{}: {}", outcome.image_id, outcome.headline()));
        }
    }

    /// Whether every listed image was reconciled completely.
    pub fn is_complete(&self) -> bool {
        self.listing_failures.is_empty() && self.incomplete.is_empty() && self.not_started == 0
    }

    /// Images per second over the whole sweep.
    pub fn images_per_second(&self) -> f64 {
        let seconds = self.elapsed.as_secs_f64();
        if seconds > 0.0 {
            self.reconciled as f64 / seconds
        } else {
            0.0
        }
    }

    /// One line for a person.
    pub fn headline(&self) -> String {
        let listed: usize = self.listed.values().sum();
        let statuses: Vec<String> = self
            .by_status
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect();
        let mut line = format!(
            "swept {} of {listed} image(s) in {} region(s) in {:.1} s ({:.1} images/s): {}; {} changed with {} call(s)",
            self.reconciled,
            self.listed.len(),
            self.elapsed.as_secs_f64(),
            self.images_per_second(),
            if statuses.is_empty() {
                "nothing to reconcile".to_string()
            } else {
                statuses.join(", ")
            },
            self.changed,
            self.actions,
        );
        if self.left_to_source > 0 {
            line.push_str(&format!(
                "; {} copy(ies) left to their source",
                self.left_to_source
            ));
        }
        if self.not_started > 0 {
            line.push_str(&format!(
                "; {} not started before the deadline (oldest first; `ami-share sweep` reaches them)",
                self.not_started
            ));
        }
        for failure in &self.listing_failures {
            line.push_str(&format!("; not swept: {failure}"));
        }
        if !self.stale_keys.is_empty() {
            line.push_str(&format!(
                "; {} KMS key(s) admit grantees no AMI on them is shared with any more (stale_keys)",
                self.stale_keys.len()
            ));
        }
        for failure in &self.key_audit_failures {
            line.push_str(&format!("; key audit incomplete: {failure}"));
        }
        line
    }
}

/// Lists the regions' images, then reconciles them `options.concurrency` at a time, telling `progress`
/// as it goes.
pub async fn sweep<A: Aws>(
    reconciler: &Reconciler<'_, A>,
    options: &SweepOptions,
    mut progress: impl FnMut(SweepProgress<'_>),
) -> SweepReport {
    let started = Instant::now();
    let mut report = SweepReport::default();
    let listings = futures::future::join_all(
        options
            .regions
            .iter()
            .map(|region| reconciler.aws().list_owned_images(region)),
    )
    .await;
    let mut listed = Vec::new();
    for (region, listing) in options.regions.iter().zip(listings) {
        match listing {
            Ok(images) => {
                report.listed.insert(region.clone(), images.len());
                listed.extend(images);
            }
            Err(e) => report.listing_failures.push(e),
        }
    }
    // The account's snapshots, in pages, once per region: the reconciler reads each image's from here
    // instead of one DescribeSnapshots per image. A failed listing only costs those calls. And each key
    // is read once, by the first image on it.
    reconciler.read_keys_once();
    let snapshot_listings =
        futures::future::join_all(report.listed.keys().map(|region| async move {
            (region, reconciler.aws().list_owned_snapshots(region).await)
        }))
        .await;
    let mut snapshots_of = BTreeMap::new();
    for (region, snapshots) in snapshot_listings {
        match snapshots {
            Ok(snapshots) => {
                reconciler.know_snapshots(region, snapshots.clone());
                snapshots_of.insert(region.clone(), snapshots);
            }
            Err(e) => {
                tracing::warn!(region = %region, "could not list the snapshots: {e} (each image reads its own)")
            }
        }
    }
    // Kept for the key audit, which looks at every image (the selection moves them into the reconciler).
    let every_image = listed.clone();
    let stop_at = options.stop_starting_at;
    let known_permissions = reconcile_images(
        reconciler,
        listed,
        options.concurrency,
        stop_at,
        &mut report,
        &mut progress,
    )
    .await;
    if stop_at.is_some_and(|at| Instant::now() >= at) {
        report.key_audit_skipped = true;
    } else {
        for region in report.listed.keys().cloned().collect::<Vec<_>>() {
            let audited = key_audit::audit(
                reconciler.aws(),
                &region,
                &every_image,
                &known_permissions,
                None,
                snapshots_of.remove(&region),
            )
            .await;
            match audited {
                Ok(stale) => report.stale_keys.extend(stale),
                Err(e) => report.key_audit_failures.push(e),
            }
        }
    }
    report.elapsed = started.elapsed();
    report
}

/// Reconciles images a listing described, `concurrency` at a time, starting none after `stop_at`: what a
/// sweep does once it has listed, and what the work queue's consumer does with a message's images
/// ([`crate::fanout`]). ami-share's copies whose source is among them are left to it, and reconciled on
/// their own only if its reconciliation did not reach them; the images that wrote an SSM parameter are
/// then reconciled again, one at a time, newest first (see the module). Returns the launch permissions
/// seen, by image id.
pub async fn reconcile_images<A: Aws>(
    reconciler: &Reconciler<'_, A>,
    listed: Vec<ObservedImage>,
    concurrency: usize,
    stop_at: Option<Instant>,
    report: &mut SweepReport,
    progress: &mut impl FnMut(SweepProgress<'_>),
) -> BTreeMap<String, BTreeSet<LaunchPermission>> {
    let selection = selection(listed);
    report.left_to_source += selection.left_to_source.len();
    progress(SweepProgress::Listed {
        to_reconcile: selection.to_reconcile.len(),
    });

    let mut wrote_parameters = Vec::new();
    let mut known_permissions = BTreeMap::new();
    let mut reached = BTreeSet::new();
    {
        let mut outcomes = futures::stream::iter(selection.to_reconcile)
            .map(|image| async move {
                if stop_at.is_some_and(|at| Instant::now() >= at) {
                    return Err(image);
                }
                // What a recheck needs: where the image is and how new it is.
                let key = (image.creation_date, image.region.clone());
                Ok((key, reconciler.reconcile_listed(image).await))
            })
            .buffer_unordered(concurrency.max(1));
        while let Some(reconciled) = outcomes.next().await {
            match reconciled {
                Err(image) => report.left_unstarted(&image),
                Ok((key, outcome)) => {
                    report.count(&outcome);
                    progress(SweepProgress::Reconciled(&outcome));
                    if let Some(permissions) = &outcome.launch_permissions {
                        known_permissions.insert(outcome.image_id.clone(), permissions.clone());
                    }
                    reached.extend(outcome.reached.iter().cloned());
                    if outcome
                        .done
                        .iter()
                        .any(|a| matches!(a, Action::PutParameter { .. }))
                    {
                        wrote_parameters.push((key, outcome.image_id.clone()));
                    }
                }
            }
        }
    }
    // The copies left to a source whose reconciliation did not reach them: on their own.
    for (copy, _) in selection.left_to_source {
        if reached.contains(&copy.image_id) {
            continue;
        }
        if stop_at.is_some_and(|at| Instant::now() >= at) {
            report.left_unstarted(&copy);
            continue;
        }
        let outcome = reconciler.reconcile_unreached_copy(copy).await;
        report.count(&outcome);
        report.unreached_copies += 1;
        progress(SweepProgress::Reconciled(&outcome));
    }
    // Newest first, one at a time: see the module's doc. Each is described again (the listing is stale
    // now: its tags, for one, were just written). Their outcomes are logged, not counted again.
    wrote_parameters.sort_by_key(|((created, _), _)| std::cmp::Reverse(*created));
    for ((_, region), image_id) in wrote_parameters {
        report.parameter_rechecks += 1;
        let event = ImageEvent {
            image: ImageRef {
                region: Some(region),
                image_id,
            },
            kind: EventKind::Direct,
            account: None,
            event_id: None,
        };
        let outcome = reconciler.reconcile(&event).await;
        if !outcome.done.is_empty() || outcome.is_incomplete() {
            progress(SweepProgress::Rechecked(&outcome));
        }
        report.actions += if outcome.dry_run {
            0
        } else {
            outcome.done.len()
        };
        if outcome.is_incomplete() {
            report
                .incomplete
                .push(format!("{}: {}", outcome.image_id, outcome.headline()));
        }
    }
    known_permissions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markers;
    use crate::observed::{SourceImage, Tags};
    use crate::test_support::fake_aws::*;

    fn image(id: &str, created: Option<&str>, tags: &[(&str, &str)]) -> ObservedImage {
        ObservedImage {
            image_id: id.into(),
            region: "us-east-1".into(),
            creation_date: created.and_then(crate::time::Timestamp::parse),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Tags>(),
            ..ObservedImage::default()
        }
    }

    /// ami-share's copy of `ami-source` in `source_region`, as EC2 records it.
    fn copy_of_source(id: &str, kind: CopyKind, source_region: &str) -> ObservedImage {
        ObservedImage {
            created_by: crate::observed::CreatedBy::CopyImage,
            source: Some(SourceImage {
                image_id: "ami-source".into(),
                region: Some(source_region.into()),
            }),
            region: match kind {
                CopyKind::Regional => "us-west-2".into(),
                CopyKind::Reencrypted => source_region.into(),
            },
            ..image(
                id,
                Some("2026-11-25T10:00:00.000Z"),
                &[
                    (markers::COPY_KIND, kind.as_str()),
                    (markers::SOURCE_IMAGE, "ami-source"),
                    (markers::SOURCE_REGION, source_region),
                ],
            )
        }
    }

    fn source_in(region: &str) -> ObservedImage {
        ObservedImage {
            region: region.into(),
            ..image("ami-source", Some("2026-11-24T10:00:00.000Z"), &[])
        }
    }

    fn ids(images: &[ObservedImage]) -> Vec<&str> {
        images.iter().map(|i| i.image_id.as_str()).collect()
    }

    #[test]
    fn newest_images_go_first_and_undated_ones_last() {
        let selection = selection(vec![
            image("ami-old", Some("2024-01-01T00:00:00.000Z"), &[]),
            image("ami-undated", None, &[]),
            image("ami-new", Some("2026-11-25T10:00:00.000Z"), &[]),
            image("ami-mid", Some("2025-06-01T00:00:00.000Z"), &[]),
        ]);
        assert_eq!(
            ids(&selection.to_reconcile),
            ["ami-new", "ami-mid", "ami-old", "ami-undated"]
        );
        assert!(selection.left_to_source.is_empty());
    }

    #[test]
    fn a_copy_is_left_to_its_source_only_when_the_source_is_listed_too() {
        let copy = copy_of_source("ami-copy", CopyKind::Regional, "us-east-1");
        let both = selection(vec![copy.clone(), source_in("us-east-1")]);
        assert_eq!(ids(&both.to_reconcile), ["ami-source"]);
        assert_eq!(both.left_to_source.len(), 1);
        assert!(
            both.left_to_source[0]
                .1
                .contains("copy of ami-source in us-east-1"),
            "{:?}",
            both.left_to_source
        );
        let alone = selection(vec![copy]);
        assert_eq!(ids(&alone.to_reconcile), ["ami-copy"]);
        let reencrypted = copy_of_source("ami-reenc", CopyKind::Reencrypted, "us-east-1");
        let with_source = selection(vec![reencrypted, source_in("us-east-1")]);
        assert_eq!(ids(&with_source.to_reconcile), ["ami-source"]);
        assert!(
            with_source.left_to_source[0]
                .1
                .contains("re-encrypted copy")
        );
    }

    #[test]
    fn marks_ec2_does_not_back_leave_nothing_to_a_source() {
        // Tagged as the source's copy by someone who may tag, but EC2 records no copy.
        let mut forged = copy_of_source("ami-forged", CopyKind::Regional, "us-east-1");
        forged.source = None;
        let selection = selection(vec![forged, source_in("us-east-1")]);
        assert_eq!(ids(&selection.to_reconcile), ["ami-forged", "ami-source"]);
        assert!(selection.left_to_source.is_empty());
    }

    #[test]
    fn the_report_counts_statuses_changes_and_what_is_left() {
        let mut report = SweepReport::default();
        report.listed.insert("us-east-1".into(), 3);
        let mut changed = Outcome {
            image_id: "ami-1".into(),
            ..Outcome::default()
        };
        changed.done.push(crate::plan::Action::SetStatus {
            region: "us-east-1".into(),
            image_id: "ami-1".into(),
            tags: Default::default(),
        });
        report.count(&changed);
        report.count(&Outcome::default());
        report.not_started = 1;
        report.elapsed = Duration::from_secs(2);
        assert_eq!(report.reconciled, 2);
        assert_eq!(report.changed, 1);
        assert_eq!(report.actions, 1);
        assert_eq!(report.by_status.get(&Status::Done), Some(&2));
        assert!(!report.is_complete());
        let headline = report.headline();
        assert!(
            headline.starts_with("swept 2 of 3 image(s) in 1 region(s) in 2.0 s (1.0 images/s): 2 done; 1 changed with 1 call(s)"),
            "{headline}"
        );
        assert!(
            headline.contains("1 not started before the deadline"),
            "{headline}"
        );
    }

    // The sweep against the in-memory AWS.

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
    async fn a_sweep_lists_the_snapshots_once_instead_of_reading_them_per_image() {
        use crate::sweep::{SweepOptions, sweep};
        let aws = FakeAws::new(ImageState::Available, None);
        {
            let mut state = aws.state.lock().unwrap();
            for n in 2..=5 {
                let mut image = state.images[IMAGE].clone();
                image.image_id = format!("ami-0000000{n}");
                image.snapshots[0].snapshot_id = format!("snap-{n}");
                state.images.insert(image.image_id.clone(), image);
                let facts = state.snapshots["snap-1"].clone();
                state.snapshots.insert(format!("snap-{n}"), facts);
            }
        }
        let config = config(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\n",
        );
        let options = SweepOptions {
            regions: vec![REGION.into()],
            concurrency: 4,
            stop_starting_at: None,
        };
        let snapshot_reads = || {
            aws.calls()
                .iter()
                .filter(|c| **c == "DescribeSnapshots")
                .count()
        };
        let first = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |_| {}).await;
        assert_eq!(
            (first.reconciled, first.changed),
            (5, 5),
            "{}",
            first.headline()
        );
        let first_reads = snapshot_reads();
        assert!(
            first_reads <= 2,
            "the listing (and the key audit's), not one per image: {:?}",
            aws.calls()
        );
        for n in 1..=5 {
            assert_eq!(
                aws.state.lock().unwrap().snapshots[&format!("snap-{n}")].tags["t"],
                "1"
            );
        }
        // The listing kept the sweep's own tag writes: a second sweep of the same images writes nothing.
        let writes = aws.writes().len();
        let second = sweep(&reconciler(&aws, &config, Mode::Apply), &options, |_| {}).await;
        assert_eq!(
            (second.reconciled, second.changed),
            (5, 0),
            "{}",
            second.headline()
        );
        assert_eq!(aws.writes().len(), writes);
        assert!(snapshot_reads() - first_reads <= 2);
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
            older.creation_date = Timestamp::parse("2026-01-01T00:00:00.000Z");
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
            aws.parameter(REGION, "/ami-share/golden/latest").as_deref(),
            Some(IMAGE)
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
}
