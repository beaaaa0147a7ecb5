//! The vocabulary of a plan: each AWS call it may need, as plain data that prints for a person (it is what
//! `plan` shows) and that `apply` executes.

use super::*;

/// One AWS call the plan needs. Plain data: it is what `plan` shows a person and what `apply` executes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// EC2 CreateTags: set `tags` on every resource (image and snapshot ids) listed.
    CreateTags {
        region: String,
        resources: Vec<String>,
        tags: Tags,
    },
    /// KMS PutKeyPolicy: admit `admit` to the key, through ami-share's own statements.
    PatchKeyPolicy {
        region: String,
        key_arn: String,
        /// The grantees the policy lacks now.
        admit: KeyGrantees,
        /// Whether ami-share's statements there, written by an earlier version, are limited to use
        /// through EC2 (`kms:ViaService`) by this write.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        limit_to_ec2: bool,
        /// Every grantee the image needs: apply merges them into a fresh read of the policy.
        #[serde(skip)]
        grantees: KeyGrantees,
        /// The policy as merged into the planning read: what the plan previews, and what the event path
        /// writes (its planning read is made in the round just before). A sweep, whose read of a key
        /// serves all its images, merges into a fresh read instead.
        #[serde(skip)]
        policy: String,
    },
    /// EC2 ModifyImageAttribute launchPermission Add. Applied only after every key patch succeeded.
    AddLaunchPermissions {
        region: String,
        image_id: String,
        permissions: Vec<LaunchPermission>,
    },
    /// EC2 ModifyImageAttribute launchPermission Remove: exclusive mode, for permissions no selecting rule
    /// grants.
    RemoveLaunchPermissions {
        region: String,
        image_id: String,
        permissions: Vec<LaunchPermission>,
    },
    /// EC2 CopyImage: a re-encrypted copy beside the image, or a copy in another region.
    CopyImage(ImageCopy),
    /// EC2 ModifySnapshotAttribute createVolumePermission Add: lets the accounts copy the AMI. Applied
    /// with the launch permissions, after the key patches.
    AddCreateVolumePermission {
        region: String,
        snapshot_id: String,
        accounts: Vec<String>,
    },
    /// EC2 ModifySnapshotAttribute createVolumePermission remove: exclusive mode, for the permissions no
    /// selecting rule grants.
    RemoveCreateVolumePermission {
        region: String,
        snapshot_id: String,
        permissions: Vec<VolumePermission>,
    },
    /// EC2 EnableImageDeprecation.
    DeprecateImage {
        region: String,
        image_id: String,
        deprecate_at: Timestamp,
    },
    /// EC2 EnableImageDeregistrationProtection (`WithCooldown` when `with_cooldown`).
    ProtectImage {
        region: String,
        image_id: String,
        with_cooldown: bool,
    },
    /// SSM PutParameter (DataType `aws:ec2:image`): the rule's latest AMI in the region. Applied last,
    /// once the image is shared, so a launch template never follows it to an AMI it cannot launch.
    PutParameter {
        region: String,
        name: String,
        image_id: String,
        /// The version read before deciding: the writes after it are the ones to check ours against.
        after_version: Option<i64>,
        /// When the image's family began (what makes one image newer than another).
        created: Option<Timestamp>,
    },
    /// EC2 CreateTags of ami-share's status tags: applied last, and only if every other action succeeded,
    /// so the status never claims what did not happen.
    SetStatus {
        region: String,
        image_id: String,
        tags: Tags,
    },
}

/// A copy of an image made by ami-share, marked as such by its tags (applied at creation, through
/// TagSpecifications, so no event ever sees the copy unmarked, and a copy is never copied again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageCopy {
    /// Why the copy is made.
    pub kind: CopyKind,
    /// Where the copy is made (CopyImage is called there).
    pub region: String,
    pub source_region: String,
    pub source_image_id: String,
    pub name: String,
    pub description: String,
    /// The key to encrypt the copy with; `None`: as EC2 does by default.
    pub kms_key_arn: Option<String>,
    /// Makes a retried CopyImage return the copy already made instead of a second one.
    pub client_token: String,
    pub tags: Tags,
    pub snapshot_tags: Tags,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateTags {
                region,
                resources,
                tags,
            } => write!(
                f,
                "tag {} in {region}: {}",
                resources.join(", "),
                pairs(tags)
            ),
            Self::PatchKeyPolicy {
                region,
                key_arn,
                admit,
                limit_to_ec2,
                ..
            } => {
                if !admit.is_empty() {
                    write!(
                        f,
                        "let {admit} use KMS key {key_arn} in {region} through EC2"
                    )?;
                } else {
                    write!(
                        f,
                        "limit the grantees of KMS key {key_arn} in {region} to use through EC2"
                    )?;
                }
                match limit_to_ec2 {
                    true => write!(
                        f,
                        " (ami-share's statements in its key policy, now limited by kms:ViaService)"
                    ),
                    false => write!(f, " (ami-share's statements in its key policy)"),
                }
            }
            Self::AddLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                let to: Vec<String> = permissions.iter().map(ToString::to_string).collect();
                write!(f, "share {image_id} in {region} with {}", to.join(", "))
            }
            Self::RemoveLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                let from: Vec<String> = permissions.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "unshare {image_id} in {region} from {} (exclusive: no rule grants it)",
                    from.join(", ")
                )
            }
            Self::SetStatus {
                region,
                image_id,
                tags,
            } => write!(f, "mark {image_id} in {region}: {}", pairs(tags)),
            Self::CopyImage(copy) if copy.kind == CopyKind::Reencrypted => write!(
                f,
                "copy {} in {} as {:?}, re-encrypted with KMS key {}, to share the copy instead",
                copy.source_image_id,
                copy.region,
                copy.name,
                copy.kms_key_arn.as_deref().unwrap_or("(default)")
            ),
            Self::CopyImage(copy) => {
                write!(
                    f,
                    "copy {} from {} to {} as {:?}",
                    copy.source_image_id, copy.source_region, copy.region, copy.name
                )?;
                match &copy.kms_key_arn {
                    Some(key) => write!(f, ", encrypted with KMS key {key}"),
                    None => Ok(()),
                }
            }
            Self::AddCreateVolumePermission {
                region,
                snapshot_id,
                accounts,
            } => write!(
                f,
                "let {} create volumes from snapshot {snapshot_id} in {region} (needed to copy the AMI)",
                accounts.join(", ")
            ),
            Self::RemoveCreateVolumePermission {
                region,
                snapshot_id,
                permissions,
            } => {
                let from: Vec<String> = permissions.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "revoke create-volume permission on snapshot {snapshot_id} in {region} from {} (exclusive: no rule grants it)",
                    from.join(", ")
                )
            }
            Self::DeprecateImage {
                region,
                image_id,
                deprecate_at,
            } => write!(f, "deprecate {image_id} in {region} at {deprecate_at}"),
            Self::ProtectImage {
                region,
                image_id,
                with_cooldown,
            } => write!(
                f,
                "protect {image_id} in {region} from deregistration{}",
                match with_cooldown {
                    true => " (with the 24-hour cooldown)",
                    false => "",
                }
            ),
            Self::PutParameter {
                region,
                name,
                image_id,
                ..
            } => write!(f, "point SSM parameter {name} in {region} at {image_id}"),
        }
    }
}

impl Action {
    /// The region its call is made in.
    pub fn region(&self) -> &str {
        match self {
            Self::CreateTags { region, .. }
            | Self::PatchKeyPolicy { region, .. }
            | Self::AddLaunchPermissions { region, .. }
            | Self::RemoveLaunchPermissions { region, .. }
            | Self::AddCreateVolumePermission { region, .. }
            | Self::RemoveCreateVolumePermission { region, .. }
            | Self::DeprecateImage { region, .. }
            | Self::ProtectImage { region, .. }
            | Self::PutParameter { region, .. }
            | Self::SetStatus { region, .. } => region,
            Self::CopyImage(copy) => &copy.region,
        }
    }
}

pub(super) fn pairs(tags: &Tags) -> String {
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::plan::*;

    #[test]
    fn actions_print_for_a_person() {
        let p = plan(&desired(), &observed(image(ImageState::Available)));
        assert_eq!(
            p.actions[0].to_string(),
            "tag ami-12345678, snap-1 in us-east-1: shared=yes, team=platform"
        );
        assert_eq!(
            p.actions[1].to_string(),
            format!(
                "share ami-12345678 in us-east-1 with organization {ORG}, account 210987654321"
            )
        );
    }

    // --- copies to other regions ---------------------------------------------------------------------
}
