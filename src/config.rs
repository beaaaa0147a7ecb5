//! The config file: rules that say which AMIs get which tags and are shared with whom.
//!
//! Format: TOML. It has comments (a sharing policy deserves its reasons written beside it), no
//! indentation traps, and the parser reports the line and column of a bad value, which is what makes the
//! error messages below point at the mistake. Every value that AWS would reject later (a bare `o-…` id, a
//! malformed ARN, an 11-digit account) is rejected here, with the expected form; unknown keys are errors,
//! so a typo never silently disables a rule.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::distribution::{CopySettings, ParameterName};
use crate::keys::KeyRef;
use crate::limits::{
    SHARING_ENTITIES_PER_IMAGE, TAG_KEY_CHARS, TAG_VALUE_CHARS, TAGS_PER_RESOURCE,
};
use crate::markers;
use crate::observed::{CreatedBy, Protection};
use crate::targets::{AccountId, LaunchPermission, OrganizationArn, OrganizationalUnitArn};

/// Environment variable naming the config file in the deployed function and for the CLI.
pub const CONFIG_PATH_ENV: &str = "AMI_SHARE_CONFIG";
/// Where the SAM template's config layer puts the file (layers are unpacked under /opt).
pub const DEFAULT_CONFIG_PATH: &str = "/opt/ami-share.toml";

/// A config that failed to load: where, and what is wrong, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is invalid: {message}")]
    Invalid { path: String, message: String },
}

/// The whole validated config. Built only by [`Config::parse`], so holding one means it is valid.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(rename = "rule", default)]
    pub rules: Vec<Rule>,
    /// Settings for the KMS keys of encrypted AMIs (`[keys]`).
    #[serde(default)]
    pub keys: KeySettings,
}

/// `[keys]`: which customer managed keys ami-share may open to share targets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySettings {
    /// Keys whose policy ami-share may change, besides those their owner tagged
    /// `ami-share:manage-key-policy=true` and those a rule names (`reencrypt.kms_key`,
    /// `copy.regions[].kms_key`): aliases (best: `alias/golden-images` names the key of that alias in
    /// every region), alias ARNs, key ARNs or key ids.
    #[serde(default)]
    pub approved: Vec<KeyRef>,
}

impl Config {
    /// Every key the config names as one ami-share may change the policy of: `keys.approved`, and each
    /// rule's `reencrypt.kms_key` and `copy.regions[].kms_key` (a key named to encrypt the copies ami-share
    /// shares is one it is meant to open).
    pub fn approved_keys(&self) -> Vec<KeyRef> {
        let mut keys: Vec<KeyRef> = self.keys.approved.clone();
        for rule in &self.rules {
            keys.extend(rule.reencrypt.iter().map(|r| r.kms_key.clone()));
            if let Some(copy) = &rule.copy {
                keys.extend(copy.regions.iter().filter_map(|r| r.kms_key.clone()));
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

/// One rule: a selector and the effects on the AMIs it selects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Names the rule in logs, plans and errors. Unique in the file.
    pub name: String,
    /// Which AMIs the rule selects; every given criterion must hold. No criteria: every AMI.
    #[serde(default, rename = "match")]
    pub selector: Selector,
    /// Tags to put on the AMI.
    #[serde(default)]
    pub tags: BTreeMap<TagKey, TagValue>,
    /// Whether `tags` also go on the AMI's EBS snapshots (tags are per resource in EC2).
    #[serde(default = "yes")]
    pub tag_snapshots: bool,
    /// Whom to grant launch permission.
    #[serde(default)]
    pub share: ShareTargets,
    /// What to do with a selected AMI that cannot be shared as it is, because its snapshots are encrypted
    /// with a key ami-share cannot open to the share targets (the AWS managed `aws/ebs` key, or a key of
    /// another account): share a copy re-encrypted with this key instead. Absent: leave it unshared.
    #[serde(default)]
    pub reencrypt: Option<Reencrypt>,
    /// Copies to other regions (`[rule.copy]`), each tagged and shared there like the source.
    #[serde(default)]
    pub copy: Option<CopySettings>,
    /// Deprecate the AMI and its copies this many days after the AMI was created (EC2
    /// EnableImageDeprecation): a deprecated AMI stays launchable but drops out of listings.
    #[serde(default)]
    pub deprecate_after_days: Option<u32>,
    /// Turn on EC2's deregistration protection on the AMI and its copies (`true`), optionally with AWS's
    /// 24-hour cooldown after it is turned off (`"with-cooldown"`), so an AMI receivers launch from is
    /// not deregistered by mistake. ami-share turns it on, never off.
    #[serde(default, deserialize_with = "protection")]
    pub deregistration_protection: Protection,
    /// The SSM parameter that holds the latest AMI id of this rule, in each region where the rule has an
    /// AMI (`{rule}`: the rule's name), written once the AMI is shared there.
    #[serde(default)]
    pub ssm_parameter: Option<ParameterName>,
}

/// EC2 refuses a deprecation time more than 10 years ahead.
pub use crate::limits::DEPRECATE_AFTER_DAYS as MAX_DEPRECATE_AFTER_DAYS;

/// A rule's opt-in to sharing re-encrypted copies of AMIs it cannot share as they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reencrypt {
    /// The customer managed key of this account to encrypt the copy with. An alias (`alias/…`) names a
    /// key in whichever region the AMI is.
    pub kms_key: KeyRef,
}

/// `deregistration_protection`: `true`, `false` or `"with-cooldown"`.
fn protection<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Protection, D::Error> {
    struct Wanted;
    impl serde::de::Visitor<'_> for Wanted {
        type Value = Protection;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(r#"true, false or "with-cooldown""#)
        }
        fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<Protection, E> {
            Ok(if on { Protection::On } else { Protection::Off })
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Protection, E> {
            match v {
                "with-cooldown" => Ok(Protection::WithCooldown),
                _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
            }
        }
    }
    d.deserialize_any(Wanted)
}

fn yes() -> bool {
    true
}

/// The criteria of a rule. Empty lists mean "any".
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// Globs on the AMI name (`*`, `?`, `[a-z]`, `{a,b}`); any one must match.
    #[serde(default)]
    pub name: Vec<Glob>,
    /// Tags the AMI must carry; each value is a glob (`"*"`: any value).
    #[serde(default)]
    pub tags: BTreeMap<TagKey, Glob>,
    /// The API call that made the AMI; any one must match.
    #[serde(default)]
    pub created_by: Vec<CreatedBy>,
    /// The account that owns the AMI (the account the event came from); any one must match.
    #[serde(default)]
    pub accounts: Vec<AccountId>,
}

/// Whom a rule shares with.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareTargets {
    #[serde(default)]
    pub organizations: Vec<OrganizationArn>,
    #[serde(default)]
    pub organizational_units: Vec<OrganizationalUnitArn>,
    #[serde(default)]
    pub accounts: Vec<AccountId>,
    /// Also grant `accounts` createVolumePermission on the AMI's snapshots, which they need to copy the
    /// AMI (AWS: "You do not have permission to access the storage of this ami"). Snapshots cannot be
    /// shared with organizations or OUs: only the listed accounts get it.
    #[serde(default)]
    pub create_volume_permission: bool,
    /// Exclusive mode: remove every launch permission of the AMI (and its copies) that no selecting rule
    /// grants. The owner's own access is never touched. Off: ami-share only ever adds.
    #[serde(default)]
    pub exclusive: bool,
    /// Share with everyone (`Group=all`). Only ever with this explicit `true`, and never for an AMI with
    /// encrypted snapshots or product codes, nor while the region's image block public access is on.
    #[serde(default)]
    pub public: bool,
}

impl ShareTargets {
    pub fn is_empty(&self) -> bool {
        self.organizations.is_empty()
            && self.organizational_units.is_empty()
            && self.accounts.is_empty()
            && !self.public
    }

    pub fn launch_permissions(&self) -> impl Iterator<Item = LaunchPermission> + '_ {
        let orgs = self
            .organizations
            .iter()
            .cloned()
            .map(LaunchPermission::Organization);
        let ous = self
            .organizational_units
            .iter()
            .cloned()
            .map(LaunchPermission::OrganizationalUnit);
        let accounts = self.accounts.iter().cloned().map(LaunchPermission::Account);
        let public = self.public.then_some(LaunchPermission::Public);
        orgs.chain(ous).chain(accounts).chain(public)
    }
}

/// A compiled glob, kept with its source text for messages.
#[derive(Clone, Deserialize)]
#[serde(try_from = "String")]
pub struct Glob {
    text: String,
    matcher: GlobMatcher,
}

impl Glob {
    pub fn is_match(&self, candidate: &str) -> bool {
        self.matcher.is_match(candidate)
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.text)
    }
}

impl TryFrom<String> for Glob {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        // AMI names may contain '/', and it is an ordinary character there: `*` must cross it.
        let glob = GlobBuilder::new(&text)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| {
                format!("{text:?} is not a valid glob ({}); expected a pattern with *, ?, [a-z] or {{a,b}}", e.kind())
            })?;
        Ok(Self {
            matcher: glob.compile_matcher(),
            text,
        })
    }
}

/// A tag key AWS will accept on an AMI: 1–128 characters, not starting with the reserved `aws:`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagKey(String);

impl TagKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TagKey {
    type Error = String;
    fn try_from(key: String) -> Result<Self, String> {
        let len = key.chars().count();
        if !(1..=TAG_KEY_CHARS).contains(&len) {
            return Err(format!(
                "tag key {key:?} has {len} characters; expected 1 to {TAG_KEY_CHARS}"
            ));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(format!(
                "tag key {key:?} starts with \"aws:\", which AWS reserves; expected a key of your own"
            ));
        }
        Ok(Self(key))
    }
}

impl From<TagKey> for String {
    fn from(key: TagKey) -> String {
        key.0
    }
}

/// A tag value AWS will accept: at most 256 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TagValue(String);

impl TagValue {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TagValue {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        let len = value.chars().count();
        if len > TAG_VALUE_CHARS {
            return Err(format!(
                "tag value {:?}… has {len} characters; expected at most {TAG_VALUE_CHARS}",
                value.chars().take(20).collect::<String>()
            ));
        }
        Ok(Self(value))
    }
}

impl From<TagValue> for String {
    fn from(value: TagValue) -> String {
        value.0
    }
}

impl Config {
    /// Reads and validates the file named by `AMI_SHARE_CONFIG`, or [`DEFAULT_CONFIG_PATH`].
    pub fn load_from_env() -> Result<Self, ConfigError> {
        let path =
            std::env::var(CONFIG_PATH_ENV).unwrap_or_else(|_| DEFAULT_CONFIG_PATH.to_string());
        Self::load(Path::new(&path))
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates config text. The error is a readable, possibly multi-line message.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that span rules or need the whole rule (what serde cannot see field by field).
    fn validate(&self) -> Result<(), String> {
        if self.rules.is_empty() {
            return Err(
                "no rules: add at least one [[rule]] table (see README, \"Config\")".into(),
            );
        }
        let mut names = BTreeSet::new();
        let mut problems = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let at = format!("rule #{} ({:?})", index + 1, rule.name);
            if rule.name.trim().is_empty() {
                problems.push(format!(
                    "rule #{}: name is empty; expected a short unique name",
                    index + 1
                ));
            } else if !names.insert(rule.name.as_str()) {
                problems.push(format!(
                    "{at}: name is used by an earlier rule; expected unique names"
                ));
            }
            if rule.tags.is_empty()
                && rule.share.is_empty()
                && rule.copy.is_none()
                && !rule.share.exclusive
            {
                problems.push(format!(
                    "{at}: the rule does nothing; expected `tags`, `copy.regions`, share.exclusive and/or at least one of share.organizations, share.organizational_units, share.accounts"
                ));
            }
            if rule.share.create_volume_permission && rule.share.accounts.is_empty() {
                problems.push(format!(
                    "{at}: share.create_volume_permission = true but share.accounts is empty; EC2 grants snapshot createVolumePermission to accounts only (not organizations or OUs): list the accounts that copy the AMI"
                ));
            }
            if let Some(copy) = &rule.copy {
                problems.extend(copy.problems().into_iter().map(|p| format!("{at}: {p}")));
            }
            if let Some(days) = rule.deprecate_after_days
                && !(1..=MAX_DEPRECATE_AFTER_DAYS).contains(&days)
            {
                problems.push(format!(
                    "{at}: deprecate_after_days = {days}; expected 1 to {MAX_DEPRECATE_AFTER_DAYS} (EC2 allows deprecation at most 10 years ahead)"
                ));
            }
            if let Some(parameter) = &rule.ssm_parameter
                && let Err(e) = parameter.check_rule(&rule.name)
            {
                problems.push(format!("{at}: ssm_parameter: {e}"));
            }
            if rule.tags.len() > TAGS_PER_RESOURCE {
                problems.push(format!(
                    "{at}: {} tags; EC2 allows at most {TAGS_PER_RESOURCE} per resource",
                    rule.tags.len()
                ));
            }
            for key in rule.tags.keys() {
                if markers::RESERVED.contains(&key.as_str()) {
                    problems.push(format!(
                        "{at}: tags sets {:?}, which ami-share writes itself; expected another key (reserved: {})",
                        key.as_str(),
                        markers::RESERVED.join(", ")
                    ));
                }
            }
            if let Some(reencrypt) = &rule.reencrypt
                && rule.share.is_empty()
            {
                problems.push(format!(
                    "{at}: reencrypt.kms_key = {:?} but the rule shares with nobody; re-encrypted copies are made only to be shared: add share targets or remove reencrypt",
                    reencrypt.kms_key.as_str()
                ));
            }
            let duplicates = duplicates(rule.share.launch_permissions());
            if !duplicates.is_empty() {
                problems.push(format!(
                    "{at}: share lists {} more than once",
                    duplicates.join(", ")
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("\n"))
        }
    }
}

impl Config {
    /// What is valid but likely not what was meant, one sentence each. `account`: the account that runs
    /// ami-share (and so owns the AMIs it shares), when known.
    pub fn warnings(&self, account: Option<&str>) -> Vec<String> {
        let mut warnings = Vec::new();
        for (index, rule) in self.rules.iter().enumerate() {
            let at = format!("rule #{} ({:?})", index + 1, rule.name);
            for target in &rule.share.accounts {
                let target = target.as_str();
                let owner = if account == Some(target) {
                    Some("the account that runs ami-share, which owns the AMIs it shares")
                } else if rule.selector.accounts.iter().any(|a| a.as_str() == target) {
                    Some("an owner of the AMIs the rule selects (match.accounts)")
                } else {
                    None
                };
                if let Some(owner) = owner {
                    warnings.push(format!(
                        "{at}: share.accounts lists {target}, {owner}: an owner needs no launch or volume permission, so ami-share gives it none; remove it"
                    ));
                }
            }
            // ami-share's own marks take room among EC2's 50 tags: a source may carry the status and
            // the re-encrypted copy's id, a copy its three copy marks and the status.
            let (marks, on) = match rule.copy.is_some() || rule.reencrypt.is_some() {
                true => (markers::MARKS_ON_A_COPY, "its copies"),
                false => (markers::MARKS_ON_A_SOURCE, "its AMIs"),
            };
            let marks = marks
                + usize::from(!rule.deregistration_protection.is_off())
                + usize::from(rule.share.exclusive);
            if rule.tags.len() + marks > TAGS_PER_RESOURCE {
                warnings.push(format!(
                    "{at}: {} tags, and ami-share's own marks may need {marks} more on {on}: EC2 allows {TAGS_PER_RESOURCE} per resource, so the last of the rule's tags (in key order) may be left out; keep it to {} tags",
                    rule.tags.len(),
                    TAGS_PER_RESOURCE - marks
                ));
            }
            let entities = rule.share.organizations.len()
                + rule.share.organizational_units.len()
                + rule.share.accounts.len();
            if entities > SHARING_ENTITIES_PER_IMAGE {
                warnings.push(format!(
                    "{at}: {entities} share targets: AWS shares an AMI with at most {SHARING_ENTITIES_PER_IMAGE} entities, so {} of them will be left out; share with organizations or OUs instead of single accounts (each counts as one)",
                    entities - SHARING_ENTITIES_PER_IMAGE
                ));
            }
        }
        warnings
    }
}

fn duplicates(items: impl Iterator<Item = LaunchPermission>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut repeated = BTreeSet::new();
    for item in items {
        if !seen.insert(item.clone()) {
            repeated.insert(item.to_string());
        }
    }
    repeated.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
    const OU: &str = "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12-cd34ef56";

    fn error_of(text: &str) -> String {
        match Config::parse(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e,
        }
    }

    fn assert_error(text: &str, expected: &[&str]) {
        let e = error_of(text);
        for part in expected {
            assert!(e.contains(part), "error lacks {part:?}:\n{e}");
        }
    }

    #[test]
    fn the_example_config_in_the_repository_is_valid() {
        let text = include_str!("../config/ami-share.toml");
        let config = Config::parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert!(config.rules.len() >= 2);
    }

    #[test]
    fn a_full_rule_parses() {
        let config = Config::parse(&format!(
            r#"
            [[rule]]
            name = "golden"
            tag_snapshots = false
            match.name = ["golden-*", "base/{{al2023,ubuntu}}-*"]
            match.tags = {{ stage = "release", team = "*" }}
            match.created_by = ["CreateImage", "CopyImage"]
            match.accounts = ["111122223333"]
            tags = {{ "ami-share:shared" = "true" }}
            share.organizations = ["{ORG}"]
            share.organizational_units = ["{OU}"]
            share.accounts = ["444455556666"]
            reencrypt.kms_key = "alias/ami-share"
            "#
        ))
        .unwrap();
        let rule = &config.rules[0];
        assert_eq!(rule.name, "golden");
        assert!(!rule.tag_snapshots);
        assert!(rule.selector.name[1].is_match("base/ubuntu-24.04"));
        assert_eq!(
            rule.selector.created_by,
            [CreatedBy::CreateImage, CreatedBy::CopyImage]
        );
        assert_eq!(rule.share.launch_permissions().count(), 3);
        assert_eq!(
            rule.reencrypt.as_ref().unwrap().kms_key.as_str(),
            "alias/ami-share"
        );
    }

    #[test]
    fn reencrypt_needs_a_valid_customer_key_and_share_targets() {
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.accounts = [\"111122223333\"]\nreencrypt.kms_key = \"alias/aws/ebs\"\n",
            &[
                "line 4",
                "alias/aws/ebs",
                "AWS managed keys",
                "expected a customer managed KMS key",
            ],
        );
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.accounts = [\"111122223333\"]\nreencrypt.key = \"alias/x\"\n",
            &["line 4", "unknown field `key`", "kms_key"],
        );
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\nreencrypt.kms_key = \"alias/x\"\n",
            &["rule #1 (\"r\")", "shares with nobody"],
        );
    }

    #[test]
    fn ami_shares_own_tag_keys_are_refused_as_rule_tags() {
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { \"ami-share:status\" = \"x\" }\n",
            &["rule #1", "\"ami-share:status\"", "writes itself"],
        );
    }

    #[test]
    fn a_bare_org_id_is_refused_naming_line_value_and_form() {
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.organizations = [\"o-a1b2c3d4e5\"]\n",
            &[
                "line 3",
                "organizations",
                "\"o-a1b2c3d4e5\"",
                "bare organization id",
                "arn:aws:organizations::123456789012:organization/o-",
            ],
        );
    }

    #[test]
    fn a_bare_ou_id_is_refused() {
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.organizational_units = [\"ou-ab12-cd34ef56\"]\n",
            &["line 3", "organizational_units", "bare OU id", ":ou/o-"],
        );
    }

    #[test]
    fn a_malformed_arn_is_refused() {
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.organizations = [\"arn:aws:organizations::123456789012:account/o-a1b2c3d4e5\"]\n",
            &[
                "line 3",
                "does not start with \"organization/\"",
                "expected arn:",
            ],
        );
    }

    #[test]
    fn an_account_that_is_not_twelve_digits_is_refused() {
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.accounts = [\"12345678901\"]\n",
            &["line 3", "\"12345678901\"", "11 characters", "12-digit"],
        );
        // An unquoted number is a TOML integer: the message must still say what to write.
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.accounts = [123456789012]\n",
            &["line 3", "string"],
        );
    }

    #[test]
    fn an_unknown_key_is_refused_with_the_known_ones() {
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\nshare.organisations = [\"x\"]\n",
            &["line 4", "unknown field `organisations`", "organizations"],
        );
        assert_error(
            "[[rules]]\nname = \"r\"\n",
            &["unknown field `rules`", "rule"],
        );
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\nmatch.created_by = [\"CreateSnapshot\"]\n",
            &[
                "line 4",
                "CreateSnapshot",
                "CreateImage",
                "CopyImage",
                "RegisterImage",
            ],
        );
    }

    #[test]
    fn an_empty_rule_is_refused() {
        assert_error(
            "[[rule]]\nname = \"does-nothing\"\nmatch.name = [\"x-*\"]\n",
            &[
                "rule #1 (\"does-nothing\")",
                "does nothing",
                "share.organizations",
            ],
        );
        assert_error("", &["no rules"]);
        assert_error(
            "[[rule]]\nname = \"\"\ntags = { a = \"b\" }\n",
            &["rule #1", "name is empty"],
        );
        assert_error(
            "[[rule]]\ntags = { a = \"b\" }\n",
            &["missing field `name`"],
        );
    }

    #[test]
    fn duplicate_names_and_targets_are_refused() {
        assert_error(
            "[[rule]]\nname = \"a\"\ntags = { a = \"b\" }\n[[rule]]\nname = \"a\"\ntags = { a = \"b\" }\n",
            &["rule #2 (\"a\")", "used by an earlier rule"],
        );
        assert_error(
            "[[rule]]\nname = \"a\"\nshare.accounts = [\"111122223333\", \"111122223333\"]\n",
            &["account 111122223333", "more than once"],
        );
    }

    #[test]
    fn bad_tags_and_globs_are_refused() {
        assert_error(
            "[[rule]]\nname = \"a\"\ntags = { \"aws:x\" = \"b\" }\n",
            &["line 3", "reserves"],
        );
        let long = "v".repeat(257);
        assert_error(
            &format!("[[rule]]\nname = \"a\"\ntags = {{ k = \"{long}\" }}\n"),
            &["257 characters", "at most 256"],
        );
        assert_error(
            "[[rule]]\nname = \"a\"\ntags = { k = \"v\" }\nmatch.name = [\"golden-[\"]\n",
            &["line 4", "\"golden-[\" is not a valid glob"],
        );
        let many: String = (0..51).map(|i| format!("k{i} = \"v\", ")).collect();
        assert_error(
            &format!(
                "[[rule]]\nname = \"a\"\ntags = {{ {} }}\n",
                many.trim_end_matches(", ")
            ),
            &["51 tags", "at most 50"],
        );
    }

    #[test]
    fn copy_settings_are_checked_with_the_expected_form() {
        let rule = |extra: &str| {
            format!("[[rule]]\nname = \"r\"\nshare.accounts = [\"111122223333\"]\n{extra}\n")
        };
        let config = Config::parse(&rule(
            "copy.regions = [{ region = \"us-west-2\", kms_key = \"alias/ami-share\" }, { region = \"eu-central-1\" }]",
        ))
        .unwrap();
        let copy = config.rules[0].copy.as_ref().unwrap();
        assert_eq!(copy.regions.len(), 2);
        assert_eq!(copy.name.as_str(), "{name}", "the source's name by default");
        assert!(copy.source_tags);
        assert_error(
            &rule("copy.regions = [{ region = \"us-west\" }]"),
            &[
                "line 4",
                "\"us-west\" is not an AWS region code",
                "eu-west-1",
            ],
        );
        assert_error(
            &rule("copy.regions = [{ region = \"us-west-2\" }, { region = \"us-west-2\" }]"),
            &["rule #1", "us-west-2 more than once"],
        );
        assert_error(
            &rule(
                "copy.regions = [{ region = \"us-west-2\", kms_key = \"arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab\" }]",
            ),
            &["a key of eu-west-1", "KMS keys are regional", "an alias"],
        );
        assert_error(&rule("copy.regions = []"), &["copy.regions is empty"]);
        assert_error(
            &rule("copy.regions = [{ region = \"us-west-2\" }]\ncopy.name = \"{name}:{region}\""),
            &["copy.name", "':'", "EC2 refuses"],
        );
        assert_error(
            &rule("copy.regions = [{ region = \"us-west-2\" }]\ncopy.description = \"{nmae}\""),
            &["line 5", "{nmae}", "{image_id}"],
        );
        assert_error(
            &rule("copy.regions = [{ region = \"us-west-2\", key = \"alias/x\" }]"),
            &["unknown field `key`", "kms_key"],
        );
    }

    #[test]
    fn deregistration_protection_is_true_false_or_with_cooldown() {
        let protection = |value: &str| {
            Config::parse(&format!(
                "[[rule]]\nname = \"r\"\ntags = {{ a = \"b\" }}\nderegistration_protection = {value}\n"
            ))
            .map(|c| c.rules[0].deregistration_protection)
        };
        assert_eq!(protection("true").unwrap(), Protection::On);
        assert_eq!(protection("false").unwrap(), Protection::Off);
        assert_eq!(
            protection("\"with-cooldown\"").unwrap(),
            Protection::WithCooldown
        );
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\nderegistration_protection = \"yes\"\n",
            &["line 4", "\"yes\"", r#"true, false or "with-cooldown""#],
        );
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\nderegistration_protection = 1\n",
            &["line 4", r#"true, false or "with-cooldown""#],
        );
    }

    #[test]
    fn snapshot_permission_deprecation_and_parameter_are_checked() {
        assert_error(
            "[[rule]]\nname = \"r\"\nshare.organizations = [\"arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5\"]\nshare.create_volume_permission = true\n",
            &["share.accounts is empty", "accounts only"],
        );
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\ndeprecate_after_days = 0\n",
            &["deprecate_after_days = 0", "1 to 3650"],
        );
        assert_error(
            "[[rule]]\nname = \"r\"\ntags = { a = \"b\" }\nssm_parameter = \"latest\"\n",
            &["line 4", "start with '/'"],
        );
        assert_error(
            "[[rule]]\nname = \"golden images\"\ntags = { a = \"b\" }\nssm_parameter = \"/ami-share/{rule}\"\n",
            &["ssm_parameter", "' '"],
        );
        let only_copies =
            Config::parse("[[rule]]\nname = \"r\"\ncopy.regions = [{ region = \"us-west-2\" }]\n");
        assert!(only_copies.is_ok(), "a rule may only distribute");
        let private = Config::parse("[[rule]]\nname = \"private\"\nshare.exclusive = true\n");
        assert!(
            private.unwrap().rules[0].share.exclusive,
            "an exclusive rule with no target keeps AMIs private"
        );
    }

    #[test]
    fn an_owner_listed_as_a_share_target_is_warned_about() {
        let config = Config::parse(
            "[[rule]]\nname = \"a\"\nmatch.accounts = [\"111122223333\"]\nshare.accounts = [\"111122223333\", \"444455556666\"]\n",
        )
        .unwrap();
        let warnings = config.warnings(None);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("rule #1 (\"a\")")
                && warnings[0].contains("111122223333")
                && warnings[0].contains("match.accounts"),
            "{warnings:?}"
        );
        let warnings = config.warnings(Some("444455556666"));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[1].contains("the account that runs ami-share"));
    }

    #[test]
    fn rules_that_cannot_fit_aws_limits_are_warned_about_with_the_fix() {
        let tags = |n: usize| {
            (0..n)
                .map(|i| format!("t{i:02} = \"v\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let accounts = (0..1001)
            .map(|i| format!("\"2000000{i:05}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "[[rule]]\nname = \"fits\"\nshare.accounts = [\"444455556666\"]\ntags = {{ {} }}\n\
             [[rule]]\nname = \"crowded\"\nshare.accounts = [\"444455556666\"]\ntags = {{ {} }}\n\
             [[rule]]\nname = \"copies\"\nshare.accounts = [\"444455556666\"]\ncopy.regions = [{{ region = \"us-west-2\" }}]\ntags = {{ {} }}\n\
             [[rule]]\nname = \"many\"\nshare.accounts = [{accounts}]\n",
            tags(47),
            tags(48),
            tags(46),
        );
        let warnings = Config::parse(&text).unwrap().warnings(None);
        assert_eq!(warnings.len(), 3, "{warnings:#?}");
        assert!(warnings[0].starts_with("rule #2 (\"crowded\"): 48 tags, and ami-share's own marks may need 3 more on its AMIs: EC2 allows 50 per resource"), "{}", warnings[0]);
        assert!(
            warnings[0].ends_with("keep it to 47 tags"),
            "{}",
            warnings[0]
        );
        assert!(warnings[1].starts_with("rule #3 (\"copies\"): 46 tags, and ami-share's own marks may need 5 more on its copies"), "{}", warnings[1]);
        assert!(warnings[2].starts_with("rule #4 (\"many\"): 1001 share targets: AWS shares an AMI with at most 1000 entities, so 1 of them will be left out"), "{}", warnings[2]);
    }

    #[test]
    fn approved_keys_are_those_listed_and_those_rules_name() {
        let config = Config::parse(
            "[keys]\napproved = [\"alias/golden-images\"]\n[[rule]]\nname = \"a\"\nshare.accounts = [\"444455556666\"]\nreencrypt.kms_key = \"alias/ami-share\"\ncopy.regions = [{ region = \"us-west-2\", kms_key = \"alias/ami-share\" }, { region = \"eu-west-1\" }]\n",
        )
        .unwrap();
        let approved: Vec<String> = config
            .approved_keys()
            .iter()
            .map(|k| k.as_str().to_string())
            .collect();
        assert_eq!(approved, ["alias/ami-share", "alias/golden-images"]);
        assert_error(
            "[keys]\napproved = [\"alias/aws/ebs\"]\n[[rule]]\nname = \"a\"\ntags = { a = \"b\" }\n",
            &["line 2", "AWS managed keys"],
        );
        assert_error(
            "[keys]\napprove = []\n[[rule]]\nname = \"a\"\ntags = { a = \"b\" }\n",
            &["unknown field `approve`", "approved"],
        );
    }

    #[test]
    fn every_problem_of_a_file_is_reported_at_once() {
        let e = error_of("[[rule]]\nname = \"a\"\n[[rule]]\nname = \"a\"\ntags = { k = \"v\" }\n");
        assert!(e.contains("rule #1") && e.contains("rule #2"), "{e}");
    }
}
