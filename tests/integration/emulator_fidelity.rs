//! Each AWS-fidelity fix of tests/emulator.py, shown: the emulator now answers as AWS does where moto
//! alone would be lax. If one of these fails, a test elsewhere may be passing only because moto is lax.

use crate::common::*;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{LaunchPermission, LaunchPermissionModifications};

async fn share(
    ec2: &aws_sdk_ec2::Client,
    image: &str,
    permission: LaunchPermission,
) -> Result<(), String> {
    ec2.modify_image_attribute()
        .image_id(image)
        .launch_permission(
            LaunchPermissionModifications::builder()
                .add(permission)
                .build(),
        )
        .send()
        .await
        .map(|_| ())
        .map_err(|e| e.code().unwrap_or("no code").to_string())
}

#[tokio::test]
async fn sharing_requires_full_organization_and_ou_arns() {
    let emulator = Emulator::start();
    let org = emulator.organization(&["eng"]);
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "any", &[]).await;
    let org_id = org["id"].as_str().unwrap();
    let org_arn = org["arn"].as_str().unwrap();
    let ou_id = org["ous"]["eng"]["id"].as_str().unwrap();
    let ou_arn = org["ous"]["eng"]["arn"].as_str().unwrap();

    let org_perm = |v: &str| LaunchPermission::builder().organization_arn(v).build();
    let ou_perm = |v: &str| {
        LaunchPermission::builder()
            .organizational_unit_arn(v)
            .build()
    };
    assert_eq!(
        share(&ec2, &image, org_perm(org_id)).await,
        Err("InvalidParameter".into())
    );
    assert_eq!(
        share(&ec2, &image, ou_perm(ou_id)).await,
        Err("InvalidParameter".into())
    );
    let account_form = org_arn.replace(":organization/", ":account/");
    assert_eq!(
        share(&ec2, &image, org_perm(&account_form)).await,
        Err("InvalidAMIAttributeItemValue".into())
    );
    assert_eq!(
        share(&ec2, &image, org_perm(ou_arn)).await,
        Err("InvalidAMIAttributeItemValue".into()),
        "an OU ARN given as an organization ARN"
    );
    assert!(
        launch_permissions(&ec2, &image).await.is_empty(),
        "nothing half-added"
    );
    assert_eq!(share(&ec2, &image, org_perm(org_arn)).await, Ok(()));
    assert_eq!(share(&ec2, &image, ou_perm(ou_arn)).await, Ok(()));
}

#[tokio::test]
async fn a_pending_image_cannot_be_shared() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "any", &[]).await;
    emulator.set_image_state(REGION, &image, "pending");
    let perm = LaunchPermission::builder().user_id("210987654321").build();
    assert_eq!(
        share(&ec2, &image, perm.clone()).await,
        Err("InvalidAMIID.Unavailable".into())
    );
    let described = ec2
        .describe_images()
        .image_ids(&image)
        .send()
        .await
        .unwrap();
    assert_eq!(described.images()[0].state().unwrap().as_str(), "pending");
    emulator.set_image_state(REGION, &image, "available");
    assert_eq!(share(&ec2, &image, perm).await, Ok(()));
}

#[tokio::test]
async fn describe_images_applies_owners_together_with_image_ids() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "any", &[]).await;
    let own = |owner: &'static str| ec2.describe_images().image_ids(&image).owners(owner).send();
    assert_eq!(own("self").await.unwrap().images().len(), 1);
    emulator.set_image_owner(REGION, &image, "210987654321");
    assert_eq!(own("self").await.unwrap().images().len(), 0);
    assert_eq!(own("210987654321").await.unwrap().images().len(), 1);
}

#[tokio::test]
async fn create_image_records_the_instance_and_its_image() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "any", &[]).await;
    let described = ec2
        .describe_images()
        .image_ids(&image)
        .send()
        .await
        .unwrap();
    let image = &described.images()[0];
    assert!(
        image
            .source_instance_id()
            .is_some_and(|i| i.starts_with("i-"))
    );
    assert_eq!(
        image.source_image_id(),
        Some("ami-12c6146b"),
        "the instance's AMI"
    );
}

#[tokio::test]
async fn a_copy_records_its_source_image_and_region() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "any", &[]).await;
    let west = aws_sdk_ec2::Client::from_conf(
        aws_sdk_ec2::config::Builder::from(&emulator.sdk_config().await)
            .region(aws_sdk_ec2::config::Region::new("eu-west-1"))
            .build(),
    );
    let copy = west
        .copy_image()
        .source_image_id(&image)
        .source_region(REGION)
        .name("copy")
        .send()
        .await
        .unwrap();
    let described = west
        .describe_images()
        .image_ids(copy.image_id().unwrap())
        .send()
        .await
        .unwrap();
    let copy = &described.images()[0];
    assert_eq!(copy.source_image_id(), Some(image.as_str()));
    assert_eq!(copy.source_image_region(), Some(REGION));
    assert_eq!(copy.source_instance_id(), None);
}

#[tokio::test]
async fn an_image_of_an_encrypted_volume_is_encrypted_with_the_volumes_key() {
    let emulator = Emulator::start();
    let (ec2, kms) = (emulator.ec2().await, emulator.kms().await);
    let key = create_key(&kms).await;
    let (image, snapshots) = create_image_with(&ec2, "enc", &[], RootVolume::Key(&key)).await;
    assert_eq!(
        image_root_encrypted(&ec2, &image).await,
        Some(true),
        "DescribeImages reports Ebs.Encrypted"
    );
    assert_eq!(
        describe_image(&ec2, &image).await.block_device_mappings()[0]
            .ebs()
            .and_then(|ebs| ebs.kms_key_id()),
        Some(key.as_str()),
        "and Ebs.KmsKeyId, the snapshot's key"
    );
    assert_eq!(
        snapshot_encryption(&ec2, &snapshots[0]).await,
        (true, Some(key)),
        "the snapshot keeps the volume's key"
    );
    let (plain, snapshots) = create_image(&ec2, "plain", &[]).await;
    assert_eq!(image_root_encrypted(&ec2, &plain).await, Some(false));
    assert_eq!(
        snapshot_encryption(&ec2, &snapshots[0]).await,
        (false, None)
    );
}

#[tokio::test]
async fn the_default_ebs_key_is_aws_managed_and_customer_keys_are_not() {
    let emulator = Emulator::start();
    let (ec2, kms) = (emulator.ec2().await, emulator.kms().await);
    let (_, snapshots) = create_image_with(&ec2, "default-key", &[], RootVolume::DefaultKey).await;
    let (encrypted, key) = snapshot_encryption(&ec2, &snapshots[0]).await;
    assert!(encrypted);
    let manager = |key: String| {
        let kms = kms.clone();
        async move {
            let described = kms.describe_key().key_id(key).send().await.unwrap();
            let metadata = described.key_metadata().unwrap().clone();
            (
                metadata.arn().unwrap().to_string(),
                metadata.key_manager().unwrap().as_str().to_string(),
            )
        }
    };
    let (arn, aws_managed) = manager(key.unwrap()).await;
    assert_eq!(aws_managed, "AWS");
    assert_eq!(
        manager("alias/aws/ebs".into()).await.0,
        arn,
        "the default key is aws/ebs"
    );
    let (_, customer) = manager(create_key(&kms).await).await;
    assert_eq!(customer, "CUSTOMER");
}

#[tokio::test]
async fn copy_image_is_pending_encrypted_with_the_key_tagged_and_idempotent() {
    use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
    let emulator = Emulator::start();
    let (ec2, kms) = (emulator.ec2().await, emulator.kms().await);
    let key = create_key(&kms).await;
    let (source, _) = create_image_with(&ec2, "source", &[], RootVolume::DefaultKey).await;
    let spec = |kind, key: &str| {
        TagSpecification::builder()
            .resource_type(kind)
            .tags(Tag::builder().key(key).value("yes").build())
            .build()
    };
    let copy = || {
        ec2.copy_image()
            .source_image_id(&source)
            .source_region(REGION)
            .name("source-copy")
            .encrypted(true)
            .kms_key_id(&key)
            .client_token("one-copy-please")
            .tag_specifications(spec(ResourceType::Image, "on-image"))
            .tag_specifications(spec(ResourceType::Snapshot, "on-snapshot"))
            .send()
    };
    let first = copy().await.unwrap().image_id().unwrap().to_string();
    let again = copy().await.unwrap().image_id().unwrap().to_string();
    assert_eq!(first, again, "the same ClientToken returns the same copy");
    use aws_sdk_ec2::error::ProvideErrorMetadata;
    let code = |r: Result<_, aws_sdk_ec2::error::SdkError<_, _>>| {
        r.map(|_| ())
            .map_err(|e| e.code().unwrap_or("none").to_string())
    };
    let other_name = ec2
        .copy_image()
        .source_image_id(&source)
        .source_region(REGION)
        .name("another-name")
        .client_token("one-copy-please")
        .send()
        .await;
    assert_eq!(code(other_name), Err("IdempotentParameterMismatch".into()));
    let same_name = ec2
        .copy_image()
        .source_image_id(&source)
        .source_region(REGION)
        .name("source-copy")
        .send()
        .await;
    assert_eq!(
        code(same_name),
        Err("InvalidAMIName.Duplicate".into()),
        "AMI names are unique"
    );
    let key_without_encrypted = ec2
        .copy_image()
        .source_image_id(&source)
        .source_region(REGION)
        .name("third")
        .kms_key_id(&key)
        .send()
        .await;
    assert_eq!(
        code(key_without_encrypted),
        Err("InvalidParameterDependency".into())
    );
    let described = ec2
        .describe_images()
        .image_ids(&first)
        .send()
        .await
        .unwrap();
    let image = &described.images()[0];
    assert_eq!(image.state().unwrap().as_str(), "pending");
    assert_eq!(image_tags(&ec2, &first).await, tags(&[("on-image", "yes")]));
    let snapshot = image_snapshots(&ec2, &first).await.remove(0);
    assert_eq!(
        snapshot_encryption(&ec2, &snapshot).await,
        (true, Some(key))
    );
    assert_eq!(
        snapshot_tags(&ec2, &snapshot).await,
        tags(&[("on-snapshot", "yes")])
    );
}

#[tokio::test]
async fn put_key_policy_refuses_what_kms_refuses_and_keeps_what_it_accepts_as_written() {
    use aws_sdk_kms::error::ProvideErrorMetadata;
    let emulator = Emulator::start();
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let before = key_policy(&kms, &key).await;
    let put = |policy: String| {
        kms.put_key_policy()
            .key_id(&key)
            .policy_name("default")
            .policy(policy)
            .send()
    };
    let code = |r: Result<_, aws_sdk_kms::error::SdkError<_, _>>| {
        r.map(|_| ())
            .map_err(|e| e.code().unwrap_or("none").to_string())
    };
    assert_eq!(
        code(put("not json".into()).await),
        Err("MalformedPolicyDocumentException".into())
    );
    let big = format!(
        r#"{{"Version":"2012-10-17","Statement":[],"Id":"{}"}}"#,
        "x".repeat(33_000)
    );
    assert_eq!(code(put(big).await), Err("LimitExceededException".into()));
    assert_eq!(key_policy(&kms, &key).await, before, "nothing half-written");
    let pretty = format!(
        "{}\n",
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&before).unwrap())
            .unwrap()
    );
    assert_eq!(code(put(pretty.clone()).await), Ok(()));
    assert_eq!(
        key_policy(&kms, &key).await,
        pretty,
        "returned byte for byte"
    );
}

#[tokio::test]
async fn a_simulated_concurrent_writer_undoes_exactly_the_next_writes() {
    let emulator = Emulator::start();
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let original = key_policy(&kms, &key).await;
    emulator.race_key_policy(&key, 1);
    let mine = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Mine","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"}]}"#;
    put_key_policy(&kms, &key, mine).await;
    assert_eq!(
        key_policy(&kms, &key).await,
        original,
        "the racing writer won"
    );
    put_key_policy(&kms, &key, mine).await;
    assert_eq!(
        key_policy(&kms, &key).await,
        mine,
        "only the next write was raced"
    );
}

#[tokio::test]
async fn enable_image_deprecation_is_reported_rounded_to_the_minute() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "deprecated", &[]).await;
    let at = aws_smithy_types::DateTime::from_str(
        "2030-01-02T03:04:40Z",
        aws_smithy_types::date_time::Format::DateTime,
    )
    .unwrap();
    ec2.enable_image_deprecation()
        .image_id(&image)
        .deprecate_at(at)
        .send()
        .await
        .expect("moto alone answers HTTP 500 here");
    let described = ec2
        .describe_images()
        .image_ids(&image)
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.images()[0].deprecation_time(),
        Some("2030-01-02T03:05:00.000Z")
    );
}

#[tokio::test]
async fn deregistration_protection_is_reported_and_refuses_deregistration_through_its_cooldown() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let protection = async |image: &str| deregistration_protection(&ec2, image).await;
    let deregister = async |image: &str| ec2.deregister_image().image_id(image).send().await;
    let enable = async |image: &str, cooldown: bool| {
        ec2.enable_image_deregistration_protection()
            .image_id(image)
            .with_cooldown(cooldown)
            .send()
            .await
            .expect("moto alone does not implement it")
    };
    let disable = async |image: &str| {
        ec2.disable_image_deregistration_protection()
            .image_id(image)
            .send()
            .await
            .unwrap()
    };

    let (plain, _) = create_image(&ec2, "protected", &[]).await;
    assert_eq!(protection(&plain).await, None);
    enable(&plain, false).await;
    assert_eq!(
        protection(&plain).await.as_deref(),
        Some("enabled-without-cooldown")
    );
    let refused = deregister(&plain).await.expect_err("protected");
    assert!(format!("{refused:?}").contains("deregistration protection"));
    disable(&plain).await;
    deregister(&plain).await.expect("no cooldown: at once");

    let (cooled, _) = create_image(&ec2, "cooled", &[]).await;
    enable(&cooled, true).await;
    assert_eq!(
        protection(&cooled).await.as_deref(),
        Some("enabled-with-cooldown")
    );
    disable(&cooled).await;
    deregister(&cooled)
        .await
        .expect_err("the cooldown keeps it protected for 24 hours");
}

#[tokio::test]
async fn a_client_token_names_its_copy_even_after_the_copy_is_deregistered() {
    // EC2: a retried request with the same token and parameters succeeds with the original result,
    // with no further action (the idempotency guide documents no expiry for CopyImage's token).
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "source", &[]).await;
    let copy = async || {
        ec2.copy_image()
            .source_image_id(&image)
            .source_region(REGION)
            .name("copied")
            .client_token("a-token")
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_string()
    };
    let first = copy().await;
    ec2.deregister_image()
        .image_id(&first)
        .send()
        .await
        .unwrap();
    assert_eq!(copy().await, first, "the dead copy's id, and no new copy");
    let listed = ec2.describe_images().owners("self").send().await.unwrap();
    assert!(
        listed.images().iter().all(|i| i.image_id() != Some(&first)),
        "deregistered images are not listed"
    );
}

#[tokio::test]
async fn an_encrypted_ami_copied_to_another_region_without_a_key_gets_that_regions_default_key() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let key = create_key(&emulator.kms().await).await;
    let (image, _) = create_image_with(&ec2, "encrypted", &[], RootVolume::Key(&key)).await;
    let west = emulator.ec2_in("us-west-2").await;
    let copy = west
        .copy_image()
        .source_image_id(&image)
        .source_region(REGION)
        .name("encrypted")
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_string();
    let snapshot = &image_snapshots(&west, &copy).await[0];
    let (encrypted, copy_key) = snapshot_encryption(&west, snapshot).await;
    assert!(encrypted);
    let copy_key = copy_key.expect("a key");
    assert!(
        copy_key.starts_with("arn:aws:kms:us-west-2:"),
        "a key of the destination, not {key}: {copy_key}"
    );
    let managed = emulator
        .kms_in("us-west-2")
        .await
        .describe_key()
        .key_id(&copy_key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        managed.key_metadata().unwrap().key_manager(),
        Some(&aws_sdk_kms::types::KeyManagerType::Aws),
        "the default EBS key, aws/ebs"
    );
}

#[tokio::test]
async fn a_refused_region_answers_every_ec2_call_as_aws_does() {
    let emulator = Emulator::start();
    emulator.refuse_region("ap-south-2", Some("opt-in"));
    emulator.refuse_region("us-west-2", Some("throttled"));
    let code = |e: aws_sdk_ec2::error::SdkError<_, _>| {
        let e: aws_sdk_ec2::error::SdkError<
            aws_sdk_ec2::operation::describe_images::DescribeImagesError,
            _,
        > = e;
        e.code().unwrap_or("no code").to_string()
    };
    let opt_in = emulator.ec2_in("ap-south-2").await;
    let err = opt_in
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(err), "AuthFailure");
    let throttled = emulator.ec2_in("us-west-2").await;
    let err = throttled
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap_err();
    assert_eq!(code(err), "RequestLimitExceeded");
    emulator.refuse_region("us-west-2", None);
    throttled
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap();
    emulator
        .ec2()
        .await
        .describe_images()
        .owners("self")
        .send()
        .await
        .unwrap();
}

#[tokio::test]
async fn public_sharing_is_refused_for_encrypted_images_and_while_blocked() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let everyone = || {
        LaunchPermission::builder()
            .group(aws_sdk_ec2::types::PermissionGroup::All)
            .build()
    };
    let key = create_key(&emulator.kms().await).await;
    let (encrypted, _) = create_image_with(&ec2, "enc", &[], RootVolume::Key(&key)).await;
    assert_eq!(
        share(&ec2, &encrypted, everyone()).await,
        Err("InvalidParameter".into())
    );
    let state = ec2
        .get_image_block_public_access_state()
        .send()
        .await
        .unwrap();
    assert_eq!(state.image_block_public_access_state(), Some("unblocked"));
    let (open, _) = create_image(&ec2, "open", &[]).await;
    ec2.enable_image_block_public_access()
        .image_block_public_access_state(
            aws_sdk_ec2::types::ImageBlockPublicAccessEnabledState::BlockNewSharing,
        )
        .send()
        .await
        .unwrap();
    let state = ec2
        .get_image_block_public_access_state()
        .send()
        .await
        .unwrap();
    assert_eq!(
        state.image_block_public_access_state(),
        Some("block-new-sharing")
    );
    assert_eq!(
        share(&ec2, &open, everyone()).await,
        Err("OperationNotPermitted".into())
    );
}

#[tokio::test]
async fn put_key_policy_refuses_a_policy_that_would_lock_the_account_out_unless_told_to_bypass_the_check()
 {
    use aws_sdk_kms::error::ProvideErrorMetadata;
    let emulator = Emulator::start();
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let before = key_policy(&kms, &key).await;
    // Only the organization may use the key: nobody could change its policy again.
    let locked = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Org","Effect":"Allow","Principal":{"AWS":"*"},"Action":"kms:Decrypt","Resource":"*","Condition":{"StringEquals":{"aws:PrincipalOrgID":"o-a1b2c3d4e5"}}}]}"#;
    let refused = kms
        .put_key_policy()
        .key_id(&key)
        .policy_name("default")
        .policy(locked)
        .send()
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("MalformedPolicyDocumentException"));
    assert!(
        refused
            .message()
            .unwrap()
            .contains("will not allow you to update the key policy in the future")
    );
    assert_eq!(key_policy(&kms, &key).await, before);
    kms.put_key_policy()
        .key_id(&key)
        .policy_name("default")
        .policy(locked)
        .bypass_policy_lockout_safety_check(true)
        .send()
        .await
        .expect("KMS skips the check when asked");
    let writes = emulator.control("key-policy-writes", None);
    let bypasses: Vec<bool> = writes
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["bypass"].as_bool().unwrap())
        .collect();
    assert_eq!(
        bypasses,
        [false, true],
        "the log tells which write bypassed it"
    );
}

#[tokio::test]
async fn register_image_uses_the_snapshot_it_names_and_images_can_be_found_by_snapshot() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, snapshots) = create_image(&ec2, "golden-1", &[]).await;
    let registered = register_on_snapshot(&ec2, "registered-from-golden", &snapshots[0]).await;
    assert_eq!(image_snapshots(&ec2, &registered).await, snapshots);
    let on_snapshot = ec2
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name("block-device-mapping.snapshot-id")
                .values(&snapshots[0])
                .build(),
        )
        .send()
        .await
        .unwrap();
    let mut ids: Vec<&str> = on_snapshot
        .images()
        .iter()
        .filter_map(|i| i.image_id())
        .collect();
    ids.sort();
    let mut expected = vec![image.as_str(), registered.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
}
