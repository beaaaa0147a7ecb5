//! One EventBridge event in, one summary log record and one JSON answer out.
//!
//! Errors are for events that a retry may still handle: an AWS call that failed in a way worth retrying
//! (throttling, a 5xx, a time-out, a copy limit), or EC2 not having caught up with the event. Returning
//! an error makes Lambda retry the asynchronous invocation (which redoes only what is still missing) and,
//! when retries run out, send the event to the dead-letter queue: nothing is lost silently. An event of
//! the wrong shape is an error too. A failure no retry can cure (access denied, a key policy KMS refuses,
//! an opt-in region not enabled) is not retried: the invocation succeeds with status `failed`, and the
//! summary log names it and every region's outcome. Events that need no work (a failed CreateImage, an
//! image no rule selects, one owned by another account) succeed with the reason.
//!
//! A scheduled event ("Scheduled Event" from `aws.events`, the stack's optional `SweepSchedule`) sweeps
//! the function's region. With a work queue (the stack's `WorkQueue`), it only sends the region's AMIs
//! there, and the queue's messages (an SQS event) are reconciled as they come, each answered for on its
//! own ([`crate::fanout`]); without one, every AMI is reconciled in the invocation, newest first, starting
//! none after the deadline less [`SWEEP_MARGIN`]. A sweep is never retried as a whole (the next schedule
//! is the retry); each image that changed or failed gets its own summary record, the sweep one more.
//!
//! Each image event and each sweep also prints one CloudWatch EMF line of counters ([`crate::metrics`]).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::aws::Aws;
use crate::config::Config;
use crate::fanout::{self, WorkQueue, WorkRecord};
use crate::metrics::Counts;
use crate::outcome::{Outcome, Status};
use crate::reconcile::{KeyPolicyWrites, Mode, Reconciler};
use crate::sweep::{self, SweepOptions, SweepProgress, SweepReport, SweepStatus};
use crate::trigger::{self, ImageEvent, Trigger, TriggerError};

/// `tracing::event!` at a level known only at run time (the macro wants a constant).
macro_rules! at_level {
    ($level:expr, $($fields:tt)+) => {
        match $level {
            tracing::Level::ERROR => tracing::error!($($fields)+),
            tracing::Level::WARN => tracing::warn!($($fields)+),
            _ => tracing::info!($($fields)+),
        }
    };
}

/// A scheduled sweep starts no image later than this before the invocation's deadline: time for the
/// images in flight to finish (a key policy write, its read-back and its re-check) and be logged.
pub const SWEEP_MARGIN: Duration = Duration::from_secs(20);

/// Images a scheduled sweep reconciles at once.
pub const SWEEP_CONCURRENCY: usize = 4;

/// An event that was not fully handled.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    UnsupportedEvent(#[from] TriggerError),
    /// A call failed in a way a retry may cure, or EC2 has not caught up; the message is the outcome's
    /// headline (what was done, what failed, each region's outcome).
    #[error("{headline}")]
    Retryable { headline: String },
}

impl HandlerError {
    /// The Lambda `errorType`, so a dead-lettered event says at a glance what kind of failure it was.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::UnsupportedEvent(_) => "UnsupportedEvent",
            Self::Retryable { .. } => "Retryable",
        }
    }
}

impl From<HandlerError> for lambda_runtime::Diagnostic {
    fn from(error: HandlerError) -> Self {
        Self {
            error_type: error.error_type().to_string(),
            error_message: error.to_string(),
        }
    }
}

/// What Lambda tells of one invocation, beside the event.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    /// When Lambda ends the invocation: a sweep stops starting images before it.
    pub deadline: Option<SystemTime>,
    /// The invoked function's ARN (`arn:aws:lambda:<region>:<account>:function:<name>`): whose account
    /// this function acts for, known without a call.
    pub function_arn: Option<String>,
}

impl Invocation {
    /// The account of the invoked function's ARN.
    fn account(&self) -> Option<&str> {
        let arn = self.function_arn.as_deref()?;
        let account = arn.split(':').nth(4)?;
        crate::targets::is_account_id(account).then_some(account)
    }
}

/// The configured core, built once per process and reused by every invocation.
pub struct Handler<A> {
    config: Config,
    aws: A,
    home_region: String,
    /// Regions besides `home_region` whose (forwarded) events this function handles.
    event_regions: Vec<String>,
    key_policy_writes: KeyPolicyWrites,
    /// The function's work queue: sweeps fan out through it, key writes are re-checked through it.
    queue: Option<WorkQueue>,
}

impl<A: Aws> Handler<A> {
    pub fn new(config: Config, aws: A, home_region: impl Into<String>) -> Self {
        Self {
            config,
            aws,
            home_region: home_region.into(),
            event_regions: Vec::new(),
            key_policy_writes: KeyPolicyWrites::default(),
            queue: None,
        }
    }

    /// Sweeps through `queue` ([`crate::fanout`]), and re-checks each key policy write through it
    /// rather than by reading it again after a pause.
    pub fn with_work_queue(mut self, queue: WorkQueue) -> Self {
        self.queue = Some(queue);
        self
    }

    /// The config it serves.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Also handles the events of these regions (forwarded to this function's region).
    pub fn with_event_regions(mut self, regions: Vec<String>) -> Self {
        self.event_regions = regions;
        self
    }

    /// Sets how key policy writes are confirmed (tests shorten the pause).
    pub fn with_key_policy_writes(mut self, writes: KeyPolicyWrites) -> Self {
        self.key_policy_writes = writes;
        self
    }

    /// Handles one event with no deadline and no function ARN (tests, local runs): see
    /// [`Handler::handle_invocation`].
    pub async fn handle(&self, event: Value) -> Result<Value, HandlerError> {
        self.handle_invocation(event, &Invocation::default()).await
    }

    /// Handles one event and logs its summary record. An image event of another account than the
    /// function's, or of a region it does not serve, is skipped with the reason (the invocation
    /// succeeds: a retry would not change whose event it is).
    pub async fn handle_invocation(
        &self,
        event: Value,
        invocation: &Invocation,
    ) -> Result<Value, HandlerError> {
        let deadline = invocation.deadline;
        let trigger = match trigger::parse(event) {
            Ok(trigger) => trigger,
            Err(e) => {
                tracing::error!(outcome = "unsupported_event", error = %e, "event not handled: {e}");
                return Err(e.into());
            }
        };
        let events = match trigger {
            Trigger::Ignore { reason } => {
                tracing::info!(outcome = "ignored", reason = %reason, "event ignored: {reason}");
                return Ok(json!({ "status": "ignored", "reason": reason }));
            }
            // Boxed: the sweep's future is large and deep, and the event path need not carry it.
            Trigger::Sweep { event_id } => {
                return Ok(match &self.queue {
                    Some(queue) => self.enqueue_sweep(queue, event_id).await,
                    None => Box::pin(self.sweep(event_id, deadline)).await,
                });
            }
            Trigger::Work(records) => return Box::pin(self.consume(records, deadline)).await,
            Trigger::Images(events) => events,
        };
        let (events, past_cap) = events.split_at(events.len().min(MAX_IMAGES_PER_EVENT));
        let mut answers: Vec<ImageAnswer> = futures::stream::iter(events)
            .map(|event| self.handle_image(event, invocation))
            .buffered(IMAGES_AT_ONCE)
            .collect()
            .await;
        for event in past_cap {
            let region = event.image.region.as_deref().unwrap_or(&self.home_region);
            let outcome = Outcome::not_reconciled(
                &event.image.image_id,
                region,
                format!(
                    "one event reconciles at most {MAX_IMAGES_PER_EVENT} AMIs and this one names {}: the sweep (SweepSchedule, or `ami-share sweep`) or `ami-share apply --image-id` reaches the rest",
                    events.len() + past_cap.len()
                ),
            );
            log_summary(&outcome, event.event_id.as_deref());
            answers.push(ImageAnswer::of(&outcome));
        }
        if answers.len() == 1 {
            return answers.pop().expect("one answer").into_result();
        }
        // A tag event that named several AMIs: one answer for all, retried (as a whole: what is done
        // is not redone) if any of them must be.
        let retry: Vec<&str> = answers.iter().filter_map(|a| a.retry.as_deref()).collect();
        if !retry.is_empty() {
            return Err(HandlerError::Retryable {
                headline: format!(
                    "{} of the event's {} AMIs must be handled again: {}",
                    retry.len(),
                    answers.len(),
                    retry.join("; ")
                ),
            });
        }
        let status = answers
            .iter()
            .map(|a| a.status)
            .max_by_key(|s| s.severity())
            .expect("an event names at least one image");
        let summary = answers
            .iter()
            .map(|a| a.answer["summary"].as_str().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("; ");
        let images: Vec<Value> = answers.into_iter().map(|a| a.answer).collect();
        Ok(json!({ "status": status, "summary": summary, "images": images }))
    }

    /// Reconciles one image an event names, logs its summary record and counters.
    async fn handle_image(&self, event: &ImageEvent, invocation: &Invocation) -> ImageAnswer {
        if let Some(reason) = self.not_served(event, invocation) {
            let region = event.image.region.as_deref().unwrap_or(&self.home_region);
            let outcome = Outcome::not_reconciled(&event.image.image_id, region, reason);
            log_summary(&outcome, event.event_id.as_deref());
            return ImageAnswer::of(&outcome);
        }
        let mut outcome = self.reconciler().reconcile(event).await;
        if let Some(queue) = &self.queue
            && fanout::wrote_a_key(&outcome)
            && let Some(recheck) =
                fanout::key_recheck(&outcome.region, vec![outcome.image_id.clone()], 0)
        {
            // Unsent, the event is delivered again: that delivery reads the key afresh.
            if let Err(e) = self
                .aws
                .send_messages(&queue.url, &[recheck.message(queue.key_recheck_delay)])
                .await
            {
                outcome.failures.push(e);
            }
        }
        log_summary(&outcome, event.event_id.as_deref());
        emit_metrics(Counts::of(&outcome));
        ImageAnswer::of(&outcome)
    }
}

/// AMIs of one tag event reconciled at once (a CreateTags call may name many).
const IMAGES_AT_ONCE: usize = 4;

/// AMIs one event may have reconciled. A CreateTags call may name any number of resources, and anyone
/// who may tag may make one: past this, the invocation could not finish in its time (and would be
/// retried to time out again). A pipeline's call names one.
pub const MAX_IMAGES_PER_EVENT: usize = 25;

/// What the handler answers for one image, and whether Lambda should deliver the event again.
struct ImageAnswer {
    status: Status,
    answer: Value,
    /// The headline, when a retry may complete what is missing.
    retry: Option<String>,
}

impl ImageAnswer {
    fn of(outcome: &Outcome) -> Self {
        Self {
            status: outcome.status(),
            answer: json!({ "status": outcome.status(), "summary": outcome.headline(), "outcome": outcome }),
            retry: (outcome.is_incomplete() && outcome.retryable()).then(|| outcome.headline()),
        }
    }

    fn into_result(self) -> Result<Value, HandlerError> {
        match self.retry {
            Some(headline) => Err(HandlerError::Retryable { headline }),
            None => Ok(self.answer),
        }
    }
}

impl<A: Aws> Handler<A> {
    /// Why this function does not act on the event, if it does not: the event is another account's
    /// (only the owner can share an AMI, and this function's config is its own account's), or of a
    /// region this stack does not serve.
    fn not_served(&self, event: &ImageEvent, invocation: &Invocation) -> Option<String> {
        if let (Some(own), Some(theirs)) = (invocation.account(), event.account.as_deref())
            && own != theirs
        {
            return Some(format!(
                "an event of account {theirs}: this function acts for account {own} only (only an AMI's owner can share it; deploy ami-share in {theirs} for its AMIs)"
            ));
        }
        let region = event.image.region.as_deref()?;
        if self.serves(region) {
            return None;
        }
        Some(format!(
            "an event of {region}: this stack serves {} (its own region and ForwardedEventRegions); deploy ami-share in {region}, or add it to ForwardedEventRegions",
            self.served_regions().join(", ")
        ))
    }

    fn serves(&self, region: &str) -> bool {
        region == self.home_region || self.event_regions.iter().any(|r| r == region)
    }

    fn served_regions(&self) -> Vec<&str> {
        std::iter::once(self.home_region.as_str())
            .chain(self.event_regions.iter().map(String::as_str))
            .collect()
    }

    fn reconciler(&self) -> Reconciler<'_, A> {
        let writes = match self.queue {
            // Re-checked through the queue, later: no pause here.
            Some(_) => KeyPolicyWrites {
                recheck_after: None,
                ..self.key_policy_writes
            },
            None => self.key_policy_writes,
        };
        Reconciler::new(&self.config, &self.aws, &self.home_region, Mode::Apply)
            .with_key_policy_writes(writes)
    }

    /// The scheduled sweep, fanned out: the region's images go to the work queue.
    async fn enqueue_sweep(&self, queue: &WorkQueue, event_id: Option<String>) -> Value {
        let event_id = event_id.unwrap_or_default();
        match fanout::enqueue_sweep(&self.aws, queue, &self.home_region).await {
            Ok((images, messages)) => {
                let summary = format!(
                    "sweep of {}: {images} image(s) sent to the work queue in {messages} message(s)",
                    self.home_region
                );
                tracing::info!(
                    outcome = "sweep_enqueued",
                    event_id,
                    images,
                    messages,
                    "{summary}"
                );
                json!({ "status": "enqueued", "summary": summary, "images": images, "messages": messages })
            }
            Err(e) => {
                // The next schedule is the retry; the ERROR record is what the failure alarm counts.
                tracing::error!(outcome = "failed", event_id, error = %e, "sweep of {} not sent to the work queue: {e}", self.home_region);
                json!({ "status": "failed", "summary": format!("sweep not sent to the work queue: {e}") })
            }
        }
    }

    /// Messages of the work queue: each message's images reconciled; the answer names the messages to
    /// deliver again (the event source mapping's `ReportBatchItemFailures`).
    async fn consume(
        &self,
        records: Vec<WorkRecord>,
        deadline: Option<SystemTime>,
    ) -> Result<Value, HandlerError> {
        let Some(queue) = &self.queue else {
            return Err(HandlerError::UnsupportedEvent(TriggerError {
                problem: "work queue messages, but this function has no work queue (AMI_SHARE_WORK_QUEUE_URL)".into(),
            }));
        };
        // A message of a region this stack does not serve is refused like an event of one (only the
        // function's role should send here, but anyone IAM lets send must not widen what it serves).
        let records: Vec<WorkRecord> = records
            .into_iter()
            .map(|mut record| {
                if let Ok(item) = &record.item
                    && !self.serves(&item.region)
                {
                    record.item = Err(format!(
                        "a work message for {}, which this stack does not serve ({}): expected one of its regions",
                        item.region,
                        self.served_regions().join(", ")
                    ));
                }
                record
            })
            .collect();
        let mut counts = Counts::default();
        let consumed = fanout::consume(
            &self.reconciler(),
            queue,
            &records,
            SWEEP_CONCURRENCY,
            stop_starting_at(deadline),
            &mut |progress| {
                let outcome = match progress {
                    SweepProgress::Listed { .. } => return,
                    SweepProgress::Reconciled(outcome) => {
                        counts.add(Counts::of(outcome));
                        outcome
                    }
                    SweepProgress::Rechecked(outcome) => outcome,
                };
                if outcome.is_noteworthy() {
                    log_summary(outcome, None);
                }
            },
        )
        .await;
        emit_metrics(counts);
        let report = &consumed.report;
        let level = match consumed.failed.is_empty() {
            true => tracing::Level::INFO,
            false => tracing::Level::WARN,
        };
        at_level!(
            level,
            outcome = "work_done",
            messages = records.len(),
            failed = %to_json(&consumed.failed),
            sent_on = consumed.sent,
            images = report.reconciled,
            changed = report.changed,
            not_started = report.not_started,
            "{} work message(s), {} to deliver again, {} sent on: {}",
            records.len(),
            consumed.failed.len(),
            consumed.sent,
            report.headline()
        );
        let failures: Vec<Value> = consumed
            .failed
            .iter()
            .map(|(id, _)| json!({ "itemIdentifier": id }))
            .collect();
        Ok(json!({ "batchItemFailures": failures }))
    }

    /// The scheduled sweep of the function's region.
    async fn sweep(&self, event_id: Option<String>, deadline: Option<SystemTime>) -> Value {
        let options = SweepOptions {
            regions: vec![self.home_region.clone()],
            concurrency: SWEEP_CONCURRENCY,
            stop_starting_at: stop_starting_at(deadline),
        };
        let mut counts = Counts::default();
        let report = sweep::sweep(&self.reconciler(), &options, |progress| {
            let outcome = match progress {
                SweepProgress::Listed { .. } => return,
                SweepProgress::Reconciled(outcome) => {
                    counts.add(Counts::of(outcome));
                    outcome
                }
                SweepProgress::Rechecked(outcome) => {
                    counts.add(Counts {
                        images: 0,
                        ..Counts::of(outcome)
                    });
                    outcome
                }
            };
            if outcome.is_noteworthy() {
                log_summary(outcome, event_id.as_deref());
            }
        })
        .await;
        log_sweep(&report, event_id.as_deref());
        emit_metrics(counts);
        let status = match report.is_complete() {
            true => "done",
            false => "incomplete",
        };
        json!({ "status": status, "summary": report.headline(), "sweep": report })
    }
}

/// When a sweep or the work queue's consumer starts no more images: [`SWEEP_MARGIN`] before the
/// deadline, or half-way to it if that is sooner (a short invocation still makes progress).
fn stop_starting_at(deadline: Option<SystemTime>) -> Option<Instant> {
    deadline.map(|deadline| {
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Instant::now() + left.saturating_sub(SWEEP_MARGIN.min(left / 2))
    })
}

/// The sweep's own summary record: `failed` (at ERROR, so the failure alarm sees it) when a region
/// could not even be listed, `sweep_incomplete` (WARN) when images were left, else `swept`.
fn log_sweep(report: &SweepReport, event_id: Option<&str>) {
    let status = report.status();
    let level = match status {
        SweepStatus::Failed => tracing::Level::ERROR,
        SweepStatus::Incomplete => tracing::Level::WARN,
        SweepStatus::Swept => tracing::Level::INFO,
    };
    at_level!(
        level,
        outcome = status.as_str(),
        event_id = event_id.unwrap_or_default(),
        images = report.reconciled,
        changed = report.changed,
        actions_done = report.actions,
        not_started = report.not_started,
        by_status = %to_json(&report.by_status),
        incomplete = %to_json(&report.incomplete),
        listing_failures = %to_json(&report.listing_failures),
        stale_keys = %to_json(&report.stale_keys),
        "{}",
        report.headline()
    );
}

/// Prints the counters as one EMF line on stdout, beside the logs, where CloudWatch Logs reads it.
fn emit_metrics(counts: Counts) {
    let function_name =
        std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "ami-share".to_string());
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    println!("{}", counts.emf(&function_name, now_ms));
}

/// The one summary record per event: flat fields for log queries, the headline as the message. At
/// ERROR when something failed, WARN when it must be retried or is blocked, else INFO: a stack whose
/// `LogLevel` is WARN still logs every record its alarm counts.
fn log_summary(outcome: &Outcome, event_id: Option<&str>) {
    let level = match outcome.status() {
        Status::Failed => tracing::Level::ERROR,
        Status::Retry | Status::Blocked => tracing::Level::WARN,
        // Done, but with what a limit left out: someone must change the config or the image.
        Status::Skipped | Status::Done if !outcome.limits.is_empty() => tracing::Level::WARN,
        Status::Skipped | Status::Done => tracing::Level::INFO,
    };
    at_level!(
        level,
        outcome = outcome.status().as_str(),
        event_id = event_id.unwrap_or_default(),
        image_id = %outcome.image_id,
        event_image_id = outcome.event_image_id.as_deref().unwrap_or_default(),
        region = %outcome.region,
        rules = %outcome.rules.join(","),
        actions_done = outcome.done.len(),
        actions_not_done = outcome.not_done.len(),
        done = %to_json(&outcome.done),
        deferred = %to_json(&outcome.deferred),
        blocked = %to_json(&outcome.blocked),
        limits = %to_json(&outcome.limits),
        skipped = outcome.skipped.as_deref().unwrap_or_default(),
        conflicts = %to_json(&outcome.conflicts),
        failures = %to_json(&outcome.failures),
        retry_reason = outcome.retry_reason.as_deref().unwrap_or_default(),
        regions = %to_json(&outcome.regions),
        copy_of = outcome.copy_of.as_deref().unwrap_or_default(),
        retryable = outcome.is_incomplete() && outcome.retryable(),
        "{}",
        outcome.headline()
    );
}

/// JSON text of a value, for log fields.
fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("\"unserializable: {e}\""))
}
