//! The sweep of an account of any size, on SQS: the function's work queue.
//!
//! A scheduled sweep that is given a queue does not reconcile in its own invocation. It lists the
//! region's AMIs (DescribeImages, pages of 500) and sends them to the queue, [`IMAGES_PER_MESSAGE`] to a
//! message, newest first, each source with ami-share's copies of it. The same function consumes the
//! queue through an event source mapping (the stack's `WorkQueue`): each invocation reconciles its
//! messages' images as a sweep does ([`crate::sweep::reconcile_images`]): one DescribeImages and one
//! DescribeSnapshots per message, each key once per invocation, then about one call per image. So every
//! AMI is reached in every sweep, whatever the account's size: SQS holds what is not done yet, retries
//! what failed (the message comes back after its visibility timeout), and moves a message that keeps
//! failing to the dead-letter queue, where an alarm sees it. The pace is the operator's: the mapping's
//! maximum concurrency times [`crate::handler::SWEEP_CONCURRENCY`] images in flight.
//!
//! A message whose images could not all be started before the invocation's deadline sends the rest on
//! as a new message (and succeeds), so a short deadline slows a sweep but never starves an image; a
//! message that failed (an image to retry, a malformed body) is reported alone
//! (`batchItemFailures`), and the others of its batch are not redone.
//!
//! The queue also carries the key re-checks: after a key policy write, the function sends itself the
//! image again, [`WorkQueue::key_recheck_delay`] later. A writer whose PutKeyPolicy landed after
//! ami-share's read-back (KMS has no conditional write) dropped the grant unseen; the re-check reads the
//! policy afresh and puts it back. It is an SQS message, so it is delivered at least once, retried and
//! dead-lettered like any other: a re-check cannot be lost without the alarm seeing it. A re-check that
//! writes again sends another, at most [`MAX_KEY_RECHECKS`] in a row.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::aws::{Aws, AwsError, QueuedMessage};
use crate::limits;
use crate::observed::ObservedImage;
use crate::outcome::Outcome;
use crate::plan::Action;
use crate::provenance::{Provenance, provenance};
use crate::reconcile::Reconciler;
use crate::sweep::{self, SweepProgress, SweepReport};

/// Images per message: with one DescribeImages and one DescribeSnapshots per message, and the keys
/// read once per invocation, a converged sweep costs about one call per image (the launch-permission
/// read EC2 offers only per image).
pub const IMAGES_PER_MESSAGE: usize = 100;

/// Key re-checks in a row for one image: past that, something keeps replacing the key's policy, and
/// the failure goes to the dead-letter queue and the alarm.
pub const MAX_KEY_RECHECKS: u32 = 3;

/// The work queue, as the function is given it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkQueue {
    pub url: String,
    /// How long after a key policy write the image is reconciled again.
    pub key_recheck_delay: Duration,
}

impl WorkQueue {
    /// The queue from the function's environment: `AMI_SHARE_WORK_QUEUE_URL` (none: no queue) and
    /// `AMI_SHARE_KEY_RECHECK_SECONDS` (0 to 900; default [`KEY_RECHECK_DELAY`]).
    pub fn from_env_values(url: Option<&str>, delay: Option<&str>) -> Result<Option<Self>, String> {
        let Some(url) = url.map(str::trim).filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        if !url.starts_with("https://") && !url.starts_with("http://") {
            return Err(format!(
                "AMI_SHARE_WORK_QUEUE_URL is {url:?}; expected a queue URL such as https://sqs.us-east-1.amazonaws.com/123456789012/ami-share-work"
            ));
        }
        let key_recheck_delay = match delay.map(str::trim).filter(|d| !d.is_empty()) {
            None => KEY_RECHECK_DELAY,
            Some(text) => match text.parse::<u64>() {
                Ok(seconds) if seconds <= limits::SQS_MAX_DELAY_SECONDS => {
                    Duration::from_secs(seconds)
                }
                _ => {
                    return Err(format!(
                        "AMI_SHARE_KEY_RECHECK_SECONDS is {text:?}; expected whole seconds from 0 to {} (SQS's longest message delay)",
                        limits::SQS_MAX_DELAY_SECONDS
                    ));
                }
            },
        };
        Ok(Some(Self {
            url: url.to_string(),
            key_recheck_delay,
        }))
    }
}

/// The default of [`WorkQueue::key_recheck_delay`]: far longer than any read-merge-write of a key
/// policy takes, short enough that a lost grant is back within minutes.
pub const KEY_RECHECK_DELAY: Duration = Duration::from_secs(60);

/// Why a message was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkReason {
    /// A scheduled sweep's share of the region's AMIs (or what an invocation could not start).
    Sweep,
    /// The image wrote a key policy: look again that no other writer dropped its grantees.
    KeyRecheck,
}

/// One message of the work queue: images of one region to reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkItem {
    pub reason: WorkReason,
    pub region: String,
    pub images: Vec<String>,
    /// Of a key re-check: how many came before it for these images.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub recheck: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The form of a work message, for errors.
const EXPECTED: &str = r#"{"reason": "sweep" | "key-recheck", "region": "us-east-1", "images": ["ami-0123456789abcdef0", …]} (at most 100 images)"#;

impl WorkItem {
    /// Reads a message body, checking every field; the error says what is wrong and the expected form.
    pub fn parse(body: &str) -> Result<Self, String> {
        let item: Self = serde_json::from_str(body)
            .map_err(|e| format!("not a work message ({e}); expected {EXPECTED}"))?;
        crate::distribution::RegionName::try_from(item.region.clone())
            .map_err(|e| format!("{e}: expected {EXPECTED}"))?;
        if item.images.is_empty() || item.images.len() > IMAGES_PER_MESSAGE {
            return Err(format!(
                "{} images; expected 1 to {IMAGES_PER_MESSAGE}: {EXPECTED}",
                item.images.len()
            ));
        }
        if let Some(bad) = item.images.iter().find(|id| !is_image_id(id)) {
            return Err(format!("{bad:?} is not an AMI id; expected {EXPECTED}"));
        }
        Ok(item)
    }

    pub fn message(&self, delay: Duration) -> QueuedMessage {
        QueuedMessage {
            body: serde_json::to_string(self).expect("a work item serializes"),
            delay,
        }
    }
}

/// `ami-` and 8 or 17 hexadecimal digits, as EC2 names images.
fn is_image_id(id: &str) -> bool {
    id.strip_prefix("ami-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// One message as the event source mapping delivers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkRecord {
    pub message_id: String,
    pub item: Result<WorkItem, String>,
}

/// The messages of a sweep of `listed` (one region's images): newest first, [`IMAGES_PER_MESSAGE`] to a
/// message, each of ami-share's copies in the message of its source (which finishes it).
pub fn sweep_items(region: &str, listed: Vec<ObservedImage>) -> Vec<WorkItem> {
    let selection = sweep::selection(listed);
    let mut items: Vec<WorkItem> = selection
        .to_reconcile
        .chunks(IMAGES_PER_MESSAGE)
        .map(|chunk| WorkItem {
            reason: WorkReason::Sweep,
            region: region.to_string(),
            images: chunk.iter().map(|i| i.image_id.clone()).collect(),
            recheck: 0,
        })
        .collect();
    for (copy, _) in selection.left_to_source {
        let source = match provenance(&copy) {
            Provenance::Copy(of) => Some(of.source_image),
            _ => None,
        };
        let home = items
            .iter()
            .position(|item| source.as_ref().is_some_and(|s| item.images.contains(s)));
        match home {
            Some(at) if items[at].images.len() < IMAGES_PER_MESSAGE => {
                items[at].images.push(copy.image_id)
            }
            // A full message: the copy goes on its own, and its source's message does not find it.
            _ => items.push(WorkItem {
                reason: WorkReason::Sweep,
                region: region.to_string(),
                images: vec![copy.image_id],
                recheck: 0,
            }),
        }
    }
    items
}

/// Lists the region's images and sends them to the queue; returns how many images and messages.
pub async fn enqueue_sweep<A: Aws>(
    aws: &A,
    queue: &WorkQueue,
    region: &str,
) -> Result<(usize, usize), AwsError> {
    let listed = aws.list_owned_images(region).await?;
    let images = listed.len();
    let items = sweep_items(region, listed);
    let messages: Vec<QueuedMessage> = items
        .iter()
        .map(|item| item.message(Duration::ZERO))
        .collect();
    aws.send_messages(&queue.url, &messages).await?;
    Ok((images, messages.len()))
}

/// Whether the reconciliation wrote a key policy (so the key must be re-checked later).
pub fn wrote_a_key(outcome: &Outcome) -> bool {
    outcome
        .done
        .iter()
        .any(|a| matches!(a, Action::PatchKeyPolicy { .. }))
}

/// The re-check of `images` after the key writes of a reconciliation that was itself re-check `recheck`
/// (0: an event or a sweep), or `None` past [`MAX_KEY_RECHECKS`].
pub fn key_recheck(region: &str, images: Vec<String>, recheck: u32) -> Option<WorkItem> {
    (recheck < MAX_KEY_RECHECKS && !images.is_empty()).then(|| WorkItem {
        reason: WorkReason::KeyRecheck,
        region: region.to_string(),
        images,
        recheck: recheck + 1,
    })
}

/// What one invocation of the consumer did.
#[derive(Debug, Default)]
pub struct Consumed {
    /// The message ids to be delivered again (`batchItemFailures`), each with why.
    pub failed: Vec<(String, String)>,
    pub report: SweepReport,
    /// Messages sent on: images not started before the deadline, key re-checks.
    pub sent: usize,
}

/// Reconciles the images of `records`, one message after another, starting none after `stop_at`.
pub async fn consume<A: Aws>(
    reconciler: &Reconciler<'_, A>,
    queue: &WorkQueue,
    records: &[WorkRecord],
    concurrency: usize,
    stop_at: Option<Instant>,
    progress: &mut impl FnMut(SweepProgress<'_>),
) -> Consumed {
    let started = Instant::now();
    let mut consumed = Consumed::default();
    reconciler.read_keys_once();
    for record in records {
        let item = match &record.item {
            Ok(item) => item,
            Err(problem) => {
                tracing::error!(
                    outcome = "failed",
                    message_id = %record.message_id,
                    "work message {} not handled: {problem}",
                    record.message_id
                );
                consumed
                    .failed
                    .push((record.message_id.clone(), problem.clone()));
                continue;
            }
        };
        if let Err(why) = consume_one(
            reconciler,
            queue,
            item,
            concurrency,
            stop_at,
            &mut consumed,
            progress,
        )
        .await
        {
            consumed.failed.push((record.message_id.clone(), why));
        }
    }
    consumed.report.elapsed = started.elapsed();
    consumed
}

/// One message: its images described and their snapshots read in one call each, reconciled, the rest
/// sent on. An error: the message must come back (what is done is not redone then).
async fn consume_one<A: Aws>(
    reconciler: &Reconciler<'_, A>,
    queue: &WorkQueue,
    item: &WorkItem,
    concurrency: usize,
    stop_at: Option<Instant>,
    consumed: &mut Consumed,
    progress: &mut impl FnMut(SweepProgress<'_>),
) -> Result<(), String> {
    let aws = reconciler.aws();
    let region = item.region.as_str();
    let listed = aws
        .list_owned_images_among(region, &item.images)
        .await
        .map_err(|e| e.to_string())?;
    *consumed
        .report
        .listed
        .entry(region.to_string())
        .or_default() += listed.len();
    let gone = item
        .images
        .iter()
        .filter(|id| !listed.iter().any(|i| &i.image_id == *id))
        .count();
    if gone > 0 {
        tracing::info!(
            region,
            "{gone} of the message's {} image(s) are gone or not this account's: nothing to do there",
            item.images.len()
        );
    }
    let snapshot_ids: Vec<String> = listed
        .iter()
        .flat_map(|i| i.snapshots.iter().map(|s| s.snapshot_id.clone()))
        .collect();
    if !snapshot_ids.is_empty() {
        match aws.list_owned_snapshots_among(region, &snapshot_ids).await {
            Ok(snapshots) => reconciler.know_snapshots(region, snapshots),
            Err(e) => tracing::warn!(
                region,
                "could not read the snapshots: {e} (each image reads its own)"
            ),
        }
    }
    let mut wrote_keys = BTreeSet::new();
    let mut to_retry = Vec::new();
    let mut report = SweepReport::default();
    sweep::reconcile_images(
        reconciler,
        listed,
        concurrency,
        stop_at,
        &mut report,
        &mut |p| {
            if let SweepProgress::Reconciled(outcome) | SweepProgress::Rechecked(outcome) = &p {
                if wrote_a_key(outcome) {
                    wrote_keys.insert(outcome.image_id.clone());
                }
                if outcome.is_incomplete() && outcome.retryable() {
                    to_retry.push(format!("{}: {}", outcome.image_id, outcome.headline()));
                }
            }
            progress(p)
        },
    )
    .await;
    merge(&mut consumed.report, report.clone());
    // An image a retry may still complete: the whole message comes back (what is done is not redone),
    // and that delivery reads the keys afresh, so nothing is sent on. A failure no retry cures is
    // logged as failed (the alarm counts it) and does not hold the message. (Re-checks that ran out, below,
    // do hold it: the message goes on to the dead-letter queue, where a person looks at the key.)
    if !to_retry.is_empty() {
        return Err(to_retry.join("; "));
    }
    let mut messages = Vec::new();
    if !report.unstarted.is_empty() {
        messages.push(
            WorkItem {
                images: report
                    .unstarted
                    .iter()
                    .map(|i| i.image_id.clone())
                    .collect(),
                ..item.clone()
            }
            .message(Duration::ZERO),
        );
    }
    let recheck = match item.reason {
        WorkReason::KeyRecheck => item.recheck,
        WorkReason::Sweep => 0,
    };
    let wrote_keys: Vec<String> = wrote_keys.into_iter().collect();
    for images in wrote_keys.chunks(IMAGES_PER_MESSAGE) {
        match key_recheck(region, images.to_vec(), recheck) {
            Some(again) => messages.push(again.message(queue.key_recheck_delay)),
            None => {
                let why = format!(
                    "{}: the key policy lost ami-share's grantees again at each of {MAX_KEY_RECHECKS} re-checks: another writer keeps replacing it (README, \"Encrypted AMIs\")",
                    images.join(", ")
                );
                tracing::error!(outcome = "failed", region, "{why}");
                return Err(why);
            }
        }
    }
    if !messages.is_empty() {
        aws.send_messages(&queue.url, &messages)
            .await
            .map_err(|e| format!("could not send on what is left: {e}"))?;
        consumed.sent += messages.len();
    }
    Ok(())
}

/// Adds one message's report to the invocation's.
fn merge(into: &mut SweepReport, from: SweepReport) {
    for (status, n) in from.by_status {
        *into.by_status.entry(status).or_default() += n;
    }
    into.reconciled += from.reconciled;
    into.changed += from.changed;
    into.actions += from.actions;
    into.left_to_source += from.left_to_source;
    into.unreached_copies += from.unreached_copies;
    into.not_started += from.not_started;
    into.unstarted.extend(from.unstarted);
    into.parameter_rechecks += from.parameter_rechecks;
    into.incomplete.extend(from.incomplete);
}

#[cfg(test)]
mod tests;
