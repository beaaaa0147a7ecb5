//! The operator CLI over the same core as the Lambda.
//!
//! Exit codes: 0 success; 1 the work failed or is incomplete (an AWS call failed, an image must be
//! retried, a sweep could not finish every image); 2 bad usage, an invalid config, or an event file
//! that is not a supported event naming an image.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::key_audit::{self, StaleKey};
use ami_share::outcome::Outcome;
use ami_share::reconcile::{Mode, Reconciler};
use ami_share::sweep::{SweepOptions, SweepProgress};
use ami_share::trigger::{self, EventKind, ImageEvent, ImageRef, Trigger};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

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
        /// The account that will run ami-share with it (12 digits): warns about rules that list it as a
        /// share target.
        #[arg(long, value_parser = parse_account)]
        account: Option<String>,
    },
    /// Show what ami-share would do for an event or an image, changing nothing.
    Plan(Target),
    /// Do it: tag, open encrypted AMIs' keys, and share as the config says.
    Apply(Target),
    /// Reconcile every AMI this account owns in the given regions (backfill, missed events, a changed
    /// config). Prints each image that changed, failed or is blocked, then a summary.
    Sweep(SweepArgs),
    /// Run with a receiving account's credentials: can this account launch this AMI, and if not, what
    /// exactly to fix (visibility, Allowed AMIs, deprecation, snapshot keys). Exit 0 ready, 1 a
    /// problem, 2 bad input, 3 nothing wrong found but something could not be checked from this
    /// account, 4 the check could not run (an AWS error).
    Check(CheckArgs),
}

#[derive(Args)]
struct CheckArgs {
    /// The AMI (ami-…).
    #[arg(long)]
    image_id: String,
    /// Its region (default: the AWS config's).
    #[arg(long)]
    region: Option<String>,
    /// A key that encrypts its snapshots (repeatable): a receiver sees which only with create-volume
    /// permission on the snapshots.
    #[arg(long = "kms-key")]
    kms_keys: Vec<String>,
    /// The owner's account id, to judge Allowed AMIs when the image cannot be seen at all.
    #[arg(long, value_parser = parse_account)]
    owner: Option<String>,
    #[command(flatten)]
    connection: Connection,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

/// Where AWS is: like the AWS CLI's options of the same names.
#[derive(Args)]
struct Connection {
    /// Named profile from the AWS config files.
    #[arg(long)]
    profile: Option<String>,
    /// Send AWS calls to this endpoint (an emulator, a VPC endpoint).
    #[arg(long)]
    endpoint_url: Option<String>,
}

#[derive(Args)]
struct SweepArgs {
    /// The config file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// A region to sweep; repeat it or separate with commas (default: the AWS config's region).
    #[arg(long = "region", value_delimiter = ',')]
    regions: Vec<String>,
    #[command(flatten)]
    connection: Connection,
    /// Images reconciled at once (each runs its independent calls concurrently too). The SDK's
    /// adaptive retry mode slows the sweep down when AWS throttles it.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=32))]
    concurrency: u16,
    /// Plan only: print what would be done, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the summary as JSON (the per-image lines still go to stderr).
    #[arg(long)]
    json: bool,
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
    #[command(flatten)]
    connection: Connection,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    ami_share::logging::init_text();
    match Cli::parse().command {
        Command::Validate { config, account } => validate(&config, account.as_deref()),
        Command::Plan(target) => run(target, Mode::DryRun).await,
        Command::Apply(target) => run(target, Mode::Apply).await,
        Command::Sweep(args) => sweep(args).await,
        Command::Check(args) => check(args).await,
    }
}

async fn check(args: CheckArgs) -> ExitCode {
    if !args.image_id.starts_with("ami-") {
        eprintln!("--image-id {:?}: expected an AMI id (ami-…)", args.image_id);
        return ExitCode::from(2);
    }
    if let Some(key) = args.kms_keys.iter().find(|k| !k.starts_with("arn:")) {
        eprintln!(
            "--kms-key {key:?}: expected a key ARN (arn:aws:kms:<region>:<account>:key/<id>)"
        );
        return ExitCode::from(2);
    }
    let retry = aws_config::retry::RetryConfig::standard();
    let aws = connect(&args.connection, args.region.as_deref(), retry).await;
    let region = match aws.home_region() {
        Ok(region) => region.to_string(),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let view = match aws
        .receiver_view(&region, &args.image_id, &args.kms_keys, args.owner)
        .await
    {
        Ok(view) => view,
        Err(e) => {
            // Not an answer about the image: the check itself could not run.
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"image_id": args.image_id, "region": region, "error": e.to_string()})
                );
            }
            eprintln!("the check could not run: {e}");
            return ExitCode::from(4);
        }
    };
    let checks = ami_share::check::checks(&view);
    let ready = ami_share::check::is_ready(&checks);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"image_id": view.image_id, "region": view.region, "ready": ready, "checks": checks})
        );
    } else {
        print!("{}", ami_share::check::render(&checks));
        println!(
            "{}",
            match ready {
                true => format!(
                    "ready: this account can launch {} in {region}",
                    view.image_id
                ),
                false
                    if checks
                        .iter()
                        .any(|c| c.verdict == ami_share::check::Verdict::Problem) =>
                    format!(
                        "not ready: fix the problems above ({} in {region})",
                        view.image_id
                    ),
                false => format!(
                    "nothing wrong found, but not everything could be checked from this account ({} in {region}): see above",
                    view.image_id
                ),
            }
        );
    }
    if ready {
        ExitCode::SUCCESS
    } else if checks
        .iter()
        .any(|c| c.verdict == ami_share::check::Verdict::Problem)
    {
        ExitCode::from(1)
    } else {
        ExitCode::from(3)
    }
}

/// The config, or exit code 2 with every problem on stderr.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

/// The AWS clients, configured like the AWS CLI from the environment, the profile and the options.
async fn connect(
    connection: &Connection,
    region: Option<&str>,
    retry: aws_config::retry::RetryConfig,
) -> SdkAws {
    let mut loader =
        aws_config::defaults(aws_config::BehaviorVersion::latest()).retry_config(retry);
    if let Some(profile) = &connection.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(url) = &connection.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_string()));
    }
    SdkAws::new(loader.load().await)
}

async fn sweep(args: SweepArgs) -> ExitCode {
    let config = match load_config(&args.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Adaptive retry: after a throttling answer the SDK paces every later call of the sweep.
    let retry = aws_config::retry::RetryConfig::adaptive().with_max_attempts(5);
    let aws = connect(
        &args.connection,
        args.regions.first().map(String::as_str),
        retry,
    )
    .await;
    let home_region = match aws.home_region() {
        Ok(region) => region.to_string(),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let mut regions: Vec<String> = Vec::new();
    for region in &args.regions {
        if !regions.contains(region) {
            regions.push(region.clone());
        }
    }
    if regions.is_empty() {
        regions.push(home_region.clone());
    }
    let mode = match args.dry_run {
        true => Mode::DryRun,
        false => Mode::Apply,
    };
    let reconciler = Reconciler::new(&config, &aws, &home_region, mode);
    let options = SweepOptions {
        regions,
        concurrency: usize::from(args.concurrency),
        stop_starting_at: None,
    };
    // A progress bar only for a person watching: never in a pipe or a CI log.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(0).with_style(
            ProgressStyle::with_template(
                "{spinner} {pos}/{len} images [{bar:30}] {per_sec} eta {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!(
            "listing the images of {}…",
            options.regions.join(", ")
        ));
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    });
    let json = args.json;
    // Per-image lines: stdout, or stderr when stdout carries the JSON report; above the bar.
    let print = |outcome: &Outcome| {
        if !outcome.is_noteworthy() {
            return;
        }
        let text = outcome.report();
        let write = || {
            if json {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
        };
        match &bar {
            Some(bar) => bar.suspend(write),
            None => write(),
        }
    };
    let report = ami_share::sweep::sweep(&reconciler, &options, |progress| match progress {
        SweepProgress::Listed { to_reconcile } => {
            if let Some(bar) = &bar {
                bar.set_message("");
                bar.set_length(to_reconcile as u64);
            }
        }
        SweepProgress::Reconciled(outcome) => {
            print(outcome);
            if let Some(bar) = &bar {
                bar.inc(1);
            }
        }
        SweepProgress::Rechecked(outcome) => print(outcome),
    })
    .await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serializes")
        );
    } else {
        for key in &report.stale_keys {
            println!("note: {key}");
        }
        println!("{}", report.headline());
    }
    if report.is_complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn parse_account(value: &str) -> Result<String, String> {
    value
        .parse::<ami_share::targets::AccountId>()
        .map(|id| id.as_str().to_string())
        .map_err(|e| e.to_string())
}

fn validate(path: &std::path::Path, account: Option<&str>) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            for warning in config.warnings(account) {
                eprintln!("warning: {warning}");
            }
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
    let config = match load_config(&target.config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let events = match image_events(&target) {
        Ok(events) if events.is_empty() => return ExitCode::SUCCESS,
        Ok(events) => events,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let aws = connect(
        &target.connection,
        target.region.as_deref(),
        aws_config::retry::RetryConfig::standard(),
    )
    .await;
    let home_region = match aws.home_region() {
        Ok(region) => region.to_string(),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let reconciler = Reconciler::new(&config, &aws, &home_region, mode);
    // A tag event may name several AMIs: each is planned (or applied) and printed in turn; with
    // --json, one object for one image, an array for several.
    let mut values = Vec::new();
    let mut incomplete = false;
    for event in &events {
        let outcome = reconciler.reconcile(event).await;
        incomplete |= outcome.is_incomplete();
        let stale = match mode {
            Mode::DryRun => stale_keys(&aws, &outcome).await,
            Mode::Apply => Vec::new(),
        };
        if target.json {
            let mut value = serde_json::to_value(&outcome).expect("outcome serializes");
            if !stale.is_empty() {
                value["stale_keys"] = serde_json::to_value(&stale).expect("serializes");
            }
            values.push(value);
        } else {
            println!("{}", outcome.report());
            for key in &stale {
                println!("  note: {key}");
            }
        }
    }
    if target.json {
        let value = match values.len() {
            1 => values.pop().expect("one outcome"),
            _ => serde_json::Value::Array(values),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("outcome serializes")
        );
    }
    if incomplete {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What `plan` adds: the keys of the planned image whose ami-share statements admit grantees no AMI on
/// the key is shared with any more. A read that fails is said on stderr; the plan stands.
async fn stale_keys(aws: &SdkAws, outcome: &Outcome) -> Vec<StaleKey> {
    use ami_share::aws::Aws;
    let region = &outcome.region;
    let audited = async {
        let images = aws.list_owned_images(region).await?;
        let known = outcome
            .launch_permissions
            .iter()
            .map(|p| (outcome.image_id.clone(), p.clone()))
            .collect();
        key_audit::audit(aws, region, &images, &known, Some(&outcome.image_id), None).await
    };
    match audited.await {
        Ok(stale) => stale,
        Err(e) => {
            eprintln!("note: the key audit could not finish: {e}");
            Vec::new()
        }
    }
}

/// The images to work on, from `--event` or `--image-id`: none when the event calls for no work, several
/// for a tag event that names several AMIs.
fn image_events(target: &Target) -> Result<Vec<ImageEvent>, String> {
    if let Some(image_id) = &target.image_id {
        return Ok(vec![ImageEvent {
            image: ImageRef {
                region: target.region.clone(),
                image_id: image_id.clone(),
            },
            kind: EventKind::Direct,
            account: None,
            event_id: None,
        }]);
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
        Trigger::Images(mut events) => {
            if target.region.is_some() {
                for event in &mut events {
                    event.image.region = target.region.clone();
                }
            }
            Ok(events)
        }
        Trigger::Ignore { reason } => {
            println!("nothing to do: {reason}");
            Ok(Vec::new())
        }
        Trigger::Sweep { .. } => Err(format!(
            "{} is the scheduled sweep's event, which names no image: run `ami-share sweep --config … --region …` (add --dry-run to plan only)",
            path.display()
        )),
        Trigger::Work(records) => {
            let mut events = Vec::new();
            for record in records {
                let item = record.item.map_err(|e| {
                    format!("{}: message {}: {e}", path.display(), record.message_id)
                })?;
                events.extend(item.images.into_iter().map(|image_id| trigger::ImageEvent {
                    image: trigger::ImageRef {
                        region: Some(target.region.clone().unwrap_or(item.region.clone())),
                        image_id,
                    },
                    kind: trigger::EventKind::Direct,
                    account: None,
                    event_id: Some(record.message_id.clone()),
                }));
            }
            Ok(events)
        }
    }
}
