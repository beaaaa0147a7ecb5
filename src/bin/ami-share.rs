//! The operator CLI over the same core as the Lambda.
//!
//! Exit codes: 0 success; 1 the work failed (an AWS call, an unsupported event); 2 bad usage or an
//! invalid config.

use std::path::PathBuf;
use std::process::ExitCode;

use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::reconcile::{KeyPolicyWrites, Mode, Reconciler};
use ami_share::trigger::{self, EventKind, ImageEvent, ImageRef, Trigger};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ami-share",
    version,
    about = "Tag, share and distribute AMIs across an AWS Organization"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config file; print a summary of its rules, or every problem found.
    Validate {
        /// The config file (TOML).
        config: PathBuf,
    },
    /// Show what ami-share would do for an event or an image, changing nothing.
    Plan(Target),
    /// Do it: tag, open encrypted AMIs' keys, and share as the config says.
    Apply(Target),
}

#[derive(Args)]
struct Target {
    /// The config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// An EventBridge event file (as in events/).
    #[arg(
        long,
        conflicts_with = "image_id",
        required_unless_present = "image_id"
    )]
    event: Option<PathBuf>,
    /// An image id, instead of an event.
    #[arg(long)]
    image_id: Option<String>,
    /// The region of the image (default: the event's, else the AWS config's).
    #[arg(long)]
    region: Option<String>,
    /// Named profile from the AWS config files.
    #[arg(long)]
    profile: Option<String>,
    /// Send AWS calls to this endpoint (an emulator, a VPC endpoint).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    ami_share::logging::init_text();
    match Cli::parse().command {
        Command::Validate { config } => validate(&config),
        Command::Plan(target) => run(target, Mode::DryRun).await,
        Command::Apply(target) => run(target, Mode::Apply).await,
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            println!("{}: valid, {} rule(s)", path.display(), config.rules.len());
            for rule in &config.rules {
                let targets = rule.share.launch_permissions().count();
                let mut line = format!(
                    "  {}: {} tag(s), shares with {targets} target(s)",
                    rule.name,
                    rule.tags.len()
                );
                if let Some(copy) = &rule.copy {
                    let regions: Vec<&str> =
                        copy.regions.iter().map(|r| r.region.as_str()).collect();
                    line.push_str(&format!(", copies to {}", regions.join(", ")));
                }
                if let Some(days) = rule.deprecate_after_days {
                    line.push_str(&format!(", deprecates after {days} day(s)"));
                }
                if let Some(parameter) = &rule.ssm_parameter {
                    line.push_str(&format!(", keeps {}", parameter.for_rule(&rule.name)));
                }
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(2)
        }
    }
}

async fn run(target: Target, mode: Mode) -> ExitCode {
    let config = match Config::load(&target.config) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let event = match image_event(&target) {
        Ok(Some(event)) => event,
        Ok(None) => return ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(profile) = &target.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(url) = &target.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = &target.region {
        loader = loader.region(aws_config::Region::new(region.clone()));
    }
    let aws = SdkAws::new(loader.load().await);
    let home_region = aws.home_region().unwrap_or("us-east-1").to_string();
    let reconciler = Reconciler {
        config: &config,
        aws: &aws,
        home_region: &home_region,
        mode,
        key_policy_writes: KeyPolicyWrites::default(),
    };
    let outcome = reconciler.reconcile(&event).await;
    if target.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&outcome).expect("outcome serializes")
        );
    } else {
        println!("{}", outcome.headline());
    }
    if outcome.is_incomplete() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The image to work on, from `--event` or `--image-id`. `Ok(None)`: the event calls for no work.
fn image_event(target: &Target) -> Result<Option<ImageEvent>, String> {
    if let Some(image_id) = &target.image_id {
        return Ok(Some(ImageEvent {
            image: ImageRef {
                region: target.region.clone(),
                image_id: image_id.clone(),
            },
            kind: EventKind::Direct,
            account: None,
            event_id: None,
        }));
    }
    let path = target
        .event
        .as_ref()
        .expect("clap requires --event or --image-id");
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    match trigger::parse(value).map_err(|e| format!("{}: {e}", path.display()))? {
        Trigger::Image(mut event) => {
            if target.region.is_some() {
                event.image.region = target.region.clone();
            }
            Ok(Some(event))
        }
        Trigger::Ignore { reason } => {
            println!("nothing to do: {reason}");
            Ok(None)
        }
    }
}
