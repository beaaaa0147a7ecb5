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

use crate::distribution::TemplateValues;
use crate::key_policy::{self, KeyGrantees};
use crate::keys::{APPROVAL_TAG, APPROVAL_TAG_VALUE, KeyArn, KeyRef, approval};
use crate::limits::{SHARING_ENTITIES_PER_IMAGE, TAGS_PER_RESOURCE, counts_as_user_tag, fit_tags};
use crate::markers::{self, CopyKind, Status};
use crate::observed::{
    ImageState, KeyManager, Observed, ObservedCopies, ObservedImage, ObservedKey, Protection, Tags,
};
use crate::provenance::{Provenance, provenance};
use crate::rules::{CopyWanted, Desired};
use crate::targets::{LaunchPermission, VolumePermission};
use crate::time::Timestamp;

mod action;
mod copies;
mod image_copy;
mod keys;
mod reads;

pub use action::{Action, ImageCopy};
pub use copies::desired_for_copy;
use copies::*;
use image_copy::*;
use keys::*;
pub use keys::{Blocker, key_patches};
use reads::*;
pub use reads::{
    Reads, chosen_copy, copy_targets, keys_to_read, reads_needed, wants_reencrypted_copy,
};

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
    /// What was left out to stay within one of AWS's limits ([`crate::limits`]): the limit, what was
    /// left out, what to change. The rest of the plan goes ahead.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<String>,
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
        state: ImageState,
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
                let refusal = match becomes_public(desired, image) {
                    true => public_refusal(image),
                    false => None,
                };
                plan.blocked.extend(refusal.clone());
                after_tags.extend(share_actions(
                    desired,
                    image,
                    refusal.is_none(),
                    &mut plan.limits,
                ));
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
                let (tags, copy_plan) = status_and_reencrypted_copy(desired, observed, &blocked);
                status = Some(tags);
                plan.blocked = blocked.into_iter().map(|b| b.detail).collect();
                if let Some(copy_plan) = copy_plan {
                    after_tags.extend(copy_plan.actions);
                    plan.deferred.extend(copy_plan.deferred);
                    plan.blocked.extend(copy_plan.blocked);
                    plan.notes.extend(copy_plan.notes);
                    plan.limits.extend(copy_plan.limits);
                }
                if let Some(reencryption) = &observed.reencryption {
                    plan.notes.extend(reencryption.ignored.iter().cloned());
                }
            }
        }
    }
    let protection = match shareable && shares_now(desired, image) {
        true => protection_action(desired, image),
        false => ProtectionPlan::default(),
    };
    plan.notes.extend(protection.note);
    let mut missing_status: Tags = status
        .unwrap_or_default()
        .into_iter()
        .chain(protection.mark)
        .chain(
            (desired.exclusive_scope.is_some() && image.state == ImageState::Available)
                .then(|| (markers::EXCLUSIVE.to_string(), "false".to_string())),
        )
        .filter(|(k, v)| image.tags.get(k) != Some(v))
        .collect();
    // The status has room before any rule's tag, but not beyond what the image carries already: a
    // write EC2 would refuse (TagLimitExceeded) is named instead.
    let has = image.tags.keys().filter(|k| counts_as_user_tag(k)).count();
    let new_keys = missing_status
        .keys()
        .filter(|k| !image.tags.contains_key(*k))
        .count();
    if new_keys > 0 && has + new_keys > TAGS_PER_RESOURCE {
        plan.limits.push(format!(
            "ami-share's status tags cannot be written on {} in {}: it has {has} tags, and EC2 allows {TAGS_PER_RESOURCE} per resource; remove {} of its tags so ami-share can say there why it is not shared (the summary says it meanwhile)",
            image.image_id,
            image.region,
            has + new_keys - TAGS_PER_RESOURCE
        ));
        missing_status.clear();
    }
    plan.actions.extend(tag_actions(
        &desired.image_tags,
        &desired.snapshot_tags,
        image,
        &missing_status,
        &mut plan.limits,
    ));
    plan.actions.extend(exclusive_action(desired, image));
    plan.actions
        .extend(exclusive_volume_actions(desired, image));
    plan.actions
        .extend(deprecation_action(desired, image, observed.now));
    plan.actions.extend(protection.action);
    plan.actions.extend(after_tags);
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
pub(super) fn deprecation_action(
    desired: &Desired,
    image: &ObservedImage,
    now: Option<Timestamp>,
) -> Option<Action> {
    let wanted = desired.deprecate_at?;
    if image.state != ImageState::Available {
        return None;
    }
    let current = image.deprecation_time;
    let at = match now {
        Some(now) if now >= wanted => {
            if current.is_some_and(|t| now >= t) {
                return None;
            }
            now.next_minute()
        }
        _ => wanted,
    };
    if current.is_some_and(|t| t.same_minute(at)) {
        return None;
    }
    Some(Action::DeprecateImage {
        region: image.region.clone(),
        image_id: image.image_id.clone(),
        deprecate_at: at,
    })
}

/// What deregistration protection needs: the call, the [`markers::PROTECTED`] mark (written with the
/// status, so only once the region's calls succeeded), or a note.
#[derive(Debug, Default)]
pub(super) struct ProtectionPlan {
    pub(super) action: Option<Action>,
    pub(super) mark: Option<(String, String)>,
    pub(super) note: Option<String>,
}

/// EnableImageDeregistrationProtection, for an image ami-share shares (a selecting rule cannot turn an
/// image it does not share into one nobody may deregister), once available, when it is less protected
/// than a selecting rule asks. Stronger protection is kept, and none is ever turned off. Protection
/// found off on an image ami-share protected before ([`markers::PROTECTED`]) was turned off on purpose,
/// to deregister it: it is left off, and the note says how to have it back.
pub(super) fn protection_action(desired: &Desired, image: &ObservedImage) -> ProtectionPlan {
    if image.state != ImageState::Available || desired.protection.is_off() {
        return ProtectionPlan::default();
    }
    let mark = Some((markers::PROTECTED.to_string(), "true".to_string()));
    if image.protection >= desired.protection {
        return ProtectionPlan {
            mark,
            ..ProtectionPlan::default()
        };
    }
    if image.tags.get(markers::PROTECTED).map(String::as_str) == Some("true") {
        return ProtectionPlan {
            note: Some(format!(
                "deregistration protection of {} was turned down by someone after ami-share turned it on: left as it is (delete its {} tag to have ami-share turn it on again)",
                image.image_id,
                markers::PROTECTED
            )),
            ..ProtectionPlan::default()
        };
    }
    ProtectionPlan {
        action: Some(Action::ProtectImage {
            region: image.region.clone(),
            image_id: image.image_id.clone(),
            with_cooldown: desired.protection == Protection::WithCooldown,
        }),
        mark,
        note: None,
    }
}

/// Exclusive mode: the launch permissions the image has that no selecting rule grants, as one removal.
/// Removing never needs a key, so it is planned whether or not the image can be shared. The owner's own
/// account is never removed.
pub(super) fn exclusive_action(desired: &Desired, image: &ObservedImage) -> Option<Action> {
    if !desired.exclusive || image.state != ImageState::Available {
        return None;
    }
    let extra: Vec<LaunchPermission> = image
        .launch_permissions
        .as_ref()?
        .iter()
        .filter(|p| !desired.launch_permissions.contains(p))
        .filter(|p| {
            desired
                .exclusive_scope
                .as_ref()
                .is_none_or(|scope| scope.launch_permissions.contains(p))
        })
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
pub(super) fn exclusive_volume_actions(desired: &Desired, image: &ObservedImage) -> Vec<Action> {
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
                            && desired
                                .exclusive_scope
                                .as_ref()
                                .is_none_or(|scope| scope.create_volume_accounts.contains(id))
                    }
                    // No rule grants it; once no exclusive rule selects the image, it is not ami-share's
                    // to take back.
                    VolumePermission::Public => desired.exclusive_scope.is_none(),
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
pub(super) fn create_volume_actions(desired: &Desired, image: &ObservedImage) -> Vec<Action> {
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
pub(super) fn parameter_actions(desired: &Desired, image: &ObservedImage, plan: &mut Plan) {
    for name in &desired.ssm_parameters {
        let Some(current) = image.parameters.get(name) else {
            continue;
        };
        if current.value.as_deref() == Some(image.image_id.as_str()) {
            continue;
        }
        if let (Some(theirs), Some(ours)) = (current.value_created, desired.family_created)
            && ours < theirs
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
            after_version: current.version,
            created: desired.family_created,
        });
    }
}

/// Why the image cannot be made public, if it cannot: AWS never makes an AMI with encrypted snapshots
/// or product codes public, and refuses new public sharing while image block public access is on.
/// (Only asked when a rule sets `share.public`; the block is read only then.)
pub(super) fn public_refusal(image: &ObservedImage) -> Option<String> {
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

/// The launch permissions the image lacks, within AWS's [`SHARING_ENTITIES_PER_IMAGE`] (what does not
/// fit is left out and named in `limits`), in one call; public sharing in a call of its own, so that a
/// refusal of it (the public-AMI quota, block public access) never takes the other shares down.
pub(super) fn share_actions(
    desired: &Desired,
    image: &ObservedImage,
    public_allowed: bool,
    limits: &mut Vec<String>,
) -> Vec<Action> {
    let current = image.launch_permissions.as_ref();
    let missing = |p: &&LaunchPermission| !current.is_some_and(|c| c.contains(*p));
    let mut entities: Vec<LaunchPermission> = desired
        .launch_permissions
        .iter()
        .filter(missing)
        .filter(|p| **p != LaunchPermission::Public)
        .cloned()
        .collect();
    let shared = current.map_or(0, |c| {
        c.iter().filter(|p| **p != LaunchPermission::Public).count()
    });
    let room = SHARING_ENTITIES_PER_IMAGE.saturating_sub(shared);
    if entities.len() > room {
        let left_out = entities.split_off(room);
        limits.push(format!(
            "{} share target(s) left out of {} in {}: AWS shares an AMI with at most {SHARING_ENTITIES_PER_IMAGE} entities (accounts, organizations, OUs; it has {shared}, the rules add {} more); share with organizations or OUs instead of single accounts (each counts as one). Left out: {}",
            left_out.len(),
            image.image_id,
            image.region,
            entities.len() + left_out.len(),
            named(left_out.iter().map(ToString::to_string))
        ));
    }
    let mut actions = Vec::new();
    if !entities.is_empty() {
        actions.push(Action::AddLaunchPermissions {
            region: image.region.clone(),
            image_id: image.image_id.clone(),
            permissions: entities,
        });
    }
    if public_allowed
        && desired
            .launch_permissions
            .contains(&LaunchPermission::Public)
        && missing(&&LaunchPermission::Public)
    {
        actions.push(Action::AddLaunchPermissions {
            region: image.region.clone(),
            image_id: image.image_id.clone(),
            permissions: vec![LaunchPermission::Public],
        });
    }
    actions
}

/// Up to ten names, and how many more.
pub(super) fn named(names: impl Iterator<Item = String>) -> String {
    let names: Vec<String> = names.collect();
    match names.len() {
        0..=10 => names.join(", "),
        n => format!("{}, and {} more", names[..10].join(", "), n - 10),
    }
}

/// The tags each resource lacks (absent, or with another value), grouped by identical sets, within
/// EC2's [`TAGS_PER_RESOURCE`]: ami-share's marks (and the `status` tags about to be written) always
/// fit; the rules' tags then fit in key order, and those left out are named in `limits`.
pub(super) fn tag_actions(
    image_tags: &Tags,
    snapshot_tags: &Tags,
    image: &ObservedImage,
    status: &Tags,
    limits: &mut Vec<String>,
) -> Vec<Action> {
    let mut by_missing: BTreeMap<Tags, Vec<String>> = BTreeMap::new();
    let empty = Tags::new();
    let mut consider = |resource: &str, want: &Tags, have: &Tags, status: &Tags| {
        let (mut marks, rules): (Tags, Tags) = want
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| markers::is_mark(k));
        marks.extend(status.clone());
        let fit = fit_tags(have, &marks, &rules);
        if !fit.left_out.is_empty() {
            limits.push(tags_left_out(
                resource,
                &image.region,
                have,
                &marks,
                &fit.left_out,
            ));
        }
        let missing: Tags = fit
            .tags
            .into_iter()
            .filter(|(k, v)| !status.contains_key(k) && have.get(k) != Some(v))
            .collect();
        if !missing.is_empty() {
            by_missing
                .entry(missing)
                .or_default()
                .push(resource.to_string());
        }
    };
    consider(&image.image_id, image_tags, &image.tags, status);
    if !snapshot_tags.is_empty() {
        for snapshot in &image.snapshots {
            let have = snapshot.tags.as_ref().unwrap_or(&empty);
            consider(&snapshot.snapshot_id, snapshot_tags, have, &empty);
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

/// What a plan says when a resource has no room for all the rules' tags.
pub(super) fn tags_left_out(
    resource: &str,
    region: &str,
    have: &Tags,
    marks: &Tags,
    left_out: &[String],
) -> String {
    let has = have.keys().filter(|k| counts_as_user_tag(k)).count();
    let marks = marks.keys().filter(|k| !have.contains_key(*k)).count();
    let marks = match marks {
        0 => String::new(),
        n => format!(", ami-share's own marks need {n} more"),
    };
    format!(
        "{} of the rules' tags left out of {resource} in {region}: EC2 allows {TAGS_PER_RESOURCE} tags per resource (it has {has}{marks}); give the selecting rules fewer tags, or remove tags from it. Left out: {}",
        left_out.len(),
        named(left_out.iter().cloned())
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::plan::*;

    fn many_tags(prefix: &str, n: usize) -> Tags {
        (0..n)
            .map(|i| (format!("{prefix}{i:02}"), "v".to_string()))
            .collect()
    }

    fn tags_after(image: &ObservedImage, p: &Plan, resource: &str) -> Tags {
        let mut after = match resource.starts_with("ami-") {
            true => image.tags.clone(),
            false => image.snapshots[0].tags.clone().unwrap_or_default(),
        };
        for action in &p.actions {
            match action {
                Action::CreateTags {
                    resources, tags, ..
                } if resources.iter().any(|r| r == resource) => after.extend(tags.clone()),
                Action::SetStatus { image_id, tags, .. } if image_id == resource => {
                    after.extend(tags.clone())
                }
                _ => {}
            }
        }
        after
    }

    #[test]
    fn rules_totalling_sixty_tags_leave_an_image_with_fifty_and_name_the_limit() {
        let mut wish = desired();
        wish.image_tags = many_tags("t", 60);
        wish.snapshot_tags = many_tags("t", 60);
        let img = image(ImageState::Available);
        let p = plan(&wish, &observed(img.clone()));
        for resource in ["ami-12345678", "snap-1"] {
            assert_eq!(
                tags_after(&img, &p, resource).len(),
                TAGS_PER_RESOURCE,
                "{resource}"
            );
        }
        assert_eq!(p.limits.len(), 2, "{:#?}", p.limits);
        assert!(
            p.limits[0].starts_with("10 of the rules' tags left out of ami-12345678 in us-east-1: EC2 allows 50 tags per resource (it has 0)"),
            "{}",
            p.limits[0]
        );
        assert!(
            p.limits[0].contains("Left out: t50, t51"),
            "{}",
            p.limits[0]
        );
        // The rest of the plan goes ahead: the share is planned.
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::AddLaunchPermissions { .. }))
        );

        // With 45 tags of its own and a status to write, the marks fit first.
        let mut crowded = encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws)));
        crowded.tags = many_tags("own", 45);
        crowded.tags.insert(markers::STATUS.into(), "old".into());
        let mut wish = desired();
        wish.image_tags = many_tags("t", 10);
        wish.snapshot_tags = Tags::new();
        let p = plan(&wish, &observed(crowded.clone()));
        let after = tags_after(&crowded, &p, "ami-12345678");
        assert!(after.contains_key(markers::STATUS_REASON), "{p:#?}");
        assert_eq!(after.len(), TAGS_PER_RESOURCE);
        assert!(
            p.limits[0].contains("ami-share's own marks need 1 more"),
            "{:?}",
            p.limits
        );
        // Converged: planning again on the result plans no tags and names the same limit.
        let mut done = crowded.clone();
        done.tags = after;
        let again = plan(&wish, &observed(done));
        assert!(
            !again
                .actions
                .iter()
                .any(|a| matches!(a, Action::CreateTags { .. } | Action::SetStatus { .. })),
            "{again:#?}"
        );
        assert_eq!(again.limits.len(), 1);
    }

    #[test]
    fn a_status_that_cannot_fit_beside_the_images_own_tags_is_named_not_written() {
        // 49 tags of its own (anyone who may tag it can do that), and a status of two new keys to write.
        let mut full = encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws)));
        full.tags = many_tags("own", 49);
        let mut wish = desired();
        wish.snapshot_tags = Tags::new();
        let p = plan(&wish, &observed(full.clone()));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::SetStatus { .. })),
            "EC2 would refuse it: {p:#?}"
        );
        assert!(
            p.limits.iter().any(|l| l.starts_with(
                "ami-share's status tags cannot be written on ami-12345678 in us-east-1: it has 49 tags, and EC2 allows 50 per resource; remove 1 of its tags"
            )),
            "{:?}",
            p.limits
        );
        assert!(
            !p.blocked.is_empty(),
            "the summary still says why it is not shared"
        );
        // With room for them, they are written.
        full.tags = many_tags("own", 48);
        let p = plan(&wish, &observed(full));
        assert!(
            p.actions
                .iter()
                .any(|a| matches!(a, Action::SetStatus { .. })),
            "{p:#?}"
        );
    }

    #[test]
    fn no_image_is_shared_with_more_than_a_thousand_entities_and_the_rest_are_named() {
        let mut wish = desired();
        wish.launch_permissions = (0..1001)
            .map(|i| account(&format!("2000000{i:05}")))
            .chain([org()])
            .collect();
        let img = image(ImageState::Available);
        let p = plan(&wish, &observed(img.clone()));
        let added: usize = p
            .actions
            .iter()
            .map(|a| match a {
                Action::AddLaunchPermissions { permissions, .. } => permissions.len(),
                _ => 0,
            })
            .sum();
        assert_eq!(added, SHARING_ENTITIES_PER_IMAGE);
        assert!(
            p.limits[0].starts_with("2 share target(s) left out of ami-12345678 in us-east-1: AWS shares an AMI with at most 1000 entities (accounts, organizations, OUs; it has 0, the rules add 1002 more)"),
            "{}",
            p.limits[0]
        );
        // The organization (one entity for all its accounts) is never what is left out.
        let Action::AddLaunchPermissions { permissions, .. } = &p.actions[1] else {
            panic!("{p:#?}")
        };
        assert_eq!(permissions[0], org());
        // What is there already counts.
        let mut shared = img.clone();
        shared.launch_permissions = Some(
            (0..999)
                .map(|i| account(&format!("3000000{i:05}")))
                .collect(),
        );
        let mut wish = desired();
        wish.launch_permissions = [account("210987654321"), account("210987654322")].into();
        let p = plan(&wish, &observed(shared));
        assert!(p.limits[0].contains("it has 999"), "{:?}", p.limits);
        assert!(
            p.limits[0].ends_with("Left out: account 210987654322"),
            "{:?}",
            p.limits
        );
    }

    #[test]
    fn public_sharing_is_a_call_of_its_own_so_its_refusal_keeps_the_other_shares() {
        let mut wish = desired();
        wish.launch_permissions.insert(LaunchPermission::Public);
        let mut img = image(ImageState::Available);
        img.public_sharing_blocked = Some(false);
        let p = plan(&wish, &observed(img));
        let shares: Vec<&Vec<LaunchPermission>> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::AddLaunchPermissions { permissions, .. } => Some(permissions),
                _ => None,
            })
            .collect();
        assert_eq!(
            shares,
            [
                &vec![org(), account("210987654321")],
                &vec![LaunchPermission::Public]
            ]
        );
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
            ImageState::Transient,
            ImageState::Other("error".into()),
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
    fn parameters_follow_the_newest_image_only() {
        let mut d = desired();
        d.ssm_parameters = ["/ami-share/r/latest".to_string()].into();
        let mut img = image(ImageState::Available);
        img.parameters.insert(
            "/ami-share/r/latest".into(),
            crate::observed::ObservedParameter {
                value: Some("ami-older".into()),
                version: Some(3),
                value_created: Timestamp::parse("2026-01-01T00:00:00.000Z"),
            },
        );
        let p = plan(&d, &observed(img.clone()));
        assert!(p.actions.iter().any(
            |a| matches!(a, Action::PutParameter { image_id, .. } if image_id == "ami-12345678")
        ));
        img.parameters
            .get_mut("/ami-share/r/latest")
            .unwrap()
            .value_created = Timestamp::parse("2026-12-01T00:00:00.000Z");
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
        d.deprecate_at = Timestamp::parse("2026-12-01T00:00:00Z");
        let mut obs = observed(image(ImageState::Available));
        let deprecation = |p: &Plan| {
            p.actions.iter().find_map(|a| match a {
                Action::DeprecateImage { deprecate_at, .. } => Some(deprecate_at.to_string()),
                _ => None,
            })
        };
        obs.now = Timestamp::parse("2026-11-25T10:00:00Z");
        assert_eq!(
            deprecation(&plan(&d, &obs)).as_deref(),
            Some("2026-12-01T00:00:00Z")
        );
        obs.now = Timestamp::parse("2027-03-01T08:30:10Z");
        assert_eq!(
            deprecation(&plan(&d, &obs)).as_deref(),
            Some("2027-03-01T08:31:00Z"),
            "EC2 refuses a time in the past"
        );
        obs.image.deprecation_time = Timestamp::parse("2027-03-01T08:31:00.000Z");
        assert_eq!(
            deprecation(&plan(&d, &obs)),
            None,
            "the same minute again: nothing"
        );
        obs.now = Timestamp::parse("2027-06-01T00:00:00Z");
        assert_eq!(deprecation(&plan(&d, &obs)), None, "deprecated already");
        obs.image.state = ImageState::Pending;
        obs.image.deprecation_time = None;
        assert_eq!(deprecation(&plan(&d, &obs)), None, "a pending image waits");
    }

    #[test]
    fn deregistration_protection_is_turned_on_up_to_the_strongest_asked_and_never_off() {
        let protects = |d: &Desired, obs: &Observed| {
            plan(d, obs).actions.into_iter().find_map(|a| match a {
                Action::ProtectImage { with_cooldown, .. } => Some(with_cooldown),
                _ => None,
            })
        };
        let marked = |d: &Desired, obs: &Observed| {
            plan(d, obs).actions.into_iter().any(|a| {
                matches!(a, Action::SetStatus { tags, .. } if tags.get(markers::PROTECTED).map(String::as_str) == Some("true"))
            })
        };
        let mut d = desired();
        let mut obs = observed(image(ImageState::Available));
        assert_eq!(protects(&d, &obs), None, "no rule asks");
        d.protection = Protection::On;
        assert_eq!(protects(&d, &obs), Some(false));
        assert!(
            marked(&d, &obs),
            "the mark goes with the status, after the call"
        );
        obs.image.protection = Protection::On;
        assert_eq!(protects(&d, &obs), None, "on already");
        assert!(
            marked(&d, &obs),
            "protected by someone else: ami-share's from now on"
        );
        d.protection = Protection::WithCooldown;
        assert_eq!(protects(&d, &obs), Some(true), "the cooldown is added");
        obs.image.protection = Protection::WithCooldown;
        d.protection = Protection::On;
        assert_eq!(protects(&d, &obs), None, "a stronger protection is kept");
        d.protection = Protection::Off;
        assert_eq!(protects(&d, &obs), None, "never turned off");
        obs.image.protection = Protection::Off;
        d.protection = Protection::On;
        obs.image.state = ImageState::Pending;
        assert_eq!(protects(&d, &obs), None, "a pending image waits");

        // Turned off by someone after ami-share turned it on: left off, and said.
        obs.image.state = ImageState::Available;
        obs.image
            .tags
            .insert(markers::PROTECTED.into(), "true".into());
        let p = plan(&d, &obs);
        assert_eq!(protects(&d, &obs), None);
        assert!(
            p.notes.iter().any(|n| n.contains("turned down by someone")),
            "{:?}",
            p.notes
        );
    }

    #[test]
    fn an_image_ami_share_cannot_share_is_not_protected_either() {
        let mut d = desired();
        d.protection = Protection::On;
        let obs = observed(encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws))));
        let p = plan(&d, &obs);
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::ProtectImage { .. })),
            "{:#?}",
            p.actions
        );
        // A rule that only tags (no share target) protects nothing either.
        let tags_only = Desired {
            launch_permissions: Default::default(),
            protection: Protection::On,
            ..desired()
        };
        let p = plan(&tags_only, &observed(image(ImageState::Available)));
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::ProtectImage { .. })),
            "{:#?}",
            p.actions
        );
    }

    #[test]
    fn a_copy_is_as_old_as_its_source_for_the_parameter() {
        // A copy of an older source, made after the copy of a newer source the parameter names: the
        // copy's family began when its source was created (what the reconciler reads from the source).
        let mut copy = image(ImageState::Available);
        copy.creation_date = Timestamp::parse("2026-11-30T00:00:00.000Z");
        let mut d = desired_for_copy(
            &desired(),
            &ObservedImage {
                creation_date: Timestamp::parse("2026-11-01T00:00:00.000Z"),
                ..image(ImageState::Available)
            },
            CopyKind::Regional,
        );
        d.ssm_parameters = ["/p".to_string()].into();
        copy.parameters.insert(
            "/p".into(),
            crate::observed::ObservedParameter {
                value: Some("ami-newercopy".into()),
                version: Some(1),
                value_created: Timestamp::parse("2026-11-20T00:00:00.000Z"),
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
    fn an_image_no_exclusive_rule_selects_any_more_loses_only_the_exclusive_rules_grants() {
        let stranger = account("444455556666");
        let partner = account("210987654321");
        let mut img = image(ImageState::Available);
        img.tags.insert(markers::EXCLUSIVE.into(), "true".into());
        img.launch_permissions = Some([org(), partner.clone(), stranger.clone()].into());
        // Only a rule granting the partner selects it now; the exclusive rules granted the org and
        // the partner.
        let d = Desired {
            launch_permissions: [partner.clone()].into(),
            exclusive: true,
            exclusive_scope: Some(crate::rules::ExclusiveScope {
                launch_permissions: [org(), partner.clone()].into(),
                ..Default::default()
            }),
            ..desired()
        };
        let p = plan(&d, &observed(img.clone()));
        let removed: Vec<_> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::RemoveLaunchPermissions { permissions, .. } => Some(permissions.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(
            removed,
            [vec![org()]],
            "the org goes; what a selecting rule grants and what no exclusive rule grants stay"
        );
        assert!(
            p.actions.iter().any(|a| matches!(a, Action::SetStatus { tags, .. } if tags[markers::EXCLUSIVE] == "false")),
            "the mark turns false with the status, after the removal: {p:#?}"
        );
        let after = applied(observed(img), &p);
        let p = plan(&d, &after);
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::RemoveLaunchPermissions { .. })),
            "converges"
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
            // Every share call's permissions (public sharing is a call of its own).
            p.actions
                .iter()
                .flat_map(|a| match a {
                    Action::AddLaunchPermissions { permissions, .. } => permissions.clone(),
                    _ => Vec::new(),
                })
                .collect::<Vec<_>>()
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
