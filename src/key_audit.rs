//! The key audit: grantees in ami-share's key statements that no AMI on the key is shared with any more.
//!
//! ami-share never removes a grantee from a key policy (several AMIs, shared by different rules, may use
//! one key, and removing access is an operator's decision). But an account dropped from the rules, or an
//! AMI unshared, leaves its grantee behind, and with it the grantee's use of the key through EC2. So
//! `plan` and `sweep` report them: for each customer managed key with ami-share's statements, the
//! grantees those statements admit that none of the account's AMIs on that key (in its region) is shared
//! with now. Report only.
//!
//! [`stale_grantees`] is the pure comparison; [`audit`] gathers what it needs through [`Aws`]: the
//! owner's snapshots (for their keys, in pages), each key's policy once, and the launch permissions of
//! each AMI on an audited key that the caller does not already know.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use crate::aws::{Aws, AwsError};
use crate::key_policy::{self, KeyGrantees};
use crate::keys::KeyArn;
use crate::observed::{ObservedImage, SnapshotFacts};
use crate::targets::LaunchPermission;

/// One key whose ami-share statements admit grantees no AMI on it is shared with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaleKey {
    pub region: String,
    pub key_arn: String,
    /// The grantees no AMI on the key is shared with.
    pub stale: KeyGrantees,
    /// The AMIs of the account (in the key's region) with a snapshot on the key.
    pub images: Vec<String>,
}

impl fmt::Display for StaleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "KMS key {} in {}: ami-share's statements still admit {}, which none of the {} AMI(s) on the key is shared with any more; remove them from the key policy if they should lose the key (ami-share never removes a grantee)",
            self.key_arn,
            self.region,
            self.stale,
            self.images.len()
        )
    }
}

/// The grantees of `admitted` (ami-share's statements in the policy of a key owned by `key_owner`) that
/// none of the launch permission sets of the AMIs on the key calls for.
pub fn stale_grantees<'a>(
    admitted: &KeyGrantees,
    key_owner: &str,
    shared_with: impl IntoIterator<Item = &'a BTreeSet<LaunchPermission>>,
) -> KeyGrantees {
    let needed = shared_with
        .into_iter()
        .fold(KeyGrantees::default(), |needed, permissions| {
            needed.union(&KeyGrantees::for_launch_permissions(permissions, key_owner))
        });
    admitted.difference(&needed)
}

/// Audits the keys of `images` (every image of this account listed in `region`; `of_image`: only the keys
/// of that one). Launch permissions in `known` (by image id) are not read again. A key whose policy the
/// function may not read (one nobody approved, under the template's IAM) is left out: ami-share never
/// wrote to it. `listed`: the owner's snapshots in `region`, when the caller listed them already.
pub async fn audit<A: Aws>(
    aws: &A,
    region: &str,
    images: &[ObservedImage],
    known: &BTreeMap<String, BTreeSet<LaunchPermission>>,
    of_image: Option<&str>,
    listed: Option<BTreeMap<String, SnapshotFacts>>,
) -> Result<Vec<StaleKey>, AwsError> {
    if !images.iter().any(ObservedImage::may_be_encrypted) {
        return Ok(Vec::new());
    }
    let snapshots = match listed {
        Some(snapshots) => snapshots,
        None => aws.list_owned_snapshots(region).await?,
    };
    // Key ARN → the images with a snapshot on it.
    let mut on_key: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for image in images.iter().filter(|i| i.region == region) {
        for snapshot in &image.snapshots {
            let key = snapshots
                .get(&snapshot.snapshot_id)
                .and_then(|s| s.kms_key_id.as_deref());
            if let Some(key) = key {
                on_key
                    .entry(key.to_string())
                    .or_default()
                    .insert(&image.image_id);
            }
        }
    }
    if let Some(image) = of_image {
        on_key.retain(|_, on| on.contains(image));
    }
    let mut stale_keys = Vec::new();
    let mut launch: BTreeMap<String, BTreeSet<LaunchPermission>> = BTreeMap::new();
    for (key_arn, key_images) in on_key {
        let Ok(arn) = key_arn.parse::<KeyArn>() else {
            continue;
        };
        let policy = match aws.get_key_policy(region, &key_arn).await {
            Ok(policy) => policy,
            Err(e) if e.is_access_denied() => continue,
            Err(e) => return Err(e),
        };
        // A policy ami-share cannot read as its own (a foreign edit) is reported by the events that meet it.
        let Ok(admitted) = key_policy::admitted(&policy, arn.partition()) else {
            continue;
        };
        if admitted.is_empty() {
            continue;
        }
        for image in &key_images {
            if !known.contains_key(*image) && !launch.contains_key(*image) {
                let permissions = aws.describe_launch_permissions(region, image).await?;
                launch.insert(image.to_string(), permissions);
            }
        }
        let shared_with = key_images
            .iter()
            .filter_map(|image| known.get(*image).or_else(|| launch.get(*image)));
        let stale = stale_grantees(&admitted, arn.account(), shared_with);
        if !stale.is_empty() {
            stale_keys.push(StaleKey {
                region: region.to_string(),
                key_arn,
                stale,
                images: key_images.iter().map(|i| i.to_string()).collect(),
            });
        }
    }
    Ok(stale_keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "123456789012";

    fn account(id: &str) -> LaunchPermission {
        LaunchPermission::Account(id.parse().unwrap())
    }

    fn org() -> LaunchPermission {
        LaunchPermission::Organization(
            "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5"
                .parse()
                .unwrap(),
        )
    }

    fn grantees(orgs: &[&str], accounts: &[&str]) -> KeyGrantees {
        KeyGrantees {
            organizations: orgs.iter().map(|s| s.to_string()).collect(),
            ou_paths: BTreeSet::new(),
            accounts: accounts.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_grantee_no_ami_on_the_key_is_shared_with_is_stale() {
        let admitted = grantees(&["o-a1b2c3d4e5"], &["210987654321", "444455556666"]);
        let first: BTreeSet<LaunchPermission> = [org(), account("210987654321")].into();
        let second: BTreeSet<LaunchPermission> = [account(OWNER)].into();
        assert_eq!(
            stale_grantees(&admitted, OWNER, [&first, &second]),
            grantees(&[], &["444455556666"])
        );
        assert_eq!(
            stale_grantees(&admitted, OWNER, []),
            admitted,
            "no AMI on the key: every grantee"
        );
        let all: BTreeSet<LaunchPermission> =
            [org(), account("210987654321"), account("444455556666")].into();
        assert!(stale_grantees(&admitted, OWNER, [&all]).is_empty());
    }

    #[test]
    fn a_report_says_what_to_do_and_that_nothing_is_removed() {
        let stale = StaleKey {
            region: "us-east-1".into(),
            key_arn: "arn:aws:kms:us-east-1:123456789012:key/k".into(),
            stale: grantees(&[], &["444455556666"]),
            images: vec!["ami-1".into(), "ami-2".into()],
        };
        assert_eq!(
            stale.to_string(),
            "KMS key arn:aws:kms:us-east-1:123456789012:key/k in us-east-1: ami-share's statements still admit account 444455556666, which none of the 2 AMI(s) on the key is shared with any more; remove them from the key policy if they should lose the key (ami-share never removes a grantee)"
        );
    }
}
