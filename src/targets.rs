//! Whom an AMI can be shared with: organization ARNs, OU ARNs and account ids.
//!
//! Each type is validated when it is built (and so when the config is parsed): AWS rejects a bare
//! `o-…`/`ou-…` id, a malformed ARN or a short account id only when the share is attempted, long after the
//! operator wrote the config. Catching them at load time, with the expected form in the message, is the point.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An error naming the bad value and the form AWS expects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: {problem}; expected {expected}")]
pub struct TargetError {
    what: &'static str,
    value: String,
    problem: String,
    expected: &'static str,
}

const ORG_ARN_FORM: &str = "arn:<partition>:organizations::<12-digit management account id>:organization/o-<10 to 32 lowercase letters or digits>, e.g. arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
const OU_ARN_FORM: &str = "arn:<partition>:organizations::<12-digit management account id>:ou/o-<org id>/ou-<root part>-<ou part>, e.g. arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12-cd34ef56";
const ACCOUNT_FORM: &str =
    "a 12-digit AWS account id, e.g. \"123456789012\" (quoted, so leading zeros survive)";

/// Partitions that have AWS Organizations.
const PARTITIONS: [&str; 3] = ["aws", "aws-cn", "aws-us-gov"];

fn is_lower_alnum(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `o-` followed by 10–32 lowercase letters or digits (the Organizations API's `organizationId` pattern).
pub(crate) fn is_org_id(s: &str) -> bool {
    s.strip_prefix("o-")
        .is_some_and(|rest| (10..=32).contains(&rest.len()) && is_lower_alnum(rest))
}

/// `ou-` + 4–32 lowercase alphanumerics (the root part) + `-` + 8–32 lowercase alphanumerics.
pub(crate) fn is_ou_id(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("ou-") else {
        return false;
    };
    let Some((root, ou)) = rest.split_once('-') else {
        return false;
    };
    (4..=32).contains(&root.len())
        && is_lower_alnum(root)
        && (8..=32).contains(&ou.len())
        && is_lower_alnum(ou)
}

pub(crate) fn is_account_id(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

/// Splits `arn:<partition>:organizations::<account>:<resource>` and checks the fixed parts.
/// Returns (partition, management account, resource) or a description of what is wrong.
fn split_org_arn(value: &str) -> Result<(&str, &str, &str), String> {
    let parts: Vec<&str> = value.splitn(6, ':').collect();
    if parts.len() != 6 || parts[0] != "arn" {
        return Err("it is not an ARN (arn:partition:service:region:account:resource)".into());
    }
    let (partition, service, region, account, resource) =
        (parts[1], parts[2], parts[3], parts[4], parts[5]);
    if !PARTITIONS.contains(&partition) {
        return Err(format!(
            "unknown partition {partition:?} (one of {})",
            PARTITIONS.join(", ")
        ));
    }
    if service != "organizations" {
        return Err(format!("service is {service:?}, not \"organizations\""));
    }
    if !region.is_empty() {
        return Err(format!(
            "Organizations ARNs have no region, found {region:?}"
        ));
    }
    if !is_account_id(account) {
        return Err(format!(
            "the management account {account:?} is not 12 digits"
        ));
    }
    Ok((partition, account, resource))
}

/// The ARN of an AWS Organization: shares with every account in it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrganizationArn {
    arn: String,
    org_id_at: usize,
}

impl OrganizationArn {
    pub fn as_str(&self) -> &str {
        &self.arn
    }
    /// The `o-…` id (used by key-policy conditions, which take ids, not ARNs).
    pub fn org_id(&self) -> &str {
        &self.arn[self.org_id_at..]
    }
}

impl FromStr for OrganizationArn {
    type Err = TargetError;
    fn from_str(value: &str) -> Result<Self, TargetError> {
        let err = |problem: String| TargetError {
            what: "organization ARN",
            value: value.to_string(),
            problem,
            expected: ORG_ARN_FORM,
        };
        if is_org_id(value) {
            return Err(err(
                "a bare organization id; AWS accepts only the full ARN".into()
            ));
        }
        let (_, _, resource) = split_org_arn(value).map_err(err)?;
        if resource.starts_with("ou/") {
            return Err(err(
                "this is an OU ARN: list it under share.organizational_units".into(),
            ));
        }
        let Some(org_id) = resource.strip_prefix("organization/") else {
            return Err(err(format!(
                "the resource part {resource:?} does not start with \"organization/\""
            )));
        };
        if !is_org_id(org_id) {
            return Err(err(format!(
                "{org_id:?} is not an organization id (o- and 10 to 32 lowercase letters or digits)"
            )));
        }
        Ok(Self {
            org_id_at: value.len() - org_id.len(),
            arn: value.to_string(),
        })
    }
}

/// The ARN of an organizational unit: shares with every account in it and in the OUs below it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OrganizationalUnitArn {
    arn: String,
}

impl OrganizationalUnitArn {
    pub fn as_str(&self) -> &str {
        &self.arn
    }
    /// (`o-…`, `ou-…`) ids taken from the ARN.
    pub fn ids(&self) -> (&str, &str) {
        let path = self.arn.rsplit_once(":ou/").map(|(_, p)| p).unwrap_or("");
        path.split_once('/').unwrap_or(("", ""))
    }
}

impl FromStr for OrganizationalUnitArn {
    type Err = TargetError;
    fn from_str(value: &str) -> Result<Self, TargetError> {
        let err = |problem: String| TargetError {
            what: "organizational unit ARN",
            value: value.to_string(),
            problem,
            expected: OU_ARN_FORM,
        };
        if is_ou_id(value) {
            return Err(err("a bare OU id; AWS accepts only the full ARN".into()));
        }
        let (_, _, resource) = split_org_arn(value).map_err(err)?;
        if resource.starts_with("organization/") {
            return Err(err(
                "this is an organization ARN: list it under share.organizations".into(),
            ));
        }
        let Some(path) = resource.strip_prefix("ou/") else {
            return Err(err(format!(
                "the resource part {resource:?} does not start with \"ou/\""
            )));
        };
        let Some((org_id, ou_id)) = path.split_once('/') else {
            return Err(err(format!("{path:?} should be <org id>/<ou id>")));
        };
        if !is_org_id(org_id) {
            return Err(err(format!("{org_id:?} is not an organization id")));
        }
        if !is_ou_id(ou_id) {
            return Err(err(format!(
                "{ou_id:?} is not an OU id (ou-<root part>-<ou part>)"
            )));
        }
        Ok(Self {
            arn: value.to_string(),
        })
    }
}

/// A 12-digit AWS account id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountId(String);

impl AccountId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AccountId {
    type Err = TargetError;
    fn from_str(value: &str) -> Result<Self, TargetError> {
        if is_account_id(value) {
            return Ok(Self(value.to_string()));
        }
        let problem = if is_org_id(value) {
            "this is an organization id: list the organization's ARN under share.organizations"
                .into()
        } else if is_ou_id(value) {
            "this is an OU id: list the OU's ARN under share.organizational_units".into()
        } else if value.starts_with("arn:") {
            "an ARN, not an account id".into()
        } else {
            format!("{} characters, not 12 digits", value.chars().count())
        };
        Err(TargetError {
            what: "account id",
            value: value.to_string(),
            problem,
            expected: ACCOUNT_FORM,
        })
    }
}

macro_rules! string_conversions {
    ($($ty:ty),*) => {$(
        impl TryFrom<String> for $ty {
            type Error = TargetError;
            fn try_from(value: String) -> Result<Self, TargetError> {
                value.parse()
            }
        }
        impl From<$ty> for String {
            fn from(value: $ty) -> String {
                value.as_str().to_string()
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
string_conversions!(OrganizationArn, OrganizationalUnitArn, AccountId);

/// One entry of an AMI's launch permissions, as ami-share manages them.
///
/// Ordered so that sets of them print and compare deterministically (plans must be stable).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum LaunchPermission {
    Organization(OrganizationArn),
    OrganizationalUnit(OrganizationalUnitArn),
    Account(AccountId),
    /// `Group=all`: public. Planned only for a rule with `share.public = true`, and only where AWS allows it
    /// (see `plan::public_refusal`).
    Public,
}

impl fmt::Display for LaunchPermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Organization(arn) => write!(f, "organization {arn}"),
            Self::OrganizationalUnit(arn) => write!(f, "OU {arn}"),
            Self::Account(id) => write!(f, "account {id}"),
            Self::Public => f.write_str("public (Group=all)"),
        }
    }
}

/// One entry of a snapshot's createVolumePermission: an account, or everyone (`Group=all`). AWS offers
/// no organization or OU form for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum VolumePermission {
    Account(AccountId),
    /// `Group=all`: a public snapshot. ami-share never adds it; exclusive mode removes it.
    Public,
}

impl fmt::Display for VolumePermission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Account(id) => write!(f, "account {id}"),
            Self::Public => f.write_str("everyone (Group=all)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
    const OU: &str = "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12-cd34ef56";

    fn problem<T: FromStr<Err = TargetError>>(value: &str) -> String {
        match value.parse::<T>() {
            Ok(_) => panic!("{value:?} was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_targets_parse_and_expose_ids() {
        let org: OrganizationArn = ORG.parse().unwrap();
        assert_eq!(org.org_id(), "o-a1b2c3d4e5");
        let ou: OrganizationalUnitArn = OU.parse().unwrap();
        assert_eq!(ou.ids(), ("o-a1b2c3d4e5", "ou-ab12-cd34ef56"));
        for partition in ["aws-cn", "aws-us-gov"] {
            let arn = ORG.replace("arn:aws:", &format!("arn:{partition}:"));
            assert!(arn.parse::<OrganizationArn>().is_ok(), "{arn}");
        }
        assert_eq!(
            "012345678901".parse::<AccountId>().unwrap().as_str(),
            "012345678901"
        );
    }

    #[test]
    fn bare_ids_are_refused_with_the_full_form() {
        let e = problem::<OrganizationArn>("o-a1b2c3d4e5");
        assert!(e.contains("bare organization id"), "{e}");
        assert!(
            e.contains("arn:aws:organizations::123456789012:organization/o-"),
            "{e}"
        );
        let e = problem::<OrganizationalUnitArn>("ou-ab12-cd34ef56");
        assert!(e.contains("bare OU id"), "{e}");
        assert!(e.contains(":ou/o-"), "{e}");
    }

    #[test]
    fn malformed_arns_say_what_is_wrong() {
        let cases = [
            (
                "arn:aws:organizations::123456789012:account/o-a1b2c3d4e5",
                "does not start with \"organization/\"",
            ),
            (
                "arn:aws:organizations::12345:organization/o-a1b2c3d4e5",
                "not 12 digits",
            ),
            (
                "arn:aws:iam::123456789012:organization/o-a1b2c3d4e5",
                "service is \"iam\"",
            ),
            (
                "arn:aws:organizations:us-east-1:123456789012:organization/o-a1b2c3d4e5",
                "have no region",
            ),
            (
                "arn:azure:organizations::123456789012:organization/o-a1b2c3d4e5",
                "unknown partition",
            ),
            (
                "arn:aws:organizations::123456789012:organization/o-SHORT",
                "not an organization id",
            ),
            ("organization/o-a1b2c3d4e5", "not an ARN"),
            (OU, "this is an OU ARN"),
        ];
        for (value, expected) in cases {
            let e = problem::<OrganizationArn>(value);
            assert!(e.contains(expected), "{value}: {e}");
            assert!(e.contains(value), "message names the value: {e}");
        }
        let ou_cases = [
            (ORG, "this is an organization ARN"),
            (
                "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5",
                "should be <org id>/<ou id>",
            ),
            (
                "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12",
                "not an OU id",
            ),
            (
                "arn:aws:organizations::123456789012:ou/o-bad/ou-ab12-cd34ef56",
                "not an organization id",
            ),
        ];
        for (value, expected) in ou_cases {
            let e = problem::<OrganizationalUnitArn>(value);
            assert!(e.contains(expected), "{value}: {e}");
        }
    }

    #[test]
    fn account_ids_must_be_twelve_digits() {
        for (value, expected) in [
            ("12345678901", "11 characters"),
            ("1234567890123", "13 characters"),
            ("12345678901a", "12 characters"),
            ("o-a1b2c3d4e5", "organization id"),
            ("ou-ab12-cd34ef56", "OU id"),
            (ORG, "an ARN"),
        ] {
            let e = problem::<AccountId>(value);
            assert!(e.contains(expected), "{value}: {e}");
            assert!(e.contains("12-digit"), "{e}");
        }
    }
}
