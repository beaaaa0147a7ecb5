//! Key blockers and patches: whether the keys of an image's snapshots can be opened to its share targets
//! (approved, customer managed, enabled, this account's), the PutKeyPolicy each needs, and what a copy to
//! another key may carry.

use super::*;

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
    pub(super) fn new(summary: String, detail: String) -> Self {
        Self {
            summary,
            detail,
            cured_by_copy: false,
        }
    }

    pub(super) fn cured_by_copy(summary: String, detail: String) -> Self {
        Self {
            cured_by_copy: true,
            ..Self::new(summary, detail)
        }
    }
}

/// The key id part of a key ARN, for short messages.
pub(super) fn key_id(arn: &KeyArn) -> &str {
    arn.as_str().rsplit('/').next().unwrap_or(arn.as_str())
}

/// Why a customer managed key of this account may not be opened, if its owner has not approved it
/// ([`keys::approval`]): the AMI is then not shared, and nothing it holds is copied to another key (a
/// copy re-encrypted with an approved key would share what the unapproved key protects just the same).
pub(super) fn unapproved(
    arn: &KeyArn,
    key: &ObservedKey,
    snapshots: &str,
    desired: &Desired,
) -> Option<Blocker> {
    if approval(arn, key.tags.as_ref(), &key.aliases, &desired.approved_keys).is_some() {
        return None;
    }
    let id = key_id(arn);
    let tag = format!("{}={}", APPROVAL_TAG, APPROVAL_TAG_VALUE);
    Some(Blocker::new(
        format!(
            "{snapshots} uses KMS key {id}, not approved for ami-share: to share, tag the key {tag} or list it in keys.approved"
        ),
        format!(
            "snapshot {snapshots} is encrypted with KMS key {arn}, whose owner has not approved ami-share: its policy is left as it is and the AMI is not shared. To approve it, its owner tags it (aws kms tag-resource --region {} --key-id {arn} --tags TagKey={},TagValue={}), or the config lists it in keys.approved",
            arn.region(),
            APPROVAL_TAG,
            APPROVAL_TAG_VALUE
        ),
    ))
}

/// Whether the config names the key by ARN or id: the only consent ami-share can see for another
/// account's key (whose tags and aliases it cannot read).
pub(super) fn named_by_arn(arn: &KeyArn, desired: &Desired) -> bool {
    desired
        .approved_keys
        .iter()
        .any(|r| !r.is_alias() && r.names(arn, &[]))
}

/// Why what the image's snapshots hold may not be copied to another key (a copy to another region, which
/// EC2 encrypts with that region's key): each encrypted snapshot must be unencrypted, on the AWS managed
/// key, on an approved key of this account, or on a key the config names by ARN.
pub(super) fn copy_blockers(desired: &Desired, image: &ObservedImage) -> Vec<Blocker> {
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

/// A key of this account that may be opened: enabled, customer managed, approved, its policy read.
pub(super) struct Openable<'a> {
    arn: KeyArn,
    snapshots: String,
    policy: &'a str,
}

/// What stands in the way of one snapshot or key, or a key to merge the share targets into.
pub(super) enum KeyVerdict<'a> {
    Blocked(Blocker),
    Openable(Openable<'a>),
}

/// For each snapshot whose encryption is unknown and each key the snapshots use (in key order): why it
/// keeps the image from being shared as it is, or that it may be opened. No merge yet: whether a
/// re-encrypted copy could help (what the reconciler asks before it reads copies) is mostly decided
/// without one, so a key policy is merged once per event, by the plan.
pub(super) fn key_verdicts<'a>(desired: &Desired, image: &'a ObservedImage) -> Vec<KeyVerdict<'a>> {
    let mut verdicts = Vec::new();
    // Key ARN → the snapshots it encrypts, so a message names both.
    let mut by_key: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for snapshot in &image.snapshots {
        let id = &snapshot.snapshot_id;
        match (snapshot.encrypted, snapshot.kms_key_id.as_deref()) {
            (Some(false), _) => {}
            (None, _) => verdicts.push(KeyVerdict::Blocked(Blocker::new(
                format!("{id}: encryption unknown"),
                format!("ami-share could not tell whether snapshot {id} is encrypted"),
            ))),
            (Some(true), None) => verdicts.push(KeyVerdict::Blocked(Blocker::new(
                format!("{id} is encrypted with an unknown key"),
                format!("snapshot {id} is encrypted but EC2 reported no KMS key for it"),
            ))),
            (Some(true), Some(key)) => by_key.entry(key).or_default().push(id),
        }
    }
    for (key_arn, snapshots) in by_key {
        let snapshots = snapshots.join(", ");
        let arn = match key_arn.parse::<KeyArn>() {
            Ok(arn) => arn,
            Err(e) => {
                verdicts.push(KeyVerdict::Blocked(Blocker::new(
                    format!("{snapshots}: unreadable key id"),
                    format!("snapshot {snapshots}: {e}"),
                )));
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
            verdicts.push(KeyVerdict::Blocked(match named_by_arn(&arn, desired) {
                true => Blocker::cured_by_copy(summary, detail),
                false => Blocker::new(
                    format!(
                        "{summary}; to share a re-encrypted copy, list the key in keys.approved (with its owner's consent) and set reencrypt.kms_key"
                    ),
                    detail,
                ),
            }));
            continue;
        }
        let Some(key) = image.keys.get(key_arn) else {
            verdicts.push(KeyVerdict::Blocked(Blocker::new(
                format!("key {id} was not read"),
                format!("KMS key {arn} was not read"),
            )));
            continue;
        };
        if let KeyManager::Other(manager) = &key.manager {
            verdicts.push(KeyVerdict::Blocked(Blocker::new(
                format!("key {id} has key manager {manager}"),
                format!("KMS reports key manager {manager:?} for KMS key {arn}, which ami-share does not know how to open"),
            )));
            continue;
        }
        if key.manager == KeyManager::Aws {
            verdicts.push(KeyVerdict::Blocked(Blocker::cured_by_copy(
                format!("{snapshots} uses the AWS managed key aws/ebs, which cannot be shared"),
                format!(
                    "snapshot {snapshots} is encrypted with the AWS managed key {arn} (aws/ebs), whose policy cannot be changed: AWS does not let anyone else use it"
                ),
            )));
            continue;
        }
        if !key.is_enabled() {
            verdicts.push(KeyVerdict::Blocked(Blocker::new(
                format!("{snapshots} uses KMS key {id}, which is {}", key.state),
                format!(
                    "snapshot {snapshots} is encrypted with KMS key {arn}, which is {}: nobody can launch from it",
                    key.state
                ),
            )));
            continue;
        }
        if let Some(blocker) = unapproved(&arn, key, &snapshots, desired) {
            verdicts.push(KeyVerdict::Blocked(blocker));
            continue;
        }
        let Some(policy) = key.policy.as_deref() else {
            verdicts.push(KeyVerdict::Blocked(Blocker::new(
                format!("the policy of key {id} was not read"),
                format!("the policy of KMS key {arn} was not read"),
            )));
            continue;
        };
        verdicts.push(KeyVerdict::Openable(Openable {
            arn,
            snapshots,
            policy,
        }));
    }
    verdicts
}

/// The key policy patches sharing needs, or why the image cannot be shared as it is (in the order of
/// [`key_verdicts`], a policy that cannot be merged into in its key's place).
pub fn key_patches(desired: &Desired, image: &ObservedImage) -> Result<Vec<Action>, Vec<Blocker>> {
    let mut blocked = Vec::new();
    let mut patches = Vec::new();
    for verdict in key_verdicts(desired, image) {
        match verdict {
            KeyVerdict::Blocked(blocker) => blocked.push(blocker),
            KeyVerdict::Openable(key) => match patch(desired, image, key) {
                Ok(Some(action)) => patches.push(action),
                Ok(None) => {}
                Err(blocker) => blocked.push(blocker),
            },
        }
    }
    if blocked.is_empty() {
        Ok(patches)
    } else {
        Err(blocked)
    }
}

/// The share targets merged into one key's policy: the patch, none when it admits them already, or why
/// it cannot be merged into (a copy would not cure that).
fn patch(
    desired: &Desired,
    image: &ObservedImage,
    Openable {
        arn,
        snapshots,
        policy,
    }: Openable<'_>,
) -> Result<Option<Action>, Blocker> {
    let grantees = KeyGrantees::for_launch_permissions(&desired.launch_permissions, arn.account());
    match key_policy::merge(policy, &grantees, arn.partition()) {
        Ok(None) => Ok(None),
        Ok(Some(merged)) => Ok(Some(Action::PatchKeyPolicy {
            region: image.region.clone(),
            key_arn: arn.to_string(),
            admit: merged.admitted,
            limit_to_ec2: merged.limited_to_ec2,
            grantees,
            policy: merged.policy,
        })),
        Err(e) => {
            let id = key_id(&arn);
            let summary = match &e {
                key_policy::KeyPolicyError::TooLarge { .. } => {
                    format!("the policy of key {id} would exceed 32 KB")
                }
                _ => format!("the policy of key {id} cannot be merged into"),
            };
            Err(Blocker::new(
                summary,
                format!("KMS key {arn} of snapshot {snapshots}: {e}"),
            ))
        }
    }
}

/// Whether every reason the image cannot be shared as it is would be cured by a copy re-encrypted with
/// a key of this account (and there is such a reason). A key policy ami-share cannot merge into would
/// keep the image from being shared after the copy too, so keys it may open are merged here as well, but
/// only when a copy is otherwise the cure: an image with snapshots both on the AWS managed key (or
/// another account's) and on a key it may open. For every other image, no merge happens here.
pub(super) fn all_cured_by_copy(desired: &Desired, image: &ObservedImage) -> bool {
    let verdicts = key_verdicts(desired, image);
    let mut blockers = verdicts.iter().filter_map(|v| match v {
        KeyVerdict::Blocked(blocker) => Some(blocker),
        KeyVerdict::Openable(_) => None,
    });
    let cured = blockers.clone().next().is_some() && blockers.all(|b| b.cured_by_copy);
    cured
        && verdicts.into_iter().all(|v| match v {
            KeyVerdict::Blocked(_) => true,
            KeyVerdict::Openable(key) => patch(desired, image, key).is_ok(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::plan::*;

    #[test]
    fn what_keeps_an_image_from_sharing_is_listed_in_key_order() {
        // CMK's ARN sorts before AWS_EBS's: its policy's merge error comes first, where its key is.
        let image = on_aws_ebs_and_cmk("not a policy");
        let blocked = key_patches(&desired(), &image).unwrap_err();
        let summaries: Vec<&str> = blocked.iter().map(|b| b.summary.as_str()).collect();
        assert_eq!(summaries.len(), 2, "{summaries:?}");
        assert!(
            summaries[0].contains("cannot be merged into"),
            "{summaries:?}"
        );
        assert!(summaries[1].contains("aws/ebs"), "{summaries:?}");
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
}
