//! ami-share: tag, share and distribute Amazon Machine Images across an AWS Organization.
//!
//! One flow, two faces (the Lambda `ami-share-lambda` and the operator CLI `ami-share`):
//!
//! ```text
//! event JSON ─trigger::parse─▶ ImageEvent ─▶ reconcile: describe image (aws) ─▶ rules::desired_for
//!                                             ─▶ extra reads (aws) ─▶ plan::plan ─▶ apply (aws) ─▶ Outcome
//! ```
//!
//! A sweep (`sweep`) lists the account's images and sends each through the same reconciler.
//!
//! `config`, `targets`, `trigger`, `rules`, `plan` and `observed` are pure (no I/O, no SDK types);
//! every AWS call is in `aws`.

pub mod aws;
pub mod check;
pub mod config;
pub mod distribution;
pub mod fanout;
pub mod handler;
mod json;
pub mod key_audit;
pub mod key_policy;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod markers;
pub mod metrics;
pub mod observed;
pub mod outcome;
pub mod plan;
pub mod provenance;
pub mod reconcile;
pub mod rules;
pub mod sweep;
pub mod targets;
#[cfg(test)]
mod test_support;
pub mod time;
pub mod trigger;
