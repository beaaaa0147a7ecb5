//! The Lambda entry point: load and validate the config, build the AWS clients once, serve events.
//!
//! A config that does not validate stops the function at start (the error is logged, the runtime reports
//! an init failure): it never runs half-configured.

use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::Handler;
use lambda_runtime::{LambdaEvent, service_fn};
use serde_json::Value;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    ami_share::logging::init_json();
    let config = Config::load_from_env().inspect_err(|e| {
        tracing::error!(error = %e, "refusing to start: {e}");
    })?;
    tracing::debug!(rules = config.rules.len(), "config loaded");
    let sdk_config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let aws = SdkAws::new(sdk_config);
    let home_region = aws.home_region().unwrap_or("us-east-1").to_string();
    let handler = Handler::new(config, aws, home_region);
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| async move {
        let deadline =
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(event.context.deadline);
        handler.handle_before(event.payload, Some(deadline)).await
    }))
    .await
}
