//! One EventBridge event in, one summary log record and one JSON answer out.
//!
//! Errors are for events that were not handled: an event of the wrong shape, or an AWS call that failed.
//! Returning an error makes Lambda retry the asynchronous invocation and, when retries run out, send the
//! event to the dead-letter queue: nothing is lost silently. Events that need no work (a failed
//! CreateImage, an image no rule selects, one owned by another account) succeed with the reason.

use serde_json::{Value, json};

use crate::aws::Ec2;
use crate::config::Config;
use crate::reconcile::{Mode, Outcome, reconcile};
use crate::trigger::{self, Trigger, TriggerError};

/// An event that was not fully handled.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error(transparent)]
    UnsupportedEvent(#[from] TriggerError),
    /// Some AWS call failed; the message is the outcome's headline (what was done, what failed).
    #[error("{headline}")]
    Incomplete { headline: String, retryable: bool },
}

impl HandlerError {
    /// The Lambda `errorType`, so a dead-lettered event says at a glance what kind of failure it was.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::UnsupportedEvent(_) => "UnsupportedEvent",
            Self::Incomplete {
                retryable: true, ..
            } => "Retryable",
            Self::Incomplete {
                retryable: false, ..
            } => "NotRetryable",
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
pub struct Handler<E> {
    config: Config,
    ec2: E,
    home_region: String,
}

impl<E: Ec2> Handler<E> {
    pub fn new(config: Config, ec2: E, home_region: impl Into<String>) -> Self {
        Self {
            config,
            ec2,
            home_region: home_region.into(),
        }
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
        let outcome = reconcile(
            &event,
            &self.home_region,
            &self.config,
            &self.ec2,
            Mode::Apply,
        )
        .await;
        log_summary(&outcome, event.event_id.as_deref());
        if outcome.is_incomplete() {
            return Err(HandlerError::Incomplete {
                headline: outcome.headline(),
                retryable: outcome.retryable(),
            });
        }
        let status = if outcome.skipped.is_some() {
            "skipped"
        } else {
            "done"
        };
        Ok(json!({ "status": status, "outcome": outcome }))
    }
}

/// The one summary record per event: flat fields for log queries, the headline as the message.
fn log_summary(outcome: &Outcome, event_id: Option<&str>) {
    let status = match () {
        _ if !outcome.failures.is_empty() => "failed",
        _ if outcome.retry_reason.is_some() => "retry",
        _ if outcome.skipped.is_some() => "skipped",
        _ => "done",
    };
    tracing::info!(
        outcome = status,
        event_id = event_id.unwrap_or_default(),
        image_id = %outcome.image_id,
        region = %outcome.region,
        rules = %outcome.rules.join(","),
        actions_done = outcome.done.len(),
        actions_not_done = outcome.not_done.len(),
        done = %to_json(&outcome.done),
        deferred = %to_json(&outcome.deferred),
        skipped = outcome.skipped.as_deref().unwrap_or_default(),
        conflicts = %to_json(&outcome.conflicts),
        failures = %to_json(&outcome.failures),
        retry_reason = outcome.retry_reason.as_deref().unwrap_or_default(),
        retryable = outcome.is_incomplete() && outcome.retryable(),
        "{}",
        outcome.headline()
    );
}

/// JSON text of a value, for log fields.
fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("\"unserializable: {e}\""))
}
