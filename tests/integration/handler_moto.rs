//! The handler against the emulator: sample events in, tags and launch permissions checked with describe
//! calls, mutating calls counted from the emulator's request log.

use std::collections::BTreeSet;

use crate::common::*;
use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::Handler;
use serde_json::{Value, json};

struct Setup {
    emulator: Emulator,
    ec2: aws_sdk_ec2::Client,
    handler: Handler<SdkAws>,
    org_arn: String,
    eng_ou_arn: String,
    data_ou_arn: String,
}

const PARTNER: &str = "210987654321";

/// An emulator with an organization (OUs eng and data) and a handler whose config shares golden images
/// with the organization and data previews with the data OU and a partner account.
async fn setup() -> Setup {
    let emulator = Emulator::start();
    let org = emulator.organization(&["eng", "data"]);
    let org_arn = org["arn"].as_str().unwrap().to_string();
    let eng_ou_arn = org["ous"]["eng"]["arn"].as_str().unwrap().to_string();
    let data_ou_arn = org["ous"]["data"]["arn"].as_str().unwrap().to_string();
    let config = Config::parse(&format!(
        r#"
        [[rule]]
        name = "golden"
        match.name = ["golden-*"]
        match.tags = {{ stage = "release" }}
        tags = {{ "ami-share:distributed" = "org", "cost-center" = "platform" }}
        share.organizations = ["{org_arn}"]
        share.organizational_units = ["{eng_ou_arn}"]

        [[rule]]
        name = "data-previews"
        match.name = ["data-*", "golden-data-*"]
        tags = {{ team = "data" }}
        tag_snapshots = false
        share.organizational_units = ["{data_ou_arn}"]
        share.accounts = ["{PARTNER}"]

        [[rule]]
        name = "copies-only"
        match.name = ["copied-*"]
        match.created_by = ["CopyImage"]
        tags = {{ copied = "yes" }}
        "#
    ))
    .unwrap();
    let ec2 = emulator.ec2().await;
    let handler = Handler::new(config, SdkAws::new(emulator.sdk_config().await), REGION);
    Setup {
        emulator,
        ec2,
        handler,
        org_arn,
        eng_ou_arn,
        data_ou_arn,
    }
}

impl Setup {
    /// A handler whose one rule, `name`, shares the images `glob` selects with the organization, plus
    /// `extra` (a line of the rule).
    async fn org_rule_handler(&self, name: &str, glob: &str, extra: &str) -> Handler<SdkAws> {
        let config = Config::parse(&format!(
            "[[rule]]\nname = \"{name}\"\nmatch.name = [\"{glob}\"]\nshare.organizations = [\"{}\"]\n{extra}\n",
            self.org_arn
        ))
        .unwrap();
        Handler::new(
            config,
            SdkAws::new(self.emulator.sdk_config().await),
            REGION,
        )
    }
}

fn perms(entries: &[String]) -> BTreeSet<String> {
    entries.iter().cloned().collect()
}

#[tokio::test]
async fn create_image_event_tags_and_shares_exactly_as_configured() {
    let s = setup().await;
    let (image, snapshots) = create_image(&s.ec2, "golden-al2023-1", &[("stage", "release")]).await;
    assert_eq!(snapshots.len(), 1);

    let answer = s
        .handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();

    assert_eq!(answer["status"], "done", "{answer:#}");
    assert_eq!(answer["outcome"]["rules"], json!(["golden"]));
    assert_eq!(
        image_tags(&s.ec2, &image).await,
        tags(&[
            ("stage", "release"),
            ("ami-share:distributed", "org"),
            ("cost-center", "platform")
        ])
    );
    assert_eq!(
        snapshot_tags(&s.ec2, &snapshots[0]).await,
        tags(&[
            ("ami-share:distributed", "org"),
            ("cost-center", "platform")
        ])
    );
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        perms(&[format!("org={}", s.org_arn), format!("ou={}", s.eng_ou_arn)])
    );
}

#[tokio::test]
async fn the_fewest_calls_are_made_and_a_duplicate_event_makes_no_mutating_call() {
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-al2023-2", &[("stage", "release")]).await;
    let event = sample_event("create-image.json", &image, REGION);

    let before = s.emulator.requests().len();
    s.handler.handle(event.clone()).await.unwrap();
    let mut first = s.emulator.mutating_requests_since(before);
    first.sort();
    assert_eq!(
        first,
        ["ec2:CreateTags", "ec2:ModifyImageAttribute"],
        "one CreateTags for image and snapshot, one ModifyImageAttribute for all targets"
    );

    let tags_after_first = image_tags(&s.ec2, &image).await;
    let perms_after_first = launch_permissions(&s.ec2, &image).await;
    let before = s.emulator.requests().len();
    let answer = s.handler.handle(event).await.unwrap();
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(answer["outcome"]["done"], json!([]), "{answer:#}");
    assert_eq!(image_tags(&s.ec2, &image).await, tags_after_first);
    assert_eq!(launch_permissions(&s.ec2, &image).await, perms_after_first);
}

#[tokio::test]
async fn a_non_matching_ami_is_untouched() {
    let s = setup().await;
    // Named like a golden image but without the required stage=release tag.
    let (image, snapshots) = create_image(&s.ec2, "golden-al2023-3", &[("stage", "dev")]).await;
    let (scratch, _) = create_image(&s.ec2, "scratch-build", &[]).await;

    let before = s.emulator.requests().len();
    for id in [&image, &scratch] {
        let answer = s
            .handler
            .handle(sample_event("create-image.json", id, REGION))
            .await
            .unwrap();
        assert_eq!(answer["status"], "skipped", "{answer:#}");
        let reason = answer["outcome"]["skipped"].as_str().unwrap();
        assert!(reason.contains("no rule selects it"), "{reason}");
    }
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(image_tags(&s.ec2, &image).await, tags(&[("stage", "dev")]));
    assert_eq!(snapshot_tags(&s.ec2, &snapshots[0]).await, tags(&[]));
    assert!(launch_permissions(&s.ec2, &image).await.is_empty());
    assert!(launch_permissions(&s.ec2, &scratch).await.is_empty());
}

#[tokio::test]
async fn several_matching_rules_are_united() {
    let s = setup().await;
    let (image, snapshots) =
        create_image(&s.ec2, "golden-data-spark", &[("stage", "release")]).await;
    let answer = s
        .handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(
        answer["outcome"]["rules"],
        json!(["golden", "data-previews"])
    );
    assert_eq!(
        image_tags(&s.ec2, &image).await,
        tags(&[
            ("stage", "release"),
            ("ami-share:distributed", "org"),
            ("cost-center", "platform"),
            ("team", "data")
        ])
    );
    // data-previews does not tag snapshots.
    assert_eq!(
        snapshot_tags(&s.ec2, &snapshots[0]).await,
        tags(&[
            ("ami-share:distributed", "org"),
            ("cost-center", "platform")
        ])
    );
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        perms(&[
            format!("org={}", s.org_arn),
            format!("ou={}", s.eng_ou_arn),
            format!("ou={}", s.data_ou_arn),
            format!("account={PARTNER}"),
        ])
    );
}

#[tokio::test]
async fn a_pending_image_is_tagged_at_once_and_shared_when_available() {
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-al2023-4", &[("stage", "release")]).await;
    // AWS: an image is pending for minutes after CreateImage (moto's never are: tests/emulator.py can).
    s.emulator.set_image_state(REGION, &image, "pending");

    let before = s.emulator.requests().len();
    let answer = s
        .handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        ["ec2:CreateTags"]
    );
    let deferred = answer["outcome"]["deferred"][0].as_str().unwrap();
    assert!(
        deferred.contains("waits until it is available"),
        "{deferred}"
    );
    assert_eq!(image_tags(&s.ec2, &image).await["cost-center"], "platform");
    assert!(launch_permissions(&s.ec2, &image).await.is_empty());

    // A duplicate CloudTrail event while still pending changes nothing.
    let before = s.emulator.requests().len();
    s.handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );

    s.emulator.set_image_state(REGION, &image, "available");
    let before = s.emulator.requests().len();
    let answer = s
        .handler
        .handle(sample_event("ami-state-available.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(answer["status"], "done", "{answer:#}");
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        ["ec2:ModifyImageAttribute"]
    );
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        perms(&[format!("org={}", s.org_arn), format!("ou={}", s.eng_ou_arn)])
    );
}

#[tokio::test]
async fn an_available_event_that_outruns_describe_images_is_retried_not_lost() {
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-al2023-8", &[("stage", "release")]).await;
    s.emulator.set_image_state(REGION, &image, "pending");
    let event = sample_event("ami-state-available.json", &image, REGION);
    let error = s.handler.handle(event.clone()).await.unwrap_err();
    assert_eq!(error.error_type(), "Retryable");
    assert!(error.to_string().contains("still says pending"), "{error}");
    assert_eq!(
        image_tags(&s.ec2, &image).await["cost-center"],
        "platform",
        "tagged meanwhile"
    );
    // Lambda's retry of the same event, once EC2 has caught up, shares.
    s.emulator.set_image_state(REGION, &image, "available");
    assert_eq!(s.handler.handle(event).await.unwrap()["status"], "done");
    assert_eq!(launch_permissions(&s.ec2, &image).await.len(), 2);
}

#[tokio::test]
async fn a_state_change_that_arrives_first_does_the_whole_job_and_the_late_api_call_event_nothing()
{
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-al2023-5", &[("stage", "release")]).await;
    s.handler
        .handle(sample_event("ami-state-available.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(launch_permissions(&s.ec2, &image).await.len(), 2);
    let before = s.emulator.requests().len();
    s.handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn created_by_is_read_from_the_image_when_the_event_does_not_say() {
    // The emulator reports SourceImageId on CreateImage images too (as AWS does): only
    // SourceInstanceId tells CreateImage from CopyImage.
    let s = setup().await;
    let (source, _) = create_image(&s.ec2, "copied-base", &[]).await;
    let copy = s
        .ec2
        .copy_image()
        .source_image_id(&source)
        .source_region(REGION)
        .name("copied-base-2")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    // A copy is pending at first (as on AWS); its state-change event comes when it is available.
    s.emulator.set_image_state(REGION, &copy, "available");
    // The state-change event carries no operation: the copy's SourceImageId says CopyImage.
    let answer = s
        .handler
        .handle(sample_event("ami-state-available.json", &copy, REGION))
        .await
        .unwrap();
    assert_eq!(answer["outcome"]["created_by"], "CopyImage", "{answer:#}");
    assert_eq!(image_tags(&s.ec2, &copy).await, tags(&[("copied", "yes")]));
    // The source was made by CreateImage: the copies-only rule does not select it.
    let answer = s
        .handler
        .handle(sample_event("ami-state-available.json", &source, REGION))
        .await
        .unwrap();
    assert_eq!(answer["status"], "skipped", "{answer:#}");
    assert_eq!(answer["outcome"]["created_by"], "CreateImage");
}

#[tokio::test]
async fn images_of_other_accounts_and_missing_images_are_skipped_with_the_reason() {
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-al2023-6", &[("stage", "release")]).await;
    s.emulator.set_image_owner(REGION, &image, PARTNER);
    let before = s.emulator.requests().len();
    let answer = s
        .handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    let reason = answer["outcome"]["skipped"].as_str().unwrap();
    assert!(
        reason.contains(&format!("owned by account {PARTNER}")),
        "{reason}"
    );

    // An image an event announces but EC2 does not show (yet: it is eventually consistent) is retried.
    let error = s
        .handler
        .handle(sample_event(
            "create-image.json",
            "ami-0123456789abcdef0",
            REGION,
        ))
        .await
        .unwrap_err();
    assert_eq!(error.error_type(), "Retryable");
    assert!(
        error
            .to_string()
            .contains("EC2 does not show ami-0123456789abcdef0 in us-east-1 yet"),
        "{error}"
    );
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_failed_api_call_and_a_terminal_state_make_no_aws_call() {
    let s = setup().await;
    let before = s.emulator.requests().len();
    let failed: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("events/create-image-failed.json")).unwrap(),
    )
    .unwrap();
    let answer = s.handler.handle(failed).await.unwrap();
    assert_eq!(answer["status"], "ignored");
    let mut deregistered =
        sample_event("ami-state-available.json", "ami-0123456789abcdef0", REGION);
    deregistered["detail"]["State"] = json!("deregistered");
    let answer = s.handler.handle(deregistered).await.unwrap();
    assert_eq!(answer["status"], "skipped", "{answer:#}");
    assert_eq!(s.emulator.requests().len(), before, "no AWS request at all");
}

#[tokio::test]
async fn an_aws_failure_is_an_error_that_says_what_was_done_and_what_failed() {
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-al2023-7", &[("stage", "release")]).await;
    // Point the handler at a dead endpoint: every call fails to connect, which is retryable.
    let dead = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url("http://127.0.0.1:9")
        .region(aws_config::Region::new(REGION))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "t", "t", None, None, "t",
        ))
        .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(1))
        .load()
        .await;
    let handler = Handler::new(
        Config::parse("[[rule]]\nname = \"all\"\ntags = { a = \"b\" }\n").unwrap(),
        SdkAws::new(dead),
        REGION,
    );
    let error = handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap_err();
    assert_eq!(error.error_type(), "Retryable");
    let message = error.to_string();
    assert!(
        message.contains(&image) && message.contains("DescribeImages"),
        "{message}"
    );
}

#[tokio::test]
async fn exclusive_mode_removes_exactly_what_no_rule_grants_and_then_nothing() {
    let s = setup().await;
    let handler = s
        .org_rule_handler("golden-exclusive", "golden-*", "share.exclusive = true")
        .await;
    let (image, _) = create_image(&s.ec2, "golden-exclusive-1", &[]).await;
    // Shared by hand beforehand: with a stranger account and the data OU.
    s.ec2
        .modify_image_attribute()
        .image_id(&image)
        .launch_permission(
            aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                .add(
                    aws_sdk_ec2::types::LaunchPermission::builder()
                        .user_id("444455556666")
                        .build(),
                )
                .add(
                    aws_sdk_ec2::types::LaunchPermission::builder()
                        .organizational_unit_arn(&s.data_ou_arn)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();
    let answer = handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        perms(&[format!("org={}", s.org_arn)]),
        "{answer:#}"
    );
    let summary = answer["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!(
            "done: unshare {image} in {REGION} from OU {}, account 444455556666 (exclusive",
            s.data_ou_arn
        )),
        "says exactly what was removed: {summary}"
    );
    let before = s.emulator.requests().len();
    handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .unwrap();
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn public_sharing_only_with_share_public_and_never_encrypted_or_while_blocked() {
    let s = setup().await;
    let handler = s
        .org_rule_handler("public-images", "public-*", "share.public = true")
        .await;
    let everyone = format!("group={:?}", Some(aws_sdk_ec2::types::PermissionGroup::All));

    let (open, _) = create_image(&s.ec2, "public-1", &[]).await;
    handler
        .handle(sample_event("create-image.json", &open, REGION))
        .await
        .unwrap();
    assert_eq!(
        launch_permissions(&s.ec2, &open).await,
        perms(&[format!("org={}", s.org_arn), everyone.clone()])
    );

    let key = create_key(&s.emulator.kms().await).await;
    let (encrypted, _) = create_image_with(&s.ec2, "public-2", &[], RootVolume::Key(&key)).await;
    let answer = handler
        .handle(sample_event("create-image.json", &encrypted, REGION))
        .await
        .unwrap();
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    assert_eq!(
        launch_permissions(&s.ec2, &encrypted).await,
        perms(&[format!("org={}", s.org_arn)]),
        "shared with the organization, never public"
    );
    assert!(
        answer["summary"]
            .as_str()
            .unwrap()
            .contains("never makes an encrypted AMI public"),
        "{answer:#}"
    );

    s.ec2
        .enable_image_block_public_access()
        .image_block_public_access_state(
            aws_sdk_ec2::types::ImageBlockPublicAccessEnabledState::BlockNewSharing,
        )
        .send()
        .await
        .unwrap();
    let (later, _) = create_image(&s.ec2, "public-3", &[]).await;
    let answer = handler
        .handle(sample_event("create-image.json", &later, REGION))
        .await
        .unwrap();
    assert_eq!(
        launch_permissions(&s.ec2, &later).await,
        perms(&[format!("org={}", s.org_arn)])
    );
    assert!(
        answer["summary"]
            .as_str()
            .unwrap()
            .contains("image block public access is on in us-east-1"),
        "{answer:#}"
    );
}

#[tokio::test]
async fn two_amis_of_a_rule_announced_at_once_leave_its_parameter_on_the_newer_every_time() {
    // SSM has no conditional write: both deliveries read the parameter before either writes, and the
    // older AMI's write may land last. Repeated on 12 rules (a parameter each) to catch every order.
    const ROUNDS: usize = 12;
    let s = setup().await;
    let rules: String = (0..ROUNDS)
        .map(|k| {
            format!(
                "[[rule]]\nname = \"race{k}\"\nmatch.name = [\"race{k}-*\"]\nshare.organizations = [\"{}\"]\nssm_parameter = \"/ami-share/{{rule}}/latest\"\n",
                s.org_arn
            )
        })
        .collect();
    let handler = || async {
        Handler::new(
            Config::parse(&rules).unwrap(),
            SdkAws::new(s.emulator.sdk_config().await),
            REGION,
        )
    };
    let (first, second) = (handler().await, handler().await);
    let mut older = Vec::new();
    for k in 0..ROUNDS {
        older.push(create_image(&s.ec2, &format!("race{k}-older"), &[]).await.0);
    }
    // EC2 dates images to the second or finer: a second later, every "newer" AMI is newer.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let mut newer = Vec::new();
    for k in 0..ROUNDS {
        newer.push(create_image(&s.ec2, &format!("race{k}-newer"), &[]).await.0);
    }
    let races = (0..ROUNDS).map(|k| {
        let (first, second) = (&first, &second);
        let (older, newer) = (older[k].clone(), newer[k].clone());
        async move {
            // Alternate which delivery starts first.
            let (a, b) = match k % 2 {
                0 => (older, newer),
                _ => (newer, older),
            };
            let (x, y) = futures::join!(
                first.handle(sample_event("create-image.json", &a, REGION)),
                second.handle(sample_event("create-image.json", &b, REGION)),
            );
            x.expect("first delivery");
            y.expect("second delivery");
        }
    });
    futures::future::join_all(races).await;
    for k in 0..ROUNDS {
        assert_eq!(
            ssm_parameter(&s.emulator, REGION, &format!("/ami-share/race{k}/latest")).await,
            Some(newer[k].clone()),
            "round {k}: the parameter is on the older AMI {}",
            older[k]
        );
    }
}

#[tokio::test]
async fn a_tag_event_naming_more_amis_than_one_invocation_can_finish_reconciles_the_first_and_names_the_rest()
 {
    let s = setup().await;
    let (image, _) = create_image(&s.ec2, "golden-tagged", &[("stage", "release")]).await;
    let cap = ami_share::handler::MAX_IMAGES_PER_EVENT;
    let mut ids = vec![image.clone()];
    ids.extend((1..=cap).map(|i| format!("ami-{i:017x}")));
    let mut event = sample_event("create-tags.json", &image, REGION);
    event["detail"]["requestParameters"]["resourcesSet"]["items"] = ids
        .iter()
        .map(|id| json!({ "resourceId": id }))
        .collect::<Vec<_>>()
        .into();
    let before = s.emulator.requests().len();
    let answer = s.handler.handle(event).await.expect("not retried");
    let images = answer["images"].as_array().unwrap();
    assert_eq!(images.len(), cap + 1);
    assert_eq!(images[0]["outcome"]["image_id"], image.as_str());
    assert_eq!(images[0]["status"], "done", "{:#}", images[0]);
    let last = &images[cap];
    assert_eq!(last["status"], "skipped");
    assert!(
        last["summary"].as_str().unwrap().contains(&format!(
            "one event reconciles at most {cap} AMIs and this one names {}",
            cap + 1
        )),
        "{last:#}"
    );
    // Only the first `cap` were looked at: one DescribeImages each (the real one may read a little more).
    let described = s.emulator.requests()[before..]
        .iter()
        .filter(|r| *r == "ec2:DescribeImages")
        .count();
    assert!(
        (cap..=cap + 2).contains(&described),
        "{described} DescribeImages"
    );
}
