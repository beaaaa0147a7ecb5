//! Each AWS-fidelity fix of tests/emulator.py, shown: the emulator now answers as AWS does where moto
//! alone would be lax. If one of these fails, a test elsewhere may be passing only because moto is lax.

mod common;

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{LaunchPermission, LaunchPermissionModifications};
use common::*;

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
