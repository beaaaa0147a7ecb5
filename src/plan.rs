//! Planning: what the selecting rules want × what AWS has → the calls still needed.
//!
//! Pure and total. The plan holds only what is missing, so applying it and planning again on the state
//! it produced yields an empty plan: duplicate events, retries and re-runs change nothing. Calls are
//! grouped to the fewest: one CreateTags per distinct set of missing tags (normally one for the image and
//! all its snapshots), one PutKeyPolicy per key that lacks a grantee, one ModifyImageAttribute for all
//! missing launch permissions.
//!
//! Encrypted snapshots: an AMI is shared only when every key of its snapshots can be opened to the share
//! targets, that is, when it is an enabled customer managed key of the AMI's own account. Otherwise
//! (the AWS managed `aws/ebs` key, another account's key, a disabled key, a policy that would exceed
//! KMS's limit) sharing it would hand out an AMI nobody can launch: it is **not shared**, it gets a status
//! tag saying why, and, when a rule sets `reencrypt`, a copy re-encrypted with that key is made and shared
//! instead (the copy is planned through this same function).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::config::MAX_TAGS_PER_RESOURCE;
use crate::distribution::{TemplateValues, is_before, next_minute, same_minute};
use crate::key_policy::{self, KeyGrantees};
use crate::keys::{self, KeyArn, KeyRef};
use crate::markers::{self, CopyKind, Status};
use crate::observed::{
    ImageState, KeyManager, Observed, ObservedCopies, ObservedImage, ObservedKey, Tags,
};
use crate::provenance::{Provenance, provenance};
use crate::rules::{CopyWanted, Desired};
use crate::targets::{LaunchPermission, VolumePermission};

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
        /// The policy as merged into the one planning read: what the plan previews. (Apply writes a merge
        /// into a policy read just before, in case it changed meanwhile.)
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
        deprecate_at: String,
    },
    /// SSM PutParameter (DataType `aws:ec2:image`): the rule's latest AMI in the region. Applied last,
    /// once the image is shared, so a launch template never follows it to an AMI it cannot launch.
    PutParameter {
        region: String,
        name: String,
        image_id: String,
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
            Self::PutParameter {
                region,
                name,
                image_id,
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
            | Self::PutParameter { region, .. }
            | Self::SetStatus { region, .. } => region,
            Self::CopyImage(copy) => &copy.region,
        }
    }
}

fn pairs(tags: &Tags) -> String {
    let pairs: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.join(", ")
}

/// The actions for one image, and what was left for later, or not done at all, and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Work deliberately not planned now (e.g. sharing a pending image), with the reason.
    pub deferred: Vec<String>,
    /// Why the image is not shared as it is (its snapshots' keys), or a copy cannot be made, one
    /// sentence per cause.
    pub blocked: Vec<String>,
    /// Each target region of the rules' `copy`, and where its copy stands.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub regions: BTreeMap<String, RegionCopy>,
    /// What a person should know that changes nothing: images found by ami-share's marks that EC2 does
    /// not record as copies (ignored), configured targets that need no grant.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Where the copy of an image in one target region stands, as planning saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RegionCopy {
    /// The source is not available yet: CopyImage needs an available source.
    Waiting,
    /// No copy yet: the plan makes it.
    ToCopy,
    /// The copy exists; when available, the plan holds what it still lacks, or why it cannot be shared.
    Copy {
        image_id: String,
        state: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        blocked: Option<String>,
    },
    /// No copy can be made: why.
    Blocked { reason: String },
    /// The region could not be read (the failure says why): nothing planned there.
    Unread,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

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
fn shares_now(desired: &Desired, image: &ObservedImage) -> bool {
    image.state == ImageState::Available && !desired.launch_permissions.is_empty()
}

/// Whether the image is to be copied to other regions now: available, and a rule copies it elsewhere.
fn copies_now(desired: &Desired, image: &ObservedImage) -> bool {
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
        block_public_access: shares_now(desired, image)
            && desired
                .launch_permissions
                .contains(&LaunchPermission::Public)
            && !image
                .launch_permissions
                .as_ref()
                .is_some_and(|p| p.contains(&LaunchPermission::Public)),
    }
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

/// Why an image cannot be shared as it is: a short summary for the status tag (EC2 allows 256
/// characters) and the whole story, with what to do, for the plan and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub summary: String,
    pub detail: String,
    /// Whether a copy re-encrypted with a key of this account would be shareable: true for a snapshot on
    /// the AWS managed key or on another account's key; false for a disabled key, a key policy ami-share
    /// cannot merge into, or unknown encryption (a copy would fail, or meet the same problem).
    pub cured_by_copy: bool,
}

impl Blocker {
    fn new(summary: String, detail: String) -> Self {
        Self {
            summary,
            detail,
            cured_by_copy: false,
        }
    }

    fn cured_by_copy(summary: String, detail: String) -> Self {
        Self {
            cured_by_copy: true,
            ..Self::new(summary, detail)
        }
    }
}

/// The key id part of a key ARN, for short messages.
fn key_id(arn: &KeyArn) -> &str {
    arn.as_str().rsplit('/').next().unwrap_or(arn.as_str())
}

/// Why a customer managed key of this account may not be opened, if its owner has not approved it
/// ([`keys::approval`]): the AMI is then not shared, and nothing it holds is copied to another key (a
/// copy re-encrypted with an approved key would share what the unapproved key protects just the same).
fn unapproved(
    arn: &KeyArn,
    key: &ObservedKey,
    snapshots: &str,
    desired: &Desired,
) -> Option<Blocker> {
    if keys::approval(arn, key.tags.as_ref(), &key.aliases, &desired.approved_keys).is_some() {
        return None;
    }
    let id = key_id(arn);
    let tag = format!("{}={}", keys::APPROVAL_TAG, keys::APPROVAL_TAG_VALUE);
    Some(Blocker::new(
        format!(
            "{snapshots} uses KMS key {id}, not approved for ami-share: to share, tag the key {tag} or list it in keys.approved"
        ),
        format!(
            "snapshot {snapshots} is encrypted with KMS key {arn}, whose owner has not approved ami-share: its policy is left as it is and the AMI is not shared. To approve it, its owner tags it (aws kms tag-resource --region {} --key-id {arn} --tags TagKey={},TagValue={}), or the config lists it in keys.approved",
            arn.region(),
            keys::APPROVAL_TAG,
            keys::APPROVAL_TAG_VALUE
        ),
    ))
}

/// Whether the config names the key by ARN or id: the only consent ami-share can see for another
/// account's key (whose tags and aliases it cannot read).
fn named_by_arn(arn: &KeyArn, desired: &Desired) -> bool {
    desired
        .approved_keys
        .iter()
        .any(|r| !r.is_alias() && r.names(arn, &[]))
}

/// Why what the image's snapshots hold may not be copied to another key (a copy to another region, which
/// EC2 encrypts with that region's key): each encrypted snapshot must be unencrypted, on the AWS managed
/// key, on an approved key of this account, or on a key the config names by ARN.
fn copy_blockers(desired: &Desired, image: &ObservedImage) -> Vec<Blocker> {
    let mut by_key: BTreeMap<Option<&str>, Vec<&str>> = BTreeMap::new();
    for snapshot in image.snapshots.iter().filter(|s| s.encrypted == Some(true)) {
        by_key
            .entry(snapshot.kms_key_id.as_deref())
            .or_default()
            .push(&snapshot.snapshot_id);
    }
    by_key
        .into_iter()
        .filter_map(|(key_arn, snapshots)| {
            let snapshots = snapshots.join(", ");
            let unknown = || {
                Some(Blocker::new(
                    format!("{snapshots} is encrypted with a key ami-share cannot tell"),
                    format!("snapshot {snapshots} is encrypted with a key EC2 did not report or ami-share cannot read"),
                ))
            };
            let Some(arn) = key_arn.and_then(|k| k.parse::<KeyArn>().ok()) else {
                return unknown();
            };
            if named_by_arn(&arn, desired) {
                return None;
            }
            if arn.account() != image.owner_id {
                return Some(Blocker::new(
                    format!("{snapshots} uses KMS key {} of account {}", key_id(&arn), arn.account()),
                    format!(
                        "snapshot {snapshots} is encrypted with KMS key {arn} of account {}: with its owner's consent, list it in keys.approved",
                        arn.account()
                    ),
                ));
            }
            let Some(key) = image.keys.get(arn.as_str()) else {
                return unknown();
            };
            match key.manager {
                KeyManager::Aws => None,
                KeyManager::Customer => unapproved(&arn, key, &snapshots, desired),
                KeyManager::Other(_) => unknown(),
            }
        })
        .collect()
}

/// The key policy patches sharing needs, or why the image cannot be shared as it is.
pub fn key_patches(desired: &Desired, image: &ObservedImage) -> Result<Vec<Action>, Vec<Blocker>> {
    let mut blocked = Vec::new();
    // Key ARN → the snapshots it encrypts, so a message names both.
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for snapshot in &image.snapshots {
        let id = &snapshot.snapshot_id;
        match (snapshot.encrypted, snapshot.kms_key_id.as_deref()) {
            (Some(false), _) => {}
            (None, _) => blocked.push(Blocker::new(
                format!("{id}: encryption unknown"),
                format!("ami-share could not tell whether snapshot {id} is encrypted"),
            )),
            (Some(true), None) => blocked.push(Blocker::new(
                format!("{id} is encrypted with an unknown key"),
                format!("snapshot {id} is encrypted but EC2 reported no KMS key for it"),
            )),
            (Some(true), Some(key)) => by_key.entry(key).or_default().push(id),
        }
    }
    let mut patches = Vec::new();
    for (key_arn, snapshots) in by_key {
        let snapshots = snapshots.join(", ");
        let arn = match key_arn.parse::<KeyArn>() {
            Ok(arn) => arn,
            Err(e) => {
                blocked.push(Blocker::new(
                    format!("{snapshots}: unreadable key id"),
                    format!("snapshot {snapshots}: {e}"),
                ));
                continue;
            }
        };
        let id = key_id(&arn);
        if arn.account() != image.owner_id {
            let summary = format!("{snapshots} uses KMS key {id} of account {}", arn.account());
            let detail = format!(
                "snapshot {snapshots} is encrypted with KMS key {arn} of account {}: only that account can let others use it (add ami-share's statements to that key's policy there, see README); or, with its owner's consent, list the key in keys.approved and set reencrypt on the rule to share a re-encrypted copy",
                arn.account()
            );
            // Re-encrypting it would share what another account's key protects: only with consent.
            blocked.push(match named_by_arn(&arn, desired) {
                true => Blocker::cured_by_copy(summary, detail),
                false => Blocker::new(
                    format!(
                        "{summary}; to share a re-encrypted copy, list the key in keys.approved (with its owner's consent) and set reencrypt.kms_key"
                    ),
                    detail,
                ),
            });
            continue;
        }
        let Some(key) = image.keys.get(key_arn) else {
            blocked.push(Blocker::new(
                format!("key {id} was not read"),
                format!("KMS key {arn} was not read"),
            ));
            continue;
        };
        if let KeyManager::Other(manager) = &key.manager {
            blocked.push(Blocker::new(
                format!("key {id} has key manager {manager}"),
                format!("KMS reports key manager {manager:?} for KMS key {arn}, which ami-share does not know how to open"),
            ));
            continue;
        }
        if key.manager == KeyManager::Aws {
            blocked.push(Blocker::cured_by_copy(
                format!("{snapshots} uses the AWS managed key aws/ebs, which cannot be shared"),
                format!(
                    "snapshot {snapshots} is encrypted with the AWS managed key {arn} (aws/ebs), whose policy cannot be changed: AWS does not let anyone else use it"
                ),
            ));
            continue;
        }
        if !key.is_enabled() {
            blocked.push(Blocker::new(
                format!("{snapshots} uses KMS key {id}, which is {}", key.state),
                format!(
                    "snapshot {snapshots} is encrypted with KMS key {arn}, which is {}: nobody can launch from it",
                    key.state
                ),
            ));
            continue;
        }
        if let Some(blocker) = unapproved(&arn, key, &snapshots, desired) {
            blocked.push(blocker);
            continue;
        }
        let grantees =
            KeyGrantees::for_launch_permissions(&desired.launch_permissions, arn.account());
        let Some(policy) = key.policy.as_deref() else {
            blocked.push(Blocker::new(
                format!("the policy of key {id} was not read"),
                format!("the policy of KMS key {arn} was not read"),
            ));
            continue;
        };
        match key_policy::merge(policy, &grantees, arn.partition()) {
            Ok(None) => {}
            Ok(Some(merged)) => patches.push(Action::PatchKeyPolicy {
                region: image.region.clone(),
                key_arn: arn.to_string(),
                admit: merged.admitted,
                limit_to_ec2: merged.limited_to_ec2,
                grantees,
                policy: merged.policy,
            }),
            Err(e) => {
                let summary = match &e {
                    key_policy::KeyPolicyError::TooLarge { .. } => {
                        format!("the policy of key {id} would exceed 32 KB")
                    }
                    _ => format!("the policy of key {id} cannot be merged into"),
                };
                blocked.push(Blocker::new(
                    summary,
                    format!("KMS key {arn} of snapshot {snapshots}: {e}"),
                ));
            }
        }
    }
    if blocked.is_empty() {
        Ok(patches)
    } else {
        Err(blocked)
    }
}

/// The calls still needed to bring the observed image (and its re-encrypted copy, if any) to `desired`.
///
/// - `available`: missing tags, key grants and launch permissions (or, when the snapshots' keys cannot be
///   opened, a status tag and maybe the re-encrypted copy);
/// - `pending`: missing tags now; sharing is deferred (EC2 refuses to share a pending image with
///   `InvalidAMIID.Unavailable`), it happens on the "available" state-change event;
/// - any other state: nothing.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let image = &observed.image;
    let mut plan = Plan::default();
    match image.state {
        ImageState::Available => {}
        ImageState::Pending => {
            if !desired.launch_permissions.is_empty() {
                plan.deferred.push(format!(
                    "sharing {} waits until it is available (EC2 cannot share a pending image); the \"EC2 AMI State Change\" event to available triggers it",
                    image.image_id
                ));
            }
        }
        ref other => {
            plan.deferred.push(format!(
                "{} is {other}: nothing to tag or share",
                image.image_id
            ));
            return plan;
        }
    }
    let mut after_tags = Vec::new();
    let mut status = None;
    let mut shareable = true;
    if shares_now(desired, image) {
        match key_patches(desired, image) {
            Ok(patches) => {
                after_tags.extend(patches);
                let refusal = match reads_needed(desired, image).block_public_access {
                    true => public_refusal(image),
                    false => None,
                };
                plan.blocked.extend(refusal.clone());
                after_tags.extend(share_action(desired, image, refusal.is_none()));
                after_tags.extend(create_volume_actions(desired, image));
                // A status written while the image could not be shared is set right once it is.
                if image.tags.contains_key(markers::STATUS) {
                    status = Some(markers::status_tags(
                        Status::Shared,
                        "shared as configured: its snapshots' keys admit the share targets",
                    ));
                }
            }
            Err(blocked) => {
                shareable = false;
                let (tags, copy_plan) = not_shareable(desired, observed, &blocked);
                status = Some(tags);
                plan.blocked = blocked.into_iter().map(|b| b.detail).collect();
                if let Some(copy_plan) = copy_plan {
                    after_tags.extend(copy_plan.actions);
                    plan.deferred.extend(copy_plan.deferred);
                    plan.blocked.extend(copy_plan.blocked);
                    plan.notes.extend(copy_plan.notes);
                }
                if let Some(reencryption) = &observed.reencryption {
                    plan.notes.extend(reencryption.ignored.iter().cloned());
                }
            }
        }
    }
    plan.actions.extend(tag_actions(
        &desired.image_tags,
        &desired.snapshot_tags,
        image,
    ));
    plan.actions.extend(exclusive_action(desired, image));
    plan.actions
        .extend(exclusive_volume_actions(desired, image));
    plan.actions
        .extend(deprecation_action(desired, image, observed.now.as_deref()));
    plan.actions.extend(after_tags);
    let missing_status: Tags = status
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| image.tags.get(k) != Some(v))
        .collect();
    if !missing_status.is_empty() {
        plan.actions.push(Action::SetStatus {
            region: image.region.clone(),
            image_id: image.image_id.clone(),
            tags: missing_status,
        });
    }
    if shareable && image.state == ImageState::Available {
        parameter_actions(desired, image, &mut plan);
    }
    if let Some(wanted) = &desired.copy {
        regional_copies(desired, wanted, observed, &mut plan);
    }
    plan
}

/// EnableImageDeprecation, when the image is available and not deprecated at the wanted minute. (A
/// pending image waits: it is not launchable yet, and its available event comes.) When the wanted time is
/// already past (an old image, or a copy made late), which EC2 refuses, the image is deprecated at the
/// next minute, unless it is deprecated already.
fn deprecation_action(
    desired: &Desired,
    image: &ObservedImage,
    now: Option<&str>,
) -> Option<Action> {
    let wanted = desired.deprecate_at.as_ref()?;
    if image.state != ImageState::Available {
        return None;
    }
    let current = image.deprecation_time.as_deref();
    let at = match now {
        Some(now) if !is_before(now, wanted) => {
            if current.is_some_and(|t| !is_before(now, t)) {
                return None;
            }
            next_minute(now)?
        }
        _ => wanted.clone(),
    };
    if current.is_some_and(|t| same_minute(t, &at)) {
        return None;
    }
    Some(Action::DeprecateImage {
        region: image.region.clone(),
        image_id: image.image_id.clone(),
        deprecate_at: at,
    })
}

/// Exclusive mode: the launch permissions the image has that no selecting rule grants, as one removal.
/// Removing never needs a key, so it is planned whether or not the image can be shared. The owner's own
/// account is never removed.
fn exclusive_action(desired: &Desired, image: &ObservedImage) -> Option<Action> {
    if !desired.exclusive || image.state != ImageState::Available {
        return None;
    }
    let extra: Vec<LaunchPermission> = image
        .launch_permissions
        .as_ref()?
        .iter()
        .filter(|p| !desired.launch_permissions.contains(p))
        .filter(|p| !matches!(p, LaunchPermission::Account(id) if id.as_str() == image.owner_id))
        .cloned()
        .collect();
    (!extra.is_empty()).then(|| Action::RemoveLaunchPermissions {
        region: image.region.clone(),
        image_id: image.image_id.clone(),
        permissions: extra,
    })
}

/// Exclusive mode, on the snapshots: the createVolumePermissions no selecting rule grants (accounts the
/// rules' `share.create_volume_permission` does not list, and `Group=all`), one removal per snapshot.
/// Without it, an account dropped from the rules could still read the whole disk. The owner's own
/// account is never removed.
fn exclusive_volume_actions(desired: &Desired, image: &ObservedImage) -> Vec<Action> {
    if !desired.exclusive || image.state != ImageState::Available {
        return Vec::new();
    }
    image
        .snapshots
        .iter()
        .filter_map(|snapshot| {
            // A snapshot may back other AMIs too: what their rules grant on it stays.
            let others = snapshot.other_images.as_ref();
            let extra: Vec<VolumePermission> = snapshot
                .create_volume_permissions
                .as_ref()?
                .iter()
                .filter(|p| match p {
                    VolumePermission::Account(id) => {
                        id.as_str() != image.owner_id
                            && !desired.create_volume_accounts.contains(id)
                            && !others.is_some_and(|o| o.create_volume_accounts.contains(id))
                    }
                    VolumePermission::Public => true,
                })
                .cloned()
                .collect();
            (!extra.is_empty()).then(|| Action::RemoveCreateVolumePermission {
                region: image.region.clone(),
                snapshot_id: snapshot.snapshot_id.clone(),
                permissions: extra,
            })
        })
        .collect()
}

/// createVolumePermission for the accounts each snapshot lacks.
fn create_volume_actions(desired: &Desired, image: &ObservedImage) -> Vec<Action> {
    if desired.create_volume_accounts.is_empty() {
        return Vec::new();
    }
    image
        .snapshots
        .iter()
        .filter_map(|snapshot| {
            let have = snapshot.create_volume_permissions.as_ref();
            let missing: Vec<String> = desired
                .create_volume_accounts
                .iter()
                .filter(|a| {
                    !have.is_some_and(|h| h.contains(&VolumePermission::Account((*a).clone())))
                })
                .map(|a| a.as_str().to_string())
                .collect();
            (!missing.is_empty()).then(|| Action::AddCreateVolumePermission {
                region: image.region.clone(),
                snapshot_id: snapshot.snapshot_id.clone(),
                accounts: missing,
            })
        })
        .collect()
}

/// PutParameter for each rule parameter that does not name this image, unless it names a newer image
/// (events arrive in any order: an older image's late event must not move the parameter back).
fn parameter_actions(desired: &Desired, image: &ObservedImage, plan: &mut Plan) {
    for name in &desired.ssm_parameters {
        let Some(current) = image.parameters.get(name) else {
            continue;
        };
        if current.value.as_deref() == Some(image.image_id.as_str()) {
            continue;
        }
        let ours = desired.family_created.as_deref();
        if let (Some(theirs), Some(ours)) = (current.value_created.as_deref(), ours)
            && is_before(ours, theirs)
        {
            plan.deferred.push(format!(
                "SSM parameter {name} in {} keeps {}, which is newer than {}",
                image.region,
                current.value.as_deref().unwrap_or_default(),
                image.image_id
            ));
            continue;
        }
        plan.actions.push(Action::PutParameter {
            region: image.region.clone(),
            name: name.clone(),
            image_id: image.image_id.clone(),
        });
    }
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

/// The copies to the rules' other regions: made once the source is available; each copy, once there,
/// planned like an image of its own under the source's rules (tags, key, shares), and never copied again.
fn regional_copies(desired: &Desired, wanted: &CopyWanted, observed: &Observed, plan: &mut Plan) {
    let source = &observed.image;
    let targets = copy_targets(wanted, source);
    if targets.is_empty() {
        return;
    }
    if source.state != ImageState::Available {
        let names: Vec<&str> = targets.iter().map(|(r, _)| r.as_str()).collect();
        plan.deferred.push(format!(
            "copies to {} wait until {} is available (CopyImage needs an available source)",
            names.join(", "),
            source.image_id
        ));
        for (region, _) in targets {
            plan.regions.insert(region.clone(), RegionCopy::Waiting);
        }
        return;
    }
    // What a key's owner has not approved is not copied to other keys either.
    let unapproved = copy_blockers(desired, source);
    if !unapproved.is_empty() {
        let why = unapproved
            .iter()
            .map(|b| b.detail.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        for (region, _) in targets {
            let reason = format!("not copied: {why}");
            plan.blocked.push(format!("no copy in {region}: {reason}"));
            plan.regions
                .insert(region.clone(), RegionCopy::Blocked { reason });
        }
        return;
    }
    for (region, key_ref) in targets {
        let status = match observed.regional.get(region.as_str()) {
            Some(Some(found)) => region_copy(
                desired,
                wanted,
                observed,
                region,
                key_ref.as_ref(),
                found,
                plan,
            ),
            None | Some(None) => RegionCopy::Unread,
        };
        plan.regions.insert(region.clone(), status);
    }
}

fn region_copy(
    desired: &Desired,
    wanted: &CopyWanted,
    observed: &Observed,
    region: &str,
    key_ref: Option<&KeyRef>,
    found: &ObservedCopies,
    plan: &mut Plan,
) -> RegionCopy {
    let source = &observed.image;
    let copy_desired = desired_for_copy(desired, source, CopyKind::Regional);
    plan.notes.extend(found.ignored.iter().cloned());
    if let Some(copy) = chosen_copy(&found.copies) {
        let copy_plan = self::plan(
            &copy_desired,
            &Observed {
                image: copy.clone(),
                now: observed.now.clone(),
                ..Observed::default()
            },
        );
        let blocked = copy_plan.blocked.first().cloned();
        plan.actions.extend(copy_plan.actions);
        plan.deferred.extend(copy_plan.deferred);
        plan.blocked.extend(copy_plan.blocked);
        plan.notes.extend(copy_plan.notes);
        plan.blocked
            .extend(duplicate_copies(&found.copies, copy, source, "copies"));
        return RegionCopy::Copy {
            image_id: copy.image_id.clone(),
            state: copy.state.to_string(),
            blocked,
        };
    }
    let mut blocked = |reason: String| {
        plan.blocked.push(format!("no copy in {region}: {reason}"));
        RegionCopy::Blocked { reason }
    };
    let failed = failed_copies(&found.copies);
    if failed.len() >= MAX_FAILED_COPIES {
        return blocked(too_many_failed(&failed, "copies"));
    }
    let key = match copy_key(key_ref, found.key.as_ref(), &source.owner_id, region) {
        Ok(key) => key,
        Err(why) => return blocked(why),
    };
    let values = TemplateValues {
        name: source.name.as_deref().unwrap_or(&source.image_id),
        description: source.description.as_deref().unwrap_or_default(),
        image_id: &source.image_id,
        source_region: &source.region,
        region,
    };
    let own = match wanted.source_tags {
        true => own_tags(source),
        false => Tags::new(),
    };
    plan.actions.push(Action::CopyImage(new_copy(CopyDraft {
        kind: CopyKind::Regional,
        source,
        region,
        key: key.as_ref(),
        name: wanted.name.render(&values, MAX_NAME_CHARS),
        description: wanted.description.render(&values, MAX_DESCRIPTION_CHARS),
        tags: with_marks(own, copy_desired.image_tags),
        snapshot_tags: desired.snapshot_tags.clone(),
        previous: &failed.into_iter().collect::<Vec<_>>(),
    })));
    plan.deferred.push(format!(
        "sharing the copy of {} in {region} waits until the copy is available",
        source.image_id
    ));
    RegionCopy::ToCopy
}

/// The ids of ami-share's copies (of one kind, in one region) that can no longer be used.
fn failed_copies(copies: &[ObservedImage]) -> BTreeSet<&str> {
    copies.iter().map(|c| c.image_id.as_str()).collect()
}

/// Why no more copies are made; `what`: "copies" or "re-encrypted copies".
fn too_many_failed(failed: &BTreeSet<&str>, what: &str) -> String {
    let ids: Vec<&str> = failed.iter().copied().collect();
    format!(
        "{} {what} failed ({}): deregister them to have ami-share try again",
        ids.len(),
        ids.join(", ")
    )
}

/// A note on usable copies beside the chosen one (made outside ami-share's idempotency, e.g. by hand).
fn duplicate_copies(
    copies: &[ObservedImage],
    chosen: &ObservedImage,
    source: &ObservedImage,
    what: &str,
) -> Option<String> {
    let duplicates: Vec<&str> = usable(copies)
        .filter(|c| c.image_id != chosen.image_id)
        .map(|c| c.image_id.as_str())
        .collect();
    (!duplicates.is_empty()).then(|| {
        format!(
            "{} also {what} of {} in {}; ami-share shares only {}: deregister the others",
            duplicates.join(", "),
            source.image_id,
            chosen.region,
            chosen.image_id
        )
    })
}

/// Whether the image is to be shared, cannot be as it is, and a copy re-encrypted with the rule's key
/// would cure that: then the reconciler observes the copy (or the key to make one with).
pub fn wants_reencrypted_copy(desired: &Desired, image: &ObservedImage) -> bool {
    desired.reencrypt_with.is_some()
        && reads_needed(desired, image).keys
        && key_patches(desired, image).is_err_and(|blocked| blocked.iter().all(|b| b.cured_by_copy))
}

/// At most this many re-encrypted copies of one image may fail before ami-share stops making new ones.
const MAX_FAILED_COPIES: usize = 3;

/// The status tags for an image that cannot be shared as it is, and the plan of its re-encrypted copy.
fn not_shareable(
    desired: &Desired,
    observed: &Observed,
    blocked: &[Blocker],
) -> (Tags, Option<Plan>) {
    let image = &observed.image;
    // Lead with what a copy cannot cure: it is what the operator must act on.
    let mut ordered: Vec<&Blocker> = blocked.iter().collect();
    ordered.sort_by_key(|b| b.cured_by_copy);
    let cause = match ordered.as_slice() {
        [one] => one.summary.clone(),
        [first, rest @ ..] => format!("{} (+{} more)", first.summary, rest.len()),
        [] => unreachable!("blocked has a reason"),
    };
    let curable = blocked.iter().all(|b| b.cured_by_copy);
    let not_shared = |reason: String| markers::status_tags(Status::NotShared, &reason);
    let key_ref = match &desired.reencrypt_with {
        Some(key_ref) if curable => key_ref,
        None if curable => {
            // ami-share never copies its own copies: a regional copy is cured at its making.
            let remedy = match provenance(image) {
                Provenance::Copy(copy) if copy.kind == CopyKind::Regional => format!(
                    "to share copies in {}, set its kms_key in the rule's copy.regions",
                    image.region
                ),
                _ => "to share a re-encrypted copy instead, set reencrypt.kms_key".to_string(),
            };
            return (not_shared(format!("{cause}; {remedy}")), None);
        }
        _ => return (not_shared(cause), None),
    };
    let mut shared_as_copy = markers::status_tags(
        Status::SharedAsCopy,
        &format!(
            "{cause}; shared instead: a copy re-encrypted with {key_ref} (tag {})",
            markers::REENCRYPTED_COPY
        ),
    );
    let Some(reencryption) = &observed.reencryption else {
        // Not observed: nothing can be planned for the copy yet (the reconciler observes it when needed).
        return (shared_as_copy, None);
    };
    if let Some(copy) = chosen_copy(&reencryption.copies) {
        shared_as_copy.insert(markers::REENCRYPTED_COPY.into(), copy.image_id.clone());
        let mut copy_plan = plan(
            &desired_for_copy(desired, image, CopyKind::Reencrypted),
            &Observed {
                image: copy.clone(),
                now: observed.now.clone(),
                ..Observed::default()
            },
        );
        copy_plan.blocked.extend(duplicate_copies(
            &reencryption.copies,
            copy,
            image,
            "re-encrypted copies",
        ));
        return (shared_as_copy, Some(copy_plan));
    }
    // No usable copy: the ones found failed; the one the image names may have been deregistered since.
    let failed = failed_copies(&reencryption.copies);
    if failed.len() >= MAX_FAILED_COPIES {
        let why = too_many_failed(&failed, "re-encrypted copies");
        return (
            not_shared(format!("{cause}; {why}")),
            Some(Plan {
                blocked: vec![why],
                ..Plan::default()
            }),
        );
    }
    let mut previous = failed;
    previous.extend(
        image
            .tags
            .get(markers::REENCRYPTED_COPY)
            .map(String::as_str),
    );
    let previous: Vec<&str> = previous.into_iter().collect();
    let key = copy_key(
        Some(key_ref),
        reencryption.key.as_ref(),
        &image.owner_id,
        &image.region,
    );
    match key {
        Ok(key) => {
            let description = format!(
                "{} re-encrypted with {key_ref} by ami-share, to be shared in its place",
                image.image_id
            );
            let marks = desired_for_copy(desired, image, CopyKind::Reencrypted).image_tags;
            let copy = new_copy(CopyDraft {
                kind: CopyKind::Reencrypted,
                source: image,
                region: &image.region,
                key: key.as_ref(),
                name: image.name.clone().unwrap_or_else(|| image.image_id.clone()),
                description: description.chars().take(MAX_DESCRIPTION_CHARS).collect(),
                tags: with_marks(own_tags(image), marks),
                snapshot_tags: desired.snapshot_tags.clone(),
                previous: &previous,
            });
            (
                shared_as_copy,
                Some(Plan {
                    actions: vec![Action::CopyImage(copy)],
                    deferred: vec![format!(
                        "sharing the re-encrypted copy of {} waits until the copy is available",
                        image.image_id
                    )],
                    ..Plan::default()
                }),
            )
        }
        Err(why) => (
            not_shared(format!("{cause}; no re-encrypted copy: {why}")),
            Some(Plan {
                blocked: vec![format!("no re-encrypted copy: {why}")],
                ..Plan::default()
            }),
        ),
    }
}

/// Copies that are, or will be, usable: available, pending, or in EC2's passing `transient` state.
fn usable(copies: &[ObservedImage]) -> impl Iterator<Item = &ObservedImage> {
    copies.iter().filter(|c| match &c.state {
        ImageState::Available | ImageState::Pending => true,
        ImageState::Other(state) => state == "transient",
        _ => false,
    })
}

/// The copy ami-share shares when there are several: the usable one with the lowest id.
pub fn chosen_copy(copies: &[ObservedImage]) -> Option<&ObservedImage> {
    usable(copies).min_by(|a, b| a.image_id.cmp(&b.image_id))
}

/// What a copy of `source` must have: the source's wanted tags, shares, snapshot permissions,
/// deprecation and parameters, plus its marks; never a copy of its own.
pub fn desired_for_copy(desired: &Desired, source: &ObservedImage, kind: CopyKind) -> Desired {
    let mut image_tags = desired.image_tags.clone();
    image_tags.extend(markers::copy_tags(kind, &source.image_id, &source.region));
    Desired {
        image_tags,
        // A copy is as old as its source, as EC2 dates the source (copies are never copied: a source is
        // always an image of its own).
        family_created: source.creation_date.clone(),
        reencrypt_with: None,
        copy: None,
        conflicts: Vec::new(),
        ..desired.clone()
    }
}

/// EC2's limits on an AMI's name and description.
const MAX_NAME_CHARS: usize = 128;
const MAX_DESCRIPTION_CHARS: usize = 255;

/// FNV-1a, 64 bits: the same in every build (std's hasher is not promised to be), for idempotency tokens
/// and names that must not change when the function is redeployed.
fn stable_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.join("\n").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The key a copy in `region` is to be encrypted with: `None` when none is configured, else the
/// configured key as KMS resolved it there, which must be an enabled customer managed key of the account
/// in that region; or why it cannot be used.
fn copy_key(
    key_ref: Option<&KeyRef>,
    key: Option<&Option<ObservedKey>>,
    owner_id: &str,
    region: &str,
) -> Result<Option<KeyArn>, String> {
    let Some(key_ref) = key_ref else {
        return Ok(None);
    };
    let key = match key {
        None => return Err(format!("KMS key {key_ref} was not read")),
        Some(None) => {
            return Err(format!(
                "KMS key {key_ref} not found in {region}: create it there (an alias names a key per region)"
            ));
        }
        Some(Some(key)) => key,
    };
    let arn: KeyArn = key.arn.parse()?;
    if key.manager != KeyManager::Customer {
        return Err(format!("KMS key {key_ref} is not customer managed"));
    }
    if arn.account() != owner_id || arn.region() != region {
        return Err(format!(
            "KMS key {key_ref} is not of account {owner_id} in {region}"
        ));
    }
    if !key.is_enabled() {
        return Err(format!("KMS key {key_ref} is {}", key.state));
    }
    Ok(Some(arn))
}

/// The source's own tags a copy takes: not AWS's reserved `aws:` ones (CreateTags refuses them), not
/// ami-share's bookkeeping.
fn own_tags(source: &ObservedImage) -> Tags {
    source
        .tags
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("aws:")
                && !markers::RESERVED.contains(&k.as_str())
                && k.as_str() != markers::REENCRYPTED_COPY
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `tags` with `marks` (the wanted tags and the copy's marks) over them, within EC2's 50 tags.
fn with_marks(tags: Tags, marks: Tags) -> Tags {
    let mut merged: Tags = tags
        .into_iter()
        .filter(|(k, _)| !marks.contains_key(k))
        .take(MAX_TAGS_PER_RESOURCE.saturating_sub(marks.len()))
        .collect();
    merged.extend(marks);
    merged
}

/// What a new copy is made of, before its token and final name are derived.
struct CopyDraft<'a> {
    kind: CopyKind,
    source: &'a ObservedImage,
    region: &'a str,
    key: Option<&'a KeyArn>,
    name: String,
    description: String,
    tags: Tags,
    snapshot_tags: Tags,
    /// Earlier copies (failed or gone): a new attempt needs a new token and a name of its own.
    previous: &'a [&'a str],
}

/// The CopyImage of a draft. The client token repeats for a retry of this copy (EC2 then returns the copy
/// already made), and changes once an earlier copy failed or was deregistered (EC2 would otherwise answer
/// with that unusable copy). AMI names are unique in an account and region: a copy after earlier ones
/// gets a name of its own.
fn new_copy(draft: CopyDraft) -> ImageCopy {
    let source = draft.source;
    let key = draft.key.map(KeyArn::as_str).unwrap_or_default();
    let identity: Vec<&str> = match draft.kind {
        // The re-encrypted copy's token is as it was before regional copies existed.
        CopyKind::Reencrypted => vec![source.image_id.as_str(), key],
        kind => vec![
            kind.as_str(),
            source.region.as_str(),
            source.image_id.as_str(),
            draft.region,
            key,
        ],
    };
    let hash = stable_hash(
        &identity
            .into_iter()
            .chain(draft.previous.iter().copied())
            .collect::<Vec<_>>(),
    );
    let base = match draft.kind {
        CopyKind::Reencrypted => "-reencrypted",
        _ => "",
    };
    let suffix = match draft.previous {
        [] => base.to_string(),
        _ => format!("{base}-{:08x}", hash >> 32),
    };
    let name: String = draft
        .name
        .chars()
        .take(MAX_NAME_CHARS - suffix.len())
        .collect();
    ImageCopy {
        kind: draft.kind,
        region: draft.region.to_string(),
        source_region: source.region.clone(),
        source_image_id: source.image_id.clone(),
        name: format!("{name}{suffix}"),
        description: draft.description,
        kms_key_arn: draft.key.map(ToString::to_string),
        client_token: format!("ami-share-{}-{hash:016x}", source.image_id),
        tags: draft.tags,
        snapshot_tags: draft.snapshot_tags,
    }
}

impl ImageCopy {
    /// The same copy under a name of its own (and so a token of its own), suffixed from `salt`, for
    /// when its name is taken in its region by an image ami-share did not make.
    pub fn renamed(&self, salt: u64) -> ImageCopy {
        let salt = salt.to_string();
        let hash = stable_hash(&[self.client_token.as_str(), "renamed", salt.as_str()]);
        let suffix = format!("-{:08x}", hash >> 32);
        let name: String = self
            .name
            .chars()
            .take(MAX_NAME_CHARS - suffix.len())
            .collect();
        ImageCopy {
            name: format!("{name}{suffix}"),
            client_token: format!("{}-r", self.client_token),
            ..self.clone()
        }
    }
}

/// Why the image cannot be made public, if it cannot: AWS never makes an AMI with encrypted snapshots
/// or product codes public, and refuses new public sharing while image block public access is on.
/// (Only asked when a rule sets `share.public`; the block is read only then.)
fn public_refusal(image: &ObservedImage) -> Option<String> {
    let id = &image.image_id;
    if let Some(s) = image.snapshots.iter().find(|s| s.encrypted != Some(false)) {
        return Some(format!(
            "not public: {id}'s snapshot {} is encrypted (or not known to be unencrypted), and AWS never makes an encrypted AMI public; it is shared with the other targets",
            s.snapshot_id
        ));
    }
    if !image.product_codes.is_empty() {
        return Some(format!(
            "not public: {id} has product codes ({}), and AWS never makes such an AMI public; it is shared with the other targets",
            image.product_codes.join(", ")
        ));
    }
    if image.public_sharing_blocked == Some(true) {
        return Some(format!(
            "not public: image block public access is on in {} (EC2 settings, Data protection and security); turn it off to let {id} be public, or remove share.public",
            image.region
        ));
    }
    None
}

/// The launch permissions the image lacks, as one call; `Group=all` only if `public_allowed`.
fn share_action(desired: &Desired, image: &ObservedImage, public_allowed: bool) -> Option<Action> {
    let current = image.launch_permissions.as_ref();
    let missing: Vec<LaunchPermission> = desired
        .launch_permissions
        .iter()
        .filter(|p| !current.is_some_and(|c| c.contains(p)))
        .filter(|p| public_allowed || **p != LaunchPermission::Public)
        .cloned()
        .collect();
    (!missing.is_empty()).then(|| Action::AddLaunchPermissions {
        region: image.region.clone(),
        image_id: image.image_id.clone(),
        permissions: missing,
    })
}

/// The tags each resource lacks (absent, or with another value), grouped by identical sets.
fn tag_actions(image_tags: &Tags, snapshot_tags: &Tags, image: &ObservedImage) -> Vec<Action> {
    let mut by_missing: BTreeMap<Tags, Vec<String>> = BTreeMap::new();
    let empty = Tags::new();
    let mut consider = |resource: &str, want: &Tags, have: &Tags| {
        let missing: Tags = want
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !missing.is_empty() {
            by_missing
                .entry(missing)
                .or_default()
                .push(resource.to_string());
        }
    };
    consider(&image.image_id, image_tags, &image.tags);
    if !snapshot_tags.is_empty() {
        for snapshot in &image.snapshots {
            let have = snapshot.tags.as_ref().unwrap_or(&empty);
            consider(&snapshot.snapshot_id, snapshot_tags, have);
        }
    }
    by_missing
        .into_iter()
        .map(|(tags, resources)| Action::CreateTags {
            region: image.region.clone(),
            resources,
            tags,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::observed::{ObservedKey, ObservedSnapshot};

    const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
    const CMK: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    const AWS_EBS: &str =
        "arn:aws:kms:us-east-1:123456789012:key/99999999-12ab-34cd-56ef-1234567890ab";
    const REENCRYPT_KEY: &str =
        "arn:aws:kms:us-east-1:123456789012:key/77777777-12ab-34cd-56ef-1234567890ab";
    const KEY_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Enable IAM User Permissions","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"}]}"#;

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn org() -> LaunchPermission {
        LaunchPermission::Organization(ORG.parse().unwrap())
    }

    fn account(id: &str) -> LaunchPermission {
        LaunchPermission::Account(id.parse().unwrap())
    }

    fn image(state: ImageState) -> ObservedImage {
        ObservedImage {
            image_id: "ami-12345678".into(),
            region: "us-east-1".into(),
            name: Some("golden".into()),
            owner_id: "123456789012".into(),
            state,
            tags: Tags::new(),
            created_by: crate::config::CreatedBy::CreateImage,
            snapshots: vec![ObservedSnapshot {
                snapshot_id: "snap-1".into(),
                encrypted: Some(false),
                kms_key_id: None,
                tags: Some(Tags::new()),
                create_volume_permissions: None,
                other_images: None,
            }],
            launch_permissions: Some(BTreeSet::new()),
            creation_date: Some("2026-11-25T10:00:00.000Z".into()),
            ..ObservedImage::default()
        }
    }

    /// A key of the image's region, its owner's approval tag on it.
    fn key(arn: &str, manager: KeyManager) -> ObservedKey {
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
    fn encrypted(arn: &str, observed_key: Option<ObservedKey>) -> ObservedImage {
        let mut img = image(ImageState::Available);
        img.snapshots[0].encrypted = Some(true);
        img.snapshots[0].kms_key_id = Some(arn.into());
        if let Some(k) = observed_key {
            img.keys.insert(arn.into(), k);
        }
        img
    }

    fn observed(image: ObservedImage) -> Observed {
        Observed {
            image,
            reencryption: None,
            regional: BTreeMap::new(),
            now: None,
        }
    }

    fn desired() -> Desired {
        Desired {
            rules: vec!["r".into()],
            image_tags: tags(&[("team", "platform"), ("shared", "yes")]),
            snapshot_tags: tags(&[("team", "platform"), ("shared", "yes")]),
            launch_permissions: [org(), account("210987654321")].into(),
            reencrypt_with: None,
            conflicts: vec![],
            // As the rules date the image of `image()`.
            family_created: Some("2026-11-25T10:00:00.000Z".into()),
            ..Desired::default()
        }
    }

    fn reencrypting() -> Desired {
        Desired {
            reencrypt_with: Some("alias/ami-share".parse().unwrap()),
            ..desired()
        }
    }

    fn apply_to_image(image: &mut ObservedImage, action: &Action) {
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
    fn applied(mut observed: Observed, plan: &Plan) -> Observed {
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

    #[test]
    fn an_untouched_available_image_gets_one_tag_call_and_one_share_call() {
        let p = plan(&desired(), &observed(image(ImageState::Available)));
        assert_eq!(p.actions.len(), 2, "{p:#?}");
        assert_eq!(
            p.actions[0],
            Action::CreateTags {
                region: "us-east-1".into(),
                resources: vec!["ami-12345678".into(), "snap-1".into()],
                tags: desired().image_tags,
            }
        );
        assert_eq!(
            p.actions[1],
            Action::AddLaunchPermissions {
                region: "us-east-1".into(),
                image_id: "ami-12345678".into(),
                permissions: vec![org(), account("210987654321")],
            }
        );
        assert!(p.deferred.is_empty() && p.blocked.is_empty());
    }

    #[test]
    fn planning_again_after_applying_plans_nothing() {
        let cases = [
            image(ImageState::Available),
            image(ImageState::Pending),
            encrypted(CMK, Some(key(CMK, KeyManager::Customer))),
            encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws))),
        ];
        for img in cases {
            let first = plan(&desired(), &observed(img.clone()));
            let after = applied(observed(img), &first);
            let again = plan(&desired(), &after);
            assert!(again.is_empty(), "{again:#?}\n{after:#?}");
        }
    }

    #[test]
    fn only_what_is_missing_is_planned() {
        let mut img = image(ImageState::Available);
        img.tags = tags(&[("team", "platform"), ("other", "kept")]);
        img.snapshots[0].tags = Some(desired().snapshot_tags);
        img.launch_permissions = Some([org()].into());
        let p = plan(&desired(), &observed(img));
        assert_eq!(
            p.actions,
            [
                Action::CreateTags {
                    region: "us-east-1".into(),
                    resources: vec!["ami-12345678".into()],
                    tags: tags(&[("shared", "yes")]),
                },
                Action::AddLaunchPermissions {
                    region: "us-east-1".into(),
                    image_id: "ami-12345678".into(),
                    permissions: vec![account("210987654321")],
                }
            ]
        );
    }

    #[test]
    fn a_tag_with_another_value_is_set_to_the_configured_value() {
        let mut img = image(ImageState::Available);
        img.tags = tags(&[("team", "someone-else"), ("shared", "yes")]);
        img.snapshots.clear();
        img.launch_permissions = Some(desired().launch_permissions);
        let p = plan(&desired(), &observed(img));
        assert_eq!(
            p.actions,
            [Action::CreateTags {
                region: "us-east-1".into(),
                resources: vec!["ami-12345678".into()],
                tags: tags(&[("team", "platform")]),
            }]
        );
    }

    #[test]
    fn a_pending_image_is_tagged_now_and_shared_later() {
        let p = plan(&desired(), &observed(image(ImageState::Pending)));
        assert!(
            matches!(p.actions.as_slice(), [Action::CreateTags { .. }]),
            "{p:#?}"
        );
        assert_eq!(p.deferred.len(), 1);
        assert!(p.deferred[0].contains("waits until it is available"));
    }

    #[test]
    fn failed_deregistered_disabled_and_unknown_images_are_left_alone() {
        for state in [
            ImageState::Failed,
            ImageState::Deregistered,
            ImageState::Disabled,
            ImageState::Other("transient".into()),
        ] {
            let p = plan(&desired(), &observed(image(state.clone())));
            assert!(p.is_empty(), "{state}");
            assert!(p.deferred[0].contains(&state.to_string()));
        }
    }

    #[test]
    fn snapshots_with_different_missing_tags_get_separate_calls() {
        let mut d = desired();
        d.snapshot_tags = tags(&[("team", "platform")]);
        let mut img = image(ImageState::Available);
        img.snapshots.push(ObservedSnapshot {
            snapshot_id: "snap-2".into(),
            encrypted: Some(false),
            kms_key_id: None,
            tags: Some(tags(&[("team", "platform")])),
            create_volume_permissions: None,
            other_images: None,
        });
        img.launch_permissions = Some(d.launch_permissions.clone());
        let p = plan(&d, &observed(img));
        let resources: Vec<Vec<String>> = p
            .actions
            .iter()
            .map(|a| match a {
                Action::CreateTags { resources, .. } => resources.clone(),
                other => panic!("{other}"),
            })
            .collect();
        assert_eq!(resources.len(), 2, "{p:#?}");
        assert!(resources.contains(&vec!["ami-12345678".to_string()]));
        assert!(resources.contains(&vec!["snap-1".to_string()]));
    }

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

    #[test]
    fn a_customer_key_is_opened_to_the_targets_before_the_image_is_shared() {
        let p = plan(
            &desired(),
            &observed(encrypted(CMK, Some(key(CMK, KeyManager::Customer)))),
        );
        assert!(p.blocked.is_empty(), "{p:#?}");
        let kinds: Vec<&str> = p
            .actions
            .iter()
            .map(|a| match a {
                Action::CreateTags { .. } => "tag",
                Action::PatchKeyPolicy { .. } => "key",
                Action::AddLaunchPermissions { .. } => "share",
                Action::CopyImage(_) => "copy",
                Action::SetStatus { .. } => "status",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["tag", "key", "share"]);
        let Action::PatchKeyPolicy {
            key_arn,
            admit,
            policy,
            ..
        } = &p.actions[1]
        else {
            unreachable!()
        };
        assert_eq!(key_arn, CMK);
        assert_eq!(
            admit.to_string(),
            "organization o-a1b2c3d4e5, account 210987654321"
        );
        assert!(policy.contains("Enable IAM User Permissions"));
        assert_eq!(
            p.actions[1].to_string(),
            format!(
                "let organization o-a1b2c3d4e5, account 210987654321 use KMS key {CMK} in us-east-1 through EC2 (ami-share's statements in its key policy)"
            )
        );
    }

    #[test]
    fn a_key_that_already_admits_the_targets_is_not_written() {
        let once = plan(
            &desired(),
            &observed(encrypted(CMK, Some(key(CMK, KeyManager::Customer)))),
        );
        let Action::PatchKeyPolicy { policy, .. } = &once.actions[1] else {
            unreachable!()
        };
        let mut k = key(CMK, KeyManager::Customer);
        k.policy = Some(policy.clone());
        let p = plan(&desired(), &observed(encrypted(CMK, Some(k))));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::PatchKeyPolicy { .. })),
            "{p:#?}"
        );
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::AddLaunchPermissions { .. }))
        );
    }

    /// The status tags the plan sets on the source image.
    fn status_of(p: &Plan) -> Tags {
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

    fn assert_not_shared(p: &Plan, expected_reason: &str) {
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

    #[test]
    fn an_aws_managed_key_blocks_sharing_and_says_why_on_the_image() {
        let p = plan(
            &desired(),
            &observed(encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws)))),
        );
        assert_not_shared(&p, "AWS managed key");
        assert_eq!(
            status_of(&p)[markers::STATUS_REASON],
            "snap-1 uses the AWS managed key aws/ebs, which cannot be shared; to share a re-encrypted copy instead, set reencrypt.kms_key"
        );
        // The rule's own tags still apply, and the status comes last.
        assert!(
            matches!(&p.actions[0], Action::CreateTags { tags, .. } if tags["team"] == "platform")
        );
        assert!(matches!(p.actions.last(), Some(Action::SetStatus { .. })));
    }

    #[test]
    fn another_accounts_key_a_disabled_key_and_an_oversized_policy_block_sharing() {
        let foreign = "arn:aws:kms:us-east-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        assert_not_shared(
            &plan(&desired(), &observed(encrypted(foreign, None))),
            "of account 210987654321: only that account can let others use it",
        );
        let mut disabled = key(CMK, KeyManager::Customer);
        disabled.state = "PendingDeletion".into();
        assert_not_shared(
            &plan(&desired(), &observed(encrypted(CMK, Some(disabled)))),
            "which is PendingDeletion",
        );
        let mut big = key(CMK, KeyManager::Customer);
        big.policy = Some(format!(
            r#"{{"Version":"2012-10-17","Statement":[{{"Sid":"x","Effect":"Allow","Principal":{{"AWS":"arn:aws:iam::123456789012:root"}},"Action":"kms:*","Resource":"*","Condition":{{"StringEquals":{{"aws:PrincipalTag/t":"{}"}}}}}}]}}"#,
            "y".repeat(32_700)
        ));
        assert_not_shared(
            &plan(&desired(), &observed(encrypted(CMK, Some(big)))),
            "over KMS's limit",
        );
        let mut external = key(CMK, KeyManager::Customer);
        external.manager = KeyManager::Other("EXTERNAL".into());
        assert_not_shared(
            &plan(&desired(), &observed(encrypted(CMK, Some(external)))),
            "ami-share does not know how to open",
        );
        let mut keyless = encrypted(CMK, None);
        keyless.snapshots[0].kms_key_id = None;
        assert_not_shared(
            &plan(&desired(), &observed(keyless)),
            "encrypted but EC2 reported no KMS key",
        );
    }

    /// A key of this account whose owner has not tagged it for ami-share.
    fn unapproved_key() -> ObservedKey {
        ObservedKey {
            tags: Some(Tags::new()),
            ..key(CMK, KeyManager::Customer)
        }
    }

    #[test]
    fn a_key_its_owner_did_not_approve_is_never_opened_and_the_image_says_how_to_approve_it() {
        let p = plan(
            &desired(),
            &observed(encrypted(CMK, Some(unapproved_key()))),
        );
        assert_not_shared(&p, "whose owner has not approved ami-share");
        let status = status_of(&p);
        let reason = &status[markers::STATUS_REASON];
        assert!(
            reason.contains("1234abcd-12ab-34cd-56ef-1234567890ab")
                && reason.contains("ami-share:manage-key-policy=true")
                && reason.contains("keys.approved"),
            "names the key and how to approve it: {reason}"
        );
        assert!(reason.chars().count() <= 256);
        assert!(
            p.blocked[0].contains(&format!(
                "aws kms tag-resource --region us-east-1 --key-id {CMK} --tags TagKey=ami-share:manage-key-policy,TagValue=true"
            )),
            "{:?}",
            p.blocked
        );
        // Not even a copy re-encrypted with an approved key: it would share what the key protects.
        let p = plan(&reencrypting(), &reencryption(vec![], None));
        assert!(!p.actions.iter().any(|a| matches!(a, Action::CopyImage(_))));
        let mut unapproved =
            reencryption(vec![], Some(Some(key(REENCRYPT_KEY, KeyManager::Customer))));
        unapproved.image = encrypted(CMK, Some(unapproved_key()));
        let p = plan(&reencrypting(), &unapproved);
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::CopyImage(_) | Action::PatchKeyPolicy { .. })),
            "{p:#?}"
        );
        assert_eq!(status_of(&p)[markers::STATUS], "not-shared");
    }

    #[test]
    fn a_key_the_config_names_is_approved_without_its_tag() {
        let mut named = desired();
        named.approved_keys = vec!["alias/golden-images".parse().unwrap()];
        let mut k = unapproved_key();
        k.aliases = vec!["alias/golden-images".into()];
        let p = plan(&named, &observed(encrypted(CMK, Some(k))));
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::PatchKeyPolicy { .. })),
            "{p:#?}"
        );
        assert!(p.blocked.is_empty(), "{:?}", p.blocked);
        named.approved_keys = vec![CMK.parse().unwrap()];
        let p = plan(&named, &observed(encrypted(CMK, Some(unapproved_key()))));
        assert!(p.blocked.is_empty(), "by ARN: {:?}", p.blocked);
    }

    #[test]
    fn one_unshareable_snapshot_blocks_the_image_and_no_key_is_touched() {
        let mut img = encrypted(CMK, Some(key(CMK, KeyManager::Customer)));
        img.snapshots.push(ObservedSnapshot {
            snapshot_id: "snap-2".into(),
            encrypted: Some(true),
            kms_key_id: Some(AWS_EBS.into()),
            tags: Some(Tags::new()),
            create_volume_permissions: None,
            other_images: None,
        });
        img.keys
            .insert(AWS_EBS.into(), key(AWS_EBS, KeyManager::Aws));
        assert_not_shared(&plan(&desired(), &observed(img)), "snapshot snap-2");
    }

    #[test]
    fn sharing_a_once_blocked_image_sets_its_status_right() {
        let mut img = image(ImageState::Available);
        img.tags = markers::status_tags(Status::NotShared, "not shared: old reason");
        let p = plan(&desired(), &observed(img));
        assert_eq!(status_of(&p)[markers::STATUS], "shared");
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::AddLaunchPermissions { .. }))
        );
    }

    fn reencryption(copies: Vec<ObservedImage>, key: Option<Option<ObservedKey>>) -> Observed {
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

    #[test]
    fn with_reencrypt_an_unshareable_image_gets_a_marked_re_encrypted_copy() {
        let mut obs = reencryption(vec![], Some(Some(key(REENCRYPT_KEY, KeyManager::Customer))));
        obs.image.tags = tags(&[("Name", "golden"), ("aws:cloudformation:stack-name", "x")]);
        let p = plan(&reencrypting(), &obs);
        let copy = p
            .actions
            .iter()
            .find(|a| matches!(a, Action::CopyImage(_)))
            .unwrap_or_else(|| panic!("{p:#?}"));
        let Action::CopyImage(ImageCopy {
            region,
            source_image_id,
            name,
            kms_key_arn,
            client_token,
            tags: copy_tags,
            snapshot_tags,
            ..
        }) = copy
        else {
            unreachable!()
        };
        assert_eq!(
            (region.as_str(), source_image_id.as_str(), name.as_str()),
            ("us-east-1", "ami-12345678", "golden-reencrypted")
        );
        assert_eq!(kms_key_arn.as_deref(), Some(REENCRYPT_KEY));
        assert!(
            client_token.starts_with("ami-share-ami-12345678-") && client_token.len() <= 64,
            "{client_token}"
        );
        assert_eq!(copy_tags[markers::SOURCE_IMAGE], "ami-12345678");
        assert_eq!(copy_tags[markers::COPY_KIND], "re-encrypted");
        assert_eq!(copy_tags["Name"], "golden", "the source's own tags");
        assert_eq!(copy_tags["team"], "platform", "the rule's tags");
        assert!(!copy_tags.contains_key("aws:cloudformation:stack-name"));
        assert_eq!(*snapshot_tags, desired().snapshot_tags);
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::AddLaunchPermissions { .. }))
        );
        let status = status_of(&p);
        assert_eq!(status[markers::STATUS], "shared-as-copy");
        assert_eq!(
            status[markers::STATUS_REASON],
            "snap-1 uses the AWS managed key aws/ebs, which cannot be shared; shared instead: a copy re-encrypted with alias/ami-share (tag ami-share:reencrypted-copy)"
        );
        assert!(
            !status.contains_key(markers::REENCRYPTED_COPY),
            "its id is not known yet"
        );
        assert!(p.deferred[0].contains("waits until the copy is available"));
    }

    #[test]
    fn an_existing_copy_is_finished_not_copied_again() {
        let mut copy = encrypted(
            REENCRYPT_KEY,
            Some(key(REENCRYPT_KEY, KeyManager::Customer)),
        );
        copy.image_id = "ami-copy0001".into();
        copy.state = ImageState::Pending;
        copy.tags = desired_for_copy(
            &reencrypting(),
            &encrypted(AWS_EBS, None),
            CopyKind::Reencrypted,
        )
        .image_tags;
        copy.snapshots[0].tags = Some(desired().snapshot_tags);
        copy.launch_permissions = None;
        let p = plan(&reencrypting(), &reencryption(vec![copy.clone()], None));
        assert!(
            !p.actions.iter().any(|a| matches!(a, Action::CopyImage(_))),
            "{p:#?}"
        );
        assert!(
            p.deferred
                .iter()
                .any(|d| d.contains("sharing ami-copy0001 waits")),
            "{p:#?}"
        );

        copy.state = ImageState::Available;
        copy.launch_permissions = Some(BTreeSet::new());
        let p = plan(&reencrypting(), &reencryption(vec![copy], None));
        let on_copy: Vec<String> = p
            .actions
            .iter()
            .filter(|a| !matches!(a, Action::CreateTags { .. } | Action::SetStatus { .. }))
            .map(ToString::to_string)
            .collect();
        assert_eq!(on_copy.len(), 2, "{p:#?}");
        assert!(on_copy[0].contains(REENCRYPT_KEY), "{on_copy:?}");
        assert!(on_copy[1].starts_with("share ami-copy0001"), "{on_copy:?}");
        assert_eq!(status_of(&p)[markers::REENCRYPTED_COPY], "ami-copy0001");
    }

    fn copy_of(p: &Plan) -> Option<&ImageCopy> {
        p.actions.iter().find_map(|a| match a {
            Action::CopyImage(c) => Some(c),
            _ => None,
        })
    }

    fn failed_copy(id: &str) -> ObservedImage {
        let mut failed = encrypted(REENCRYPT_KEY, None);
        failed.image_id = id.into();
        failed.state = ImageState::Failed;
        failed
    }

    #[test]
    fn after_a_failed_or_vanished_copy_a_new_one_gets_its_own_token_and_name() {
        let key = || Some(Some(key(REENCRYPT_KEY, KeyManager::Customer)));
        let first = plan(&reencrypting(), &reencryption(vec![], key()));
        let first = copy_of(&first).unwrap().clone();
        let again = plan(&reencrypting(), &reencryption(vec![], key()));
        assert_eq!(
            copy_of(&again),
            Some(&first),
            "a retry repeats the token: EC2 returns the same copy"
        );

        let after_failure = plan(
            &reencrypting(),
            &reencryption(vec![failed_copy("ami-failed01")], key()),
        );
        let after_failure = copy_of(&after_failure).unwrap();
        assert_ne!(after_failure.client_token, first.client_token);
        assert!(
            after_failure.name.starts_with("golden-reencrypted-")
                && after_failure.name != first.name
        );

        // The copy the image names was deregistered: EC2 no longer lists it.
        let mut obs = reencryption(vec![], key());
        obs.image
            .tags
            .insert(markers::REENCRYPTED_COPY.into(), "ami-gone0001".into());
        let after_vanished = plan(&reencrypting(), &obs);
        let after_vanished = copy_of(&after_vanished).unwrap();
        assert_ne!(after_vanished.client_token, first.client_token);
        assert_ne!(after_vanished.client_token, after_failure.client_token);
    }

    #[test]
    fn after_three_failed_copies_no_more_are_made() {
        let failed = vec![
            failed_copy("ami-failed01"),
            failed_copy("ami-failed02"),
            failed_copy("ami-failed03"),
        ];
        let p = plan(
            &reencrypting(),
            &reencryption(failed, Some(Some(key(REENCRYPT_KEY, KeyManager::Customer)))),
        );
        assert!(copy_of(&p).is_none(), "{p:#?}");
        let status = status_of(&p);
        assert_eq!(status[markers::STATUS], "not-shared");
        assert!(
            status[markers::STATUS_REASON].contains("3 re-encrypted copies failed"),
            "{status:?}"
        );
    }

    #[test]
    fn a_copy_is_made_only_for_what_a_copy_cures() {
        let mut disabled = key(CMK, KeyManager::Customer);
        disabled.state = "Disabled".into();
        let obs = Observed {
            image: encrypted(CMK, Some(disabled)),
            reencryption: Some(ObservedCopies {
                copies: vec![],
                key: Some(Some(key(REENCRYPT_KEY, KeyManager::Customer))),
                ..ObservedCopies::default()
            }),
            regional: BTreeMap::new(),
            now: None,
        };
        assert!(!wants_reencrypted_copy(&reencrypting(), &obs.image));
        let p = plan(&reencrypting(), &obs);
        assert!(copy_of(&p).is_none(), "{p:#?}");
        assert_eq!(status_of(&p)[markers::STATUS], "not-shared");
        assert!(wants_reencrypted_copy(
            &reencrypting(),
            &encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws)))
        ));
    }

    #[test]
    fn what_another_accounts_key_protects_is_re_encrypted_or_copied_only_if_the_config_names_it() {
        let foreign = "arn:aws:kms:us-east-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let image = encrypted(foreign, None);
        assert!(!wants_reencrypted_copy(&reencrypting(), &image));
        let mut named = reencrypting();
        named.approved_keys = vec![foreign.parse().unwrap()];
        assert!(
            wants_reencrypted_copy(&named, &image),
            "its owner's consent, by ARN"
        );
        // Copies to other regions: likewise.
        let west = || ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&distributing(), &with_regions(image.clone(), Some(west())));
        assert!(copies(&p).is_empty(), "{p:#?}");
        assert!(
            matches!(&p.regions["us-west-2"], RegionCopy::Blocked { reason }
                if reason.contains("of account 210987654321") && reason.contains("keys.approved")),
            "{:?}",
            p.regions
        );
        let mut distributing_named = distributing();
        distributing_named
            .approved_keys
            .push(foreign.parse().unwrap());
        let p = plan(&distributing_named, &with_regions(image, Some(west())));
        assert_eq!(copies(&p).len(), 2, "{p:#?}");
    }

    #[test]
    fn duplicate_copies_are_reported_and_the_lowest_id_is_shared() {
        let mut a = encrypted(
            REENCRYPT_KEY,
            Some(key(REENCRYPT_KEY, KeyManager::Customer)),
        );
        a.image_id = "ami-copy000a".into();
        let mut b = a.clone();
        b.image_id = "ami-copy000b".into();
        let p = plan(&reencrypting(), &reencryption(vec![b, a], None));
        assert!(
            p.blocked
                .iter()
                .any(|m| m.contains("ami-copy000b also re-encrypted copies")
                    && m.contains("shares only ami-copy000a")),
            "{p:#?}"
        );
        assert_eq!(status_of(&p)[markers::REENCRYPTED_COPY], "ami-copy000a");
    }

    #[test]
    fn an_unusable_reencrypt_key_leaves_the_image_unshared_with_the_reason() {
        let other_region =
            "arn:aws:kms:eu-west-1:123456789012:key/77777777-12ab-34cd-56ef-1234567890ab";
        let cases = [
            (None, "KMS key alias/ami-share not found in us-east-1"),
            (
                Some(key(AWS_EBS, KeyManager::Aws)),
                "is not customer managed",
            ),
            (
                Some(key(other_region, KeyManager::Customer)),
                "is not of account 123456789012 in us-east-1",
            ),
        ];
        for (k, expected) in cases {
            let p = plan(&reencrypting(), &reencryption(vec![], Some(k)));
            assert!(
                !p.actions.iter().any(|a| matches!(a, Action::CopyImage(_))),
                "{p:#?}"
            );
            let status = status_of(&p);
            assert_eq!(status[markers::STATUS], "not-shared");
            assert!(
                status[markers::STATUS_REASON].contains(expected),
                "{status:?}"
            );
        }
    }

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

    const WEST_KEY: &str =
        "arn:aws:kms:us-west-2:123456789012:key/55555555-12ab-34cd-56ef-1234567890ab";

    fn distributing() -> Desired {
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
                created_by: crate::config::CreatedBy::CreateImage,
                creation_date: Some("2026-11-25T10:00:00.000Z"),
            },
        )
    }

    fn with_regions(mut image: ObservedImage, west: Option<ObservedCopies>) -> Observed {
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

    fn copies(p: &Plan) -> Vec<&ImageCopy> {
        p.actions
            .iter()
            .filter_map(|a| match a {
                Action::CopyImage(c) => Some(c),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn copies_wait_for_an_available_source() {
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Pending), None),
        );
        assert!(copies(&p).is_empty());
        assert_eq!(
            p.regions,
            BTreeMap::from([
                ("eu-central-1".to_string(), RegionCopy::Waiting),
                ("us-west-2".to_string(), RegionCopy::Waiting)
            ]),
            "the source's own region is never a target"
        );
        assert!(
            p.deferred
                .iter()
                .any(|d| d.contains("CopyImage needs an available source"))
        );
    }

    #[test]
    fn each_region_gets_one_marked_copy_with_its_key_name_and_tags() {
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west)),
        );
        let made = copies(&p);
        assert_eq!(made.len(), 2, "{p:#?}");
        let west = made.iter().find(|c| c.region == "us-west-2").unwrap();
        let frankfurt = made.iter().find(|c| c.region == "eu-central-1").unwrap();
        assert_eq!(west.kind, CopyKind::Regional);
        assert_eq!(west.source_region, "us-east-1");
        assert_eq!(west.name, "golden-us-west-2");
        assert_eq!(west.description, "Golden (from ami-12345678 in us-east-1)");
        assert_eq!(west.kms_key_arn.as_deref(), Some(WEST_KEY));
        assert_eq!(frankfurt.kms_key_arn, None, "no key: EC2's default");
        assert_ne!(
            west.client_token, frankfurt.client_token,
            "a token per region"
        );
        assert_eq!(west.tags["os"], "al2023", "the source's own tags");
        assert_eq!(west.tags["team"], "platform", "the rule's tags");
        assert!(
            !west.tags.contains_key("aws:ec2launchtemplate:id"),
            "never aws: tags"
        );
        assert_eq!(
            (
                west.tags[markers::COPY_KIND].as_str(),
                west.tags[markers::SOURCE_REGION].as_str(),
                west.tags[markers::SOURCE_IMAGE].as_str()
            ),
            ("regional", "us-east-1", "ami-12345678")
        );
        assert!(
            !west.tags.contains_key(markers::SOURCE_CREATED),
            "a copy's age is read from its source, never from a tag"
        );
        assert_eq!(p.regions["us-west-2"], RegionCopy::ToCopy);
        // The same state plans the same calls: a retry reuses the tokens, so EC2 returns the same copies.
        let again = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(ObservedCopies {
                    copies: vec![],
                    key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
                    ..ObservedCopies::default()
                }),
            ),
        );
        assert_eq!(copies(&again), made);
    }

    #[test]
    fn an_existing_copy_is_finished_under_the_sources_rules_and_never_copied() {
        let mut copy = image(ImageState::Available);
        copy.image_id = "ami-0west".into();
        copy.region = "us-west-2".into();
        copy.tags = markers::copy_tags(CopyKind::Regional, "ami-12345678", "us-east-1");
        let west = ObservedCopies {
            copies: vec![copy],
            ..ObservedCopies::default()
        };
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west)),
        );
        assert_eq!(copies(&p).len(), 1, "only Frankfurt's: {p:#?}");
        let in_west: Vec<&Action> = p
            .actions
            .iter()
            .filter(|a| matches!(a, Action::CreateTags { region, .. } | Action::AddLaunchPermissions { region, .. } | Action::DeprecateImage { region, .. } if region == "us-west-2"))
            .collect();
        assert_eq!(
            in_west.len(),
            3,
            "tags, share and deprecation of the copy: {p:#?}"
        );
        assert!(in_west.iter().any(|a| matches!(a, Action::DeprecateImage { image_id, deprecate_at, .. } if image_id == "ami-0west" && deprecate_at == "2026-12-25T10:00:00Z")), "deprecated with its source");
        assert_eq!(
            p.regions["us-west-2"],
            RegionCopy::Copy {
                image_id: "ami-0west".into(),
                state: "available".into(),
                blocked: None,
            }
        );
    }

    #[test]
    fn what_an_unapproved_key_protects_is_not_copied_to_other_regions() {
        let mut source = encrypted(CMK, Some(unapproved_key()));
        source.launch_permissions = Some(BTreeSet::new());
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&distributing(), &with_regions(source, Some(west)));
        assert!(copies(&p).is_empty(), "{p:#?}");
        for region in ["us-west-2", "eu-central-1"] {
            assert!(
                matches!(&p.regions[region], RegionCopy::Blocked { reason }
                    if reason.contains("not copied") && reason.contains("has not approved ami-share")),
                "{region}: {:?}",
                p.regions[region]
            );
        }
        // Approved, it is copied.
        let mut approved = encrypted(CMK, Some(key(CMK, KeyManager::Customer)));
        approved.launch_permissions = Some(BTreeSet::new());
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&distributing(), &with_regions(approved, Some(west)));
        assert_eq!(copies(&p).len(), 2, "{p:#?}");
    }

    #[test]
    fn a_missing_key_blocks_its_region_only_and_an_unread_region_plans_nothing() {
        let p = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(ObservedCopies {
                    copies: vec![],
                    key: Some(None),
                    ..ObservedCopies::default()
                }),
            ),
        );
        assert!(
            matches!(&p.regions["us-west-2"], RegionCopy::Blocked { reason } if reason.contains("alias/ami-share not found in us-west-2"))
        );
        assert_eq!(copies(&p).len(), 1);
        assert!(
            p.blocked
                .iter()
                .any(|b| b.starts_with("no copy in us-west-2"))
        );
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), None),
        );
        assert_eq!(p.regions["us-west-2"], RegionCopy::Unread);
        assert!(copies(&p).iter().all(|c| c.region != "us-west-2"));
    }

    #[test]
    fn after_three_failed_copies_in_a_region_none_is_made_and_a_new_attempt_gets_a_new_name() {
        let failed = |id: &str| {
            let mut c = failed_copy(id);
            c.region = "us-west-2".into();
            c
        };
        let west = |copies: Vec<ObservedImage>| ObservedCopies {
            copies,
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let first = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west(vec![]))),
        );
        let retry = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(west(vec![failed("ami-f1")])),
            ),
        );
        let name = |p: &Plan| {
            copies(p)
                .iter()
                .find(|c| c.region == "us-west-2")
                .unwrap()
                .name
                .clone()
        };
        assert_ne!(
            name(&first),
            name(&retry),
            "AMI names are unique per region"
        );
        assert!(name(&retry).starts_with("golden-us-west-2-"));
        let p = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(west(vec![
                    failed("ami-f1"),
                    failed("ami-f2"),
                    failed("ami-f3"),
                ])),
            ),
        );
        assert!(
            matches!(&p.regions["us-west-2"], RegionCopy::Blocked { reason } if reason.contains("3 copies failed"))
        );
    }

    #[test]
    fn parameters_follow_the_newest_image_only() {
        let mut d = desired();
        d.ssm_parameters = ["/ami-share/r/latest".to_string()].into();
        let mut img = image(ImageState::Available);
        img.parameters.insert(
            "/ami-share/r/latest".into(),
            crate::observed::ObservedParameter {
                value: Some("ami-older".into()),
                value_created: Some("2026-01-01T00:00:00.000Z".into()),
            },
        );
        let p = plan(&d, &observed(img.clone()));
        assert!(p.actions.iter().any(
            |a| matches!(a, Action::PutParameter { image_id, .. } if image_id == "ami-12345678")
        ));
        img.parameters
            .get_mut("/ami-share/r/latest")
            .unwrap()
            .value_created = Some("2026-12-01T00:00:00.000Z".into());
        let p = plan(&d, &observed(img));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::PutParameter { .. }))
        );
        assert!(p.deferred.iter().any(|m| m.contains("newer")));
    }

    #[test]
    fn snapshot_permissions_go_to_the_accounts_that_lack_them() {
        let mut d = desired();
        d.create_volume_accounts = ["210987654321".parse().unwrap()].into();
        let mut img = image(ImageState::Available);
        img.snapshots[0].create_volume_permissions = Some(BTreeSet::new());
        let p = plan(&d, &observed(img.clone()));
        assert!(p.actions.iter().any(|a| matches!(a, Action::AddCreateVolumePermission { snapshot_id, accounts, .. } if snapshot_id == "snap-1" && accounts == &["210987654321".to_string()])));
        img.snapshots[0].create_volume_permissions =
            Some([VolumePermission::Account("210987654321".parse().unwrap())].into());
        let p = plan(&d, &observed(img));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::AddCreateVolumePermission { .. }))
        );
    }

    #[test]
    fn an_overdue_deprecation_takes_effect_at_the_next_minute_once() {
        let mut d = desired();
        d.deprecate_at = Some("2026-12-01T00:00:00Z".into());
        let mut obs = observed(image(ImageState::Available));
        let deprecation = |p: &Plan| {
            p.actions.iter().find_map(|a| match a {
                Action::DeprecateImage { deprecate_at, .. } => Some(deprecate_at.clone()),
                _ => None,
            })
        };
        obs.now = Some("2026-11-25T10:00:00Z".into());
        assert_eq!(
            deprecation(&plan(&d, &obs)).as_deref(),
            Some("2026-12-01T00:00:00Z")
        );
        obs.now = Some("2027-03-01T08:30:10Z".into());
        assert_eq!(
            deprecation(&plan(&d, &obs)).as_deref(),
            Some("2027-03-01T08:31:00Z"),
            "EC2 refuses a time in the past"
        );
        obs.image.deprecation_time = Some("2027-03-01T08:31:00.000Z".into());
        assert_eq!(
            deprecation(&plan(&d, &obs)),
            None,
            "the same minute again: nothing"
        );
        obs.now = Some("2027-06-01T00:00:00Z".into());
        assert_eq!(deprecation(&plan(&d, &obs)), None, "deprecated already");
        obs.image.state = ImageState::Pending;
        obs.image.deprecation_time = None;
        assert_eq!(deprecation(&plan(&d, &obs)), None, "a pending image waits");
    }

    #[test]
    fn a_copy_is_as_old_as_its_source_for_the_parameter() {
        // A copy of an older source, made after the copy of a newer source the parameter names: the
        // copy's family began when its source was created (what the reconciler reads from the source).
        let mut copy = image(ImageState::Available);
        copy.creation_date = Some("2026-11-30T00:00:00.000Z".into());
        let mut d = desired_for_copy(
            &desired(),
            &ObservedImage {
                creation_date: Some("2026-11-01T00:00:00.000Z".into()),
                ..image(ImageState::Available)
            },
            CopyKind::Regional,
        );
        d.ssm_parameters = ["/p".to_string()].into();
        copy.parameters.insert(
            "/p".into(),
            crate::observed::ObservedParameter {
                value: Some("ami-newercopy".into()),
                value_created: Some("2026-11-20T00:00:00.000Z".into()),
            },
        );
        let p = plan(&d, &observed(copy.clone()));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::PutParameter { .. })),
            "{p:#?}"
        );
        // Tags never date a family: a forged source-created mark in the future changes nothing.
        copy.tags.insert(
            markers::SOURCE_CREATED.into(),
            "2099-01-01T00:00:00.000Z".into(),
        );
        assert_eq!(plan(&d, &observed(copy)), p);
    }

    #[test]
    fn a_renamed_copy_is_the_same_copy_under_a_name_of_its_own() {
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west)),
        );
        let copy = copies(&p)
            .into_iter()
            .find(|c| c.region == "us-west-2")
            .unwrap()
            .clone();
        let renamed = copy.renamed(7);
        assert_ne!(renamed.name, copy.name);
        assert!(renamed.name.starts_with("golden-us-west-2-"));
        assert_ne!(renamed.client_token, copy.client_token);
        assert!(renamed.client_token.len() <= 64);
        assert_eq!(renamed, copy.renamed(7), "the salt decides the suffix");
        assert_ne!(
            renamed.name,
            copy.renamed(8).name,
            "so nobody can take the name in advance"
        );
        assert_eq!(renamed.tags, copy.tags);
    }

    #[test]
    fn exclusive_mode_revokes_create_volume_permission_no_rule_grants_too() {
        let volume = |id: &str| VolumePermission::Account(id.parse().unwrap());
        let mut img = image(ImageState::Available);
        img.snapshots[0].create_volume_permissions = Some(
            [
                volume("210987654321"),
                volume("444455556666"),
                volume("123456789012"),
                VolumePermission::Public,
            ]
            .into(),
        );
        let removal = |p: &Plan| {
            p.actions.iter().find_map(|a| match a {
                Action::RemoveCreateVolumePermission {
                    snapshot_id,
                    permissions,
                    ..
                } => Some((snapshot_id.clone(), permissions.clone())),
                _ => None,
            })
        };
        assert_eq!(removal(&plan(&desired(), &observed(img.clone()))), None);
        let exclusive = Desired {
            exclusive: true,
            create_volume_accounts: ["210987654321".parse().unwrap()].into(),
            ..desired()
        };
        let p = plan(&exclusive, &observed(img.clone()));
        assert_eq!(
            removal(&p),
            Some((
                "snap-1".to_string(),
                vec![volume("444455556666"), VolumePermission::Public]
            )),
            "the rules' accounts and the owner stay: {p:#?}"
        );
        assert!(
            p.actions.iter().any(|a| a.to_string()
                == "revoke create-volume permission on snapshot snap-1 in us-east-1 from account 444455556666, everyone (Group=all) (exclusive: no rule grants it)"),
            "{p:#?}"
        );
        let after = applied(observed(img.clone()), &p);
        assert_eq!(removal(&plan(&exclusive, &after)), None, "converges");
        // Another AMI registered on the snapshot, whose rule grants 444455556666: that stays.
        let mut shared_snapshot = observed(img);
        shared_snapshot.image.snapshots[0].other_images = Some(crate::observed::OtherImages {
            image_ids: vec!["ami-other".into()],
            create_volume_accounts: ["444455556666".parse().unwrap()].into(),
        });
        assert_eq!(
            removal(&plan(&exclusive, &shared_snapshot)),
            Some(("snap-1".to_string(), vec![VolumePermission::Public])),
            "what the other AMI's rules grant on the snapshot is not revoked"
        );
        let exclusive_without_volumes = Desired {
            exclusive: true,
            ..desired()
        };
        let reads = reads_needed(&exclusive_without_volumes, &after.image);
        assert!(reads.create_volume_permissions, "read to be revoked");
        assert_eq!(
            removal(&plan(&exclusive_without_volumes, &after)),
            Some(("snap-1".to_string(), vec![volume("210987654321")])),
            "no rule grants any: every account but the owner loses it"
        );
    }

    #[test]
    fn exclusive_mode_removes_what_no_rule_grants_but_never_the_owner() {
        let stranger = account("444455556666");
        let owner = account("123456789012");
        let mut img = image(ImageState::Available);
        img.launch_permissions = Some(
            [
                org(),
                stranger.clone(),
                owner.clone(),
                LaunchPermission::Public,
            ]
            .into(),
        );
        let removal = |p: &Plan| {
            p.actions.iter().find_map(|a| match a {
                Action::RemoveLaunchPermissions { permissions, .. } => Some(permissions.clone()),
                _ => None,
            })
        };
        let p = plan(&desired(), &observed(img.clone()));
        assert_eq!(removal(&p), None, "not exclusive: ami-share only adds");
        let exclusive = Desired {
            exclusive: true,
            ..desired()
        };
        let p = plan(&exclusive, &observed(img.clone()));
        assert_eq!(
            removal(&p),
            Some(vec![stranger, LaunchPermission::Public]),
            "granted ones and the owner stay: {p:#?}"
        );
        assert!(
            p.actions.iter().any(|a| a.to_string().contains(
                "unshare ami-12345678 in us-east-1 from account 444455556666, public (Group=all) (exclusive"
            )),
            "says exactly what is removed"
        );
        let after = applied(observed(img), &p);
        let p = plan(&exclusive, &after);
        assert_eq!(removal(&p), None, "converges");
        let mut pending = image(ImageState::Pending);
        pending.launch_permissions = None;
        assert_eq!(removal(&plan(&exclusive, &observed(pending))), None);
    }

    #[test]
    fn public_only_when_asked_and_never_encrypted_product_code_or_blocked() {
        let public = Desired {
            launch_permissions: [org(), LaunchPermission::Public].into(),
            ..desired()
        };
        let added = |p: &Plan| {
            p.actions
                .iter()
                .find_map(|a| match a {
                    Action::AddLaunchPermissions { permissions, .. } => Some(permissions.clone()),
                    _ => None,
                })
                .unwrap_or_default()
        };
        let mut img = image(ImageState::Available);
        img.public_sharing_blocked = Some(false);
        assert!(reads_needed(&public, &img).block_public_access);
        assert!(
            !reads_needed(&desired(), &img).block_public_access,
            "only when asked"
        );
        let p = plan(&public, &observed(img.clone()));
        assert_eq!(added(&p), [org(), LaunchPermission::Public]);
        assert!(p.blocked.is_empty());
        // Never for an encrypted AMI (its key would be opened to the organization only).
        let mut enc = encrypted(CMK, Some(key(CMK, KeyManager::Customer)));
        enc.public_sharing_blocked = Some(false);
        let p = plan(&public, &observed(enc));
        assert_eq!(added(&p), [org()], "{p:#?}");
        assert!(p.blocked.iter().any(
            |b| b.contains("is encrypted") && b.contains("never makes an encrypted AMI public")
        ));
        let mut coded = img.clone();
        coded.product_codes = vec!["abc123".into()];
        let p = plan(&public, &observed(coded));
        assert_eq!(added(&p), [org()]);
        assert!(
            p.blocked
                .iter()
                .any(|b| b.contains("product codes (abc123)"))
        );
        let mut blocked = img.clone();
        blocked.public_sharing_blocked = Some(true);
        let p = plan(&public, &observed(blocked));
        assert_eq!(added(&p), [org()]);
        assert!(
            p.blocked
                .iter()
                .any(|b| b.contains("image block public access is on in us-east-1"))
        );
        // Without share.public, an encrypted image has no such note.
        let p = plan(
            &desired(),
            &observed(encrypted(CMK, Some(key(CMK, KeyManager::Customer)))),
        );
        assert!(p.blocked.is_empty(), "{p:#?}");
    }
}
