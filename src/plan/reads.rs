//! The one home of "what must be observed": which reads the plan of an image needs, which keys to read,
//! where to look for copies, and which copy is the one ami-share shares. The reconciler asks here before
//! each read, so no call is made that the plan would not use.

use super::*;

/// Which extra reads planning needs for this image, so that the edge makes no call the plan won't use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reads {
    pub launch_permissions: bool,
    /// DescribeSnapshots: for their tags, or for their keys.
    pub snapshots: bool,
    /// DescribeKey and GetKeyPolicy of the keys the snapshots name (after DescribeSnapshots).
    pub keys: bool,
    /// DescribeSnapshotAttribute createVolumePermission of each snapshot.
    pub create_volume_permissions: bool,
    /// DescribeImages of the other AMIs on the snapshots: an exclusive rule may revoke create-volume
    /// permission there, and must keep what their rules grant.
    pub other_images: bool,
    /// GetParameter of the rules' SSM parameters (and the image each names).
    pub parameters: bool,
    /// GetImageBlockPublicAccessState: a rule would make it public and it is not yet.
    pub block_public_access: bool,
}

/// Whether the image is to be shared now: available, and some rule shares it.
pub(super) fn shares_now(desired: &Desired, image: &ObservedImage) -> bool {
    image.state == ImageState::Available && !desired.launch_permissions.is_empty()
}

/// Whether the image is to be copied to other regions now: available, and a rule copies it elsewhere.
pub(super) fn copies_now(desired: &Desired, image: &ObservedImage) -> bool {
    image.state == ImageState::Available
        && desired
            .copy
            .as_ref()
            .is_some_and(|wanted| !copy_targets(wanted, image).is_empty())
}

pub fn reads_needed(desired: &Desired, image: &ObservedImage) -> Reads {
    let taggable = matches!(image.state, ImageState::Available | ImageState::Pending);
    // Keys: to open them before a share, and to see their owner's consent before a copy re-encrypts
    // what they protect.
    let keys =
        (shares_now(desired, image) || copies_now(desired, image)) && image.may_be_encrypted();
    Reads {
        launch_permissions: shares_now(desired, image)
            || (desired.exclusive && image.state == ImageState::Available),
        snapshots: !image.snapshots.is_empty()
            && (keys || (taggable && !desired.snapshot_tags.is_empty())),
        keys,
        create_volume_permissions: !image.snapshots.is_empty()
            && ((shares_now(desired, image) && !desired.create_volume_accounts.is_empty())
                || (desired.exclusive && image.state == ImageState::Available)),
        other_images: !image.snapshots.is_empty()
            && desired.exclusive
            && image.state == ImageState::Available,
        parameters: image.state == ImageState::Available && !desired.ssm_parameters.is_empty(),
        block_public_access: becomes_public(desired, image),
    }
}

/// Whether a rule would make the image public now and it is not yet: then the region's image block
/// public access is read, and decides.
pub(super) fn becomes_public(desired: &Desired, image: &ObservedImage) -> bool {
    shares_now(desired, image)
        && desired
            .launch_permissions
            .contains(&LaunchPermission::Public)
        && !image
            .launch_permissions
            .as_ref()
            .is_some_and(|p| p.contains(&LaunchPermission::Public))
}

/// The key ARNs whose DescribeKey and policy planning needs: the keys of this account that encrypt the
/// image's snapshots. (Another account's key cannot be changed from here: knowing its ARN is enough.)
pub fn keys_to_read(image: &ObservedImage) -> BTreeSet<String> {
    image
        .snapshots
        .iter()
        .filter(|s| s.encrypted == Some(true))
        .filter_map(|s| s.kms_key_id.as_deref())
        .filter(|id| {
            id.parse::<KeyArn>()
                .is_ok_and(|arn| arn.account() == image.owner_id)
        })
        .map(str::to_string)
        .collect()
}

/// The regions `image` is to be copied to, each with its key: the rules' regions but its own.
pub fn copy_targets<'a>(
    wanted: &'a CopyWanted,
    image: &ObservedImage,
) -> Vec<(&'a String, &'a Option<KeyRef>)> {
    wanted
        .regions
        .iter()
        .filter(|(region, _)| **region != image.region)
        .collect()
}

/// Whether the image is to be shared, cannot be as it is, and a copy re-encrypted with the rule's key
/// would cure that: then the reconciler observes the copy (or the key to make one with).
pub fn wants_reencrypted_copy(desired: &Desired, image: &ObservedImage) -> bool {
    desired.reencrypt_with.is_some()
        && reads_needed(desired, image).keys
        && all_cured_by_copy(desired, image)
}

/// Copies that are, or will be, usable: available, pending, or in EC2's passing `transient` state.
pub(super) fn usable(copies: &[ObservedImage]) -> impl Iterator<Item = &ObservedImage> {
    copies.iter().filter(|c| {
        matches!(
            c.state,
            ImageState::Available | ImageState::Pending | ImageState::Transient
        )
    })
}

/// The copy ami-share shares when there are several: the usable one with the lowest id.
pub fn chosen_copy(copies: &[ObservedImage]) -> Option<&ObservedImage> {
    usable(copies).min_by(|a, b| a.image_id.cmp(&b.image_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::plan::*;

    #[test]
    fn reads_are_asked_only_when_the_plan_uses_them() {
        let d = desired();
        let r = reads_needed(&d, &image(ImageState::Available));
        assert_eq!(
            r,
            Reads {
                launch_permissions: true,
                snapshots: true,
                keys: false,
                create_volume_permissions: false,
                other_images: false,
                parameters: false,
                block_public_access: false,
            },
            "unencrypted: no key reads"
        );
        let r = reads_needed(&d, &image(ImageState::Pending));
        assert!(!r.launch_permissions && r.snapshots && !r.keys);
        let mut only_share = d.clone();
        only_share.snapshot_tags.clear();
        let r = reads_needed(&only_share, &image(ImageState::Available));
        assert!(
            !r.snapshots,
            "unencrypted, no snapshot tags: no DescribeSnapshots"
        );
        let mut unknown = image(ImageState::Available);
        unknown.snapshots[0].encrypted = None;
        let r = reads_needed(&only_share, &unknown);
        assert!(
            r.snapshots && r.keys,
            "encryption unknown: read the snapshots and keys"
        );
        let r = reads_needed(&only_share, &encrypted(CMK, None));
        assert!(r.snapshots && r.keys);
        let mut only_tags = d.clone();
        only_tags.launch_permissions.clear();
        only_tags.snapshot_tags.clear();
        let r = reads_needed(&only_tags, &encrypted(CMK, None));
        assert!(!r.launch_permissions && !r.snapshots && !r.keys);
        let r = reads_needed(&d, &image(ImageState::Failed));
        assert!(!r.launch_permissions && !r.snapshots && !r.keys);
    }

    #[test]
    fn only_this_accounts_keys_are_read() {
        let mut img = encrypted(CMK, None);
        img.snapshots.push(ObservedSnapshot {
            snapshot_id: "snap-2".into(),
            encrypted: Some(true),
            kms_key_id: Some(
                "arn:aws:kms:us-east-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab"
                    .into(),
            ),
            tags: Some(Tags::new()),
            create_volume_permissions: None,
            other_images: None,
        });
        assert_eq!(keys_to_read(&img), [CMK.to_string()].into());
    }
}
