//! Encrypted AMIs end to end against the emulator (moto with its fidelity fixes: encrypted snapshots keep
//! their key, aws/ebs is AWS managed, CopyImage is pending/encrypted/tagged/idempotent, PutKeyPolicy
//! validates): sample events in, key policies, tags and launch permissions checked with real describe
//! calls, mutating calls counted from the emulator's request log.

use std::collections::BTreeSet;

use crate::common::*;
use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::Handler;
use ami_share::key_policy;
use ami_share::reconcile::{KeyPolicyWrites, Mode, Reconciler};
use ami_share::sweep::{self, SweepOptions};
use serde_json::{Value, json};

const PARTNER: &str = "210987654321";

struct Setup {
    emulator: Emulator,
    ec2: aws_sdk_ec2::Client,
    kms: aws_sdk_kms::Client,
    org_id: String,
    org_arn: String,
    eng_ou: (String, String),
}

async fn setup() -> Setup {
    let emulator = Emulator::start();
    let org = emulator.organization(&["eng"]);
    let str_of = |v: &Value| v.as_str().unwrap().to_string();
    Setup {
        ec2: emulator.ec2().await,
        kms: emulator.kms().await,
        org_id: str_of(&org["id"]),
        org_arn: str_of(&org["arn"]),
        eng_ou: (
            str_of(&org["ous"]["eng"]["id"]),
            str_of(&org["ous"]["eng"]["arn"]),
        ),
        emulator,
    }
}

impl Setup {
    /// Golden images go to the organization, the eng OU and a partner; legacy images (often encrypted with
    /// the default aws/ebs key) to the organization, as copies re-encrypted with alias/ami-share.
    async fn handler(&self) -> Handler<SdkAws> {
        Handler::new(
            self.config(),
            SdkAws::new(self.emulator.sdk_config().await),
            REGION,
        )
        .with_key_policy_writes(KeyPolicyWrites {
            max_writes: 5,
            recheck_after: Some(std::time::Duration::from_millis(100)),
        })
    }

    fn config(&self) -> Config {
        Config::parse(&format!(
            r#"
            [[rule]]
            name = "golden"
            match.name = ["golden-*"]
            tags = {{ "cost-center" = "platform" }}
            share.organizations = ["{}"]
            share.organizational_units = ["{}"]
            share.accounts = ["{PARTNER}"]

            [[rule]]
            name = "legacy"
            match.name = ["legacy-*"]
            tags = {{ team = "legacy" }}
            share.organizations = ["{}"]
            reencrypt.kms_key = "alias/ami-share"
            "#,
            self.org_arn, self.eng_ou.1, self.org_arn
        ))
        .unwrap()
    }

    fn mutating_since(&self, before: usize) -> Vec<String> {
        self.emulator.mutating_requests_since(before)
    }

    fn requests(&self) -> usize {
        self.emulator.requests().len()
    }
}

/// Delivers the sample event `file`, naming `image`, and returns the handler's answer (it must succeed).
async fn deliver(handler: &Handler<SdkAws>, file: &str, image: &str) -> Value {
    handler
        .handle(sample_event(file, image, REGION))
        .await
        .unwrap_or_else(|e| panic!("{file} for {image}: {e}"))
}

fn statements(policy: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(policy).unwrap()["Statement"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_cmk_encrypted_ami_is_shared_after_its_key_policy_admits_the_targets() {
    let s = setup().await;
    let handler = s.handler().await;
    let key = create_key(&s.kms).await;
    let original = key_policy(&s.kms, &key).await;
    let (image, snapshots) =
        create_image_with(&s.ec2, "golden-enc-1", &[], RootVolume::Key(&key)).await;

    let before = s.requests();
    let answer = deliver(&handler, "create-image.json", &image).await;
    assert_eq!(answer["status"], "done", "{answer:#}");
    let mut mutating = s.mutating_since(before);
    assert_eq!(
        mutating.pop().as_deref(),
        Some("ec2:ModifyImageAttribute"),
        "the share only after the key policy was written"
    );
    mutating.sort();
    assert_eq!(
        mutating,
        ["ec2:CreateTags", "kms:PutKeyPolicy"],
        "tags and key first, together"
    );

    let policy = key_policy(&s.kms, &key).await;
    let after = statements(&policy);
    assert_eq!(
        after[..1],
        statements(&original)[..],
        "KMS's default statement kept, first, as it was"
    );
    let sids: Vec<&str> = after[1..]
        .iter()
        .map(|s| s["Sid"].as_str().unwrap())
        .collect();
    assert_eq!(sids, key_policy::OWNED_SIDS);
    let org_use = &after[1];
    assert_eq!(org_use["Principal"], json!({"AWS": "*"}));
    assert_eq!(
        org_use["Condition"]["StringEquals"]["aws:PrincipalOrgID"],
        json!([s.org_id])
    );
    let ou_path = format!("{}/*/{}/*", s.org_id, s.eng_ou.0);
    assert_eq!(
        after[3]["Condition"]["ForAnyValue:StringLike"]["aws:PrincipalOrgPaths"],
        json!([ou_path])
    );
    assert_eq!(
        after[5]["Principal"],
        json!({"AWS": [format!("arn:aws:iam::{PARTNER}:root")]})
    );
    assert_eq!(
        after[6]["Condition"]["Bool"]["kms:GrantIsForAWSResource"], "true",
        "CreateGrant only for AWS resources"
    );
    assert_eq!(
        launch_permissions(&s.ec2, &image).await,
        BTreeSet::from([
            format!("org={}", s.org_arn),
            format!("ou={}", s.eng_ou.1),
            format!("account={PARTNER}")
        ])
    );
    assert_eq!(
        snapshot_tags(&s.ec2, &snapshots[0]).await,
        tags(&[("cost-center", "platform")])
    );

    // EventBridge delivers at least once: the duplicate, and the later state-change event, change nothing.
    let before = s.requests();
    deliver(&handler, "create-image.json", &image).await;
    deliver(&handler, "ami-state-available.json", &image).await;
    assert_eq!(s.mutating_since(before), Vec::<String>::new());
    assert_eq!(key_policy(&s.kms, &key).await, policy);
}

#[tokio::test]
async fn a_second_ami_on_the_same_key_adds_its_targets_and_keeps_the_firsts() {
    let s = setup().await;
    let handler = s.handler().await;
    let key = create_key(&s.kms).await;
    let (golden, _) = create_image_with(&s.ec2, "golden-enc-2", &[], RootVolume::Key(&key)).await;
    deliver(&handler, "create-image.json", &golden).await;
    // The owner edits the policy meanwhile: their statement must survive ami-share's next write.
    let mut document: Value = serde_json::from_str(&key_policy(&s.kms, &key).await).unwrap();
    let owners = json!({"Sid": "Build role", "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:role/packer"}, "Action": "kms:Encrypt", "Resource": "*"});
    document["Statement"]
        .as_array_mut()
        .unwrap()
        .insert(0, owners.clone());
    put_key_policy(&s.kms, &key, &document.to_string()).await;

    // A legacy AMI on the same key: its rule shares with the organization only, already admitted.
    let (legacy, _) = create_image_with(&s.ec2, "legacy-enc-2", &[], RootVolume::Key(&key)).await;
    let before = s.requests();
    deliver(&handler, "create-image.json", &legacy).await;
    // No key to patch: the share goes out together with the tags, in either order.
    let mut mutating = s.mutating_since(before);
    mutating.sort();
    assert_eq!(
        mutating,
        ["ec2:CreateTags", "ec2:ModifyImageAttribute"],
        "the key already admits the organization: no key policy write"
    );
    let policy = key_policy(&s.kms, &key).await;
    assert_eq!(statements(&policy)[0], owners);
    let admitted = key_policy::admitted(&policy, "aws").unwrap();
    assert_eq!(admitted.accounts, BTreeSet::from([PARTNER.to_string()]));
    assert_eq!(admitted.organizations, BTreeSet::from([s.org_id.clone()]));
}

#[tokio::test]
async fn an_edit_made_after_a_sweep_read_the_policy_is_kept() {
    // A sweep reads each key once, for every image on it, so its read may be minutes old when an image
    // needs a patch: the write merges into a fresh read instead.
    let s = setup().await;
    let key = create_key(&s.kms).await;
    let (image, _) = create_image_with(&s.ec2, "golden-edit-1", &[], RootVolume::Key(&key)).await;
    // The owner adds a statement right after the sweep's read of the key (the one its plan is made from).
    let owners = json!({"Sid": "Backup role", "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::123456789012:role/backup"}, "Action": "kms:Decrypt", "Resource": "*"});
    s.emulator
        .edit_key_policy_after_next_read(&key, owners.clone());
    let config = s.config();
    let aws = SdkAws::new(s.emulator.sdk_config().await);
    let reconciler = Reconciler::new(&config, &aws, REGION, Mode::Apply);
    let options = SweepOptions {
        regions: vec![REGION.into()],
        concurrency: 2,
        stop_starting_at: None,
    };
    let report = sweep::sweep(&reconciler, &options, |_| {}).await;
    assert!(report.is_complete(), "{}", report.headline());
    let after = statements(&key_policy(&s.kms, &key).await);
    assert_eq!(
        after[1], owners,
        "the owner's statement survives ami-share's write"
    );
    assert_eq!(after.len(), 2 + 9);
    assert_eq!(launch_permissions(&s.ec2, &image).await.len(), 3);
}

#[tokio::test]
async fn an_ami_encrypted_with_aws_ebs_is_not_shared_and_says_why() {
    let s = setup().await;
    let handler = s.handler().await;
    let (image, _) = create_image_with(&s.ec2, "golden-ebs-1", &[], RootVolume::DefaultKey).await;
    let before = s.requests();
    let answer = deliver(&handler, "create-image.json", &image).await;
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    let blocked = answer["outcome"]["blocked"][0].as_str().unwrap();
    assert!(
        blocked.contains("AWS managed key") && blocked.contains("aws/ebs"),
        "{blocked}"
    );
    let mutating = s.mutating_since(before);
    assert!(
        mutating.iter().all(|r| r == "ec2:CreateTags"),
        "no key policy write, no share: {mutating:?}"
    );
    let tags = image_tags(&s.ec2, &image).await;
    assert_eq!(tags["ami-share:status"], "not-shared");
    assert!(
        tags["ami-share:status-reason"]
            .contains("uses the AWS managed key aws/ebs, which cannot be shared"),
        "{tags:?}"
    );
    assert!(launch_permissions(&s.ec2, &image).await.is_empty());

    let before = s.requests();
    deliver(&handler, "ami-state-available.json", &image).await;
    assert_eq!(s.mutating_since(before), Vec::<String>::new());
}

#[tokio::test]
async fn with_reencrypt_a_copy_is_made_once_finished_by_its_own_events_and_shared_instead() {
    let s = setup().await;
    let handler = s.handler().await;
    let copy_key = create_key(&s.kms).await;
    s.kms
        .create_alias()
        .alias_name("alias/ami-share")
        .target_key_id(&copy_key)
        .send()
        .await
        .unwrap();
    let (source, _) = create_image_with(
        &s.ec2,
        "legacy-ebs-1",
        &[("version", "7")],
        RootVolume::DefaultKey,
    )
    .await;

    let before = s.requests();
    let answer = deliver(&handler, "create-image.json", &source).await;
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    let mutating = s.mutating_since(before);
    assert_eq!(
        mutating.iter().filter(|r| *r == "ec2:CopyImage").count(),
        1,
        "{mutating:?}"
    );
    assert!(!mutating.contains(&"ec2:ModifyImageAttribute".to_string()));
    let source_tags = image_tags(&s.ec2, &source).await;
    assert_eq!(source_tags["ami-share:status"], "shared-as-copy");

    let copies = s
        .ec2
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("tag:ami-share:source-image")
                .values(&source)
                .build(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(copies.images().len(), 1);
    let copy = copies.images()[0].image_id().unwrap().to_string();
    assert_eq!(copies.images()[0].name(), Some("legacy-ebs-1-reencrypted"));
    assert_eq!(copies.images()[0].state().unwrap().as_str(), "pending");
    let copy_tags = image_tags(&s.ec2, &copy).await;
    assert_eq!(copy_tags["version"], "7", "the source's own tags");
    assert_eq!(copy_tags["team"], "legacy", "the rule's tags");
    assert_eq!(copy_tags["ami-share:copy-kind"], "re-encrypted");
    let copy_snapshot = image_snapshots(&s.ec2, &copy).await.remove(0);
    assert_eq!(
        snapshot_encryption(&s.ec2, &copy_snapshot).await,
        (true, Some(copy_key.clone()))
    );

    // The copy's own CopyImage event (while pending) and a duplicate of the source's: no second copy; the
    // source records its copy's id, once.
    let before = s.requests();
    let answer = deliver(&handler, "copy-image.json", &copy).await;
    assert_eq!(
        answer["outcome"]["image_id"],
        source.as_str(),
        "the copy's event reconciles its source"
    );
    deliver(&handler, "create-image.json", &source).await;
    assert_eq!(s.mutating_since(before), ["ec2:CreateTags"]);
    assert_eq!(
        image_tags(&s.ec2, &source).await["ami-share:reencrypted-copy"],
        copy
    );

    // The copy becomes available: its key admits the organization, then it is shared.
    s.emulator.set_image_state(REGION, &copy, "available");
    let before = s.requests();
    deliver(&handler, "ami-state-available.json", &copy).await;
    assert_eq!(
        s.mutating_since(before),
        ["kms:PutKeyPolicy", "ec2:ModifyImageAttribute"]
    );
    assert_eq!(
        launch_permissions(&s.ec2, &copy).await,
        BTreeSet::from([format!("org={}", s.org_arn)])
    );
    assert!(
        launch_permissions(&s.ec2, &source).await.is_empty(),
        "the original stays unshared"
    );
    let admitted = key_policy::admitted(&key_policy(&s.kms, &copy_key).await, "aws").unwrap();
    assert_eq!(admitted.organizations, BTreeSet::from([s.org_id.clone()]));

    // Every event again, in any order: nothing more.
    let before = s.requests();
    for (file, id) in [
        ("ami-state-available.json", &copy),
        ("copy-image.json", &copy),
        ("ami-state-available.json", &source),
        ("create-image.json", &source),
    ] {
        deliver(&handler, file, id).await;
    }
    assert_eq!(s.mutating_since(before), Vec::<String>::new());
}

#[tokio::test]
async fn a_concurrent_writer_that_drops_the_grant_is_merged_with_again() {
    let s = setup().await;
    let handler = s.handler().await;
    let key = create_key(&s.kms).await;
    let (image, _) = create_image_with(&s.ec2, "golden-race-1", &[], RootVolume::Key(&key)).await;
    s.emulator.race_key_policy(&key, 1);
    let before = s.requests();
    let answer = deliver(&handler, "create-image.json", &image).await;
    assert_eq!(answer["status"], "done", "{answer:#}");
    let puts = s
        .mutating_since(before)
        .iter()
        .filter(|r| *r == "kms:PutKeyPolicy")
        .count();
    assert_eq!(
        puts, 2,
        "the first write was lost to the other writer, the second stayed"
    );
    let admitted = key_policy::admitted(&key_policy(&s.kms, &key).await, "aws").unwrap();
    assert_eq!(admitted.accounts, BTreeSet::from([PARTNER.to_string()]));
    assert_eq!(launch_permissions(&s.ec2, &image).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deliveries_for_amis_on_one_key_all_keep_their_grants() {
    // Six AMIs on one key, each shared with its own account by its own rule, delivered at once: each
    // invocation reads, merges and writes the one key policy while the others do.
    const N: usize = 6;
    let s = setup().await;
    let key = create_key(&s.kms).await;
    let accounts: Vec<String> = (0..N).map(|i| format!("11111111111{i}")).collect();
    let rules: String = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| format!("[[rule]]\nname = \"r{i}\"\nmatch.name = [\"team{i}-*\"]\nshare.accounts = [\"{a}\"]\n"))
        .collect();
    let handler = Handler::new(
        Config::parse(&rules).unwrap(),
        SdkAws::new(s.emulator.sdk_config().await),
        REGION,
    )
    .with_key_policy_writes(KeyPolicyWrites {
        max_writes: 8,
        recheck_after: Some(std::time::Duration::from_millis(300)),
    });
    let mut images = Vec::new();
    for i in 0..N {
        images.push(
            create_image_with(&s.ec2, &format!("team{i}-base"), &[], RootVolume::Key(&key))
                .await
                .0,
        );
    }
    let answers = futures::future::join_all(
        images
            .iter()
            .map(|image| handler.handle(sample_event("create-image.json", image, REGION))),
    )
    .await;
    for answer in answers {
        assert_eq!(answer.unwrap()["status"], "done");
    }
    let admitted = key_policy::admitted(&key_policy(&s.kms, &key).await, "aws").unwrap();
    assert_eq!(
        admitted.accounts,
        accounts.iter().cloned().collect::<BTreeSet<_>>()
    );
    for (image, account) in images.iter().zip(&accounts) {
        assert_eq!(
            launch_permissions(&s.ec2, image).await,
            BTreeSet::from([format!("account={account}")])
        );
    }
}

#[tokio::test]
async fn a_new_ami_on_a_key_that_needs_a_patch_is_shared_in_four_round_trips() {
    // DescribeImages; its launch permissions, snapshots and the key DescribeImages names, together;
    // PutKeyPolicy (merged into that read); the share, beside the policy's read-back. No pause.
    let s = setup().await;
    let handler = s.handler().await;
    let key = create_key(&s.kms).await;
    let (image, _) = create_image_with(&s.ec2, "golden-depth-1", &[], RootVolume::Key(&key)).await;
    // Every request answered 50 ms late, so that calls made together overlap and calls made one after
    // another do not.
    s.emulator.set_latency(0.05);
    let before = s.requests();
    let answer = deliver(&handler, "create-image.json", &image).await;
    assert_eq!(answer["status"], "done", "{answer:#}");
    let depth = s
        .emulator
        .depth_until(before, "ec2:ModifyImageAttribute")
        .unwrap();
    assert!(depth <= 4, "shared after {depth} sequential round trips");
    assert_eq!(
        s.emulator.depth_until(before, "kms:PutKeyPolicy"),
        Some(3),
        "the key policy written in the third"
    );
    let admitted = key_policy::admitted(&key_policy(&s.kms, &key).await, "aws").unwrap();
    assert_eq!(admitted.accounts, BTreeSet::from([PARTNER.to_string()]));
}
