//! Cross-region distribution end to end against the emulator (moto with its fidelity fixes: copies are
//! `pending` at first, encrypted as CopyImage says — with the destination's default key when crossing
//! regions without one —, tagged at creation, idempotent by ClientToken; EnableImageDeprecation works;
//! a region can refuse every call as an opt-in region not enabled, or as an overloaded one, does).
//! Events in, copies, tags, shares, key policies, deprecation and SSM parameters checked with real
//! describe calls in each region, mutating calls counted from the emulator's request log.

use std::collections::BTreeMap;

use crate::common::*;
use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::Handler;
use ami_share::markers;
use ami_share::observed::Tags;
use ami_share::reconcile::KeyPolicyWrites;
use serde_json::{Value, json};

const PARTNER: &str = "210987654321";
const WEST: &str = "us-west-2";
const FRANKFURT: &str = "eu-central-1";

struct Setup {
    emulator: Emulator,
    ec2: aws_sdk_ec2::Client,
    org_arn: String,
}

async fn setup() -> Setup {
    let emulator = Emulator::start();
    let org = emulator.organization(&[]);
    Setup {
        ec2: emulator.ec2().await,
        org_arn: org["arn"].as_str().unwrap().to_string(),
        emulator,
    }
}

impl Setup {
    async fn handler(&self, rule_extra: &str) -> Handler<SdkAws> {
        let config = Config::parse(&format!(
            r#"
            [[rule]]
            name = "golden"
            match.name = ["golden-*"]
            tags = {{ team = "platform" }}
            share.organizations = ["{}"]
            share.accounts = ["{PARTNER}"]
            {rule_extra}
            "#,
            self.org_arn
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        Handler::new(
            config,
            SdkAws::new(self.emulator.sdk_config().await),
            REGION,
        )
        // One stack that handles the events of the regions it copies to (forwarded to it).
        .with_event_regions(vec![WEST.into(), FRANKFURT.into()])
        .with_key_policy_writes(KeyPolicyWrites {
            max_writes: 5,
            recheck_after: Some(std::time::Duration::from_millis(100)),
        })
    }

    /// A customer managed key in `region` with the alias `alias/ami-share`. Returns its ARN.
    async fn alias_key(&self, region: &str) -> String {
        let kms = self.emulator.kms_in(region).await;
        let arn = create_key(&kms).await;
        kms.create_alias()
            .alias_name("alias/ami-share")
            .target_key_id(&arn)
            .send()
            .await
            .expect("CreateAlias");
        arn
    }

    fn requests(&self) -> usize {
        self.emulator.requests().len()
    }

    /// ami-share's copies of `source` in `region`, by their marks: (image id, tags).
    async fn copies_in(&self, region: &str, source: &str) -> Vec<(String, Tags)> {
        copies_of(&self.emulator, region, source).await
    }

    async fn parameter(&self, region: &str, name: &str) -> Option<String> {
        ssm_parameter(&self.emulator, region, name).await
    }
}

/// Delivers a sample event (for `image` in `region`) and returns the answer of a handled event.
async fn deliver(handler: &Handler<SdkAws>, file: &str, image: &str, region: &str) -> Value {
    handler
        .handle(sample_event(file, image, region))
        .await
        .unwrap_or_else(|e| panic!("{file} for {image} in {region} failed: {e}"))
}

fn status(answer: &Value) -> &str {
    answer["status"].as_str().unwrap()
}

fn regions(answer: &Value) -> BTreeMap<String, String> {
    answer["outcome"]["regions"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(r, o)| (r.clone(), o["status"].as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn copy_requests(s: &Setup, since: usize) -> Vec<(String, String)> {
    s.emulator
        .requests_by_region_since(since)
        .into_iter()
        .filter(|(_, r)| r == "ec2:CopyImage")
        .collect()
}

#[tokio::test]
async fn an_ami_lands_in_every_region_shared_there_and_no_event_copies_twice() {
    let s = setup().await;
    let west_key = s.alias_key(WEST).await;
    let handler = s
        .handler(&format!(
            r#"
            share.create_volume_permission = true
            deprecate_after_days = 365
            ssm_parameter = "/ami-share/{{rule}}/latest"
            copy.name = "{{name}}-from-{{source_region}}"
            copy.regions = [{{ region = "{WEST}", kms_key = "alias/ami-share" }}, {{ region = "{FRANKFURT}" }}, {{ region = "{REGION}" }}]
            "#
        ))
        .await;
    let (image, snapshots) = create_image(&s.ec2, "golden-1", &[("os", "al2023")]).await;

    // CreateImage while pending: tags only; copies wait for an available source.
    s.emulator.set_image_state(REGION, &image, "pending");
    let answer = deliver(&handler, "create-image.json", &image, REGION).await;
    assert_eq!(
        regions(&answer),
        BTreeMap::from([
            (FRANKFURT.into(), "waiting".into()),
            (WEST.into(), "waiting".into())
        ]),
        "the rule's own region is skipped: {answer:#}"
    );
    assert!(copy_requests(&s, 0).is_empty());

    // Available: copied to both regions at once; the source is shared, deprecated, and its parameter set.
    s.emulator.set_image_state(REGION, &image, "available");
    let before = s.requests();
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(
        regions(&answer),
        BTreeMap::from([
            (FRANKFURT.into(), "copying".into()),
            (WEST.into(), "copying".into())
        ]),
        "{answer:#}"
    );
    let made: Vec<String> = copy_requests(&s, before)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_eq!(made.len(), 2, "one CopyImage per region: {made:?}");
    assert!(made.contains(&WEST.to_string()) && made.contains(&FRANKFURT.to_string()));
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        [format!("org={}", s.org_arn), format!("account={PARTNER}")].into()
    );
    assert_eq!(
        s.parameter(REGION, "/ami-share/golden/latest")
            .await
            .as_deref(),
        Some(image.as_str())
    );
    let source = &s
        .ec2
        .describe_images()
        .image_ids(&image)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    assert!(
        source.deprecation_time().is_some(),
        "deprecated: {source:?}"
    );
    let volume = s
        .ec2
        .describe_snapshot_attribute()
        .snapshot_id(&snapshots[0])
        .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await
        .unwrap();
    let accounts: Vec<&str> = volume
        .create_volume_permissions()
        .iter()
        .filter_map(|p| p.user_id())
        .collect();
    assert_eq!(accounts, [PARTNER], "{answer:#}");

    // Each copy is marked at creation, named by the template, with the source's and the rule's tags.
    let west = s.copies_in(WEST, &image).await;
    let frankfurt = s.copies_in(FRANKFURT, &image).await;
    assert_eq!((west.len(), frankfurt.len()), (1, 1));
    let (west_copy, west_tags) = &west[0];
    let (frankfurt_copy, _) = &frankfurt[0];
    assert_eq!(
        west_tags[markers::COPY_KIND],
        markers::CopyKind::Regional.as_str()
    );
    assert_eq!(west_tags[markers::SOURCE_REGION], REGION);
    assert_eq!(west_tags["os"], "al2023", "the source's own tags travel");
    assert_eq!(west_tags["team"], "platform");
    let west_ec2 = s.emulator.ec2_in(WEST).await;
    let described = west_ec2
        .describe_images()
        .image_ids(west_copy)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.images()[0].name(),
        Some("golden-1-from-us-east-1")
    );
    let west_snapshot = image_snapshots(&west_ec2, west_copy).await;
    assert_eq!(
        snapshot_encryption(&west_ec2, &west_snapshot[0]).await,
        (true, Some(west_key.clone())),
        "the west copy is encrypted with the west key"
    );

    // A duplicate event while the copies are pending: nothing is made or changed.
    let before = s.requests();
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(
        regions(&answer),
        BTreeMap::from([
            (FRANKFURT.into(), "pending".into()),
            (WEST.into(), "pending".into())
        ])
    );

    // The copy's own CopyImage event, in its region, while pending: its source is found by its marks,
    // nothing is copied again, nothing is left to do.
    let before = s.requests();
    let answer = deliver(&handler, "copy-image.json", west_copy, WEST).await;
    assert_eq!(
        answer["outcome"]["copy_of"],
        json!(format!("{image} in {REGION}"))
    );
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new(),
        "{answer:#}"
    );

    // The copies become available; their events finish them in their regions: key opened, shared.
    for (region, copy) in [(WEST, west_copy), (FRANKFURT, frankfurt_copy)] {
        s.emulator.set_image_state(region, copy, "available");
        let answer = deliver(&handler, "ami-state-available.json", copy, region).await;
        assert_eq!(status(&answer), "done", "{answer:#}");
        let ec2 = s.emulator.ec2_in(region).await;
        assert_eq!(
            launch_permissions(&ec2, copy).await,
            [format!("org={}", s.org_arn), format!("account={PARTNER}")].into(),
            "{region}"
        );
        assert_eq!(
            s.parameter(region, "/ami-share/golden/latest")
                .await
                .as_deref(),
            Some(copy.as_str())
        );
    }
    let west_policy = key_policy(&s.emulator.kms_in(WEST).await, &west_key).await;
    assert!(
        west_policy.contains("AmiShareOrganizationsUseKey") && west_policy.contains(PARTNER),
        "{west_policy}"
    );

    // Everything in place: the source's event again plans nothing anywhere, and no copy was made twice.
    let before = s.requests();
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(
        regions(&answer),
        BTreeMap::from([
            (FRANKFURT.into(), "done".into()),
            (WEST.into(), "done".into())
        ])
    );
    assert_eq!(copy_requests(&s, 0).len(), 2);
    for (region, copy) in [(WEST, west_copy), (FRANKFURT, frankfurt_copy)] {
        let before = s.requests();
        deliver(&handler, "ami-state-available.json", copy, region).await;
        assert_eq!(
            s.emulator.mutating_requests_since(before),
            Vec::<String>::new(),
            "{region}"
        );
    }
}

#[tokio::test]
async fn a_region_without_its_key_is_blocked_and_the_other_regions_go_on() {
    let s = setup().await;
    let handler = s
        .handler(&format!(
            r#"copy.regions = [{{ region = "{WEST}", kms_key = "alias/missing" }}, {{ region = "{FRANKFURT}" }}]"#
        ))
        .await;
    let (image, _) = create_image(&s.ec2, "golden-2", &[]).await;
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(status(&answer), "blocked", "{answer:#}");
    assert_eq!(
        regions(&answer),
        BTreeMap::from([
            (FRANKFURT.into(), "copying".into()),
            (WEST.into(), "blocked".into())
        ])
    );
    let reason = answer["outcome"]["regions"][WEST]["detail"]
        .as_str()
        .unwrap();
    assert!(
        reason.contains("alias/missing not found in us-west-2"),
        "{reason}"
    );
    assert!(s.copies_in(WEST, &image).await.is_empty());
    assert_eq!(s.copies_in(FRANKFURT, &image).await.len(), 1);
}

#[tokio::test]
async fn a_copy_someone_deregistered_is_made_again_on_the_next_event_and_the_region_never_waits_on_it()
 {
    let s = setup().await;
    let handler = s
        .handler(&format!(r#"copy.regions = [{{ region = "{WEST}" }}]"#))
        .await;
    let (image, _) = create_image(&s.ec2, "golden-3", &[]).await;
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(regions(&answer)[WEST], "copying", "{answer:#}");
    let [(lost, _)] = &s.copies_in(WEST, &image).await[..] else {
        panic!("one copy in {WEST}");
    };
    // A cleanup job deregisters the copy. The emulator remembers the client token as EC2 does: the
    // same CopyImage request answers with the dead copy's id.
    s.emulator
        .ec2_in(WEST)
        .await
        .deregister_image()
        .image_id(lost)
        .send()
        .await
        .expect("DeregisterImage");

    let before = s.requests();
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(regions(&answer)[WEST], "copying", "{answer:#}");
    let copies = s.copies_in(WEST, &image).await;
    let [(copy, _)] = &copies[..] else {
        panic!("one live copy in {WEST}: {copies:?}, {answer:#}");
    };
    assert_ne!(copy, lost);
    assert_eq!(
        answer["outcome"]["regions"][WEST]["image_id"].as_str(),
        Some(copy.as_str()),
        "the region names the live copy: {answer:#}"
    );
    assert_eq!(
        copy_requests(&s, before).len(),
        2,
        "the dead answer, then a new token"
    );

    // Later events find the new copy by its marks: no third copy.
    let before = s.requests();
    deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert!(copy_requests(&s, before).is_empty());
    assert_eq!(s.copies_in(WEST, &image).await.len(), 1);
}

#[tokio::test]
async fn deregistration_protection_covers_the_ami_and_its_copy_once_each_and_holds() {
    let s = setup().await;
    let handler = s
        .handler(&format!(
            r#"
            deregistration_protection = "with-cooldown"
            copy.regions = [{{ region = "{WEST}" }}]
            "#
        ))
        .await;
    let protection = async |region: &str, image: &str| {
        deregistration_protection(&s.emulator.ec2_in(region).await, image).await
    };
    let protections = |since: usize| -> Vec<String> {
        s.emulator
            .mutating_requests_since(since)
            .into_iter()
            .filter(|r| r.ends_with("EnableImageDeregistrationProtection"))
            .collect()
    };
    let (image, _) = create_image(&s.ec2, "golden-5", &[]).await;
    let before = s.requests();
    deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(
        protection(REGION, &image).await.as_deref(),
        Some("enabled-with-cooldown")
    );
    assert_eq!(protections(before).len(), 1);
    let (copy, _) = s.copies_in(WEST, &image).await.remove(0);
    assert_eq!(protection(WEST, &copy).await, None, "a pending copy waits");

    s.emulator.set_image_state(WEST, &copy, "available");
    let before = s.requests();
    deliver(&handler, "ami-state-available.json", &copy, WEST).await;
    assert_eq!(
        protection(WEST, &copy).await.as_deref(),
        Some("enabled-with-cooldown")
    );
    assert_eq!(protections(before).len(), 1, "the copy, once");
    let refused = s
        .emulator
        .ec2_in(WEST)
        .await
        .deregister_image()
        .image_id(&copy)
        .send()
        .await;
    assert!(refused.is_err(), "protected: {refused:?}");

    // Every event again: nothing to do.
    let before = s.requests();
    deliver(&handler, "ami-state-available.json", &image, REGION).await;
    deliver(&handler, "ami-state-available.json", &copy, WEST).await;
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn an_unreachable_region_fails_alone_retryably_and_a_redelivery_finishes_the_job() {
    let s = setup().await;
    let handler = s
        .handler(&format!(
            r#"copy.regions = [{{ region = "{WEST}" }}, {{ region = "{FRANKFURT}" }}, {{ region = "ap-south-2" }}]"#
        ))
        .await;
    let (image, _) = create_image(&s.ec2, "golden-3", &[]).await;
    s.emulator.refuse_region(WEST, Some("throttled"));
    s.emulator.refuse_region("ap-south-2", Some("opt-in"));
    let error = handler
        .handle(sample_event("ami-state-available.json", &image, REGION))
        .await
        .unwrap_err();
    assert_eq!(error.error_type(), "Retryable");
    let message = error.to_string();
    assert!(
        message.contains("us-west-2: failed")
            && message.contains("RequestLimitExceeded")
            && message.contains("ap-south-2: failed")
            && message.contains("AuthFailure")
            && message.contains("if it is an opt-in region, enable it")
            && message.contains("eu-central-1: copying"),
        "{message}"
    );
    assert_eq!(
        s.copies_in(FRANKFURT, &image).await.len(),
        1,
        "the others go on"
    );
    assert_eq!(
        launch_permissions(&s.ec2, &image).await.len(),
        2,
        "the source is shared all the same"
    );

    // The throttled region recovers; the redelivered event copies there only. The opt-in region stays
    // refused: not retryable, so the invocation now succeeds with status failed, naming it.
    s.emulator.refuse_region(WEST, None);
    let before = s.requests();
    let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
    assert_eq!(status(&answer), "failed", "{answer:#}");
    assert_eq!(
        regions(&answer),
        BTreeMap::from([
            ("ap-south-2".into(), "failed".into()),
            (FRANKFURT.into(), "pending".into()),
            (WEST.into(), "copying".into())
        ])
    );
    let made: Vec<String> = copy_requests(&s, before)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert_eq!(made, [WEST.to_string()]);
}

#[tokio::test]
async fn an_encrypted_ami_copied_without_a_key_says_how_to_share_its_copy() {
    let s = setup().await;
    let handler = s
        .handler(&format!(r#"copy.regions = [{{ region = "{WEST}" }}]"#))
        .await;
    let kms = s.emulator.kms().await;
    let key = create_key(&kms).await;
    let (image, _) = create_image_with(&s.ec2, "golden-4", &[], RootVolume::Key(&key)).await;
    deliver(&handler, "ami-state-available.json", &image, REGION).await;
    let (copy, _) = s.copies_in(WEST, &image).await.remove(0);
    s.emulator.set_image_state(WEST, &copy, "available");
    let answer = deliver(&handler, "ami-state-available.json", &copy, WEST).await;
    assert_eq!(status(&answer), "blocked", "{answer:#}");
    let tags = image_tags(&s.emulator.ec2_in(WEST).await, &copy).await;
    assert_eq!(tags[markers::STATUS], "not-shared");
    assert!(
        tags[markers::STATUS_REASON].contains("aws/ebs")
            && tags[markers::STATUS_REASON].contains("set its kms_key in the rule's copy.regions"),
        "{tags:?}"
    );
    assert!(
        copy_requests(&s, 0).len() == 1,
        "the copy is not copied again to cure it"
    );
}

/// The figure the issue asks for: sequential round trips of one event with 1 and with 5 target regions.
/// Every request is delayed 100 ms, so calls made together overlap and calls made one after another do
/// not; the depth is read from the emulator's log. It is printed (run with --nocapture to see it); the
/// assertion is only that the regions are worked on together (one region more would add its whole chain).
#[tokio::test]
async fn one_event_takes_as_many_round_trips_for_five_regions_as_for_one() {
    let s = setup().await;
    let mut depths = Vec::new();
    for (n, regions) in [
        (1, vec![WEST]),
        (
            5,
            vec![WEST, FRANKFURT, "eu-west-1", "ap-south-1", "sa-east-1"],
        ),
    ] {
        let list: Vec<String> = regions
            .iter()
            .map(|r| format!(r#"{{ region = "{r}", kms_key = "alias/ami-share" }}"#))
            .collect();
        for region in &regions {
            if n == 1 || *region != WEST {
                s.alias_key(region).await;
            }
            // moto loads a region's catalogue of public images on its first EC2 call there, holding
            // Python's lock for a while: done here, so it does not stretch the measured calls.
            s.emulator
                .ec2_in(region)
                .await
                .describe_images()
                .owners("self")
                .send()
                .await
                .unwrap();
        }
        let handler = s
            .handler(&format!("copy.regions = [{}]", list.join(", ")))
            .await;
        let (image, _) = create_image(&s.ec2, &format!("golden-depth-{n}"), &[]).await;
        s.emulator.set_latency(0.1);
        let before = s.requests();
        let answer = deliver(&handler, "ami-state-available.json", &image, REGION).await;
        let depth = s.emulator.round_trip_depth_since(before);
        if std::env::var("DEBUG_DEPTH").is_ok() {
            let log = s.emulator.control("requests", None);
            let t0 = log[before]["start"].as_f64().unwrap();
            for r in log.as_array().unwrap().iter().skip(before) {
                println!(
                    "{:>6.3} {:>6.3} {} {}",
                    r["start"].as_f64().unwrap() - t0,
                    r["end"].as_f64().unwrap() - t0,
                    r["region"],
                    r["action"]
                );
            }
        }
        let calls = s.requests() - before;
        s.emulator.set_latency(0.0);
        assert_eq!(copy_requests(&s, before).len(), n, "{answer:#}");
        println!("{n} target region(s): {calls} calls in {depth} sequential round trips");
        depths.push(depth);
    }
    assert!(
        depths[1] <= depths[0] + 1,
        "5 regions took {} round trips, 1 region {}",
        depths[1],
        depths[0]
    );
}
