//! The key-policy merge: admit an AMI's share targets to the customer managed KMS key that encrypts its
//! snapshots, through EC2 only, keeping every statement ami-share does not own exactly as it was.
//!
//! Pure. ami-share owns nine statements, known by their Sids ([`OWNED_SIDS`]): for each audience
//! (organizations, OUs, accounts) one statement for using the key, one for `kms:CreateGrant`, which needs
//! its own condition, and one for `kms:DescribeKey` alone. The merge reads the grantees already in those
//! statements, unites them with the ones wanted, and writes the nine back (those that are not empty) after
//! all the other statements, in a fixed order, with sorted lists. Hence:
//! - **idempotent**: a grantee already admitted changes nothing, and the merge then returns `None` (no write);
//! - **order-independent**: admitting A then B gives byte-for-byte the policy B then A gives;
//! - **monotonic**: a grantee is never removed. Several AMIs, shared by different rules, may use one key: a
//!   grantee one AMI no longer needs may be needed by another. (Removing is an operator's decision.)
//! - **never open**: a statement with `Principal: {"AWS": "*"}` is only ever written with an
//!   `aws:PrincipalOrgID` condition naming at least one organization;
//! - **through EC2 only**: every statement that uses the key carries
//!   `"StringLike": {"kms:ViaService": "ec2.*.amazonaws.com"}`
//!   (`amazonaws.com.cn` in `aws-cn`), so the receivers' principals can use the key only in calls EC2 and
//!   EBS make on their behalf (launching an instance, creating a volume, copying the AMI), never by calling
//!   KMS themselves: an organization-wide `kms:Decrypt` on a key that may also encrypt other data would
//!   otherwise let any principal of the organization decrypt what it holds of that data. The region is
//!   left open (`ec2.*`): a receiver that copies the AMI to another region has EC2 in that region use the
//!   key, and `kms:ViaService` is set only by AWS services, so `ec2.*.amazonaws.com` names EC2 in some
//!   region and nothing else. Launches by Auto Scaling run under grants, which key policy conditions do not
//!   govern (README, "Encrypted AMIs"). Statements written by earlier versions, without the condition, are
//!   upgraded by the next merge;
//! - **described directly**: the DescribeKey statements carry no `kms:ViaService`, so a receiving account
//!   can call DescribeKey itself and see that the key admits it (`ami-share check`). DescribeKey returns
//!   the key's metadata (ARN, state, spec, dates), never its policy, and uses nothing. They never cause a
//!   write on their own (keys opened before they existed gain them with the next write that admits a new
//!   receiver), and give way where the policy would otherwise pass KMS's size limit.
//!
//! **An operator may narrow ami-share's statements**, and the merge keeps it: conditions ami-share does not
//! write (IAM requires every condition of a statement, so an added one can only narrow it), a `kms:ViaService`
//! limited to named regions (`ec2.eu-west-1.amazonaws.com`), or a shorter list of ami-share's actions. What
//! would widen a statement (another action, another principal or principal form, one of ami-share's
//! conditions removed or loosened, `NotAction`, another effect or resource) is refused as a foreign edit:
//! the policy is left as it is and the AMI is not shared.
//!
//! Why these actions (AWS EBS guide, "Share the KMS key used to encrypt a shared snapshot"; EC2 guide,
//! "Allow organizations and OUs to use a KMS key"): launching from, or copying, an AMI with encrypted
//! snapshots makes EBS, on the receiver's behalf, describe the key (`kms:DescribeKey`), create a data key
//! for the new volume (`kms:GenerateDataKey`, `kms:GenerateDataKeyWithoutPlaintext`), decrypt the
//! snapshot's data key (`kms:Decrypt`), re-encrypt it when the volume or copy uses another key
//! (`kms:ReEncryptFrom`, `kms:ReEncryptTo`), and create a grant so the instance can use the key while it
//! runs (`kms:CreateGrant`, limited by `kms:GrantIsForAWSResource` to grants EBS makes on the receiver's
//! behalf). This is the list of AWS's EBS guide. Auto Scaling in a receiving account needs more: that
//! account creates a grant for its own service-linked role, a grant not made for an AWS resource, which
//! these statements do not allow (allowing it would let every principal of the organization create any
//! grant); README, "Encrypted AMIs", says how to add it. AWS's own example also grants `kms:Encrypt`, `kms:List*`
//! and `kms:Get*`: EBS needs none of them, and `kms:GetKeyPolicy` would show this key's whole policy to
//! every account in the organization, so they are left out. Receivers also need an IAM policy in their
//! own account allowing these actions on the key (README, "Encrypted AMIs").

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::json::json_kind;
use crate::targets::{LaunchPermission, is_account_id, is_org_id, is_ou_id};

mod statement;

use statement::*;

/// KMS's limit on the size of a key policy document.
pub use crate::limits::KEY_POLICY_BYTES as MAX_POLICY_BYTES;

/// The actions receivers need on the key, besides `kms:CreateGrant` (see the module documentation).
pub const USE_ACTIONS: [&str; 6] = [
    "kms:Decrypt",
    "kms:DescribeKey",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyWithoutPlaintext",
    "kms:ReEncryptFrom",
    "kms:ReEncryptTo",
];

pub(super) const ORG_ID_KEY: &str = "aws:PrincipalOrgID";

pub(super) const ORG_PATHS_KEY: &str = "aws:PrincipalOrgPaths";

pub(super) const GRANT_FOR_AWS_RESOURCE: &str = "kms:GrantIsForAWSResource";

/// The condition that limits every statement ami-share writes to calls EC2 makes for the principal.
pub const VIA_SERVICE_KEY: &str = "kms:ViaService";

pub(super) const VIA_SERVICE_OPERATOR: &str = "StringLike";

/// `kms:ViaService` of EC2 in any region of `partition`: `ec2.*.amazonaws.com` (`.com.cn` in China).
pub fn via_ec2(partition: &str) -> String {
    format!("ec2.*.{}", dns_suffix(partition))
}

/// Who a statement admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Audience {
    Organizations,
    OrganizationalUnits,
    Accounts,
}

/// What a statement allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    UseKey,
    CreateGrant,
    /// `kms:DescribeKey` called by the receiver itself, not through EC2: the key's metadata only (ARN,
    /// state, spec; never the policy, nor any use of the key), so a receiving account can tell that the
    /// key admits it (`ami-share check`). Everything that uses the key stays through EC2.
    DescribeKey,
}

impl Purpose {
    fn actions(self) -> BTreeSet<String> {
        match self {
            Self::UseKey => USE_ACTIONS.iter().map(|a| a.to_string()).collect(),
            Self::CreateGrant => ["kms:CreateGrant".to_string()].into(),
            Self::DescribeKey => ["kms:DescribeKey".to_string()].into(),
        }
    }
}

/// ami-share's statements, in the order it writes them. A statement with one of these Sids is ami-share's.
pub const OWNED_SIDS: [&str; 9] = [
    "AmiShareOrganizationsUseKey",
    "AmiShareOrganizationsCreateGrant",
    "AmiShareOrganizationalUnitsUseKey",
    "AmiShareOrganizationalUnitsCreateGrant",
    "AmiShareAccountsUseKey",
    "AmiShareAccountsCreateGrant",
    "AmiShareOrganizationsDescribeKey",
    "AmiShareOrganizationalUnitsDescribeKey",
    "AmiShareAccountsDescribeKey",
];

pub(super) const OWNED: [(Audience, Purpose); 9] = [
    (Audience::Organizations, Purpose::UseKey),
    (Audience::Organizations, Purpose::CreateGrant),
    (Audience::OrganizationalUnits, Purpose::UseKey),
    (Audience::OrganizationalUnits, Purpose::CreateGrant),
    (Audience::Accounts, Purpose::UseKey),
    (Audience::Accounts, Purpose::CreateGrant),
    (Audience::Organizations, Purpose::DescribeKey),
    (Audience::OrganizationalUnits, Purpose::DescribeKey),
    (Audience::Accounts, Purpose::DescribeKey),
];

pub(super) fn owned(sid: &str) -> Option<(Audience, Purpose)> {
    OWNED_SIDS.iter().position(|s| *s == sid).map(|i| OWNED[i])
}

pub(super) fn sid_of(audience: Audience, purpose: Purpose) -> &'static str {
    let i = OWNED
        .iter()
        .position(|o| *o == (audience, purpose))
        .expect("every audience and purpose has a Sid");
    OWNED_SIDS[i]
}

/// Whom a key must admit: the receivers of the AMIs it encrypts.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct KeyGrantees {
    /// Organization ids (`o-…`): every account of the organization may use the key.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub organizations: BTreeSet<String>,
    /// `aws:PrincipalOrgPaths` patterns, `o-…/*/ou-…/*`: every account in the OU or below it.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub ou_paths: BTreeSet<String>,
    /// 12-digit account ids: every principal of the account (its IAM policies decide who exactly).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub accounts: BTreeSet<String>,
}

impl KeyGrantees {
    /// The grantees an AMI's launch permissions call for, on a key owned by `key_owner` (who needs no grant).
    ///
    /// An OU's path is derived from its ARN as `o-…/*/ou-…/*`: the wildcard stands for the root and any
    /// parent OUs. OU ids are unique in an organization and the pattern is bounded by `/` on both sides,
    /// so it matches exactly the accounts in the OU and in the OUs below it, as the launch permission does.
    /// The exact path (`o-…/r-…/ou-…/`) would need `organizations:ListParents`, which only the management
    /// account or a delegated administrator may call, not the account that owns the AMI.
    pub fn for_launch_permissions<'a>(
        permissions: impl IntoIterator<Item = &'a LaunchPermission>,
        key_owner: &str,
    ) -> Self {
        let mut grantees = Self::default();
        for permission in permissions {
            match permission {
                LaunchPermission::Organization(arn) => {
                    grantees.organizations.insert(arn.org_id().to_string());
                }
                LaunchPermission::OrganizationalUnit(arn) => {
                    let (org, ou) = arn.ids();
                    grantees.ou_paths.insert(format!("{org}/*/{ou}/*"));
                }
                LaunchPermission::Account(id) if id.as_str() != key_owner => {
                    grantees.accounts.insert(id.as_str().to_string());
                }
                // The owner needs no grant; nobody can launch a public AMI with encrypted snapshots.
                LaunchPermission::Account(_) | LaunchPermission::Public => {}
            }
        }
        grantees
    }

    pub fn is_empty(&self) -> bool {
        self.organizations.is_empty() && self.ou_paths.is_empty() && self.accounts.is_empty()
    }

    fn set_mut(&mut self, audience: Audience) -> &mut BTreeSet<String> {
        match audience {
            Audience::Organizations => &mut self.organizations,
            Audience::OrganizationalUnits => &mut self.ou_paths,
            Audience::Accounts => &mut self.accounts,
        }
    }

    fn combine(
        &self,
        other: &Self,
        f: impl Fn(&BTreeSet<String>, &BTreeSet<String>) -> BTreeSet<String>,
    ) -> Self {
        Self {
            organizations: f(&self.organizations, &other.organizations),
            ou_paths: f(&self.ou_paths, &other.ou_paths),
            accounts: f(&self.accounts, &other.accounts),
        }
    }

    pub fn union(&self, other: &Self) -> Self {
        self.combine(other, |a, b| a.union(b).cloned().collect())
    }

    fn intersection(&self, other: &Self) -> Self {
        self.combine(other, |a, b| a.intersection(b).cloned().collect())
    }

    /// Those of `self` that `other` lacks.
    pub fn difference(&self, other: &Self) -> Self {
        self.combine(other, |a, b| a.difference(b).cloned().collect())
    }

    /// Whether every grantee of `self` is in `other`.
    pub fn is_subset(&self, other: &Self) -> bool {
        self.difference(other).is_empty()
    }
}

impl fmt::Display for KeyGrantees {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = (self
            .organizations
            .iter()
            .map(|o| format!("organization {o}")))
        .chain(self.ou_paths.iter().map(|p| format!("OU path {p}")))
        .chain(self.accounts.iter().map(|a| format!("account {a}")))
        .collect();
        f.write_str(&parts.join(", "))
    }
}

/// A key policy ami-share could not merge into. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyPolicyError {
    #[error("the key policy is not a policy document ami-share can read ({0})")]
    Unreadable(String),
    #[error(
        "the key policy has a statement with ami-share's Sid {sid:?} that would admit more than ami-share writes ({problem}); ami-share keeps changes that narrow its statements (added conditions, kms:ViaService limited to named regions, fewer of its actions), but not this one: if the statement is yours, give it another Sid, otherwise delete it and ami-share will write it again"
    )]
    ForeignEdit { sid: String, problem: String },
    #[error(
        "with the statements ami-share needs, the key policy would be {bytes} bytes, over KMS's limit of {MAX_POLICY_BYTES}; share with organizations or OUs rather than many single accounts, or shorten the policy's other statements"
    )]
    TooLarge { bytes: usize },
}

/// The policy to write and what it changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The whole new policy document.
    pub policy: String,
    /// The wanted grantees the current policy lacked.
    pub admitted: KeyGrantees,
    /// Whether statements an earlier version wrote without `kms:ViaService` are limited to EC2 now.
    pub limited_to_ec2: bool,
}

/// Merges `want` into the policy document `current` of a key in `partition`.
///
/// `Ok(None)`: every wanted grantee is already admitted through EC2, nothing to write. `Ok(Some(_))`:
/// the policy to write. An error means the policy must not be written (it would lose something, widen
/// what someone narrowed, or KMS would refuse it).
pub fn merge(
    current: &str,
    want: &KeyGrantees,
    partition: &str,
) -> Result<Option<Merged>, KeyPolicyError> {
    let (document, statements) = parse(current)?;
    let (foreign, owned) = split(statements, partition)?;
    // Only what a launch needs decides whether to write: a key that admits its receivers is not
    // rewritten just to let them describe it (a key kept by a template would drift on every event).
    let missing = want.difference(&owned.admitted());
    let limited_to_ec2 = !owned.legacy.is_empty();
    if missing.is_empty() && !limited_to_ec2 {
        return Ok(None);
    }
    // Each statement keeps whom it named and gains the wanted: a grantee an operator removed from one
    // of its statements comes back only if an AMI wants it again. The DescribeKey statements go with
    // any write, where they fit: a policy too large with them is written with those it had.
    let use_key = owned.use_key.union(want);
    let create_grant = owned.create_grant.union(want);
    let policy = match render_policy(
        &document,
        &foreign,
        &owned,
        [&use_key, &create_grant, &owned.describe_key.union(want)],
        partition,
    ) {
        Ok(policy) => policy,
        Err(_) => render_policy(
            &document,
            &foreign,
            &owned,
            [&use_key, &create_grant, &owned.describe_key],
            partition,
        )?,
    };
    Ok(Some(Merged {
        policy,
        admitted: missing,
        limited_to_ec2,
    }))
}

/// The policy text with `foreign` first, then ami-share's statements for `grantees` (to use the key, to
/// create grants, to describe it), pretty when it fits KMS's limit, compact when only that fits.
fn render_policy(
    document: &Map<String, Value>,
    foreign: &[Value],
    owned: &OwnedGrants,
    [use_key, create_grant, describe_key]: [&KeyGrantees; 3],
    partition: &str,
) -> Result<String, KeyPolicyError> {
    let mut statements = foreign.to_vec();
    statements.extend(OWNED.iter().filter_map(|(audience, purpose)| {
        let narrowing = owned.narrowings.get(sid_of(*audience, *purpose));
        let grantees = match purpose {
            Purpose::UseKey => use_key,
            Purpose::CreateGrant => create_grant,
            Purpose::DescribeKey => describe_key,
        };
        render(*audience, *purpose, grantees, partition, narrowing)
    }));
    let mut document = document.clone();
    document
        .entry("Version")
        .or_insert_with(|| json!("2012-10-17"));
    document.insert("Statement".into(), Value::Array(statements));
    let document = Value::Object(document);
    // Readable when it fits (the console shows the stored text), compact when only that fits.
    let mut policy = serde_json::to_string_pretty(&document).expect("a JSON value serializes");
    if policy.len() > MAX_POLICY_BYTES {
        policy = document.to_string();
    }
    if policy.len() > MAX_POLICY_BYTES {
        return Err(KeyPolicyError::TooLarge {
            bytes: policy.len(),
        });
    }
    Ok(policy)
}

/// The grantees the policy document `policy` admits through ami-share's statements: for checking a
/// policy after writing it (a concurrent writer may have replaced it).
pub fn admitted(policy: &str, partition: &str) -> Result<KeyGrantees, KeyPolicyError> {
    let (_, statements) = parse(policy)?;
    let (_, owned) = split(statements, partition)?;
    Ok(owned.admitted())
}

/// A policy document as a JSON object without its statements, and the statements.
pub(super) fn parse(policy: &str) -> Result<(Map<String, Value>, Vec<Value>), KeyPolicyError> {
    let mut document = match serde_json::from_str::<Value>(policy) {
        Ok(Value::Object(document)) => document,
        Ok(other) => {
            return Err(KeyPolicyError::Unreadable(format!(
                "a JSON {}, not an object",
                json_kind(&other)
            )));
        }
        Err(e) => return Err(KeyPolicyError::Unreadable(format!("not JSON: {e}"))),
    };
    let statements = match document.remove("Statement") {
        None => Vec::new(),
        Some(Value::Array(statements)) => statements,
        Some(statement @ Value::Object(_)) => vec![statement],
        Some(other) => {
            return Err(KeyPolicyError::Unreadable(format!(
                "\"Statement\" is a JSON {}, not a list",
                json_kind(&other)
            )));
        }
    };
    Ok((document, statements))
}

/// What ami-share's own statements grant, by purpose, and how they were narrowed.
#[derive(Default)]
pub(super) struct OwnedGrants {
    use_key: KeyGrantees,
    create_grant: KeyGrantees,
    describe_key: KeyGrantees,
    /// By Sid: the narrowing found in that statement (absent: none).
    narrowings: BTreeMap<&'static str, Narrowing>,
    /// Sids of statements without `kms:ViaService`.
    legacy: BTreeSet<&'static str>,
}

impl OwnedGrants {
    /// A grantee counts as admitted only when both of its statements name it.
    fn admitted(&self) -> KeyGrantees {
        self.use_key.intersection(&self.create_grant)
    }
}

/// Separates the statements ami-share does not own (kept, in order, untouched) from what its own grant.
pub(super) fn split(
    statements: Vec<Value>,
    partition: &str,
) -> Result<(Vec<Value>, OwnedGrants), KeyPolicyError> {
    let mut foreign = Vec::new();
    let mut owned_grants = OwnedGrants::default();
    for statement in statements {
        let Some((audience, purpose)) =
            statement.get("Sid").and_then(Value::as_str).and_then(owned)
        else {
            foreign.push(statement);
            continue;
        };
        let sid = sid_of(audience, purpose);
        let found = read_owned(&statement, audience, purpose, partition)?;
        let into = match purpose {
            Purpose::UseKey => &mut owned_grants.use_key,
            Purpose::CreateGrant => &mut owned_grants.create_grant,
            Purpose::DescribeKey => &mut owned_grants.describe_key,
        };
        into.set_mut(audience).extend(found.grantees);
        if found.legacy {
            owned_grants.legacy.insert(sid);
        }
        if found.narrowing != Narrowing::default() {
            // Two statements under one Sid are written back as one: they must narrow alike.
            if let Some(earlier) = owned_grants.narrowings.get(sid)
                && *earlier != found.narrowing
            {
                return Err(KeyPolicyError::ForeignEdit {
                    sid: sid.to_string(),
                    problem: "two statements have this Sid and are narrowed differently".into(),
                });
            }
            owned_grants.narrowings.insert(sid, found.narrowing);
        }
    }
    Ok((foreign, owned_grants))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const ORG: &str = "o-a1b2c3d4e5";
    const OU_PATH: &str = "o-a1b2c3d4e5/*/ou-ab12-cd34ef56/*";

    /// The default policy KMS gives a key made in the console (its first statement), plus one of the owner's.
    fn default_policy() -> String {
        json!({
            "Version": "2012-10-17",
            "Id": "key-consolepolicy-3",
            "Statement": [
                {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
                 "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "kms:*", "Resource": "*"},
                {"Sid": "Allow use of the key by the build role", "Effect": "Allow",
                 "Principal": {"AWS": "arn:aws:iam::123456789012:role/packer"},
                 "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"}
            ]
        })
        .to_string()
    }

    fn grantees(orgs: &[&str], paths: &[&str], accounts: &[&str]) -> KeyGrantees {
        let set = |items: &[&str]| items.iter().map(|s| s.to_string()).collect();
        KeyGrantees {
            organizations: set(orgs),
            ou_paths: set(paths),
            accounts: set(accounts),
        }
    }

    fn statements(policy: &str) -> Vec<Value> {
        serde_json::from_str::<Value>(policy).unwrap()["Statement"]
            .as_array()
            .unwrap()
            .clone()
    }

    #[test]
    fn share_targets_become_grantees_and_the_key_owner_needs_none() {
        let org: LaunchPermission = LaunchPermission::Organization(
            format!("arn:aws:organizations::123456789012:organization/{ORG}")
                .parse()
                .unwrap(),
        );
        let ou = LaunchPermission::OrganizationalUnit(
            "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12-cd34ef56"
                .parse()
                .unwrap(),
        );
        let partner = LaunchPermission::Account("210987654321".parse().unwrap());
        let owner = LaunchPermission::Account("123456789012".parse().unwrap());
        let g = KeyGrantees::for_launch_permissions(
            [&org, &ou, &partner, &owner, &LaunchPermission::Public],
            "123456789012",
        );
        assert_eq!(g, grantees(&[ORG], &[OU_PATH], &["210987654321"]));
        assert_eq!(
            g.to_string(),
            format!("organization {ORG}, OU path {OU_PATH}, account 210987654321")
        );
    }

    #[test]
    fn the_merge_appends_ami_shares_statements_and_keeps_the_others_as_they_were() {
        let want = grantees(&[ORG], &[OU_PATH], &["210987654321"]);
        let merged = merge(&default_policy(), &want, "aws").unwrap().unwrap();
        assert_eq!(merged.admitted, want);
        let after = statements(&merged.policy);
        let before = statements(&default_policy());
        assert_eq!(
            after[..2],
            before[..],
            "foreign statements first, unchanged"
        );
        let document: Value = serde_json::from_str(&merged.policy).unwrap();
        assert_eq!(document["Id"], "key-consolepolicy-3");
        let use_actions = json!(USE_ACTIONS);
        let grant = json!({"kms:GrantIsForAWSResource": "true"});
        let ec2 = json!({"kms:ViaService": "ec2.*.amazonaws.com"});
        assert_eq!(
            after[2..],
            [
                json!({"Sid": "AmiShareOrganizationsUseKey", "Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": use_actions, "Resource": "*",
                       "Condition": {"StringEquals": {"aws:PrincipalOrgID": [ORG]}, "StringLike": ec2}}),
                json!({"Sid": "AmiShareOrganizationsCreateGrant", "Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": "kms:CreateGrant", "Resource": "*",
                       "Condition": {"StringEquals": {"aws:PrincipalOrgID": [ORG]}, "StringLike": ec2,
                                     "Bool": grant}}),
                json!({"Sid": "AmiShareOrganizationalUnitsUseKey", "Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": use_actions, "Resource": "*",
                       "Condition": {"StringEquals": {"aws:PrincipalOrgID": [ORG]},
                                     "ForAnyValue:StringLike": {"aws:PrincipalOrgPaths": [OU_PATH]},
                                     "StringLike": ec2}}),
                json!({"Sid": "AmiShareOrganizationalUnitsCreateGrant", "Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": "kms:CreateGrant", "Resource": "*",
                       "Condition": {"StringEquals": {"aws:PrincipalOrgID": [ORG]},
                                     "ForAnyValue:StringLike": {"aws:PrincipalOrgPaths": [OU_PATH]},
                                     "StringLike": ec2, "Bool": grant}}),
                json!({"Sid": "AmiShareAccountsUseKey", "Effect": "Allow",
                       "Principal": {"AWS": ["arn:aws:iam::210987654321:root"]},
                       "Action": use_actions, "Resource": "*", "Condition": {"StringLike": ec2}}),
                json!({"Sid": "AmiShareAccountsCreateGrant", "Effect": "Allow",
                       "Principal": {"AWS": ["arn:aws:iam::210987654321:root"]},
                       "Action": "kms:CreateGrant", "Resource": "*",
                       "Condition": {"StringLike": ec2, "Bool": grant}}),
                // Describing the key (metadata), the receiver may do itself: no kms:ViaService.
                json!({"Sid": "AmiShareOrganizationsDescribeKey", "Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": "kms:DescribeKey", "Resource": "*",
                       "Condition": {"StringEquals": {"aws:PrincipalOrgID": [ORG]}}}),
                json!({"Sid": "AmiShareOrganizationalUnitsDescribeKey", "Effect": "Allow", "Principal": {"AWS": "*"},
                       "Action": "kms:DescribeKey", "Resource": "*",
                       "Condition": {"StringEquals": {"aws:PrincipalOrgID": [ORG]},
                                     "ForAnyValue:StringLike": {"aws:PrincipalOrgPaths": [OU_PATH]}}}),
                json!({"Sid": "AmiShareAccountsDescribeKey", "Effect": "Allow",
                       "Principal": {"AWS": ["arn:aws:iam::210987654321:root"]},
                       "Action": "kms:DescribeKey", "Resource": "*"}),
            ]
        );
        assert_eq!(admitted(&merged.policy, "aws").unwrap(), want);
    }

    #[test]
    fn a_key_that_admits_its_receivers_is_not_rewritten_to_let_them_describe_it() {
        let want = grantees(&[ORG], &[], &["210987654321"]);
        let once = merge(&default_policy(), &want, "aws").unwrap().unwrap();
        // As an earlier version (or a template copied from it) holds it: no DescribeKey statements.
        let mut document: Value = serde_json::from_str(&once.policy).unwrap();
        document["Statement"].as_array_mut().unwrap().retain(|s| {
            !s["Sid"]
                .as_str()
                .unwrap_or_default()
                .ends_with("DescribeKey")
        });
        let older = document.to_string();
        assert_eq!(
            merge(&older, &want, "aws").unwrap(),
            None,
            "no write for DescribeKey alone"
        );
        // Any write adds them.
        let more = grantees(&[ORG], &[], &["210987654321", "111122223333"]);
        let merged = merge(&older, &more, "aws").unwrap().unwrap();
        assert_eq!(merged.admitted, grantees(&[], &[], &["111122223333"]));
        assert!(merged.policy.contains("AmiShareOrganizationsDescribeKey"));
        assert!(merged.policy.contains("AmiShareAccountsDescribeKey"));
    }

    #[test]
    fn the_describe_statements_give_way_when_only_they_would_pass_the_size_limit() {
        let want = grantees(&[ORG], &[], &[]);
        let padded = |pad: usize| {
            json!({"Version": "2012-10-17", "Statement": [
                {"Sid": "Big", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                 "Action": "kms:*", "Resource": "*", "Condition": {"StringEquals": {"aws:PrincipalTag/x": "y".repeat(pad)}}}
            ]})
            .to_string()
        };
        let without_describe = (MAX_POLICY_BYTES - 1_500..MAX_POLICY_BYTES).find_map(|pad| {
            let merged = merge(&padded(pad), &want, "aws").ok()??;
            (!merged.policy.contains("AmiShareOrganizationsDescribeKey")
                && merged.policy.contains("AmiShareOrganizationsUseKey"))
            .then_some(merged)
        });
        let merged =
            without_describe.expect("a size at which only the DescribeKey statement does not fit");
        assert!(merged.policy.len() <= MAX_POLICY_BYTES);
        assert_eq!(merged.admitted, want, "what a launch needs is written");
    }

    #[test]
    fn merging_what_is_already_admitted_writes_nothing() {
        let want = grantees(&[ORG], &[OU_PATH], &["210987654321"]);
        let once = merge(&default_policy(), &want, "aws").unwrap().unwrap();
        assert_eq!(merge(&once.policy, &want, "aws").unwrap(), None);
        let fewer = grantees(&[], &[OU_PATH], &[]);
        assert_eq!(merge(&once.policy, &fewer, "aws").unwrap(), None);
    }

    #[test]
    fn new_grantees_are_united_into_ami_shares_statements() {
        let first = merge(
            &default_policy(),
            &grantees(&[], &[OU_PATH], &["210987654321"]),
            "aws",
        )
        .unwrap()
        .unwrap();
        let other_path = "o-a1b2c3d4e5/*/ou-ab12-99999999/*";
        let second = merge(
            &first.policy,
            &grantees(&[], &[other_path], &["111122223333"]),
            "aws",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            second.admitted,
            grantees(&[], &[other_path], &["111122223333"])
        );
        assert_eq!(
            admitted(&second.policy, "aws").unwrap(),
            grantees(
                &[],
                &[OU_PATH, other_path],
                &["111122223333", "210987654321"]
            )
        );
        assert_eq!(
            statements(&second.policy).len(),
            2 + 6,
            "no duplicate statements"
        );
    }

    #[test]
    fn a_grantee_missing_from_one_of_its_two_statements_is_written_again() {
        let once = merge(&default_policy(), &grantees(&[ORG], &[], &[]), "aws")
            .unwrap()
            .unwrap();
        let mut document: Value = serde_json::from_str(&once.policy).unwrap();
        document["Statement"]
            .as_array_mut()
            .unwrap()
            .retain(|s| s["Sid"] != "AmiShareOrganizationsCreateGrant");
        let damaged = document.to_string();
        assert_eq!(admitted(&damaged, "aws").unwrap(), KeyGrantees::default());
        let repaired = merge(&damaged, &grantees(&[ORG], &[], &[]), "aws")
            .unwrap()
            .unwrap();
        assert_eq!(repaired.policy, once.policy);
    }

    #[test]
    fn a_grantee_an_operator_removed_from_one_statement_comes_back_only_when_wanted() {
        let both = grantees(&[], &[], &["210987654321", "444455556666"]);
        let once = merge(&default_policy(), &both, "aws").unwrap().unwrap();
        let mut document: Value = serde_json::from_str(&once.policy).unwrap();
        for statement in document["Statement"].as_array_mut().unwrap() {
            if statement["Sid"] == "AmiShareAccountsUseKey" {
                statement["Principal"]["AWS"] = json!(["arn:aws:iam::210987654321:root"]);
            }
        }
        let edited = document.to_string();
        let other = grantees(&[], &[], &["111122223333"]);
        let merged = merge(&edited, &other, "aws").unwrap().unwrap();
        let use_key = statements(&merged.policy)
            .into_iter()
            .find(|s| s["Sid"] == "AmiShareAccountsUseKey")
            .unwrap();
        assert_eq!(
            use_key["Principal"]["AWS"],
            json!([
                "arn:aws:iam::111122223333:root",
                "arn:aws:iam::210987654321:root"
            ]),
            "444455556666 stays removed"
        );
        let wanted_again = merge(&merged.policy, &both, "aws").unwrap().unwrap();
        assert_eq!(
            admitted(&wanted_again.policy, "aws").unwrap().accounts,
            [
                "111122223333".to_string(),
                "210987654321".to_string(),
                "444455556666".to_string()
            ]
            .into()
        );
    }

    #[test]
    fn other_partitions_name_account_roots_in_their_partition() {
        let merged = merge(
            &default_policy(),
            &grantees(&[], &[], &["210987654321"]),
            "aws-cn",
        )
        .unwrap()
        .unwrap();
        assert!(merged.policy.contains("arn:aws-cn:iam::210987654321:root"));
        assert_eq!(
            admitted(&merged.policy, "aws-cn").unwrap().accounts,
            ["210987654321".to_string()].into()
        );
    }

    #[test]
    fn a_single_statement_object_and_a_missing_version_are_handled() {
        let single = json!({"Statement": {"Sid": "Root", "Effect": "Allow",
            "Principal": {"AWS": "arn:aws:iam::123456789012:root"}, "Action": "kms:*", "Resource": "*"}});
        let merged = merge(&single.to_string(), &grantees(&[ORG], &[], &[]), "aws")
            .unwrap()
            .unwrap();
        let document: Value = serde_json::from_str(&merged.policy).unwrap();
        assert_eq!(document["Version"], "2012-10-17");
        assert_eq!(document["Statement"][0], single["Statement"]);
        assert_eq!(
            document["Statement"].as_array().unwrap().len(),
            4,
            "the root's, and the organization's UseKey, CreateGrant and DescribeKey"
        );
    }

    #[test]
    fn an_unreadable_policy_is_refused_not_rewritten() {
        let want = grantees(&[ORG], &[], &[]);
        for (policy, expected) in [
            ("not json", "not JSON"),
            ("[]", "a JSON array, not an object"),
            ("{\"Statement\": \"x\"}", "\"Statement\" is a JSON string"),
        ] {
            let e = merge(policy, &want, "aws").unwrap_err();
            assert!(matches!(e, KeyPolicyError::Unreadable(_)), "{e}");
            assert!(e.to_string().contains(expected), "{e}");
        }
    }

    /// ami-share's statements for `grantees`, as written.
    fn owned_statements(g: &KeyGrantees) -> Vec<Value> {
        OWNED
            .iter()
            .filter_map(|(a, p)| render(*a, *p, g, "aws", None))
            .collect()
    }

    /// A policy of ami-share's statements for `all`, one of them changed by `change`.
    fn edited(all: &KeyGrantees, sid: &str, change: &dyn Fn(&mut Value)) -> String {
        let mut statements = owned_statements(all);
        let s = statements.iter_mut().find(|s| s["Sid"] == sid).unwrap();
        change(s);
        json!({"Version": "2012-10-17", "Statement": statements}).to_string()
    }

    #[test]
    fn a_hand_edit_that_widens_an_owned_statement_is_refused_not_rewritten() {
        let want = grantees(&[ORG], &[], &[]);
        let all = grantees(&[ORG], &[OU_PATH], &["210987654321"]);
        let differs = "differs from what ami-share writes";
        let edit = |sid: &str, change: &dyn Fn(&mut Value)| edited(&all, sid, change);
        let cases: Vec<(String, &str)> = vec![
            (
                edit("AmiShareAccountsUseKey", &|s| {
                    s["Action"] = json!(["kms:Decrypt", "kms:Encrypt"]);
                }),
                "its Action has kms:Encrypt, which ami-share does not grant",
            ),
            (
                edit("AmiShareAccountsCreateGrant", &|s| {
                    s["Action"] = json!("kms:*")
                }),
                "its Action has kms:*",
            ),
            (
                edit("AmiShareOrganizationsUseKey", &|s| {
                    s["Effect"] = json!("Deny")
                }),
                "its Effect is not Allow",
            ),
            (
                edit("AmiShareOrganizationsUseKey", &|s| {
                    s["Resource"] = json!("arn:aws:kms:*")
                }),
                "its Resource is not",
            ),
            (
                edit("AmiShareOrganizationsUseKey", &|s| {
                    s["NotAction"] = json!("kms:Encrypt")
                }),
                "it has NotAction, which ami-share never writes",
            ),
            (
                edit("AmiShareOrganizationsUseKey", &|s| {
                    s["Condition"]["StringEquals"]["aws:PrincipalOrgID"] = json!(["*"])
                }),
                "\"*\" in its aws:PrincipalOrgID condition is not an organization id",
            ),
            (
                edit("AmiShareOrganizationalUnitsUseKey", &|s| {
                    s["Condition"]["ForAnyValue:StringLike"]["aws:PrincipalOrgPaths"] = json!(["*"])
                }),
                "is not an OU path",
            ),
            (
                edit("AmiShareOrganizationalUnitsUseKey", &|s| {
                    s["Condition"]["StringEquals"]["aws:PrincipalOrgID"] = json!(["o-zzzzzzzzzz"])
                }),
                differs,
            ),
            (
                edit("AmiShareOrganizationsUseKey", &|s| {
                    s.as_object_mut().unwrap().remove("Condition");
                }),
                "no StringEquals aws:PrincipalOrgID condition",
            ),
            (
                edit("AmiShareOrganizationsUseKey", &|s| {
                    s["Principal"] = json!("*");
                }),
                "its Principal is not",
            ),
            (
                edit("AmiShareAccountsUseKey", &|s| {
                    s["Principal"] = json!({"AWS": "arn:aws:iam::210987654321:user/bob"})
                }),
                "is not an account root",
            ),
            (
                edit("AmiShareAccountsCreateGrant", &|s| {
                    s["Condition"].as_object_mut().unwrap().remove("Bool");
                }),
                "no Bool kms:GrantIsForAWSResource condition",
            ),
            (
                edit("AmiShareAccountsUseKey", &|s| {
                    s["Condition"]["StringLike"]["kms:ViaService"] = json!("*.amazonaws.com")
                }),
                "its StringLike kms:ViaService condition differs",
            ),
            (
                edit("AmiShareAccountsUseKey", &|s| {
                    s["Condition"]["StringLike"]["kms:ViaService"] =
                        json!(["ec2.*.amazonaws.com", "s3.*.amazonaws.com"])
                }),
                "its StringLike kms:ViaService condition differs",
            ),
        ];
        for (policy, expected) in cases {
            let e = merge(&policy, &want, "aws").unwrap_err();
            assert!(matches!(e, KeyPolicyError::ForeignEdit { .. }), "{e}");
            assert!(e.to_string().contains(expected), "{expected}: {e}");
            assert!(e.to_string().contains("narrow"), "says what is kept: {e}");
        }
    }

    #[test]
    fn an_operators_narrowing_is_kept_by_every_later_merge() {
        let earlier = grantees(&[], &[], &["210987654321"]);
        let policy = edited(&earlier, "AmiShareAccountsUseKey", &|s| {
            s["Action"] = json!(["kms:Decrypt", "kms:DescribeKey"]);
            s["Condition"]["StringLike"]["kms:ViaService"] = json!("ec2.eu-west-1.amazonaws.com");
            s["Condition"]["StringEquals"] = json!({"aws:PrincipalTag/team": "platform"});
        });
        let want = grantees(&[], &[], &["111122223333"]);
        let merged = merge(&policy, &want, "aws").unwrap().unwrap();
        assert_eq!(merged.admitted, want);
        assert!(!merged.limited_to_ec2);
        let after = statements(&merged.policy);
        let use_key = after
            .iter()
            .find(|s| s["Sid"] == "AmiShareAccountsUseKey")
            .unwrap();
        assert_eq!(use_key["Action"], json!(["kms:Decrypt", "kms:DescribeKey"]));
        assert_eq!(
            use_key["Condition"],
            json!({"StringLike": {"kms:ViaService": "ec2.eu-west-1.amazonaws.com"},
                   "StringEquals": {"aws:PrincipalTag/team": "platform"}})
        );
        assert_eq!(
            use_key["Principal"]["AWS"],
            json!([
                "arn:aws:iam::111122223333:root",
                "arn:aws:iam::210987654321:root"
            ])
        );
        assert_eq!(
            merge(&merged.policy, &want, "aws").unwrap(),
            None,
            "and stays"
        );
    }

    /// ami-share's statements as versions before kms:ViaService wrote them.
    fn legacy_statements(g: &KeyGrantees) -> Vec<Value> {
        owned_statements(g)
            .into_iter()
            .map(|mut s| {
                if let Some(condition) = s.get_mut("Condition").and_then(Value::as_object_mut) {
                    condition.remove("StringLike");
                    if condition.is_empty() {
                        s.as_object_mut().unwrap().remove("Condition");
                    }
                }
                s
            })
            .collect()
    }

    #[test]
    fn statements_written_before_via_service_are_limited_to_ec2_once() {
        let all = grantees(&[ORG], &[OU_PATH], &["210987654321"]);
        let mut written = statements(&default_policy());
        written.extend(legacy_statements(&all));
        let policy = json!({"Version": "2012-10-17", "Statement": written}).to_string();
        assert_eq!(admitted(&policy, "aws").unwrap(), all, "read as admitting");
        let merged = merge(&policy, &grantees(&[ORG], &[], &[]), "aws")
            .unwrap()
            .unwrap();
        assert!(merged.limited_to_ec2);
        assert!(merged.admitted.is_empty());
        assert_eq!(
            statements(&merged.policy),
            statements(
                &merge(&default_policy(), &all, "aws")
                    .unwrap()
                    .unwrap()
                    .policy
            ),
            "the same as a fresh merge"
        );
        assert_eq!(merge(&merged.policy, &all, "aws").unwrap(), None);
    }

    #[test]
    fn in_china_the_condition_names_ec2_under_its_own_domain() {
        let merged = merge(&default_policy(), &grantees(&[ORG], &[], &[]), "aws-cn")
            .unwrap()
            .unwrap();
        assert!(
            merged
                .policy
                .contains("\"kms:ViaService\": \"ec2.*.amazonaws.com.cn\""),
            "{}",
            merged.policy
        );
    }

    #[test]
    fn a_statement_written_with_single_strings_or_in_another_order_is_still_read() {
        let mut statements = owned_statements(&grantees(&[ORG], &[], &["210987654321"]));
        statements[0]["Condition"]["StringEquals"]["aws:PrincipalOrgID"] = json!(ORG);
        statements[0]["Action"].as_array_mut().unwrap().reverse();
        statements[2]["Principal"]["AWS"] = json!("arn:aws:iam::210987654321:root");
        let policy = json!({"Version": "2012-10-17", "Statement": statements}).to_string();
        assert_eq!(
            admitted(&policy, "aws").unwrap(),
            grantees(&[ORG], &[], &["210987654321"])
        );
    }

    #[test]
    fn a_policy_that_would_exceed_32_kb_is_refused_and_one_that_fits_only_compact_is_compact() {
        let padded = |pad: usize| {
            json!({"Version": "2012-10-17", "Statement": [
                {"Sid": "Big", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                 "Action": "kms:*", "Resource": "*", "Condition": {"StringEquals": {"aws:PrincipalTag/x": "y".repeat(pad)}}}
            ]})
            .to_string()
        };
        let want = grantees(&[ORG], &[OU_PATH], &["210987654321"]);
        let e = merge(&padded(MAX_POLICY_BYTES), &want, "aws").unwrap_err();
        match &e {
            KeyPolicyError::TooLarge { bytes } => assert!(*bytes > MAX_POLICY_BYTES),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("over KMS's limit of 32768"), "{e}");
        // Near the limit: the pretty form would not fit, the compact one does.
        let near = padded(MAX_POLICY_BYTES - 3_200);
        let merged = merge(&near, &want, "aws").unwrap().unwrap();
        assert!(merged.policy.len() <= MAX_POLICY_BYTES);
        assert!(!merged.policy.contains('\n'), "compact");
    }

    // --- properties -----------------------------------------------------------------------------------

    fn grantees_strategy() -> impl Strategy<Value = KeyGrantees> {
        // Small pools, so that sets overlap and merges meet grantees already admitted.
        let orgs =
            prop::sample::subsequence(vec!["o-aaaaaaaaaa", "o-bbbbbbbbbb", "o-cccccccccc"], 0..=3);
        let paths = prop::sample::subsequence(
            vec![
                "o-aaaaaaaaaa/*/ou-aa11-11111111/*",
                "o-aaaaaaaaaa/*/ou-aa11-22222222/*",
                "o-bbbbbbbbbb/*/ou-bb22-33333333/*",
                "o-cccccccccc/*/ou-cc33-44444444/*",
            ],
            0..=4,
        );
        let accounts = prop::sample::subsequence(
            vec![
                "111111111111",
                "222222222222",
                "333333333333",
                "444444444444",
            ],
            0..=4,
        );
        (orgs, paths, accounts).prop_map(|(o, p, a)| grantees(&o, &p, &a))
    }

    /// Statements ami-share does not own: various Sids (or none), principals, actions, conditions.
    fn foreign_strategy() -> impl Strategy<Value = Vec<Value>> {
        let statement = (
            prop::option::of("[A-Za-z ]{1,20}"),
            prop::sample::select(vec!["kms:*", "kms:Decrypt", "kms:Encrypt"]),
            "[0-9]{12}",
            prop::option::of("[a-z]{1,10}"),
        )
            .prop_map(|(sid, action, account, tag)| {
                let mut s = json!({"Effect": "Allow",
                    "Principal": {"AWS": format!("arn:aws:iam::{account}:root")},
                    "Action": action, "Resource": "*"});
                if let Some(tag) = tag {
                    s["Condition"] = json!({"StringEquals": {"aws:PrincipalTag/team": tag}});
                }
                if let Some(sid) = sid {
                    // A Sid of the key's owner, never one of ami-share's.
                    s["Sid"] = json!(format!("Owner {sid}"));
                }
                s
            });
        prop::collection::vec(statement, 0..6).prop_map(|mut statements| {
            // Sids are unique within a policy.
            let mut seen = BTreeSet::new();
            for s in &mut statements {
                if let Some(sid) = s.get("Sid").and_then(Value::as_str).map(str::to_string)
                    && !seen.insert(sid)
                {
                    s.as_object_mut().unwrap().remove("Sid");
                }
            }
            statements
        })
    }

    /// A narrowing an operator may make to one of ami-share's statements: an added condition (under an
    /// operator ami-share uses, or another), kms:ViaService limited to a region, fewer actions.
    fn narrowing_strategy() -> impl Strategy<Value = Narrowing> {
        let condition = (
            prop::sample::select(vec![
                "StringEquals",
                "StringLike",
                "ArnLike",
                "Null",
                "IpAddress",
            ]),
            prop::sample::select(vec![
                "aws:PrincipalTag/team",
                "aws:SourceVpce",
                "kms:EncryptionContext:aws:ebs:id",
                "aws:PrincipalArn",
            ]),
            "[a-z0-9-]{1,12}",
        );
        (
            prop::collection::vec(condition, 0..3),
            prop::option::of(prop::sample::select(vec!["eu-west-1", "us-east-1"])),
            prop::option::of(prop::sample::subsequence(USE_ACTIONS.to_vec(), 1..=5)),
        )
            .prop_map(|(conditions, region, actions)| {
                let mut narrowing = Narrowing::default();
                for (operator, key, value) in conditions {
                    narrowing.add_condition(operator, key, json!(value));
                }
                if let Some(region) = region {
                    narrowing.add_condition(
                        VIA_SERVICE_OPERATOR,
                        VIA_SERVICE_KEY,
                        json!(format!("ec2.{region}.amazonaws.com")),
                    );
                }
                narrowing.actions = actions.map(|a| a.into_iter().map(str::to_string).collect());
                narrowing
            })
    }

    /// ami-share's statements for `earlier` as a policy may hold them: as written now, as an earlier
    /// version wrote them (no kms:ViaService), or narrowed by an operator.
    fn owned_strategy() -> impl Strategy<Value = Vec<Value>> {
        (
            grantees_strategy(),
            prop::collection::vec((0u8..3, narrowing_strategy()), OWNED.len()),
        )
            .prop_map(|(earlier, forms)| {
                OWNED
                    .iter()
                    .zip(forms)
                    .filter_map(|((a, p), (form, narrowing))| match form {
                        0 => render(*a, *p, &earlier, "aws", None),
                        1 => render(*a, *p, &earlier, "aws", None).map(|mut s| {
                            if let Some(condition) =
                                s.get_mut("Condition").and_then(Value::as_object_mut)
                            {
                                condition.remove(VIA_SERVICE_OPERATOR);
                            }
                            s
                        }),
                        _ => {
                            // CreateGrant and DescribeKey have one action: only conditions narrow
                            // them.
                            let narrowing = match p {
                                Purpose::UseKey => narrowing,
                                Purpose::CreateGrant | Purpose::DescribeKey => Narrowing {
                                    actions: None,
                                    ..narrowing
                                },
                            };
                            render(*a, *p, &earlier, "aws", Some(&narrowing))
                        }
                    })
                    .collect()
            })
    }

    /// A starting policy: foreign statements with, maybe, ami-share's statements of an earlier merge (as
    /// [`owned_strategy`] makes them) placed anywhere among them, pretty or compact.
    fn policy_strategy() -> impl Strategy<Value = (String, Vec<Value>)> {
        (
            foreign_strategy(),
            owned_strategy(),
            any::<prop::sample::Index>(),
            any::<bool>(),
        )
            .prop_map(|(foreign, owned, at, pretty)| {
                let mut all = foreign.clone();
                let at = at.index(all.len() + 1);
                all.splice(at..at, owned);
                let document =
                    json!({"Version": "2012-10-17", "Id": "key-policy", "Statement": all});
                let text = if pretty {
                    serde_json::to_string_pretty(&document).unwrap()
                } else {
                    document.to_string()
                };
                (text, foreign)
            })
    }

    /// The policy after an apply: the merged one, or the same when there was nothing to write.
    fn apply(policy: &str, want: &KeyGrantees) -> String {
        match merge(policy, want, "aws").unwrap() {
            Some(merged) => merged.policy,
            None => policy.to_string(),
        }
    }

    /// The number of cases each property runs (reported in the issue note).
    const CASES: u32 = 2_000;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(CASES))]

        #[test]
        fn merging_twice_is_merging_once((policy, _) in policy_strategy(), want in grantees_strategy()) {
            let once = apply(&policy, &want);
            prop_assert_eq!(merge(&once, &want, "aws").unwrap(), None);
            prop_assert_eq!(apply(&once, &want), once);
        }

        #[test]
        fn the_order_of_merges_does_not_matter(
            (policy, _) in policy_strategy(),
            a in grantees_strategy(),
            b in grantees_strategy(),
        ) {
            prop_assert_eq!(apply(&apply(&policy, &a), &b), apply(&apply(&policy, &b), &a));
        }

        #[test]
        fn every_foreign_statement_survives_in_order_and_unchanged(
            (policy, foreign) in policy_strategy(),
            want in grantees_strategy(),
        ) {
            let after = statements(&apply(&policy, &want));
            let kept: Vec<Value> = after
                .iter()
                .filter(|s| s.get("Sid").and_then(Value::as_str).is_none_or(|sid| owned(sid).is_none()))
                .cloned()
                .collect();
            prop_assert_eq!(kept, foreign);
        }

        #[test]
        fn the_result_is_a_valid_policy_admitting_old_and_new_grantees_under_unique_sids(
            (policy, _) in policy_strategy(),
            want in grantees_strategy(),
        ) {
            let before = admitted(&policy, "aws").unwrap();
            let after_text = apply(&policy, &want);
            let document: Value = serde_json::from_str(&after_text).unwrap();
            prop_assert_eq!(&document["Version"], "2012-10-17");
            let after = admitted(&after_text, "aws").unwrap();
            prop_assert!(want.is_subset(&after));
            prop_assert!(before.is_subset(&after), "nothing admitted before is dropped");
            let sids: Vec<&str> = document["Statement"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|s| s.get("Sid").and_then(Value::as_str))
                .collect();
            let unique: BTreeSet<&str> = sids.iter().copied().collect();
            prop_assert_eq!(unique.len(), sids.len(), "{:?}", sids);
            prop_assert!(after_text.len() <= MAX_POLICY_BYTES);
        }

        #[test]
        fn anyone_is_never_admitted_without_an_organization_condition(
            (policy, _) in policy_strategy(),
            want in grantees_strategy(),
        ) {
            for statement in statements(&apply(&policy, &want)) {
                let principal = &statement["Principal"];
                let anyone = principal == &json!("*") || principal["AWS"] == json!("*");
                if anyone {
                    let orgs = strings(&statement["Condition"]["StringEquals"][ORG_ID_KEY]);
                    prop_assert!(
                        orgs.is_some_and(|o| !o.is_empty() && o.iter().all(|id| is_org_id(id))),
                        "{}",
                        statement
                    );
                }
            }
        }

        #[test]
        fn a_widening_edit_of_an_owned_statement_is_refused_never_rewritten(
            owned in owned_strategy(),
            want in grantees_strategy(),
            which in any::<prop::sample::Index>(),
            widen in 0usize..9,
        ) {
            let mut statements = owned;
            prop_assume!(!statements.is_empty());
            let i = which.index(statements.len());
            let describe = statements[i]["Sid"].as_str().and_then(super::owned).map(|(_, p)| p) == Some(Purpose::DescribeKey);
            let s = statements[i].as_object_mut().unwrap();
            let mut no_condition = Value::Object(Map::new());
            let condition = s.get_mut("Condition").unwrap_or(&mut no_condition).as_object_mut().unwrap();
            match widen {
                0 => { s.insert("Action".into(), json!("kms:*")); }
                1 => {
                    let mut actions = strings(&s["Action"]).unwrap();
                    actions.insert("kms:Encrypt".into());
                    s.insert("Action".into(), json!(actions));
                }
                2 => { s.insert("Effect".into(), json!("Deny")); }
                3 => { s.insert("NotAction".into(), json!("kms:Decrypt")); }
                4 => { s.insert("Principal".into(), json!("*")); s.remove("Condition"); }
                5 => { s.insert("Resource".into(), json!("arn:aws:kms:us-east-1:123456789012:key/other")); }
                6 => {
                    // One of ami-share's conditions, other than kms:ViaService, removed.
                    let ours: Vec<String> = condition
                        .iter()
                        .filter(|(operator, entries)| {
                            *operator != VIA_SERVICE_OPERATOR
                                && entries.as_object().unwrap().keys().any(|k| {
                                    [ORG_ID_KEY, ORG_PATHS_KEY, GRANT_FOR_AWS_RESOURCE].contains(&k.as_str())
                                })
                        })
                        .map(|(operator, _)| operator.clone())
                        .collect();
                    prop_assume!(!ours.is_empty());
                    condition.remove(&ours[0]);
                }
                7 => {
                    // (On DescribeKey, a kms:ViaService condition is the operator's, and narrows.)
                    prop_assume!(!describe && condition.contains_key(VIA_SERVICE_OPERATOR));
                    condition[VIA_SERVICE_OPERATOR][VIA_SERVICE_KEY] = json!("*");
                }
                _ => {
                    // An account principal that is not an account root.
                    prop_assume!(s["Principal"]["AWS"].is_array());
                    s["Principal"]["AWS"].as_array_mut().unwrap().push(json!("arn:aws:iam::444455556666:role/x"));
                }
            }
            let policy = json!({"Version": "2012-10-17", "Statement": statements}).to_string();
            let refused = matches!(merge(&policy, &want, "aws"), Err(KeyPolicyError::ForeignEdit { .. }));
            prop_assert!(refused, "{}", policy);
        }

        #[test]
        fn an_operators_added_condition_survives_every_later_merge(
            earlier in grantees_strategy(),
            want in grantees_strategy(),
            later in grantees_strategy(),
            which in any::<prop::sample::Index>(),
            key in "[A-Za-z]{1,10}",
            value in "[a-z0-9]{1,10}",
        ) {
            let mut owned = owned_statements(&earlier);
            prop_assume!(!owned.is_empty());
            let i = which.index(owned.len());
            let sid = owned[i]["Sid"].clone();
            let added = format!("aws:PrincipalTag/{key}");
            owned[i]["Condition"]["StringEquals"][&added] = json!(value);
            let policy = json!({"Version": "2012-10-17", "Statement": owned}).to_string();
            let after = apply(&apply(&policy, &want), &later);
            let kept = statements(&after).into_iter().find(|s| s["Sid"] == sid).unwrap();
            prop_assert_eq!(&kept["Condition"]["StringEquals"][&added], &json!(value));
            prop_assert_eq!(merge(&after, &later, "aws").unwrap(), None);
        }

        #[test]
        fn every_statement_ami_share_writes_uses_the_key_only_through_ec2(
            (policy, _) in policy_strategy(),
            want in grantees_strategy(),
        ) {
            let after = apply(&policy, &want);
            for statement in statements(&after) {
                let purpose = statement.get("Sid").and_then(Value::as_str).and_then(owned).map(|(_, p)| p);
                // DescribeKey (metadata, called by the receiver itself) is the one action without it,
                // alone in its statements.
                if purpose == Some(Purpose::DescribeKey) {
                    prop_assert_eq!(&statement["Action"], &json!("kms:DescribeKey"), "{}", statement);
                } else if purpose.is_some() {
                    let via = &statement["Condition"][VIA_SERVICE_OPERATOR][VIA_SERVICE_KEY];
                    prop_assert!(
                        via == &json!(via_ec2("aws")) || names_ec2_regions(via, "aws"),
                        "{}",
                        statement
                    );
                }
            }
        }

        #[test]
        fn the_size_guard_refuses_exactly_the_policies_kms_would(
            pad in 28_000usize..33_000,
            want in grantees_strategy(),
        ) {
            let policy = json!({"Version": "2012-10-17", "Statement": [
                {"Sid": "Big", "Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                 "Action": "kms:*", "Resource": "*", "Condition": {"StringEquals": {"aws:PrincipalTag/x": "y".repeat(pad)}}}
            ]}).to_string();
            match merge(&policy, &want, "aws") {
                Ok(Some(merged)) => prop_assert!(merged.policy.len() <= MAX_POLICY_BYTES),
                Ok(None) => prop_assert!(want.is_empty()),
                Err(KeyPolicyError::TooLarge { bytes }) => {
                    prop_assert!(bytes > MAX_POLICY_BYTES);
                    // Compact is the smallest form: with it, the policy really is too large.
                    let (mut document, mut statements) = parse(&policy).unwrap();
                    statements.extend(OWNED.iter().filter_map(|(a, p)| render(*a, *p, &want, "aws", None)));
                    document.insert("Statement".into(), Value::Array(statements));
                    prop_assert!(Value::Object(document).to_string().len() > MAX_POLICY_BYTES);
                }
                Err(other) => prop_assert!(false, "{}", other),
            }
        }
    }
}
