//! Log set-up shared by both faces.
//!
//! The Lambda writes JSON lines (one object per record, the Lambda request id from the runtime's span on
//! every line) so CloudWatch Logs Insights can query fields. The CLI writes readable text to stderr.
//! The level comes from `AWS_LAMBDA_LOG_LEVEL` (Lambda's advanced logging controls) or else `RUST_LOG`
//! (full directives, e.g. `ami_share=debug`), default `info`.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::LevelFilter;

fn filter() -> EnvFilter {
    // Lambda's levels are TRACE..ERROR plus FATAL, which tracing does not have: FATAL means errors only.
    let lambda_level = std::env::var("AWS_LAMBDA_LOG_LEVEL")
        .ok()
        .and_then(|level| match level.to_ascii_uppercase().as_str() {
            "FATAL" => Some(LevelFilter::ERROR),
            other => other.parse::<LevelFilter>().ok(),
        });
    match lambda_level {
        Some(level) => EnvFilter::new(level.to_string()),
        None => EnvFilter::builder()
            .with_default_directive(LevelFilter::INFO.into())
            .from_env_lossy(),
    }
}

/// JSON lines on stdout, for the Lambda.
pub fn init_json() {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .with_env_filter(filter())
        .init();
}

/// Text on stderr, for the CLI (stdout is for the command's own output).
pub fn init_text() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_env_filter(filter())
        .init();
}
