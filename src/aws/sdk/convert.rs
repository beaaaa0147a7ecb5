//! The SDK's shapes into ami-share's plain data (images, snapshots, tags, launch permissions), and back.

use aws_sdk_ec2::types::{self as ec2};

use crate::observed::Protection;

use super::*;

pub(super) fn tags_of(tags: &[ec2::Tag]) -> Tags {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// An EC2 Describe* filter: `name` equal to any of `values`.
pub(super) fn filter(name: impl Into<String>, values: &[String]) -> ec2::Filter {
    ec2::Filter::builder()
        .name(name)
        .set_values(Some(values.to_vec()))
        .build()
}

pub(super) fn sdk_tags(tags: &Tags) -> Vec<ec2::Tag> {
    tags.iter()
        .map(|(k, v)| ec2::Tag::builder().key(k).value(v).build())
        .collect()
}

pub(super) fn snapshot_facts(s: &ec2::Snapshot) -> Option<(String, SnapshotFacts)> {
    Some((
        s.snapshot_id()?.to_string(),
        SnapshotFacts {
            tags: tags_of(s.tags()),
            encrypted: s.encrypted().unwrap_or(false),
            kms_key_id: s.kms_key_id().map(str::to_string),
        },
    ))
}

pub(super) fn observed_image(region: &str, image: &ec2::Image) -> ObservedImage {
    // SourceInstanceId appears only for CreateImage; SourceImageId for CreateImage (the instance's AMI),
    // CopyImage and CreateRestoreImageTask; neither for RegisterImage. Hence this order.
    let created_by = if image.source_instance_id().is_some() {
        CreatedBy::CreateImage
    } else if image.source_image_id().is_some() {
        CreatedBy::CopyImage
    } else {
        CreatedBy::RegisterImage
    };
    let snapshots = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs())
        .filter_map(|ebs| {
            Some(ObservedSnapshot {
                snapshot_id: ebs.snapshot_id()?.to_string(),
                encrypted: ebs.encrypted(),
                // What EC2 reports of the snapshot's key; observe takes the snapshot's own word over it.
                kms_key_id: ebs.kms_key_id().map(str::to_string),
                tags: None,
                create_volume_permissions: None,
                other_images: None,
            })
        })
        .collect();
    ObservedImage {
        image_id: image.image_id().unwrap_or_default().to_string(),
        region: region.to_string(),
        name: image.name().map(str::to_string),
        description: image.description().map(str::to_string),
        creation_date: image.creation_date().and_then(Timestamp::parse),
        deprecation_time: image.deprecation_time().and_then(Timestamp::parse),
        protection: Protection::from_ec2(image.deregistration_protection()),
        product_codes: image
            .product_codes()
            .iter()
            .filter_map(|p| p.product_code_id().map(str::to_string))
            .collect(),
        owner_id: image.owner_id().unwrap_or_default().to_string(),
        state: ImageState::from_name(image.state().map(|s| s.as_str()).unwrap_or("unknown")),
        tags: tags_of(image.tags()),
        created_by,
        source: image.source_image_id().map(|id| SourceImage {
            image_id: id.to_string(),
            region: image.source_image_region().map(str::to_string),
        }),
        snapshots,
        ..ObservedImage::default()
    }
}

/// Reads one launch permission as AWS reports it. An entry ami-share cannot read (a form it does not
/// manage) is left out: it can never equal a configured target, so leaving it out changes no plan.
pub(super) fn launch_permission(p: &ec2::LaunchPermission) -> Option<LaunchPermission> {
    if let Some(arn) = p.organization_arn() {
        return arn.parse().ok().map(LaunchPermission::Organization);
    }
    if let Some(arn) = p.organizational_unit_arn() {
        return arn.parse().ok().map(LaunchPermission::OrganizationalUnit);
    }
    if let Some(id) = p.user_id() {
        return id.parse().ok().map(LaunchPermission::Account);
    }
    (p.group() == Some(&ec2::PermissionGroup::All)).then_some(LaunchPermission::Public)
}

pub(super) fn sdk_launch_permission(p: &LaunchPermission) -> ec2::LaunchPermission {
    let b = ec2::LaunchPermission::builder();
    match p {
        LaunchPermission::Organization(arn) => b.organization_arn(arn.as_str()),
        LaunchPermission::OrganizationalUnit(arn) => b.organizational_unit_arn(arn.as_str()),
        LaunchPermission::Account(id) => b.user_id(id.as_str()),
        LaunchPermission::Public => b.group(ec2::PermissionGroup::All),
    }
    .build()
}
