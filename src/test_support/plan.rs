//! Builders of the planner's inputs (images, keys, wishes) in us-east-1, shared by the tests of
//! `plan`, and a model of AWS applying a plan.

use std::collections::{BTreeMap, BTreeSet};

use crate::keys;
use crate::markers::{self};
pub use crate::observed::{
    ImageState, KeyManager, Observed, ObservedCopies, ObservedImage, ObservedKey, ObservedSnapshot,
    Tags,
};
use crate::plan::{Action, ImageCopy, Plan};
use crate::rules::Desired;
pub use crate::targets::LaunchPermission;
pub use crate::time::Timestamp;

pub const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
pub const CMK: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
pub const AWS_EBS: &str =
    "arn:aws:kms:us-east-1:123456789012:key/99999999-12ab-34cd-56ef-1234567890ab";
pub const REENCRYPT_KEY: &str =
    "arn:aws:kms:us-east-1:123456789012:key/77777777-12ab-34cd-56ef-1234567890ab";
pub const KEY_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Enable IAM User Permissions","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"}]}"#;

pub fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn org() -> LaunchPermission {
    LaunchPermission::Organization(ORG.parse().unwrap())
}

pub fn account(id: &str) -> LaunchPermission {
    LaunchPermission::Account(id.parse().unwrap())
}

pub fn image(state: ImageState) -> ObservedImage {
    ObservedImage {
        image_id: "ami-12345678".into(),
        region: "us-east-1".into(),
        name: Some("golden".into()),
        owner_id: "123456789012".into(),
        state,
        tags: Tags::new(),
        created_by: crate::observed::CreatedBy::CreateImage,
        snapshots: vec![ObservedSnapshot {
            snapshot_id: "snap-1".into(),
            encrypted: Some(false),
            kms_key_id: None,
            tags: Some(Tags::new()),
            create_volume_permissions: None,
            other_images: None,
        }],
        launch_permissions: Some(BTreeSet::new()),
        creation_date: Timestamp::parse("2026-11-25T10:00:00.000Z"),
        ..ObservedImage::default()
    }
}

/// A key of the image's region, its owner's approval tag on it.
pub fn key(arn: &str, manager: KeyManager) -> ObservedKey {
    ObservedKey {
        arn: arn.into(),
        manager,
        state: "Enabled".into(),
        policy: Some(KEY_POLICY.into()),
        tags: Some(tags(&[(keys::APPROVAL_TAG, keys::APPROVAL_TAG_VALUE)])),
        aliases: Vec::new(),
    }
}

/// An available image whose one snapshot is encrypted with `arn`, the key observed as given.
pub fn encrypted(arn: &str, observed_key: Option<ObservedKey>) -> ObservedImage {
    let mut img = image(ImageState::Available);
    img.snapshots[0].encrypted = Some(true);
    img.snapshots[0].kms_key_id = Some(arn.into());
    if let Some(k) = observed_key {
        img.keys.insert(arn.into(), k);
    }
    img
}

/// An image with snap-1 on the AWS managed key and snap-2 on `CMK` (approved), whose policy is given.
pub fn on_aws_ebs_and_cmk(cmk_policy: &str) -> ObservedImage {
    let mut image = encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws)));
    let mut second = image.snapshots[0].clone();
    second.snapshot_id = "snap-2".into();
    second.kms_key_id = Some(CMK.into());
    image.snapshots.push(second);
    let mut cmk = key(CMK, KeyManager::Customer);
    cmk.policy = Some(cmk_policy.into());
    image.keys.insert(CMK.into(), cmk);
    image
}

pub fn observed(image: ObservedImage) -> Observed {
    Observed {
        image,
        reencryption: None,
        regional: BTreeMap::new(),
        now: None,
    }
}

pub fn desired() -> Desired {
    Desired {
        rules: vec!["r".into()],
        image_tags: tags(&[("team", "platform"), ("shared", "yes")]),
        snapshot_tags: tags(&[("team", "platform"), ("shared", "yes")]),
        launch_permissions: [org(), account("210987654321")].into(),
        reencrypt_with: None,
        conflicts: vec![],
        // As the rules date the image of `image()`.
        family_created: Timestamp::parse("2026-11-25T10:00:00.000Z"),
        ..Desired::default()
    }
}

pub fn reencrypting() -> Desired {
    Desired {
        reencrypt_with: Some("alias/ami-share".parse().unwrap()),
        ..desired()
    }
}

pub fn apply_to_image(image: &mut ObservedImage, action: &Action) {
    match action {
        Action::CreateTags {
            resources, tags, ..
        } => {
            for r in resources {
                if *r == image.image_id {
                    image.tags.extend(tags.clone());
                }
                for s in image.snapshots.iter_mut().filter(|s| s.snapshot_id == *r) {
                    s.tags.get_or_insert_default().extend(tags.clone());
                }
            }
        }
        Action::AddLaunchPermissions {
            image_id,
            permissions,
            ..
        } if *image_id == image.image_id => {
            image
                .launch_permissions
                .get_or_insert_default()
                .extend(permissions.iter().cloned());
        }
        Action::SetStatus { image_id, tags, .. } if *image_id == image.image_id => {
            image.tags.extend(tags.clone());
        }
        Action::RemoveLaunchPermissions {
            image_id,
            permissions,
            ..
        } if *image_id == image.image_id => {
            if let Some(have) = image.launch_permissions.as_mut() {
                for p in permissions {
                    have.remove(p);
                }
            }
        }
        Action::PatchKeyPolicy {
            key_arn, policy, ..
        } => {
            if let Some(k) = image.keys.get_mut(key_arn) {
                k.policy = Some(policy.clone());
            }
        }
        Action::RemoveCreateVolumePermission {
            snapshot_id,
            permissions,
            ..
        } => {
            for s in image
                .snapshots
                .iter_mut()
                .filter(|s| s.snapshot_id == *snapshot_id)
            {
                if let Some(have) = s.create_volume_permissions.as_mut() {
                    for p in permissions {
                        have.remove(p);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Applies a plan to the observed state the way AWS would: what `plan` promises to converge on.
pub fn applied(mut observed: Observed, plan: &Plan) -> Observed {
    for action in &plan.actions {
        apply_to_image(&mut observed.image, action);
        let copies = &mut observed.reencryption.get_or_insert_default().copies;
        for copy in copies.iter_mut() {
            apply_to_image(copy, action);
        }
        if let Action::CopyImage(ImageCopy {
            tags,
            kms_key_arn,
            name,
            ..
        }) = action
        {
            let kms_key_arn = kms_key_arn.as_deref().unwrap();
            let mut copy = encrypted(kms_key_arn, Some(key(kms_key_arn, KeyManager::Customer)));
            copy.image_id = "ami-copy0001".into();
            copy.name = Some(name.clone());
            copy.state = ImageState::Pending;
            copy.tags = tags.clone();
            copy.snapshots[0].snapshot_id = "snap-copy".into();
            copies.push(copy);
        }
    }
    if observed
        .reencryption
        .as_ref()
        .is_some_and(|r| r.copies.is_empty() && r.key.is_none())
    {
        observed.reencryption = None;
    }
    observed
}

/// The status tags the plan sets on the source image.
pub fn status_of(p: &Plan) -> Tags {
    p.actions
        .iter()
        .find_map(|a| match a {
            Action::SetStatus { image_id, tags, .. } if image_id == "ami-12345678" => {
                Some(tags.clone())
            }
            _ => None,
        })
        .unwrap_or_default()
}

pub fn assert_not_shared(p: &Plan, expected_reason: &str) {
    assert!(
        !p.actions.iter().any(|a| matches!(
            a,
            Action::AddLaunchPermissions { .. } | Action::PatchKeyPolicy { .. }
        )),
        "{p:#?}"
    );
    assert_eq!(p.blocked.len(), 1, "{p:#?}");
    assert!(p.blocked[0].contains(expected_reason), "{}", p.blocked[0]);
    let status = status_of(p);
    assert_eq!(status[markers::STATUS], "not-shared");
    assert!(
        status[markers::STATUS_REASON].chars().count() < 256,
        "{status:?}"
    );
}

/// A key of this account whose owner has not tagged it for ami-share.
pub fn unapproved_key() -> ObservedKey {
    ObservedKey {
        tags: Some(Tags::new()),
        ..key(CMK, KeyManager::Customer)
    }
}

pub fn reencryption(copies: Vec<ObservedImage>, key: Option<Option<ObservedKey>>) -> Observed {
    Observed {
        image: encrypted(AWS_EBS, Some(self::key(AWS_EBS, KeyManager::Aws))),
        reencryption: Some(ObservedCopies {
            copies,
            key,
            ..ObservedCopies::default()
        }),
        regional: BTreeMap::new(),
        now: None,
    }
}

pub fn copy_of(p: &Plan) -> Option<&ImageCopy> {
    p.actions.iter().find_map(|a| match a {
        Action::CopyImage(c) => Some(c),
        _ => None,
    })
}

pub fn failed_copy(id: &str) -> ObservedImage {
    let mut failed = encrypted(REENCRYPT_KEY, None);
    failed.image_id = id.into();
    failed.state = ImageState::Failed;
    failed
}

pub const WEST_KEY: &str =
    "arn:aws:kms:us-west-2:123456789012:key/55555555-12ab-34cd-56ef-1234567890ab";

pub fn distributing() -> Desired {
    let config = crate::config::Config::parse(
        r#"
        [[rule]]
        name = "r"
        tags = { team = "platform" }
        share.accounts = ["210987654321"]
        deprecate_after_days = 30
        copy.name = "{name}-{region}"
        copy.description = "{description} (from {image_id} in {source_region})"
        copy.regions = [{ region = "us-west-2", kms_key = "alias/ami-share" }, { region = "eu-central-1" }, { region = "us-east-1" }]
        "#,
    )
    .unwrap();
    let tags = tags(&[("os", "al2023"), ("aws:ec2launchtemplate:id", "lt-1")]);
    crate::rules::desired_for(
        &config,
        &crate::rules::ImageFacts {
            name: Some("golden"),
            tags: &tags,
            owner_id: "123456789012",
            created_by: crate::observed::CreatedBy::CreateImage,
            creation_date: Timestamp::parse("2026-11-25T10:00:00.000Z"),
        },
    )
}

pub fn with_regions(mut image: ObservedImage, west: Option<ObservedCopies>) -> Observed {
    image.tags = tags(&[("os", "al2023"), ("aws:ec2launchtemplate:id", "lt-1")]);
    image.description = Some("Golden".into());
    Observed {
        image,
        reencryption: None,
        regional: BTreeMap::from([
            ("us-west-2".to_string(), west),
            ("eu-central-1".to_string(), Some(ObservedCopies::default())),
        ]),
        now: None,
    }
}

pub fn copies(p: &Plan) -> Vec<&ImageCopy> {
    p.actions
        .iter()
        .filter_map(|a| match a {
            Action::CopyImage(c) => Some(c),
            _ => None,
        })
        .collect()
}
