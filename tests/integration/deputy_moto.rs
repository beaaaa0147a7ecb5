//! A deputy that cannot be turned: each attack an insider with only `ec2:CreateImage` and `ec2:CreateTags`
//! (and the volumes they can make) would try on ami-share, against the emulator, through the handler, and
//! what stops it. README "Threat model" lists the same attacks.

use crate::common::*;
use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::Handler;
use ami_share::key_policy;
use ami_share::reconcile::KeyPolicyWrites;
use serde_json::{Value, json};

const WEST: &str = "us-west-2";
const PARTNER: &str = "210987654321";
const OTHER_PARTNER: &str = "444455556666";
const PARAMETER: &str = "/ami-share/golden/latest";

struct Setup {
    emulator: Emulator,
    ec2: aws_sdk_ec2::Client,
    west: aws_sdk_ec2::Client,
    kms: aws_sdk_kms::Client,
    org_arn: String,
}

async fn setup() -> Setup {
    let emulator = Emulator::start();
    let org = emulator.organization(&[]);
    Setup {
        ec2: emulator.ec2().await,
        west: emulator.ec2_in(WEST).await,
        kms: emulator.kms().await,
        org_arn: org["arn"].as_str().unwrap().to_string(),
        emulator,
    }
}

impl Setup {
    /// A key behind `alias/ami-share`, approved by the rules that name that alias (not tagged).
    async fn copy_key(&self) {
        let key = create_unapproved_key(&self.kms).await;
        self.kms
            .create_alias()
            .alias_name("alias/ami-share")
            .target_key_id(&key)
            .send()
            .await
            .unwrap();
    }

    /// The golden rule: golden-* AMIs are tagged, shared with the organization, copied to us-west-2, and
    /// named in an SSM parameter; `extra` adds to the rule.
    async fn handler(&self, extra: &str) -> Handler<SdkAws> {
        let config = Config::parse(&format!(
            r#"
            [[rule]]
            name = "golden"
            match.name = ["golden-*"]
            tags = {{ team = "platform" }}
            share.organizations = ["{}"]
            ssm_parameter = "/ami-share/{{rule}}/latest"
            {extra}
            "#,
            self.org_arn
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        Handler::new(
            config,
            SdkAws::new(self.emulator.sdk_config().await),
            REGION,
        )
        .with_event_regions(vec![WEST.into()])
        .with_key_policy_writes(KeyPolicyWrites {
            max_writes: 5,
            recheck_after: Some(std::time::Duration::from_millis(100)),
        })
    }
}

async fn deliver(handler: &Handler<SdkAws>, file: &str, image: &str, region: &str) -> Value {
    handler
        .handle(sample_event(file, image, region))
        .await
        .unwrap_or_else(|e| panic!("{file} for {image}: {e}"))
}

/// What an insider can do: tag an AMI they made with any tags, ami-share's marks included.
async fn tag(ec2: &aws_sdk_ec2::Client, image: &str, pairs: &[(&str, &str)]) {
    ec2.create_tags()
        .resources(image)
        .set_tags(Some(
            pairs
                .iter()
                .map(|(k, v)| aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build())
                .collect(),
        ))
        .send()
        .await
        .expect("CreateTags");
}

fn notes(answer: &Value) -> String {
    answer["outcome"]["notes"].to_string()
}

#[tokio::test]
async fn a_scratch_ami_with_forged_regional_copy_marks_is_not_shared_and_never_moves_the_parameter()
{
    let s = setup().await;
    let handler = s
        .handler(&format!("copy.regions = [{{ region = \"{WEST}\" }}]"))
        .await;
    let (golden, _) = create_image(&s.ec2, "golden-1", &[]).await;
    let first = deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert_eq!(first["status"], "done", "{first:#}");
    let real_copy = first["outcome"]["regions"][WEST]["image_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The attack: a scratch AMI in us-west-2, tagged as the golden AMI's copy, dated far in the future.
    let (scratch, _) = create_image(&s.west, "scratch-build-7", &[]).await;
    tag(
        &s.west,
        &scratch,
        &[
            ("ami-share:copy-kind", "regional"),
            ("ami-share:source-image", &golden),
            ("ami-share:source-region", REGION),
            ("ami-share:source-created", "2099-01-01T00:00:00.000Z"),
        ],
    )
    .await;
    let before = s.emulator.requests().len();
    let answer = deliver(&handler, "ami-state-available.json", &scratch, WEST).await;
    assert_eq!(answer["status"], "skipped", "{answer:#}");
    // CreateImage made it from an instance, which no copy ami-share makes is.
    assert!(
        notes(&answer).contains(&format!(
            "but EC2 records {scratch} as made by CreateImage from an instance"
        )),
        "the log says what EC2 contradicts: {answer:#}"
    );
    assert!(launch_permissions(&s.west, &scratch).await.is_empty());
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(ssm_parameter(&s.emulator, WEST, PARAMETER).await, None);

    // The real copy, available, is shared and named by the parameter; the forgery still moves nothing.
    s.emulator.set_image_state(WEST, &real_copy, "available");
    let copy_answer = deliver(&handler, "ami-state-available.json", &real_copy, WEST).await;
    assert_eq!(copy_answer["status"], "done", "{copy_answer:#}");
    assert_eq!(
        ssm_parameter(&s.emulator, WEST, PARAMETER).await.as_deref(),
        Some(real_copy.as_str())
    );
    deliver(&handler, "ami-state-available.json", &scratch, WEST).await;
    assert_eq!(
        ssm_parameter(&s.emulator, WEST, PARAMETER).await.as_deref(),
        Some(real_copy.as_str()),
        "a forged source-created date wins nothing"
    );
    assert!(launch_permissions(&s.west, &scratch).await.is_empty());
    // The golden AMI's own reconciliation finds the forgery by its marks and ignores it.
    let again = deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert!(
        notes(&again).contains(&format!("ignored as a regional copy of {golden} in {WEST}")),
        "{again:#}"
    );
    assert_eq!(
        again["outcome"]["regions"][WEST]["image_id"],
        json!(real_copy)
    );
    assert!(launch_permissions(&s.west, &scratch).await.is_empty());
}

#[tokio::test]
async fn a_scratch_ami_with_forged_re_encrypted_copy_marks_borrows_nothing_from_the_golden_ami() {
    let s = setup().await;
    let handler = s.handler("").await;
    let (golden, _) = create_image(&s.ec2, "golden-1", &[]).await;
    deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert_eq!(
        ssm_parameter(&s.emulator, REGION, PARAMETER)
            .await
            .as_deref(),
        Some(golden.as_str())
    );
    let (scratch, _) = create_image(&s.ec2, "scratch-build-8", &[]).await;
    tag(
        &s.ec2,
        &scratch,
        &[
            ("ami-share:copy-kind", "re-encrypted"),
            ("ami-share:source-image", &golden),
            ("ami-share:source-region", REGION),
            ("ami-share:source-created", "2099-01-01T00:00:00.000Z"),
        ],
    )
    .await;
    let before = s.emulator.requests().len();
    let answer = deliver(&handler, "ami-state-available.json", &scratch, REGION).await;
    assert_eq!(answer["outcome"]["image_id"], json!(scratch), "{answer:#}");
    assert_eq!(answer["status"], "skipped", "{answer:#}");
    assert!(
        notes(&answer).contains(&format!(
            "but EC2 records {scratch} as made by CreateImage from an instance"
        )),
        "{answer:#}"
    );
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert!(launch_permissions(&s.ec2, &scratch).await.is_empty());
    assert_eq!(
        ssm_parameter(&s.emulator, REGION, PARAMETER)
            .await
            .as_deref(),
        Some(golden.as_str())
    );
}

#[tokio::test]
async fn an_ami_on_a_key_nobody_approved_is_not_shared_copied_or_re_encrypted_and_the_key_is_untouched()
 {
    let s = setup().await;
    // The copy key is approved by being named (alias/ami-share, reencrypt and copy.regions).
    s.copy_key().await;
    let handler = s
        .handler(&format!(
            "reencrypt.kms_key = \"alias/ami-share\"\ncopy.regions = [{{ region = \"{WEST}\" }}]"
        ))
        .await;
    // The attack: an image of a volume on the payroll database's key, named so the golden rule selects it.
    let payroll = create_unapproved_key(&s.kms).await;
    let policy_before = key_policy(&s.kms, &payroll).await;
    let (image, _) =
        create_image_with(&s.ec2, "golden-payroll", &[], RootVolume::Key(&payroll)).await;
    let before = s.emulator.requests().len();
    let answer = deliver(&handler, "create-image.json", &image, REGION).await;
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    assert_eq!(
        key_policy(&s.kms, &payroll).await,
        policy_before,
        "byte for byte"
    );
    let writes = s.emulator.mutating_requests_since(before);
    assert!(
        !writes.iter().any(|w| w.contains("PutKeyPolicy")
            || w.contains("ModifyImageAttribute")
            || w.contains("CopyImage")),
        "no key write, no share, no copy: {writes:?}"
    );
    let status = image_tags(&s.ec2, &image).await;
    let payroll_id = payroll.rsplit('/').next().unwrap();
    assert_eq!(status["ami-share:status"], "not-shared");
    assert!(
        status["ami-share:status-reason"].contains(payroll_id)
            && status["ami-share:status-reason"].contains("ami-share:manage-key-policy=true"),
        "names the key and how to approve it: {status:?}"
    );
    assert!(launch_permissions(&s.ec2, &image).await.is_empty());
    assert!(copies_of(&s.emulator, WEST, &image).await.is_empty());

    // Its owner approves it: the next event opens it, through EC2 only, and shares the AMI.
    s.kms
        .tag_resource()
        .key_id(&payroll)
        .tags(
            aws_sdk_kms::types::Tag::builder()
                .tag_key("ami-share:manage-key-policy")
                .tag_value("true")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let approved = deliver(&handler, "create-image.json", &image, REGION).await;
    assert_eq!(approved["status"], "done", "{approved:#}");
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        [format!("org={}", s.org_arn)].into()
    );
    assert_eq!(
        image_tags(&s.ec2, &image).await["ami-share:status"],
        "shared"
    );
}

/// Every statement of ami-share's that uses the key does so through EC2 only; the DescribeKey ones
/// (metadata, for `ami-share check`) grant that one action and nothing else.
fn assert_through_ec2(statements: &[Value]) {
    for statement in statements {
        match statement["Sid"].as_str().unwrap().ends_with("DescribeKey") {
            true => assert_eq!(statement["Action"], "kms:DescribeKey", "{statement}"),
            false => assert_eq!(
                statement["Condition"]["StringLike"]["kms:ViaService"], "ec2.*.amazonaws.com",
                "{statement}"
            ),
        }
    }
}

/// ami-share's statements in a key policy.
fn owned_statements(policy: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(policy).unwrap()["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["Sid"]
                .as_str()
                .is_some_and(|sid| key_policy::OWNED_SIDS.contains(&sid))
        })
        .cloned()
        .collect()
}

#[tokio::test]
async fn every_grant_is_through_ec2_only_an_operators_narrowing_survives_and_old_grants_are_limited()
 {
    let s = setup().await;
    let key = create_key(&s.kms).await;
    let handler = s.handler("").await;
    let (first, _) = create_image_with(&s.ec2, "golden-1", &[], RootVolume::Key(&key)).await;
    deliver(&handler, "create-image.json", &first, REGION).await;
    let policy = key_policy(&s.kms, &key).await;
    let statements = owned_statements(&policy);
    assert_eq!(statements.len(), 3, "{policy}");
    assert_through_ec2(&statements);

    // An operator narrows the organization statement to principals tagged team=platform.
    let mut document: Value = serde_json::from_str(&policy).unwrap();
    for statement in document["Statement"].as_array_mut().unwrap() {
        if statement["Sid"] == "AmiShareOrganizationsUseKey" {
            statement["Condition"]["StringEquals"]["aws:PrincipalTag/team"] = json!("platform");
        }
    }
    put_key_policy(&s.kms, &key, &document.to_string()).await;
    // A second AMI on the key, also for a partner: the merge keeps the narrowing.
    let partner_handler = s
        .handler(&format!("share.accounts = [\"{PARTNER}\"]"))
        .await;
    let (second, _) = create_image_with(&s.ec2, "golden-2", &[], RootVolume::Key(&key)).await;
    let answer = deliver(&partner_handler, "create-image.json", &second, REGION).await;
    assert_eq!(answer["status"], "done", "{answer:#}");
    let policy = key_policy(&s.kms, &key).await;
    let statements = owned_statements(&policy);
    assert_eq!(statements.len(), 6, "{policy}");
    let org = statements
        .iter()
        .find(|s| s["Sid"] == "AmiShareOrganizationsUseKey")
        .unwrap();
    assert_eq!(
        org["Condition"]["StringEquals"]["aws:PrincipalTag/team"], "platform",
        "the operator's condition is kept: {org}"
    );
    assert_through_ec2(&statements);

    // Statements an earlier version wrote, without kms:ViaService, are limited on the next event.
    let mut legacy: Value = serde_json::from_str(&policy).unwrap();
    for statement in legacy["Statement"].as_array_mut().unwrap() {
        if let Some(condition) = statement
            .get_mut("Condition")
            .and_then(Value::as_object_mut)
        {
            condition.remove("StringLike");
        }
    }
    put_key_policy(&s.kms, &key, &legacy.to_string()).await;
    let answer = deliver(&partner_handler, "create-image.json", &second, REGION).await;
    let patch = answer["outcome"]["done"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["action"] == "patch_key_policy")
        .unwrap_or_else(|| panic!("{answer:#}"));
    assert_eq!(patch["limit_to_ec2"], true, "{patch}");
    assert_through_ec2(&owned_statements(&key_policy(&s.kms, &key).await));
    let before = s.emulator.requests().len();
    deliver(&partner_handler, "create-image.json", &second, REGION).await;
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new(),
        "idempotent"
    );
    // No write ever asked KMS to skip its lockout check.
    let writes = s.emulator.control("key-policy-writes", None);
    assert!(
        writes
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["bypass"] == false),
        "{writes}"
    );
}

#[tokio::test]
async fn an_account_dropped_from_an_exclusive_rule_loses_launch_and_create_volume_permission() {
    let s = setup().await;
    let (image, snapshots) = create_image(&s.ec2, "golden-1", &[]).await;
    let both = s.handler(&format!(
        "share.accounts = [\"{PARTNER}\", \"{OTHER_PARTNER}\"]\nshare.create_volume_permission = true"
    )).await;
    deliver(&both, "ami-state-available.json", &image, REGION).await;
    assert_eq!(
        volume_permissions(&s.ec2, &snapshots[0]).await,
        [
            format!("account={PARTNER}"),
            format!("account={OTHER_PARTNER}")
        ]
        .into()
    );
    // Someone also made the snapshot public.
    s.ec2
        .modify_snapshot_attribute()
        .snapshot_id(&snapshots[0])
        .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
        .operation_type(aws_sdk_ec2::types::OperationType::Add)
        .group_names("all")
        .send()
        .await
        .unwrap();
    let exclusive = s.handler(&format!(
        "share.accounts = [\"{PARTNER}\"]\nshare.create_volume_permission = true\nshare.exclusive = true"
    )).await;
    let answer = deliver(&exclusive, "ami-state-available.json", &image, REGION).await;
    assert_eq!(answer["status"], "done", "{answer:#}");
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        [format!("org={}", s.org_arn), format!("account={PARTNER}")].into()
    );
    assert_eq!(
        volume_permissions(&s.ec2, &snapshots[0]).await,
        [format!("account={PARTNER}")].into(),
        "the dropped account cannot read the disk any more, nor can everyone"
    );
    assert!(
        answer["summary"].as_str().unwrap().contains(&format!(
            "revoke create-volume permission on snapshot {} in {REGION} from account {OTHER_PARTNER}, everyone (Group=all)",
            snapshots[0]
        )),
        "{answer:#}"
    );
    let before = s.emulator.requests().len();
    deliver(&exclusive, "ami-state-available.json", &image, REGION).await;
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn sweep_and_plan_report_key_grantees_no_ami_on_the_key_is_shared_with_any_more() {
    let s = setup().await;
    let key = create_key(&s.kms).await;
    let (image, _) = create_image_with(&s.ec2, "golden-1", &[], RootVolume::Key(&key)).await;
    let both = s
        .handler(&format!(
            "share.accounts = [\"{PARTNER}\", \"{OTHER_PARTNER}\"]"
        ))
        .await;
    deliver(&both, "ami-state-available.json", &image, REGION).await;
    let exclusive_rule = format!("share.accounts = [\"{PARTNER}\"]\nshare.exclusive = true");
    let exclusive = s.handler(&exclusive_rule).await;
    deliver(&exclusive, "ami-state-available.json", &image, REGION).await;
    assert!(
        !launch_permissions(&s.ec2, &image)
            .await
            .contains(&format!("account={OTHER_PARTNER}"))
    );
    let admitted = key_policy::admitted(&key_policy(&s.kms, &key).await, "aws").unwrap();
    assert!(
        admitted.accounts.contains(OTHER_PARTNER),
        "ami-share never removes a grantee"
    );

    // The sweep reports it (and removes nothing).
    let config = Config::parse(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.organizations = [\"{}\"]\n{exclusive_rule}\n",
        s.org_arn
    ))
    .unwrap();
    let aws = SdkAws::new(s.emulator.sdk_config().await);
    let reconciler = ami_share::reconcile::Reconciler::new(
        &config,
        &aws,
        REGION,
        ami_share::reconcile::Mode::Apply,
    );
    let before = s.emulator.requests().len();
    let report = ami_share::sweep::sweep(
        &reconciler,
        &ami_share::sweep::SweepOptions {
            regions: vec![REGION.into()],
            concurrency: 2,
            stop_starting_at: None,
        },
        |_| {},
    )
    .await;
    assert_eq!(report.stale_keys.len(), 1, "{report:#?}");
    let stale = &report.stale_keys[0];
    assert_eq!(stale.key_arn, key);
    assert_eq!(stale.stale.accounts, [OTHER_PARTNER.to_string()].into());
    assert_eq!(stale.images, std::slice::from_ref(&image));
    assert!(
        report.headline().contains("1 KMS key(s) admit grantees"),
        "{}",
        report.headline()
    );
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new(),
        "report only"
    );

    // So does plan.
    let config_path =
        std::env::temp_dir().join(format!("ami-share-audit-{}.toml", std::process::id()));
    std::fs::write(
        &config_path,
        format!(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.organizations = [\"{}\"]\n{exclusive_rule}\n",
            s.org_arn
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ami-share"))
        .envs(s.emulator.aws_env())
        .args(["plan", "--config"])
        .arg(&config_path)
        .args(["--image-id", &image])
        .output()
        .unwrap();
    std::fs::remove_file(&config_path).unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "note: KMS key {key} in {REGION}: ami-share's statements still admit account {OTHER_PARTNER}, which none of the 1 AMI(s) on the key is shared with any more"
        )),
        "{stdout}"
    );
}

#[tokio::test]
async fn an_image_of_an_instance_of_the_golden_ami_tagged_as_its_re_encrypted_copy_is_never_shared_as_it()
 {
    let s = setup().await;
    s.copy_key().await;
    let handler = s.handler("reencrypt.kms_key = \"alias/ami-share\"").await;
    // The golden AMI is on aws/ebs: it is shared as a re-encrypted copy.
    let (golden, _) = create_image_with(&s.ec2, "golden-1", &[], RootVolume::DefaultKey).await;
    // The attack: launch the golden AMI, change the instance, image it, and tag the image as the golden
    // AMI's re-encrypted copy. EC2 records the golden AMI as its source (CreateImage's SourceImageId).
    // (The emulator records no SourceImageRegion for CreateImage; if EC2 does, the image still counts as
    // made by CreateImage, which no copy of ami-share's is: src/provenance.rs tests that case.)
    let (tampered, _) = create_image_from(
        &s.ec2,
        &golden,
        "tampered-build",
        &[],
        RootVolume::Unencrypted,
    )
    .await;
    tag(
        &s.ec2,
        &tampered,
        &[
            ("ami-share:copy-kind", "re-encrypted"),
            ("ami-share:source-image", &golden),
            ("ami-share:source-region", REGION),
        ],
    )
    .await;
    let answer = deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert_eq!(answer["status"], "blocked", "aws/ebs: {answer:#}");
    assert!(
        notes(&answer).contains(&format!("ignored as a re-encrypted copy of {golden}"))
            && notes(&answer).contains("made by CreateImage from an instance"),
        "{answer:#}"
    );
    let copy = answer["outcome"]["done"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["action"] == "copy_image");
    assert!(copy, "a real re-encrypted copy is made instead: {answer:#}");
    assert!(launch_permissions(&s.ec2, &tampered).await.is_empty());
    let own = deliver(&handler, "ami-state-available.json", &tampered, REGION).await;
    assert_eq!(own["outcome"]["image_id"], json!(tampered), "{own:#}");
    assert_eq!(
        own["status"], "skipped",
        "its own name selects nothing: {own:#}"
    );
    assert!(launch_permissions(&s.ec2, &tampered).await.is_empty());
}

#[tokio::test]
async fn an_ami_registered_on_the_golden_amis_snapshot_cannot_make_an_exclusive_rule_revoke_its_grants()
 {
    let s = setup().await;
    let config = Config::parse(&format!(
        r#"
        [[rule]]
        name = "golden"
        match.name = ["golden-*"]
        share.accounts = ["{PARTNER}"]
        share.create_volume_permission = true

        [[rule]]
        name = "scratch"
        match.name = ["scratch-*"]
        share.accounts = ["{OTHER_PARTNER}"]
        share.exclusive = true
        "#
    ))
    .unwrap();
    let handler = Handler::new(config, SdkAws::new(s.emulator.sdk_config().await), REGION);
    let (golden, snapshots) = create_image(&s.ec2, "golden-1", &[]).await;
    deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert_eq!(
        volume_permissions(&s.ec2, &snapshots[0]).await,
        [format!("account={PARTNER}")].into()
    );
    // The attack: an AMI registered on the golden AMI's snapshot, named for the exclusive rule.
    let scratch = register_on_snapshot(&s.ec2, "scratch-on-golden", &snapshots[0]).await;
    let before = s.emulator.requests().len();
    let answer = deliver(&handler, "ami-state-available.json", &scratch, REGION).await;
    assert_eq!(answer["status"], "done", "{answer:#}");
    assert_eq!(
        volume_permissions(&s.ec2, &snapshots[0]).await,
        [format!("account={PARTNER}")].into(),
        "what the golden AMI's rule grants on the snapshot stays"
    );
    assert!(
        !s.emulator
            .mutating_requests_since(before)
            .iter()
            .any(|r| r.contains("ModifySnapshotAttribute")),
        "no flip-flop"
    );
    // The golden AMI's next event changes nothing either.
    let before = s.emulator.requests().len();
    deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert_eq!(
        s.emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

/// What an insider can do to block a copy: register an AMI under the name the copy will get.
async fn squat(ec2: &aws_sdk_ec2::Client, name: &str) -> String {
    ec2.register_image()
        .name(name)
        .root_device_name("/dev/sda1")
        .send()
        .await
        .expect("RegisterImage")
        .image_id()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn names_taken_in_advance_do_not_stop_the_copies() {
    let s = setup().await;
    s.copy_key().await;
    let handler = s
        .handler(&format!(
            "reencrypt.kms_key = \"alias/ami-share\"\ncopy.regions = [{{ region = \"{WEST}\" }}]"
        ))
        .await;
    let (golden, _) = create_image_with(&s.ec2, "golden-1", &[], RootVolume::DefaultKey).await;
    // The names the re-encrypted copy and the regional copy would get.
    let squatters = [
        squat(&s.ec2, "golden-1-reencrypted").await,
        squat(&s.west, "golden-1").await,
    ];
    let answer = deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert!(answer["outcome"].get("failures").is_none(), "{answer:#}");
    let made: Vec<&Value> = answer["outcome"]["done"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["action"] == "copy_image")
        .collect();
    assert_eq!(made.len(), 2, "both copies made: {answer:#}");
    let reencrypted = copies_of(&s.emulator, REGION, &golden).await;
    let regional = copies_of(&s.emulator, WEST, &golden).await;
    assert_eq!((reencrypted.len(), regional.len()), (1, 1), "{answer:#}");
    for (copy, _) in reencrypted.iter().chain(&regional) {
        assert!(
            !squatters.contains(copy),
            "a copy of ami-share's, not the squatter"
        );
    }
    // A second delivery finds the copies by their marks: no second copy under yet another name.
    let before = s.emulator.requests().len();
    deliver(&handler, "ami-state-available.json", &golden, REGION).await;
    assert!(
        !s.emulator
            .mutating_requests_since(before)
            .iter()
            .any(|r| r.contains("CopyImage")),
        "no second copy"
    );
}
