//! The Lambda entry point: load and validate the config, build the AWS clients once, serve events.
//!
//! A config that does not validate stops the function at start (the error is logged, the runtime reports
//! an init failure): it never runs half-configured.

use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::distribution::RegionName;
use ami_share::fanout::WorkQueue;
use ami_share::handler::{Handler, Invocation};
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

// One thread: the function waits on AWS, never on its CPU (at 128 MB, Lambda gives it a fraction of a
// vCPU anyway), and every worker thread of a multi-threaded runtime costs memory of its own (its stack,
// its malloc arena).
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    // What init spends its time on, logged at DEBUG (the benchmark's profile reads it).
    let started = std::time::Instant::now();
    let mut split = Vec::new();
    let mut lap = |step: &'static str| split.push((step, started.elapsed()));
    ami_share::logging::init_json();
    lap("logging");
    let config = Config::load_from_env().inspect_err(|e| {
        tracing::error!(error = %e, "refusing to start: {e}");
    })?;
    lap("config");
    let sdk_config = sdk_config().await;
    lap("sdk_config");
    let aws = SdkAws::new(sdk_config);
    lap("clients");
    // Lambda always sets AWS_REGION: without it, refuse to start rather than guess.
    let home_region = aws
        .home_region()
        .inspect_err(|e| tracing::error!(error = %e, "refusing to start: {e}"))?
        .to_string();
    let event_regions = event_regions_from_env().inspect_err(|e| {
        tracing::error!(error = %e, "refusing to start: {e}");
    })?;
    let queue = WorkQueue::from_env_values(
        std::env::var("AMI_SHARE_WORK_QUEUE_URL").ok().as_deref(),
        std::env::var("AMI_SHARE_KEY_RECHECK_SECONDS")
            .ok()
            .as_deref(),
    )
    .inspect_err(|e| tracing::error!(error = %e, "refusing to start: {e}"))?;
    let mut handler = Handler::new(config, aws, home_region).with_event_regions(event_regions);
    if let Some(queue) = queue {
        handler = handler.with_work_queue(queue);
    }
    lap("handler");
    let profile: Vec<String> = split
        .iter()
        .map(|(step, at)| format!("{step}={}", at.as_micros()))
        .collect();
    tracing::debug!(
        rules = handler.config().rules.len(),
        init_profile = %profile.join(" "),
        "init: microseconds from main at the end of each step (the runtime client and the first GET /next follow)"
    );
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let invocation = Invocation {
            deadline: Some(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(event.context.deadline),
            ),
            function_arn: Some(event.context.invoked_function_arn.clone()),
        };
        handler.handle_invocation(event.payload, &invocation).await
    }))
    .await
}

/// The SDK's config as Lambda gives it. The function's credentials are in its environment
/// (`AWS_ACCESS_KEY_ID`, …): they are read from there, rather than through the default chain, whose web
/// identity provider builds an STS client and with it the TLS connector (reading every root certificate
/// of the system) at start. Without them in the environment, the default chain.
async fn sdk_config() -> aws_config::SdkConfig {
    let loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    let loader = match std::env::var_os("AWS_ACCESS_KEY_ID") {
        Some(_) => loader.credentials_provider(
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        ),
        None => loader,
    };
    loader.load().await
}

/// `AMI_SHARE_EVENT_REGIONS` (the stack's ForwardedEventRegions): region codes separated by commas.
fn event_regions_from_env() -> Result<Vec<String>, String> {
    let value = std::env::var("AMI_SHARE_EVENT_REGIONS").unwrap_or_default();
    value
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| {
            RegionName::try_from(r.to_string())
                .map(|_| r.to_string())
                .map_err(|e| format!("AMI_SHARE_EVENT_REGIONS: {e}"))
        })
        .collect()
}
