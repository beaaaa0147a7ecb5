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

use serde_json::{Value, json};

use crate::aws::Aws;
use crate::config::Config;
use crate::reconcile::{KeyPolicyWrites, Mode, Outcome, Reconciler};
use crate::trigger::{self, Trigger, TriggerError};

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

/// The configured core, built once per process and reused by every invocation.
pub struct Handler<A> {
    config: Config,
    aws: A,
    home_region: String,
    key_policy_writes: KeyPolicyWrites,
}

impl<A: Aws> Handler<A> {
    pub fn new(config: Config, aws: A, home_region: impl Into<String>) -> Self {
        Self {
            config,
            aws,
            home_region: home_region.into(),
            key_policy_writes: KeyPolicyWrites::default(),
        }
    }

    /// Sets how key policy writes are confirmed (tests shorten the pause).
    pub fn with_key_policy_writes(mut self, writes: KeyPolicyWrites) -> Self {
        self.key_policy_writes = writes;
        self
    }

    /// Handles one event and logs its summary record.
    pub async fn handle(&self, event: Value) -> Result<Value, HandlerError> {
        let trigger = match trigger::parse(event) {
            Ok(trigger) => trigger,
            Err(e) => {
                tracing::error!(outcome = "unsupported_event", error = %e, "event not handled: {e}");
                return Err(e.into());
            }
        };
        let event = match trigger {
            Trigger::Ignore { reason } => {
                tracing::info!(outcome = "ignored", reason = %reason, "event ignored: {reason}");
                return Ok(json!({ "status": "ignored", "reason": reason }));
            }
            Trigger::Image(event) => event,
        };
        let reconciler = Reconciler {
            config: &self.config,
            aws: &self.aws,
            home_region: &self.home_region,
            mode: Mode::Apply,
            key_policy_writes: self.key_policy_writes,
        };
        let outcome = reconciler.reconcile(&event).await;
        log_summary(&outcome, event.event_id.as_deref());
        if outcome.is_incomplete() && outcome.retryable() {
            return Err(HandlerError::Retryable {
                headline: outcome.headline(),
            });
        }
        Ok(json!({ "status": outcome.status(), "summary": outcome.headline(), "outcome": outcome }))
    }
}

/// The one summary record per event: flat fields for log queries, the headline as the message.
fn log_summary(outcome: &Outcome, event_id: Option<&str>) {
    tracing::info!(
        outcome = outcome.status(),
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
