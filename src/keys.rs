//! KMS keys as ami-share meets them: the key ARN EBS reports for an encrypted snapshot, and the key an
//! operator names in the config for re-encrypted copies.
//!
//! Pure: parsing and validation only. Whether a key is AWS managed, and its policy, come from KMS
//! (`aws` module) and are held in [`crate::observed::ObservedKey`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::targets::is_account_id;

/// The ARN of a KMS key, `arn:<partition>:kms:<region>:<account>:key/<key id>`: the form DescribeSnapshots
/// reports a snapshot's key in, and the form a key policy is patched through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct KeyArn {
    arn: String,
    partition: String,
    region: String,
    account: String,
}

impl KeyArn {
    pub fn as_str(&self) -> &str {
        &self.arn
    }
    /// `aws`, `aws-cn`, `aws-us-gov`: key policy principals must name accounts in the key's partition.
    pub fn partition(&self) -> &str {
        &self.partition
    }
    pub fn region(&self) -> &str {
        &self.region
    }
    /// The account that owns the key: only it can change the key's policy.
    pub fn account(&self) -> &str {
        &self.account
    }
}

/// `arn:<partition>:kms:<region>:<account>:<resource>` → (partition, region, account, resource).
fn split_kms_arn(value: &str) -> Option<(&str, &str, &str, &str)> {
    let parts: Vec<&str> = value.splitn(6, ':').collect();
    match parts.as_slice() {
        ["arn", partition, "kms", region, account, resource]
            if !partition.is_empty() && !region.is_empty() =>
        {
            Some((partition, region, account, resource))
        }
        _ => None,
    }
}

impl FromStr for KeyArn {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        match split_kms_arn(value) {
            Some((partition, region, account, resource))
                if is_account_id(account)
                    && resource.strip_prefix("key/").is_some_and(is_key_id) =>
            {
                Ok(Self {
                    arn: value.to_string(),
                    partition: partition.to_string(),
                    region: region.to_string(),
                    account: account.to_string(),
                })
            }
            _ => Err(format!(
                "{value:?} is not a KMS key ARN (arn:<partition>:kms:<region>:<12-digit account>:key/<key id>)"
            )),
        }
    }
}

impl From<KeyArn> for String {
    fn from(arn: KeyArn) -> String {
        arn.arn
    }
}

impl fmt::Display for KeyArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn)
    }
}

/// A key id: a UUID (`1234abcd-12ab-34cd-56ef-1234567890ab`) or a multi-Region key id (`mrk-` + 32 hex).
fn is_key_id(id: &str) -> bool {
    if let Some(hex) = id.strip_prefix("mrk-") {
        return hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    let groups: Vec<&str> = id.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// An alias name after `alias/`: letters, digits, `/`, `_`, `-`, 1 to 250 characters.
fn is_alias_name(name: &str) -> bool {
    (1..=250).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
}

const KEY_REF_FORM: &str = "a customer managed KMS key in the image's region, named by alias (\"alias/ami-share\"), alias ARN, key ARN, or key id; an alias is best, as the same name can be created in every region";

/// A KMS key named in the config: an alias name, an alias ARN, a key ARN or a key id, as EC2's CopyImage
/// accepts. Resolved by DescribeKey in the image's region when it is used.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyRef(String);

impl KeyRef {
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The region of a key or alias named by ARN; `None` for an alias name or key id, which name a key in
    /// whichever region they are used.
    pub fn arn_region(&self) -> Option<&str> {
        split_kms_arn(&self.0).map(|(_, region, _, _)| region)
    }
}

impl FromStr for KeyRef {
    type Err = String;
    fn from_str(value: &str) -> Result<Self, String> {
        let problem = if let Some(name) = value.strip_prefix("alias/") {
            if name.starts_with("aws/") {
                Some(
                    "aliases under alias/aws/ name AWS managed keys, whose policy cannot be changed, so nobody else can use what they encrypt"
                        .to_string(),
                )
            } else if !is_alias_name(name) {
                Some("an alias name has 1 to 250 letters, digits, '/', '_' or '-'".into())
            } else {
                None
            }
        } else if value.starts_with("arn:") {
            match split_kms_arn(value).map(|(_, _, _, resource)| resource) {
                None => Some(
                    "not a KMS ARN (arn:<partition>:kms:<region>:<account>:key/… or :alias/…)"
                        .into(),
                ),
                Some(resource) => match resource.strip_prefix("alias/") {
                    Some(alias) if alias.starts_with("aws/") => Some(
                        "aliases under alias/aws/ name AWS managed keys, whose policy cannot be changed"
                            .into(),
                    ),
                    Some(alias) => (!is_alias_name(alias)).then(|| "the alias name is not valid".into()),
                    None => value
                        .parse::<KeyArn>()
                        .err()
                        .map(|_| "not a valid key ARN".into()),
                },
            }
        } else if !is_key_id(value) {
            Some("not an alias, an ARN or a key id".into())
        } else {
            None
        };
        match problem {
            None => Ok(Self(value.to_string())),
            Some(problem) => Err(format!(
                "KMS key {value:?} is not valid: {problem}; expected {KEY_REF_FORM}"
            )),
        }
    }
}

impl TryFrom<String> for KeyRef {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        value.parse()
    }
}

impl From<KeyRef> for String {
    fn from(key: KeyRef) -> String {
        key.0
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The tag by which a key's owner lets ami-share change the key's policy (and copy what it encrypts to
/// other keys): `ami-share:manage-key-policy` = `true`. The template's IAM allows PutKeyPolicy on keys
/// tagged so (`aws:ResourceTag`), as this code does.
pub const APPROVAL_TAG: &str = "ami-share:manage-key-policy";
pub const APPROVAL_TAG_VALUE: &str = "true";

/// Why ami-share may change a key's policy: its owner's consent, given by a tag on the key or by naming
/// it in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approval {
    /// The key carries [`APPROVAL_TAG`] = [`APPROVAL_TAG_VALUE`].
    Tagged,
    /// The config names it (`keys.approved`, a rule's `reencrypt.kms_key` or `copy.regions[].kms_key`).
    Named(KeyRef),
}

/// Whether a key (by its ARN, tags and aliases, as KMS reported them) is approved, and how.
pub fn approval(
    arn: &KeyArn,
    tags: Option<&crate::observed::Tags>,
    aliases: &[String],
    named: &[KeyRef],
) -> Option<Approval> {
    if let Some(key_ref) = named.iter().find(|r| r.names(arn, aliases)) {
        return Some(Approval::Named(key_ref.clone()));
    }
    tags.and_then(|t| t.get(APPROVAL_TAG))
        .filter(|v| *v == APPROVAL_TAG_VALUE)
        .map(|_| Approval::Tagged)
}

impl KeyRef {
    /// Whether this reference names the key `arn` whose aliases are `aliases` (`alias/…` names in its
    /// region). An alias ARN or key ARN names a key of one region and account only.
    pub fn names(&self, arn: &KeyArn, aliases: &[String]) -> bool {
        let value = self.as_str();
        if let Some(alias) = value.strip_prefix("alias/") {
            return aliases
                .iter()
                .any(|a| a.strip_prefix("alias/") == Some(alias));
        }
        if let Some((_, region, account, resource)) = split_kms_arn(value) {
            return match resource.strip_prefix("alias/") {
                Some(alias) => {
                    region == arn.region()
                        && account == arn.account()
                        && aliases
                            .iter()
                            .any(|a| a.strip_prefix("alias/") == Some(alias))
                }
                None => value == arn.as_str(),
            };
        }
        // A key id.
        arn.as_str().rsplit('/').next() == Some(value)
    }

    /// Whether it names a key by alias (then the key's aliases must be read to tell).
    pub fn is_alias(&self) -> bool {
        self.0.starts_with("alias/")
            || split_kms_arn(&self.0).is_some_and(|(_, _, _, r)| r.starts_with("alias/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    #[test]
    fn key_arns_parse_into_their_parts() {
        let arn: KeyArn = KEY.parse().unwrap();
        assert_eq!(
            (arn.partition(), arn.region(), arn.account()),
            ("aws", "eu-west-1", "123456789012")
        );
        let mrk = "arn:aws-cn:kms:cn-north-1:123456789012:key/mrk-1234abcd12ab34cd56ef1234567890ab";
        assert_eq!(mrk.parse::<KeyArn>().unwrap().partition(), "aws-cn");
        for bad in [
            "alias/aws/ebs",
            "arn:aws:kms:eu-west-1:123456789012:alias/aws/ebs",
            "arn:aws:kms:eu-west-1:1234:key/1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:eu-west-1:123456789012:key/not-a-key",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            let e = bad.parse::<KeyArn>().unwrap_err();
            assert!(e.contains("not a KMS key ARN"), "{bad}: {e}");
        }
    }

    #[test]
    fn config_key_references_take_every_form_copy_image_accepts() {
        for good in [
            "alias/ami-share",
            "alias/team/golden_images-1",
            "arn:aws:kms:eu-west-1:123456789012:alias/ami-share",
            KEY,
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "mrk-1234abcd12ab34cd56ef1234567890ab",
        ] {
            assert!(good.parse::<KeyRef>().is_ok(), "{good}");
        }
    }

    #[test]
    fn aws_managed_aliases_and_malformed_references_are_refused_with_the_form() {
        for (bad, expected) in [
            ("alias/aws/ebs", "AWS managed keys"),
            (
                "arn:aws:kms:eu-west-1:123456789012:alias/aws/ebs",
                "AWS managed keys",
            ),
            ("alias/", "alias name"),
            ("alias/has space", "alias name"),
            (
                "arn:aws:s3:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
                "not a KMS ARN",
            ),
            (
                "arn:aws:kms:eu-west-1:123456789012:key/xyz",
                "not a valid key ARN",
            ),
            ("ami-share", "not an alias, an ARN or a key id"),
        ] {
            let e = bad.parse::<KeyRef>().unwrap_err();
            assert!(e.contains(expected), "{bad}: {e}");
            assert!(e.contains("expected a customer managed KMS key"), "{e}");
        }
    }

    #[test]
    fn a_key_is_approved_by_its_owners_tag_or_by_name_in_the_config_only() {
        let arn: KeyArn = KEY.parse().unwrap();
        let aliases = vec!["alias/golden-images".to_string()];
        let tagged: crate::observed::Tags = [(APPROVAL_TAG.to_string(), "true".to_string())].into();
        assert_eq!(
            approval(&arn, Some(&tagged), &[], &[]),
            Some(Approval::Tagged)
        );
        let untagged: crate::observed::Tags =
            [(APPROVAL_TAG.to_string(), "TRUE".to_string())].into();
        assert_eq!(
            approval(&arn, Some(&untagged), &[], &[]),
            None,
            "as exact as the IAM condition"
        );
        assert_eq!(approval(&arn, None, &aliases, &[]), None);
        for named in [
            "alias/golden-images",
            "arn:aws:kms:eu-west-1:123456789012:alias/golden-images",
            KEY,
            "1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            let key_ref: KeyRef = named.parse().unwrap();
            assert_eq!(
                approval(&arn, None, &aliases, std::slice::from_ref(&key_ref)),
                Some(Approval::Named(key_ref)),
                "{named}"
            );
        }
        for other in [
            "alias/golden",
            "alias/golden-images-2",
            "arn:aws:kms:us-east-1:123456789012:alias/golden-images",
            "arn:aws:kms:eu-west-1:210987654321:alias/golden-images",
            "arn:aws:kms:eu-west-1:123456789012:key/99999999-12ab-34cd-56ef-1234567890ab",
            "99999999-12ab-34cd-56ef-1234567890ab",
        ] {
            let key_ref: KeyRef = other.parse().unwrap();
            assert_eq!(approval(&arn, None, &aliases, &[key_ref]), None, "{other}");
        }
    }
}
