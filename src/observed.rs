//! What ami-share saw in AWS, as plain data: the input of rule selection and planning.
//!
//! Built by the AWS edge (`aws::sdk`) from describe calls; built by hand in unit tests. No SDK types here,
//! so the pure core never depends on the SDK's shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::targets::{AccountId, LaunchPermission, VolumePermission};
use crate::time::Timestamp;

/// An image's lifecycle state (EC2 `ImageState`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ImageState {
    #[default]
    Pending,
    Available,
    Failed,
    Deregistered,
    Disabled,
    /// EC2's passing state between two others (for example while a copy completes).
    Transient,
    /// A state this version does not know (`invalid`, `error`, or a new one).
    Other(String),
}

impl ImageState {
    pub fn from_name(name: &str) -> Self {
        match name {
            "pending" => Self::Pending,
            "available" => Self::Available,
            "failed" => Self::Failed,
            "deregistered" => Self::Deregistered,
            "disabled" => Self::Disabled,
            "transient" => Self::Transient,
            other => Self::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ImageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Available => "available",
            Self::Failed => "failed",
            Self::Deregistered => "deregistered",
            Self::Disabled => "disabled",
            Self::Transient => "transient",
            Self::Other(name) => name,
        })
    }
}

impl ImageState {
    /// A state after which nothing can be tagged, shared or copied (EC2 keeps a deregistered image's id
    /// only for a while, a failed one never became usable, a disabled one is hidden until re-enabled).
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Failed | Self::Deregistered | Self::Disabled)
    }
}

impl Serialize for ImageState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

pub type Tags = BTreeMap<String, String>;

/// How an AMI came to be. Known from the CloudTrail event, or, for a state-change event, from the image
/// itself (`SourceInstanceId` is set by CreateImage, `SourceImageId` by CopyImage).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum CreatedBy {
    CreateImage,
    CopyImage,
    /// Also what an image reads as when it tells nothing of its making.
    #[default]
    RegisterImage,
}

impl fmt::Display for CreatedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CreateImage => "CreateImage",
            Self::CopyImage => "CopyImage",
            Self::RegisterImage => "RegisterImage",
        })
    }
}

/// An EBS snapshot behind one of the image's block devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedSnapshot {
    pub snapshot_id: String,
    /// Whether it is encrypted: from the image's block device mapping, then from DescribeSnapshots.
    /// `None` when neither said.
    pub encrypted: Option<bool>,
    /// The ARN of the KMS key that encrypts it (DescribeSnapshots; `None` if unencrypted or not read).
    pub kms_key_id: Option<String>,
    /// `None` until read: DescribeSnapshots is called only when snapshot tags are wanted, or when the image
    /// is to be shared and its snapshots may be encrypted.
    pub tags: Option<Tags>,
    /// Who may create volumes from it (createVolumePermission); `None` until read (only when a rule
    /// grants it, or an exclusive rule may revoke it).
    pub create_volume_permissions: Option<BTreeSet<VolumePermission>>,
    /// The other AMIs of the account it backs, and the accounts their rules grant createVolumePermission;
    /// read only where an exclusive rule may revoke it (what they grant is not revoked).
    pub other_images: Option<OtherImages>,
}

/// The other AMIs registered on a snapshot, and what their selecting rules grant on it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OtherImages {
    pub image_ids: Vec<String>,
    pub create_volume_accounts: BTreeSet<AccountId>,
}

/// What DescribeSnapshots tells of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotFacts {
    pub tags: Tags,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

/// Who manages a KMS key (DescribeKey `KeyManager`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyManager {
    /// An AWS managed key (`aws/ebs`): its policy cannot be changed, so what it encrypts cannot be shared.
    Aws,
    /// A customer managed key: its owner decides its policy.
    Customer,
    /// A value this version does not know: treated as a key ami-share cannot open.
    Other(String),
}

/// A KMS key that encrypts an image's snapshots (or is configured to re-encrypt a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedKey {
    /// The key ARN, as DescribeKey resolved it.
    pub arn: String,
    pub manager: KeyManager,
    /// `Enabled`, `Disabled`, `PendingDeletion`, …: only an enabled key can be used by anyone.
    pub state: String,
    /// The key policy (`default`); `None` until read (it is read only for keys ami-share may change).
    pub policy: Option<String>,
    /// The key's tags (ListResourceTags), where its owner approves ami-share; `None`: not read, or
    /// not readable by the function.
    pub tags: Option<Tags>,
    /// The key's aliases (`alias/…`, ListAliases), read only when the config names keys by alias.
    pub aliases: Vec<String>,
}

impl ObservedKey {
    pub fn is_enabled(&self) -> bool {
        self.state == "Enabled"
    }
}

/// EC2's deregistration protection of an image, weakest first: while it is on, DeregisterImage refuses
/// the image; with the cooldown, it stays on for 24 hours after someone turns it off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protection {
    #[default]
    Off,
    On,
    WithCooldown,
}

impl Protection {
    pub fn is_off(&self) -> bool {
        *self == Self::Off
    }

    /// DescribeImages' `DeregistrationProtection`: `enabled-with-cooldown`, `enabled-without-cooldown`
    /// (or `enabled`), `disabled`, or absent. A protection turned off whose cooldown still runs reads as
    /// off: it ends on its own, and turning it on again is what a rule asks.
    pub fn from_ec2(value: Option<&str>) -> Self {
        match value {
            Some("enabled-with-cooldown") => Self::WithCooldown,
            Some(v) if v.starts_with("enabled") => Self::On,
            _ => Self::Off,
        }
    }
}

/// The image as DescribeImages (plus the attribute and snapshot reads) showed it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedImage {
    pub image_id: String,
    pub region: String,
    pub name: Option<String>,
    pub description: Option<String>,
    /// EC2's `CreationDate` (ISO 8601).
    pub creation_date: Option<Timestamp>,
    /// EC2's `DeprecationTime`, when deprecation is set.
    pub deprecation_time: Option<Timestamp>,
    /// EC2's `DeregistrationProtection`.
    pub protection: Protection,
    /// Its product codes (Marketplace): such an AMI can never be public.
    pub product_codes: Vec<String>,
    /// Whether the region's image block public access is on (GetImageBlockPublicAccessState); read only
    /// when a rule would make the image public.
    pub public_sharing_blocked: Option<bool>,
    pub owner_id: String,
    pub state: ImageState,
    pub tags: Tags,
    /// How the image was made, as the image tells: `SourceInstanceId` is set only by CreateImage,
    /// `SourceImageId` (without it) by CopyImage, neither by RegisterImage. So every event about one image
    /// selects the same rules. (AMIs made before AWS added these fields in 2024 read as RegisterImage;
    /// CreateRestoreImageTask reads as CopyImage.)
    pub created_by: CreatedBy,
    /// The image this one was made from, as EC2 records it: the one fact about an image's origin nobody
    /// in the account can write. (Its tags, name and description anyone with `ec2:CreateTags` or
    /// `ec2:CreateImage` can.)
    pub source: Option<SourceImage>,
    pub snapshots: Vec<ObservedSnapshot>,
    /// `None` until read (DescribeImageAttribute is only called when sharing is wanted).
    pub launch_permissions: Option<BTreeSet<LaunchPermission>>,
    /// The keys of this account that encrypt its snapshots, by key ARN; read only when it is to be shared.
    pub keys: BTreeMap<String, ObservedKey>,
    /// The SSM parameters the rules name, in the image's region; read only once it can be shared.
    pub parameters: BTreeMap<String, ObservedParameter>,
}

/// DescribeImages `SourceImageId` and `SourceImageRegion`: EC2 writes them on every copy (CopyImage,
/// CreateRestoreImageTask) and, for CreateImage, names the instance's AMI. Images made before AWS added
/// these fields (2024) have none.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceImage {
    pub image_id: String,
    pub region: Option<String>,
}

/// An SSM parameter that is to hold a rule's latest AMI id in a region.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedParameter {
    /// Its value; `None`: there is no such parameter yet.
    pub value: Option<String>,
    /// Its version when it was read (SSM counts each write): what a write after it must not undo.
    pub version: Option<i64>,
    /// The `CreationDate` of the image the value names, when that is another image of this account in
    /// the region: a newer one is never replaced by an older one (events arrive in any order).
    pub value_created: Option<Timestamp>,
}

impl ObservedImage {
    /// Whether any snapshot is, or may be, encrypted (the block device mapping did not say).
    pub fn may_be_encrypted(&self) -> bool {
        self.snapshots.iter().any(|s| s.encrypted != Some(false))
    }
}

/// ami-share's copies of an image of one kind in one region (a re-encrypted copy beside it, or a copy in
/// another region), and the key to make one with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedCopies {
    /// The copies found by their marks (any state), each observed as an image; the one to be shared
    /// with its launch permissions, snapshots and keys.
    pub copies: Vec<ObservedImage>,
    /// The configured key as DescribeKey resolved it in that region: read only when a copy is to be made
    /// with a key. `Some(None)`: no such key there.
    pub key: Option<Option<ObservedKey>>,
    /// Images found by the marks that EC2 does not record as copies of the source, each with why: never
    /// taken for its copies.
    pub ignored: Vec<String>,
}

/// Everything reconciling one image observed: the input of [`crate::plan::plan`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub image: ObservedImage,
    /// Only when the image cannot be shared as it is and a selecting rule sets `reencrypt`.
    pub reencryption: Option<ObservedCopies>,
    /// Per target region of the rules' `copy`: its copies, or `None` when that region could not be
    /// observed (the reconciler records why; nothing is planned there). Read only once the image is
    /// available (CopyImage needs an available source).
    pub regional: BTreeMap<String, Option<ObservedCopies>>,
    /// The time of the observation, when known: a deprecation time already past cannot be set (EC2
    /// refuses it), so a rule's overdue deprecation takes effect at once instead.
    pub now: Option<Timestamp>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_states_read_and_print_as_ec2_names_them() {
        let names = [
            "pending",
            "available",
            "failed",
            "deregistered",
            "disabled",
            "transient",
            "error",
        ];
        for name in names {
            let state = ImageState::from_name(name);
            assert_eq!(state.to_string(), name);
            assert_eq!(serde_json::to_value(&state).unwrap(), name);
        }
        assert_eq!(ImageState::from_name("transient"), ImageState::Transient);
        assert!(matches!(
            ImageState::from_name("error"),
            ImageState::Other(_)
        ));
        let terminal: Vec<_> = names
            .into_iter()
            .filter(|n| ImageState::from_name(n).is_terminal())
            .collect();
        assert_eq!(terminal, ["failed", "deregistered", "disabled"]);
    }
}
