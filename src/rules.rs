//! Rule selection: which rules select an image, and what they want for it together.
//!
//! Pure. Rules are evaluated against the image as observed (its name, its tags before ami-share acts, its
//! owner, how it was made). Effects of all selecting rules are united: tags merge, launch permissions add
//! up. When two rules want different values for one tag key, the rule written first wins and the conflict
//! is reported (in the plan and the log), so the outcome never depends on anything but the file.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::config::{Config, Rule};
use crate::distribution::Template;
use crate::keys::KeyRef;
use crate::markers;
use crate::observed::{CreatedBy, Protection, Tags};
use crate::targets::{AccountId, LaunchPermission};
use crate::time::Timestamp;

/// The facts about an image that rules can select on.
#[derive(Debug, Clone, Copy)]
pub struct ImageFacts<'a> {
    pub name: Option<&'a str>,
    pub tags: &'a Tags,
    pub owner_id: &'a str,
    pub created_by: CreatedBy,
    /// EC2's `CreationDate`: deprecation is counted from it.
    pub creation_date: Option<Timestamp>,
}

/// What the config's exclusive rules grant: all an image they no longer select may lose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ExclusiveScope {
    pub launch_permissions: BTreeSet<LaunchPermission>,
    pub create_volume_accounts: BTreeSet<AccountId>,
}

/// What the selecting rules want for one image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// Names of the rules that selected the image, in file order.
    pub rules: Vec<String>,
    pub image_tags: Tags,
    pub snapshot_tags: Tags,
    pub launch_permissions: BTreeSet<LaunchPermission>,
    /// The key to re-encrypt a copy with when the image cannot be shared as it is (the first selecting
    /// rule that names one).
    pub reencrypt_with: Option<KeyRef>,
    /// Copies to other regions, when a selecting rule has `copy`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyWanted>,
    /// Accounts to grant createVolumePermission on the snapshots (`share.create_volume_permission`).
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub create_volume_accounts: BTreeSet<AccountId>,
    /// When to deprecate the image (and its copies): the earliest a selecting rule asks for, counted from
    /// the source image's creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deprecate_at: Option<Timestamp>,
    /// The strongest deregistration protection a selecting rule asks for (on the image and its copies).
    #[serde(skip_serializing_if = "Protection::is_off")]
    pub protection: Protection,
    /// Whether a selecting rule is exclusive: launch permissions beyond `launch_permissions` (what all
    /// selecting rules grant together) are removed.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub exclusive: bool,
    /// An image an exclusive rule selected before ([`markers::EXCLUSIVE`]) that none selects now: the
    /// removals are limited to what the config's exclusive rules grant (these targets), and the mark is
    /// then set to `false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclusive_scope: Option<ExclusiveScope>,
    /// When the image's family began, as EC2 dates it: the image's own `CreationDate`, or, for
    /// ami-share's copy, its source's. An SSM parameter never moves to an image of an older family.
    #[serde(skip)]
    pub family_created: Option<Timestamp>,
    /// SSM parameters to point at the image once it is shared, in its region.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub ssm_parameters: BTreeSet<String>,
    /// Tag keys (or re-encryption keys) two rules disagree on, described for the operator.
    pub conflicts: Vec<String>,
    /// What a person should know about the rules' wish that changes nothing (e.g. the owner's own
    /// account among the targets, which needs no grant).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The keys the config approves ([`Config::approved_keys`]): with those their owner tagged, the only
    /// keys whose policy ami-share changes.
    #[serde(skip)]
    pub approved_keys: Vec<KeyRef>,
}

/// The copies the selecting rules want: every region any of them names; for a region named twice, the
/// key of the rule first in the file (the other is reported as a conflict); the name, description and
/// tag settings of the first rule with `copy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyWanted {
    /// Region → the key to encrypt the copy there with (`None`: EC2's default behaviour).
    pub regions: BTreeMap<String, Option<KeyRef>>,
    pub name: Template,
    pub description: Template,
    pub source_tags: bool,
}

impl Desired {
    /// Nothing to do: no rule selects the image, and no exclusive rule's grants are to be taken back.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.exclusive_scope.is_none()
    }
}

/// Whether `rule` selects the image.
pub fn selects(rule: &Rule, image: &ImageFacts) -> bool {
    let s = &rule.selector;
    let name_ok = s.name.is_empty()
        || image
            .name
            .is_some_and(|name| s.name.iter().any(|glob| glob.is_match(name)));
    let tags_ok = s.tags.iter().all(|(key, glob)| {
        image
            .tags
            .get(key.as_str())
            .is_some_and(|value| glob.is_match(value))
    });
    let created_ok = s.created_by.is_empty() || s.created_by.contains(&image.created_by);
    let account_ok =
        s.accounts.is_empty() || s.accounts.iter().any(|a| a.as_str() == image.owner_id);
    name_ok && tags_ok && created_ok && account_ok
}

/// Unites the effects of every rule that selects the image.
pub fn desired_for(config: &Config, image: &ImageFacts) -> Desired {
    let mut desired = Desired {
        family_created: image.creation_date,
        ..Desired::default()
    };
    // Carried only where a rule selects the image: the plan needs them only then.
    // Which rule set each key first, to name both rules in a conflict.
    let mut owner_of_key: Tags = Tags::new();
    let selecting: Vec<&Rule> = config
        .rules
        .iter()
        .filter(|rule| selects(rule, image))
        .collect();
    for rule in &selecting {
        desired.rules.push(rule.name.clone());
        for (key, value) in &rule.tags {
            let (key, value) = (key.as_str(), value.as_str());
            match desired.image_tags.get(key) {
                Some(existing) if existing != value => desired.conflicts.push(format!(
                    "tag {key:?}: rule {:?} wants {value:?}, rule {:?} (first in the file, applied) wants {existing:?}",
                    rule.name, owner_of_key[key]
                )),
                Some(_) => {}
                None => {
                    desired.image_tags.insert(key.to_string(), value.to_string());
                    owner_of_key.insert(key.to_string(), rule.name.clone());
                }
            }
        }
        desired
            .launch_permissions
            .extend(rule.share.launch_permissions());
        if let Some(settings) = &rule.copy {
            let copy = desired.copy.get_or_insert_with(|| CopyWanted {
                regions: BTreeMap::new(),
                name: settings.name.clone(),
                description: settings.description.clone(),
                source_tags: settings.source_tags,
            });
            for target in &settings.regions {
                let region = target.region.as_str();
                match copy.regions.get(region) {
                    None => {
                        copy.regions
                            .insert(region.to_string(), target.kms_key.clone());
                    }
                    Some(first) if *first != target.kms_key => desired.conflicts.push(format!(
                        "copy to {region}: rule {:?} wants key {:?}, an earlier rule (first in the file, applied) wants {:?}",
                        rule.name,
                        target.kms_key.as_ref().map(KeyRef::as_str).unwrap_or("(default)"),
                        first.as_ref().map(KeyRef::as_str).unwrap_or("(default)"),
                    )),
                    Some(_) => {}
                }
            }
        }
        desired.exclusive |= rule.share.exclusive;
        if rule.share.create_volume_permission {
            desired
                .create_volume_accounts
                .extend(rule.share.accounts.iter().cloned());
        }
        if let Some(days) = rule.deprecate_after_days
            && let Some(at) = image
                .creation_date
                .map(|c| c.days_later_to_the_minute(days))
            && desired
                .deprecate_at
                .as_ref()
                .is_none_or(|earlier| at < *earlier)
        {
            desired.deprecate_at = Some(at);
        }
        desired.protection = desired.protection.max(rule.deregistration_protection);
        if let Some(parameter) = &rule.ssm_parameter {
            desired
                .ssm_parameters
                .insert(parameter.for_rule(&rule.name));
        }
        if let Some(reencrypt) = &rule.reencrypt {
            match &desired.reencrypt_with {
                None => desired.reencrypt_with = Some(reencrypt.kms_key.clone()),
                Some(first) if *first != reencrypt.kms_key => desired.conflicts.push(format!(
                    "reencrypt.kms_key: rule {:?} wants {:?}, an earlier rule (first in the file, applied) wants {:?}",
                    rule.name,
                    reencrypt.kms_key.as_str(),
                    first.as_str()
                )),
                Some(_) => {}
            }
        }
    }
    if !selecting.is_empty() {
        desired.approved_keys = config.approved_keys();
    }
    match desired.exclusive {
        true => {
            desired
                .image_tags
                .insert(markers::EXCLUSIVE.to_string(), "true".to_string());
        }
        false if image.tags.get(markers::EXCLUSIVE).map(String::as_str) == Some("true") => {
            let mut scope = ExclusiveScope::default();
            for rule in config.rules.iter().filter(|r| r.share.exclusive) {
                // Never Group=all: taking an AMI back from the public is for a rule that selects it
                // to decide, not for a mark.
                scope.launch_permissions.extend(
                    rule.share
                        .launch_permissions()
                        .filter(|p| *p != LaunchPermission::Public),
                );
                if rule.share.create_volume_permission {
                    scope
                        .create_volume_accounts
                        .extend(rule.share.accounts.iter().cloned());
                }
            }
            desired.exclusive = true;
            desired.exclusive_scope = Some(scope);
        }
        false => {}
    }
    // The owner launches its own AMIs and copies its own snapshots: EC2 needs (and shows) no grant for it.
    let owner = desired
        .launch_permissions
        .iter()
        .find(|p| matches!(p, LaunchPermission::Account(id) if id.as_str() == image.owner_id))
        .cloned();
    if let Some(owner) = owner {
        desired.launch_permissions.remove(&owner);
        desired
            .create_volume_accounts
            .retain(|a| a.as_str() != image.owner_id);
        desired.notes.push(format!(
            "account {} is listed in share.accounts but owns the AMI: the owner needs no launch or volume permission, so none is given",
            image.owner_id
        ));
    }
    // Snapshot tags: the winning value of each key, for keys of rules that tag snapshots.
    for rule in selecting.iter().filter(|rule| rule.tag_snapshots) {
        for key in rule.tags.keys() {
            let key = key.as_str();
            desired
                .snapshot_tags
                .insert(key.to_string(), desired.image_tags[key].clone());
        }
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
    const OU: &str = "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12-cd34ef56";

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn facts<'a>(name: &'a str, tags: &'a Tags) -> ImageFacts<'a> {
        ImageFacts {
            name: Some(name),
            tags,
            owner_id: "123456789012",
            created_by: CreatedBy::CreateImage,
            creation_date: Timestamp::parse("2026-11-25T10:00:00.000Z"),
        }
    }

    #[test]
    fn an_exclusive_rule_marks_what_it_selects_and_its_grants_are_the_scope_once_it_does_not() {
        let c = config(
            r#"
            [[rule]]
            name = "exclusive"
            match.tags = { share = "org" }
            share.organizations = ["arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5"]
            share.accounts = ["111122223333"]
            share.create_volume_permission = true
            share.exclusive = true

            [[rule]]
            name = "partner"
            match.name = ["golden-*"]
            share.accounts = ["444455556666"]
            "#,
        );
        let selected = tags(&[("share", "org")]);
        let d = desired_for(&c, &facts("golden-1", &selected));
        assert!(d.exclusive && d.exclusive_scope.is_none());
        assert_eq!(d.image_tags[markers::EXCLUSIVE], "true");

        let marked = tags(&[(markers::EXCLUSIVE, "true")]);
        let d = desired_for(&c, &facts("golden-1", &marked));
        assert_eq!(d.rules, ["partner"]);
        let scope = d.exclusive_scope.expect("de-selected");
        assert_eq!(scope.launch_permissions.len(), 2, "{scope:?}");
        assert_eq!(scope.create_volume_accounts.len(), 1);
        assert!(!d.image_tags.contains_key(markers::EXCLUSIVE));

        let unmarked = Tags::new();
        let d = desired_for(&c, &facts("other", &unmarked));
        assert!(d.is_empty(), "never exclusive: nothing to take back");
        let d = desired_for(&c, &facts("other", &marked));
        assert!(
            !d.is_empty(),
            "no rule selects it, but the exclusive rule's grants go"
        );
    }

    #[test]
    fn the_owners_own_account_gets_no_launch_or_volume_permission_and_a_note_says_why() {
        let c = config(
            r#"
            [[rule]]
            name = "r"
            share.accounts = ["123456789012", "111122223333"]
            share.create_volume_permission = true
            "#,
        );
        let none = Tags::new();
        let d = desired_for(&c, &facts("x", &none));
        assert_eq!(
            d.launch_permissions,
            [LaunchPermission::Account("111122223333".parse().unwrap())].into()
        );
        assert_eq!(
            d.create_volume_accounts,
            ["111122223333".parse().unwrap()].into()
        );
        assert!(
            d.notes[0].contains("account 123456789012") && d.notes[0].contains("owns the AMI"),
            "{:?}",
            d.notes
        );
    }

    #[test]
    fn copies_snapshot_permissions_deprecation_and_parameters_unite_across_rules() {
        let c = config(
            r#"
            [[rule]]
            name = "first"
            share.accounts = ["111122223333"]
            share.create_volume_permission = true
            deprecate_after_days = 30
            deregistration_protection = "with-cooldown"
            ssm_parameter = "/ami-share/{rule}/latest"
            copy.name = "{name}-{region}"
            copy.regions = [{ region = "us-east-1", kms_key = "alias/a" }, { region = "eu-central-1" }]

            [[rule]]
            name = "second"
            share.accounts = ["444455556666"]
            deprecate_after_days = 7
            deregistration_protection = true
            copy.regions = [{ region = "us-east-1", kms_key = "alias/b" }, { region = "ap-south-1" }]
            "#,
        );
        let none = Tags::new();
        let d = desired_for(&c, &facts("x", &none));
        let copy = d.copy.as_ref().unwrap();
        assert_eq!(
            copy.regions.keys().collect::<Vec<_>>(),
            ["ap-south-1", "eu-central-1", "us-east-1"]
        );
        assert_eq!(
            copy.regions["us-east-1"].as_ref().unwrap().as_str(),
            "alias/a"
        );
        assert_eq!(copy.name.as_str(), "{name}-{region}", "the first rule's");
        assert!(
            d.conflicts
                .iter()
                .any(|c| c.contains("us-east-1") && c.contains("alias/b"))
        );
        let accounts: Vec<&str> = d
            .create_volume_accounts
            .iter()
            .map(|a| a.as_str())
            .collect();
        assert_eq!(accounts, ["111122223333"], "only the rule that opts in");
        assert_eq!(d.protection, Protection::WithCooldown, "the strongest");
        assert_eq!(
            d.deprecate_at.map(|t| t.to_string()).as_deref(),
            Some("2026-12-02T10:00:00Z"),
            "the earliest"
        );
        assert_eq!(
            d.ssm_parameters.iter().collect::<Vec<_>>(),
            ["/ami-share/first/latest"]
        );
        let undated = ImageFacts {
            creation_date: None,
            ..facts("x", &none)
        };
        assert_eq!(desired_for(&c, &undated).deprecate_at, None);
    }

    fn rule(selector: &str) -> Config {
        config(&format!(
            "[[rule]]\nname = \"r\"\ntags = {{ k = \"v\" }}\n{selector}\n"
        ))
    }

    #[test]
    fn a_rule_without_criteria_selects_every_image() {
        let c = rule("");
        let none = Tags::new();
        assert!(selects(&c.rules[0], &facts("anything", &none)));
        let nameless = ImageFacts {
            name: None,
            ..facts("", &none)
        };
        assert!(selects(&c.rules[0], &nameless));
    }

    #[test]
    fn name_globs_any_of() {
        let c = rule("match.name = [\"golden-*\", \"base/{al2023,ubuntu}-?\"]");
        let none = Tags::new();
        let r = &c.rules[0];
        assert!(selects(r, &facts("golden-al2023", &none)));
        assert!(selects(r, &facts("base/ubuntu-1", &none)));
        assert!(!selects(r, &facts("base/debian-1", &none)));
        assert!(!selects(r, &facts("base/ubuntu-12", &none)));
        assert!(
            !selects(r, &facts("my-golden-x", &none)),
            "globs are anchored"
        );
        let nameless = ImageFacts {
            name: None,
            ..facts("", &none)
        };
        assert!(!selects(r, &nameless), "a name criterion needs a name");
    }

    #[test]
    fn name_globs_cross_slashes() {
        let c = rule("match.name = [\"ubuntu/*\"]");
        let none = Tags::new();
        assert!(selects(
            &c.rules[0],
            &facts("ubuntu/images/hvm-ssd/noble-24.04", &none)
        ));
    }

    #[test]
    fn required_tags_all_of_with_value_globs() {
        let c = rule("match.tags = { stage = \"release\", team = \"*\" }");
        let r = &c.rules[0];
        assert!(selects(
            r,
            &facts("x", &tags(&[("stage", "release"), ("team", "data")]))
        ));
        assert!(
            !selects(r, &facts("x", &tags(&[("stage", "release")]))),
            "team missing"
        );
        assert!(!selects(
            r,
            &facts("x", &tags(&[("stage", "dev"), ("team", "a")]))
        ));
        assert!(
            selects(r, &facts("x", &tags(&[("stage", "release"), ("team", "")]))),
            "* matches empty"
        );
    }

    #[test]
    fn created_by_and_accounts() {
        let c = rule("match.created_by = [\"CopyImage\"]\nmatch.accounts = [\"123456789012\"]");
        let none = Tags::new();
        let r = &c.rules[0];
        let copied = ImageFacts {
            created_by: CreatedBy::CopyImage,
            ..facts("x", &none)
        };
        assert!(selects(r, &copied));
        assert!(!selects(r, &facts("x", &none)), "CreateImage");
        let other_owner = ImageFacts {
            owner_id: "210987654321",
            ..copied
        };
        assert!(!selects(r, &other_owner));
    }

    #[test]
    fn effects_of_several_rules_are_united() {
        let c = config(&format!(
            r#"
            [[rule]]
            name = "org"
            tags = {{ a = "1" }}
            share.organizations = ["{ORG}"]
            [[rule]]
            name = "ou"
            match.name = ["golden-*"]
            tags = {{ b = "2" }}
            tag_snapshots = false
            share.organizational_units = ["{OU}"]
            share.accounts = ["210987654321"]
            [[rule]]
            name = "never"
            match.name = ["nothing"]
            tags = {{ c = "3" }}
            "#
        ));
        let none = Tags::new();
        let d = desired_for(&c, &facts("golden-1", &none));
        assert_eq!(d.rules, ["org", "ou"]);
        assert_eq!(d.image_tags, tags(&[("a", "1"), ("b", "2")]));
        assert_eq!(d.snapshot_tags, tags(&[("a", "1")]));
        assert_eq!(d.launch_permissions.len(), 3);
        assert!(d.conflicts.is_empty());
        assert!(desired_for(&c, &facts("other", &none)).rules == ["org"]);
    }

    #[test]
    fn tag_conflicts_go_to_the_first_rule_and_are_reported() {
        let c = config(
            "[[rule]]\nname = \"first\"\ntags = { team = \"platform\" }\n[[rule]]\nname = \"second\"\ntags = { team = \"data\", x = \"y\" }\n",
        );
        let none = Tags::new();
        let d = desired_for(&c, &facts("any", &none));
        assert_eq!(d.image_tags, tags(&[("team", "platform"), ("x", "y")]));
        assert_eq!(d.snapshot_tags, d.image_tags);
        assert_eq!(d.conflicts.len(), 1);
        assert!(
            d.conflicts[0].contains("\"second\" wants \"data\""),
            "{}",
            d.conflicts[0]
        );
        assert!(d.conflicts[0].contains("\"first\""), "{}", d.conflicts[0]);
    }

    #[test]
    fn the_first_rule_with_a_reencryption_key_wins_and_a_disagreement_is_reported() {
        let c = config(
            "[[rule]]\nname = \"a\"\nshare.accounts = [\"111122223333\"]\nreencrypt.kms_key = \"alias/one\"\n[[rule]]\nname = \"b\"\nshare.accounts = [\"111122223333\"]\nreencrypt.kms_key = \"alias/two\"\n",
        );
        let none = Tags::new();
        let d = desired_for(&c, &facts("x", &none));
        assert_eq!(d.reencrypt_with.unwrap().as_str(), "alias/one");
        assert_eq!(d.conflicts.len(), 1);
        assert!(
            d.conflicts[0].contains("rule \"b\" wants \"alias/two\""),
            "{}",
            d.conflicts[0]
        );
    }

    #[test]
    fn the_same_target_in_two_rules_is_granted_once() {
        let c = config(&format!(
            "[[rule]]\nname = \"a\"\nshare.organizations = [\"{ORG}\"]\n[[rule]]\nname = \"b\"\nshare.organizations = [\"{ORG}\"]\n"
        ));
        let none = Tags::new();
        assert_eq!(
            desired_for(&c, &facts("x", &none)).launch_permissions.len(),
            1
        );
    }
}
