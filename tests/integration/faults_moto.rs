//! Resilience against what AWS does on a bad day, through the emulator's fault injection (tests/
//! emulator.py sits between the SDK and moto and answers instead of moto): throttling of 30 % of all
//! requests, ten deliveries of one event at once, a region that cannot be reached, and answers the SDK
//! cannot read. In each, the end state must be that of one clean delivery, nothing applied twice, and
//! every failure said clearly.
//!
//! The SDK's retry backoff is shortened here (10 ms instead of 1 s initial) so the tests run in seconds;
//! the number of attempts and the retry classification are the SDK's defaults, as in the Lambda.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::*;
use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::{Handler, HandlerError};
use ami_share::key_policy;
use ami_share::reconcile::KeyPolicyWrites;
use aws_config::retry::RetryConfig;
use serde_json::Value;

const PARTNER: &str = "210987654321";
const WEST: &str = "us-west-2";
const FIVE_REGIONS: [&str; 5] = [
    "us-west-2",
    "eu-central-1",
    "eu-west-1",
    "ap-southeast-2",
    "ca-central-1",
];

struct World {
    emulator: Emulator,
    org_arn: String,
}

async fn world() -> World {
    let emulator = Emulator::start();
    let org = emulator.organization(&[]);
    World {
        org_arn: org["arn"].as_str().unwrap().to_string(),
        emulator,
    }
}

impl World {
    fn config(&self) -> Config {
        let five: Vec<String> = FIVE_REGIONS
            .iter()
            .map(|r| format!("{{ region = \"{r}\" }}"))
            .collect();
        Config::parse(&format!(
            r#"
            [[rule]]
            name = "golden"
            match.name = ["golden-*"]
            tags = {{ team = "platform" }}
            share.organizations = ["{org}"]
            share.accounts = ["{PARTNER}"]

            [[rule]]
            name = "one-region"
            match.name = ["west-*"]
            tags = {{ team = "platform" }}
            share.organizations = ["{org}"]
            copy.regions = [{{ region = "{WEST}" }}]

            [[rule]]
            name = "five-regions"
            match.name = ["wide-*"]
            share.organizations = ["{org}"]
            copy.regions = [{five}]
            "#,
            org = self.org_arn,
            five = five.join(", ")
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A handler as a Lambda instance has one: its own clients. Retries as the SDK's standard mode,
    /// with a short backoff.
    async fn handler(&self) -> Handler<SdkAws> {
        let sdk = self.emulator.faulty_sdk_config().await;
        let sdk = sdk
            .into_builder()
            .retry_config(RetryConfig::standard().with_initial_backoff(Duration::from_millis(10)))
            .build();
        Handler::new(self.config(), SdkAws::new(sdk), REGION).with_key_policy_writes(
            KeyPolicyWrites {
                max_writes: 5,
                recheck_after: Some(std::time::Duration::from_millis(100)),
            },
        )
    }

    /// ami-share's copies of `source` in `region`, by their marks.
    async fn copies_in(&self, region: &str, source: &str) -> Vec<String> {
        let copies = copies_of(&self.emulator, region, source).await;
        copies.into_iter().map(|(id, _)| id).collect()
    }

    /// What EC2 does minutes after CopyImage: every copy of `source` becomes available.
    async fn finish_copies(&self, source: &str, regions: &[&str]) {
        for region in regions {
            for copy in self.copies_in(region, source).await {
                self.emulator.set_image_state(region, &copy, "available");
            }
        }
    }

    /// Delivers `event` as EventBridge and Lambda would, again after each failed invocation (and after
    /// the copies became available), until it is done. Returns the deliveries it took.
    async fn converge(
        &self,
        handler: &Handler<SdkAws>,
        event: &Value,
        source: &str,
        regions: &[&str],
    ) -> usize {
        for delivery in 1..=20 {
            match handler.handle(event.clone()).await {
                Ok(answer) => {
                    // Never failed or blocked for good: every fault here is one a retry cures.
                    let status = answer["status"].as_str().unwrap();
                    assert!(
                        matches!(status, "done" | "skipped"),
                        "delivery {delivery} ended {status}: {answer}"
                    );
                    let regions_done = answer["outcome"]["regions"]
                        .as_object()
                        .is_none_or(|r| r.values().all(|r| r["status"] == "done"));
                    if regions_done {
                        return delivery;
                    }
                }
                Err(HandlerError::Retryable { headline }) => {
                    assert!(!headline.is_empty());
                }
                Err(other) => panic!("delivery {delivery}: {other}"),
            }
            self.finish_copies(source, regions).await;
        }
        panic!("{source} did not converge in 20 deliveries");
    }
}

/// One scenario of the benchmark: an AMI, the event about it and the regions it is copied to.
struct Scenario {
    label: &'static str,
    name_prefix: &'static str,
    encrypted: bool,
    regions: &'static [&'static str],
}

const SCENARIOS: [Scenario; 5] = [
    Scenario {
        label: "unencrypted",
        name_prefix: "golden",
        encrypted: false,
        regions: &[],
    },
    Scenario {
        label: "CMK-encrypted",
        name_prefix: "golden",
        encrypted: true,
        regions: &[],
    },
    Scenario {
        label: "1 target region",
        name_prefix: "west",
        encrypted: false,
        regions: &[WEST],
    },
    Scenario {
        label: "5 target regions",
        name_prefix: "wide",
        encrypted: false,
        regions: &FIVE_REGIONS,
    },
    Scenario {
        label: "non-matching",
        name_prefix: "scratch",
        encrypted: false,
        regions: &[],
    },
];

/// Runs a scenario on a new image; `faults`: the fraction of requests throttled meanwhile. Returns
/// (image, what was applied, deliveries, faults injected).
async fn run(
    world: &World,
    scenario: &Scenario,
    run: &str,
    faults: f64,
) -> (String, Vec<String>, usize, usize) {
    let ec2 = world.emulator.ec2().await;
    let name = format!(
        "{}-{}-{run}",
        scenario.name_prefix,
        scenario.label.replace(' ', "-")
    );
    let key = if scenario.encrypted {
        Some(create_key(&world.emulator.kms().await).await)
    } else {
        None
    };
    let root = key
        .as_deref()
        .map_or(RootVolume::Unencrypted, RootVolume::Key);
    let (image, _) = create_image_with(&ec2, &name, &[], root).await;
    let handler = world.handler().await;
    let event = sample_event("create-image.json", &image, REGION);
    let before = world.emulator.requests().len();
    world.emulator.set_faults(faults, 7);
    let deliveries = world
        .converge(&handler, &event, &image, scenario.regions)
        .await;
    world.emulator.set_faults(0.0, 0);
    let faults = world.emulator.faults_since(before);
    (
        image,
        world.emulator.applied_since(before),
        deliveries,
        faults,
    )
}

#[tokio::test]
async fn with_30_percent_of_requests_throttled_every_scenario_converges_and_nothing_is_applied_twice()
 {
    let world = world().await;
    let ec2 = world.emulator.ec2().await;
    for scenario in &SCENARIOS {
        let (_, clean, clean_deliveries, _) = run(&world, scenario, "clean", 0.0).await;
        let (image, throttled, deliveries, faults) = run(&world, scenario, "throttled", 0.3).await;
        println!(
            "{}: {} calls applied; clean: {clean_deliveries} delivery(ies); 30 % throttled: {faults} throttled answers, {deliveries} delivery(ies)",
            scenario.label,
            clean.len()
        );
        assert_eq!(
            clean_deliveries,
            1 + usize::from(!scenario.regions.is_empty())
        );
        // (A non-matching AMI costs one read: it may well be served the first time.)
        assert!(
            faults > 0 || clean.is_empty(),
            "{}: no fault was injected",
            scenario.label
        );
        // What reached moto is what a clean run applies: the throttled calls were retried, nothing twice.
        assert_eq!(throttled, clean, "{}", scenario.label);

        let selected = scenario.name_prefix != "scratch";
        let permissions = launch_permissions(&ec2, &image).await;
        assert_eq!(!permissions.is_empty(), selected, "{}", scenario.label);
        for region in scenario.regions {
            assert_eq!(
                world.copies_in(region, &image).await.len(),
                1,
                "{}: one copy in {region}",
                scenario.label
            );
        }

        // A duplicate delivery, still throttled: nothing applied.
        let handler = world.handler().await;
        let before = world.emulator.requests().len();
        world.emulator.set_faults(0.3, 11);
        world
            .converge(
                &handler,
                &sample_event("create-image.json", &image, REGION),
                &image,
                scenario.regions,
            )
            .await;
        world.emulator.set_faults(0.0, 0);
        assert_eq!(
            world.emulator.applied_since(before),
            Vec::<String>::new(),
            "{}: duplicate delivery",
            scenario.label
        );
    }
}

/// The Sids of ami-share's statements in a key policy, in order.
fn owned_sids(policy: &str) -> Vec<String> {
    let policy: Value = serde_json::from_str(policy).unwrap();
    policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["Sid"].as_str())
        .filter(|sid| key_policy::OWNED_SIDS.contains(sid))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn ten_concurrent_deliveries_of_one_event_end_as_one_delivery() {
    let world = world().await;
    let ec2 = world.emulator.ec2().await;
    let kms = world.emulator.kms().await;
    let key = create_key(&kms).await;
    let foreign_statements = owned_sids(&key_policy(&kms, &key).await);
    assert!(foreign_statements.is_empty());
    // One AMI encrypted with a customer managed key, shared with the org and a partner; one copied to
    // us-west-2 and shared there.
    let (image, _) = create_image_with(&ec2, "golden-concurrent", &[], RootVolume::Key(&key)).await;
    let (west_image, _) = create_image(&ec2, "west-concurrent", &[]).await;

    for (image, regions) in [(&image, &[][..]), (&west_image, &[WEST][..])] {
        let event = sample_event("create-image.json", image, REGION);
        let mut handlers = Vec::new();
        for _ in 0..10 {
            handlers.push(world.handler().await);
        }
        let answers =
            futures::future::join_all(handlers.iter().map(|h| h.handle(event.clone()))).await;
        for answer in &answers {
            if let Err(e) = answer {
                assert!(matches!(e, HandlerError::Retryable { .. }), "{e}");
            }
        }
        world.finish_copies(image, regions).await;
        world.converge(&handlers[0], &event, image, regions).await;

        // As after one delivery: each launch permission once, one copy per region.
        let expected: BTreeSet<String> = if regions.is_empty() {
            [
                format!("org={}", world.org_arn),
                format!("account={PARTNER}"),
            ]
            .into()
        } else {
            [format!("org={}", world.org_arn)].into()
        };
        assert_eq!(launch_permissions(&ec2, image).await, expected);
        for region in regions {
            let copies = world.copies_in(region, image).await;
            assert_eq!(copies.len(), 1, "one copy in {region}: {copies:?}");
            let west_ec2 = world.emulator.ec2_in(region).await;
            assert_eq!(
                launch_permissions(&west_ec2, &copies[0]).await,
                [format!("org={}", world.org_arn)].into()
            );
        }
    }
    // One ami-share statement per audience and purpose in the key policy: organizations and accounts.
    assert_eq!(
        owned_sids(&key_policy(&kms, &key).await),
        [
            key_policy::OWNED_SIDS[0],
            key_policy::OWNED_SIDS[1],
            key_policy::OWNED_SIDS[4],
            key_policy::OWNED_SIDS[5],
            key_policy::OWNED_SIDS[6],
            key_policy::OWNED_SIDS[8]
        ]
    );
}

#[tokio::test]
async fn an_unreachable_region_fails_alone_retryably_by_name_and_a_redelivery_finishes_it() {
    let world = world().await;
    let ec2 = world.emulator.ec2().await;
    let (image, _) = create_image(&ec2, "wide-unreachable", &[]).await;
    let event = sample_event("create-image.json", &image, REGION);

    // eu-central-1's endpoint refuses connections: nothing listens on the port.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let sdk = world.emulator.sdk_config().await;
    let unreachable = sdk
        .clone()
        .into_builder()
        .endpoint_url(format!("http://127.0.0.1:{closed}"))
        .retry_config(RetryConfig::standard().with_initial_backoff(Duration::from_millis(10)))
        .region(aws_config::Region::new("eu-central-1"))
        .build();
    let handler = Handler::new(
        world.config(),
        SdkAws::new(sdk).with_region_clients(
            "eu-central-1",
            aws_sdk_ec2::Client::new(&unreachable),
            aws_sdk_kms::Client::new(&unreachable),
        ),
        REGION,
    );
    let error = match handler.handle(event.clone()).await {
        Err(HandlerError::Retryable { headline }) => headline,
        other => panic!("expected a retryable failure, got {other:?}"),
    };
    println!("{error}");
    assert!(error.contains("eu-central-1: failed"), "{error}");
    assert!(error.contains("in eu-central-1 failed"), "{error}");
    let others: Vec<&str> = FIVE_REGIONS
        .iter()
        .copied()
        .filter(|r| *r != "eu-central-1")
        .collect();
    for region in &others {
        assert!(error.contains(&format!("{region}: copying")), "{error}");
        assert_eq!(world.copies_in(region, &image).await.len(), 1);
    }
    assert!(world.copies_in("eu-central-1", &image).await.is_empty());

    // The region is back: the redelivery copies there only, and everything is finished.
    let before = world.emulator.requests().len();
    world
        .converge(&world.handler().await, &event, &image, &FIVE_REGIONS)
        .await;
    let copies: Vec<String> = world
        .emulator
        .applied_since(before)
        .into_iter()
        .filter(|r| r.starts_with("ec2:CopyImage"))
        .collect();
    assert_eq!(copies, ["ec2:CopyImage@eu-central-1"]);
    for region in FIVE_REGIONS {
        assert_eq!(world.copies_in(region, &image).await.len(), 1, "{region}");
    }
}

#[tokio::test]
async fn an_answer_the_sdk_cannot_read_is_a_clear_retryable_error_and_the_record_says_what_was_done()
 {
    let world = world().await;
    let ec2 = world.emulator.ec2().await;
    let (image, _) = create_image(&ec2, "golden-broken", &[]).await;
    let event = sample_event("create-image.json", &image, REGION);
    let handler = world.handler().await;

    // moto's answer to what it does not implement, for the share: the tags are done, the share is not,
    // and the error says both.
    world
        .emulator
        .break_answers("ModifyImageAttribute", Some("html-500"));
    let error = match handler.handle(event.clone()).await {
        Err(HandlerError::Retryable { headline }) => headline,
        other => panic!("expected a retryable failure, got {other:?}"),
    };
    println!("{error}");
    assert!(error.contains(&format!("done: tag {image}")), "{error}");
    assert!(
        error.contains(&format!("not done: share {image}")),
        "{error}"
    );
    assert!(
        error.contains(&format!(
            "failed: ModifyImageAttribute on {image} in us-east-1 failed"
        )),
        "{error}"
    );
    assert!(launch_permissions(&ec2, &image).await.is_empty());

    // A 200 answer cut off mid-XML, for the first read: nothing is done, and the error says which call.
    world.emulator.break_answers("ModifyImageAttribute", None);
    world
        .emulator
        .break_answers("DescribeImages", Some("cut-xml"));
    let before = world.emulator.requests().len();
    let error = match handler.handle(event.clone()).await {
        Err(HandlerError::Retryable { headline }) => headline,
        other => panic!("expected a retryable failure, got {other:?}"),
    };
    println!("{error}");
    assert!(
        error.contains(&format!("DescribeImages on {image} in us-east-1 failed")),
        "{error}"
    );
    assert_eq!(world.emulator.applied_since(before), Vec::<String>::new());

    // Answers readable again: the redelivery does only what is missing, the share.
    world.emulator.break_answers("DescribeImages", None);
    let before = world.emulator.requests().len();
    world.converge(&handler, &event, &image, &[]).await;
    assert_eq!(
        world.emulator.applied_since(before),
        ["ec2:ModifyImageAttribute@us-east-1"]
    );
}
