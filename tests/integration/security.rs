//! Security properties, checked as tests:
//! - no `Group=all` (public) launch permission unless a selecting rule says `share.public = true`
//!   (a property over generated configs and images, below);
//! - the IAM policy of template.yaml: no `*` action and no `service:*`, every statement limited to the
//!   stack's regions, `Resource: "*"` only for the read calls that support nothing narrower, and the
//!   writes on the resource types they need;
//! - the key policies ami-share writes never admit anyone (`Principal: *` or `{"AWS": "*"}`) without an
//!   `aws:PrincipalOrgID` condition: the property `anyone_is_never_admitted_without_an_organization_condition`
//!   in src/key_policy.rs (2,000 generated policies and grantee sets), beside the merge it checks.

use std::collections::BTreeMap;

use crate::common::*;
use ami_share::config::Config;
use ami_share::observed::CreatedBy;
use ami_share::observed::Tags;
use ami_share::rules::{ImageFacts, desired_for};
use ami_share::targets::LaunchPermission;
use proptest::prelude::*;
use serde_json::Value;

const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";
const OU: &str = "arn:aws:organizations::123456789012:ou/o-a1b2c3d4e5/ou-ab12-cd34ef56";

/// One generated rule: (name glob, shares with the org, the OU, public, exclusive).
fn rule_strategy() -> impl Strategy<Value = (&'static str, bool, bool, bool, bool)> {
    (
        prop::sample::select(vec!["golden-*", "*", "data-*", "golden-data-*"]),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
}

fn config_text(rules: &[(&str, bool, bool, bool, bool)]) -> String {
    let mut text = String::new();
    for (i, (glob, org, ou, public, exclusive)) in rules.iter().enumerate() {
        text.push_str(&format!(
            "[[rule]]\nname = \"r{i}\"\nmatch.name = [\"{glob}\"]\nshare.accounts = [\"2109876543{i:02}\"]\n"
        ));
        if *org {
            text.push_str(&format!("share.organizations = [\"{ORG}\"]\n"));
        }
        if *ou {
            text.push_str(&format!("share.organizational_units = [\"{OU}\"]\n"));
        }
        if *public {
            text.push_str("share.public = true\n");
        }
        if *exclusive {
            text.push_str("share.exclusive = true\n");
        }
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn public_only_when_a_selecting_rule_says_public_true(
        rules in prop::collection::vec(rule_strategy(), 1..5),
        name in prop::sample::select(vec!["golden-1", "data-x", "golden-data-2", "other"]),
    ) {
        let config = Config::parse(&config_text(&rules)).unwrap();
        let tags = Tags::new();
        let desired = desired_for(&config, &ImageFacts {
            name: Some(name),
            tags: &tags,
            owner_id: "123456789012",
            created_by: CreatedBy::CreateImage,
            creation_date: None,
        });
        let public_rules: BTreeMap<String, bool> = rules
            .iter()
            .enumerate()
            .map(|(i, rule)| (format!("r{i}"), rule.3))
            .collect();
        let a_selecting_rule_is_public = desired.rules.iter().any(|r| public_rules[r]);
        prop_assert_eq!(
            desired.launch_permissions.contains(&LaunchPermission::Public),
            a_selecting_rule_is_public,
            "{:?}", desired
        );
    }
}

fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().flat_map(strings).collect(),
        other => vec![other.to_string()],
    }
}

#[test]
fn the_function_role_grants_no_wildcard_action_and_scopes_every_statement() {
    let template = template();
    let statements = role_statements(&template);
    assert!(statements.len() >= 8, "{statements:#?}");
    for statement in statements {
        let sid = statement["Sid"].as_str().unwrap_or("(no Sid)");
        if statement["Effect"] == "Deny" {
            // The one Deny: PutKeyPolicy asking KMS to skip its lockout check.
            assert_eq!(statement["Action"], "kms:PutKeyPolicy", "{sid}");
            assert_eq!(
                statement["Condition"]["Bool"]["kms:BypassPolicyLockoutSafetyCheck"], "true",
                "{sid}"
            );
            assert_eq!(statement["Resource"], "*", "{sid}: denied everywhere");
            continue;
        }
        assert_eq!(statement["Effect"], "Allow", "{sid}");
        assert!(
            statement.get("NotAction").is_none() && statement.get("NotResource").is_none(),
            "{sid}"
        );
        let actions = strings(&statement["Action"]);
        // The function's own work queue: sending to it, that queue only (an SQS ARN names its region).
        if actions.iter().any(|a| a.starts_with("sqs:")) {
            assert_eq!(actions, ["sqs:SendMessage"], "{sid}");
            let resources = strings(&statement["Resource"]);
            assert!(
                resources.len() == 1 && resources[0].contains("WorkQueue"),
                "{sid}: SQS on {resources:?}"
            );
            continue;
        }
        for action in &actions {
            let (service, name) = action.split_once(':').unwrap_or(("", action));
            assert!(
                !service.is_empty() && name != "*" && !name.is_empty() && action != "*",
                "{sid}: action {action:?} is a wildcard"
            );
            assert!(
                ["ec2", "kms", "ssm"].contains(&service),
                "{sid}: {action} is a service ami-share does not use"
            );
        }
        // Every statement holds only in this region and the CopyRegions (in each branch of a condition
        // chosen by a stack parameter).
        let condition = &statement["Condition"];
        let conditions: Vec<&Value> = match condition["Fn::If"].as_array() {
            Some(branches) => branches[1..].iter().collect(),
            None => vec![condition],
        };
        for condition in conditions {
            let region_limited = condition
                .as_object()
                .is_some_and(|c| c.values().any(|op| op.get("aws:RequestedRegion").is_some()));
            assert!(
                region_limited,
                "{sid}: not limited by aws:RequestedRegion: {condition}"
            );
        }
        // "*" only where AWS supports no resource-level permission: the read calls.
        let resources = strings(&statement["Resource"]);
        if resources.iter().any(|r| r == "*") {
            for action in &actions {
                let name = action.split_once(':').unwrap().1;
                assert!(
                    name.starts_with("Describe")
                        || name.starts_with("Get")
                        || name.starts_with("List"),
                    "{sid}: {action} on Resource \"*\""
                );
            }
        }
        // The key-policy writer and KMS use: this account's keys only (listing aliases is not on a key).
        if actions
            .iter()
            .any(|a| a.starts_with("kms:") && a != "kms:ListAliases")
        {
            for resource in &resources {
                assert!(
                    resource.contains(":kms:") && resource.contains("${AWS::AccountId}:key/"),
                    "{sid}: KMS on {resource}"
                );
            }
        }
        // Writes of EC2 go to images and snapshots only.
        if actions
            .iter()
            .any(|a| a.starts_with("ec2:") && !a.contains(":Describe") && !a.contains(":Get"))
        {
            for resource in &resources {
                assert!(
                    resource.contains("::image/") || resource.contains("::snapshot/"),
                    "{sid}: EC2 writes on {resource}"
                );
            }
        }
    }
}

/// The function role's statements, each branch of a statement chosen by a stack parameter (`Fn::If`)
/// taken as a statement of its own.
fn role_statements(template: &Value) -> Vec<Value> {
    let policies = template["Resources"]["AmiShareFunction"]["Properties"]["Policies"]
        .as_array()
        .expect("the function's inline policies");
    policies
        .iter()
        .flat_map(|p| {
            p["Statement"]
                .as_array()
                .expect("a policy document")
                .clone()
        })
        .flat_map(|statement| match statement["Fn::If"].as_array() {
            Some(branches) => branches[1..]
                .iter()
                .filter(|b| b.get("Sid").is_some())
                .cloned()
                .collect(),
            None => vec![statement],
        })
        .collect()
}

#[test]
fn key_policies_may_be_changed_only_on_keys_their_owner_approved_and_never_bypassing_the_lockout_check()
 {
    let template = template();
    assert_eq!(
        template["Parameters"]["KmsKeyScope"]["Default"], "approved-keys",
        "consent is the default"
    );
    let statements = role_statements(&template);
    let mut writers = 0;
    for statement in &statements {
        let actions = strings(&statement["Action"]);
        if statement["Effect"] != "Allow" || !actions.iter().any(|a| a == "kms:PutKeyPolicy") {
            continue;
        }
        writers += 1;
        let sid = statement["Sid"].as_str().unwrap();
        // In the default scope (every branch but KmsKeyScope=all-keys's): a key the owner tagged, or
        // whose alias the stack names.
        let conditions: Vec<&Value> = match statement["Condition"]["Fn::If"].as_array() {
            Some(branches) => {
                assert_eq!(branches[0], "AllKeys", "{sid}");
                vec![&branches[2]]
            }
            None => vec![&statement["Condition"]],
        };
        for condition in conditions {
            let tagged =
                condition["StringEquals"]["aws:ResourceTag/ami-share:manage-key-policy"] == "true";
            let aliased = condition["ForAnyValue:StringLike"]["kms:ResourceAliases"]
                == serde_json::json!({"Ref": "ApprovedKeyAliases"});
            assert!(
                tagged || aliased,
                "{sid}: PutKeyPolicy on unapproved keys: {condition}"
            );
        }
    }
    assert_eq!(writers, 2, "tagged keys, and aliased keys");
    assert!(
        statements.iter().any(|s| s["Effect"] == "Deny"
            && s["Action"] == "kms:PutKeyPolicy"
            && s["Condition"]["Bool"]["kms:BypassPolicyLockoutSafetyCheck"] == "true"),
        "PutKeyPolicy with BypassPolicyLockoutSafetyCheck is denied"
    );
}

#[test]
fn only_eventbridge_may_invoke_the_function_or_write_to_the_dead_letter_queue() {
    let template = template();
    let resources = template["Resources"].as_object().unwrap();
    for (name, resource) in resources {
        let properties = &resource["Properties"];
        match resource["Type"].as_str().unwrap() {
            "AWS::Lambda::Permission" => {
                assert_eq!(properties["Principal"], "events.amazonaws.com", "{name}");
                assert!(
                    properties.get("SourceArn").is_some(),
                    "{name}: any rule could invoke"
                );
            }
            "AWS::SQS::QueuePolicy" => {
                for statement in properties["PolicyDocument"]["Statement"]
                    .as_array()
                    .unwrap()
                {
                    assert_eq!(
                        statement["Principal"]["Service"], "events.amazonaws.com",
                        "{name}"
                    );
                    assert!(
                        statement["Condition"]["ArnEquals"]["aws:SourceArn"].is_array(),
                        "{name}: not limited to the stack's rules"
                    );
                }
            }
            _ => {}
        }
    }
}

// --- the service control policy and tag policy of policies/ -------------------------------------------

/// A request as an SCP sees it, for the few condition keys the policies use.
struct Request<'a> {
    principal_arn: &'a str,
    action: &'a str,
    resource: &'a str,
    /// `aws:TagKeys`: the tag keys in the request (absent for a call that names none).
    tag_keys: &'a [&'a str],
}

/// IAM's wildcard match: `*` any run of characters (`/` and `:` too), `?` one.
fn iam_like(pattern: &str, value: &str) -> bool {
    fn go(p: &[u8], v: &[u8]) -> bool {
        match (p.first(), v.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], v) || (!v.is_empty() && go(p, &v[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &v[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &v[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), value.as_bytes())
}

/// Whether one condition operator holds for the request, as IAM evaluates it (a `ForAnyValue` test of an
/// absent key is false; a negated test of an absent key is true).
fn condition_holds(operator: &str, entries: &Value, request: &Request) -> bool {
    entries.as_object().unwrap().iter().all(|(key, patterns)| {
        let patterns = strings(patterns);
        let values: Vec<&str> = match key.as_str() {
            "aws:TagKeys" => request.tag_keys.to_vec(),
            "aws:PrincipalArn" => vec![request.principal_arn],
            other => panic!("the evaluator does not know {other}"),
        };
        let any_like = |like: &dyn Fn(&str, &str) -> bool| {
            values.iter().any(|v| patterns.iter().any(|p| like(p, v)))
        };
        match operator {
            "ForAnyValue:StringLike" => any_like(&iam_like),
            "ForAnyValue:StringEquals" => any_like(&|p, v| p == v),
            "ForAnyValue:StringEqualsIgnoreCase" => any_like(&|p, v| p.eq_ignore_ascii_case(v)),
            "ArnNotLike" => !any_like(&iam_like),
            // `Null: true` holds when the request has no value for the key.
            "Null" => patterns.iter().all(|p| (p == "true") == values.is_empty()),
            other => panic!("the evaluator does not know {other}"),
        }
    })
}

fn scp_denies(scp: &Value, request: &Request) -> bool {
    scp["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .any(|statement| {
            assert_eq!(statement["Effect"], "Deny", "an SCP of denials");
            strings(&statement["Action"])
                .iter()
                .any(|a| iam_like(a, request.action))
                && strings(&statement["Resource"])
                    .iter()
                    .any(|r| iam_like(r, request.resource))
                && statement["Condition"]
                    .as_object()
                    .is_none_or(|c| c.iter().all(|(op, e)| condition_holds(op, e, request)))
        })
}

fn policy_file(name: &str) -> (String, Value) {
    let text = std::fs::read_to_string(repo_path(&format!("policies/{name}"))).unwrap();
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
    (text, value)
}

#[test]
fn the_service_control_policy_reserves_ami_shares_tags_for_its_role_and_key_approval_for_key_administrators()
 {
    let (text, scp) = policy_file("scp-reserve-ami-share-tags.json");
    assert!(
        text.len() <= 5_120,
        "SCPs are limited to 5,120 characters: {}",
        text.len()
    );
    // The template puts the function's role where the policy exempts it.
    assert_eq!(
        template()["Resources"]["AmiShareFunction"]["Properties"]["RolePath"],
        "/ami-share/"
    );
    let function = "arn:aws:iam::123456789012:role/ami-share/ami-share-AmiShareFunctionRole-1A2B3C";
    let insider = "arn:aws:iam::123456789012:role/builders/packer";
    let key_admin = "arn:aws:iam::123456789012:role/key-administrators/alice";
    let image = "arn:aws:ec2:us-east-1::image/ami-0a1b2c3d4e5f67890";
    let snapshot = "arn:aws:ec2:us-east-1::snapshot/snap-0a1b2c3d4e5f67890";
    let key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    let request = |principal_arn, action, resource, tag_keys| Request {
        principal_arn,
        action,
        resource,
        tag_keys,
    };
    for (what, request, denied) in [
        // Every mark and status ami-share writes, on images and snapshots, at creation (CreateImage's
        // tags are authorized as ec2:CreateTags) or later.
        (
            "forging a copy mark",
            request(
                insider,
                "ec2:CreateTags",
                image,
                &["ami-share:copy-kind", "Name"][..],
            ),
            true,
        ),
        (
            "forging the source",
            request(
                insider,
                "ec2:CreateTags",
                image,
                &["ami-share:source-image"][..],
            ),
            true,
        ),
        (
            "setting a status",
            request(
                insider,
                "ec2:CreateTags",
                snapshot,
                &["ami-share:status"][..],
            ),
            true,
        ),
        (
            "deleting a status",
            request(
                insider,
                "ec2:DeleteTags",
                image,
                &["ami-share:status-reason"][..],
            ),
            true,
        ),
        (
            "deleting every tag, marks too",
            request(insider, "ec2:DeleteTags", image, &[][..]),
            true,
        ),
        (
            "ami-share deleting every tag",
            request(function, "ec2:DeleteTags", image, &[][..]),
            false,
        ),
        (
            "deleting a tag of one's own",
            request(insider, "ec2:DeleteTags", image, &["team"][..]),
            false,
        ),
        (
            "tagging as usual",
            request(insider, "ec2:CreateTags", image, &["team", "stage"][..]),
            false,
        ),
        (
            "ami-share writing its marks",
            request(
                function,
                "ec2:CreateTags",
                image,
                &["ami-share:copy-kind"][..],
            ),
            false,
        ),
        // Approving a key is for key administrators (IAM matches the template's aws:ResourceTag
        // condition on tag keys without regard to case: so does this policy).
        (
            "approving a key by a tag in capitals",
            request(
                insider,
                "kms:TagResource",
                key,
                &["AMI-SHARE:Manage-Key-Policy"][..],
            ),
            true,
        ),
        (
            "approving a key by tag",
            request(
                insider,
                "kms:TagResource",
                key,
                &["ami-share:manage-key-policy"][..],
            ),
            true,
        ),
        (
            "creating a pre-approved key",
            request(
                insider,
                "kms:CreateKey",
                "*",
                &["ami-share:manage-key-policy"][..],
            ),
            true,
        ),
        (
            "tagging a key as usual",
            request(insider, "kms:TagResource", key, &["team"][..]),
            false,
        ),
        (
            "a key administrator approving",
            request(
                key_admin,
                "kms:TagResource",
                key,
                &["ami-share:manage-key-policy"][..],
            ),
            false,
        ),
        (
            "approving a key by alias",
            request(
                insider,
                "kms:CreateAlias",
                "arn:aws:kms:us-east-1:123456789012:alias/ami-share-golden",
                &[][..],
            ),
            true,
        ),
        (
            "an alias of one's own",
            request(
                insider,
                "kms:CreateAlias",
                "arn:aws:kms:us-east-1:123456789012:alias/team-x",
                &[][..],
            ),
            false,
        ),
        (
            "even ami-share",
            request(
                function,
                "kms:TagResource",
                key,
                &["ami-share:manage-key-policy"][..],
            ),
            true,
        ),
    ] {
        assert_eq!(scp_denies(&scp, &request), denied, "{what}");
    }
    // Every tag key ami-share writes on images and snapshots is one the policy reserves.
    for key in ami_share::markers::RESERVED {
        assert!(iam_like("ami-share:*", key), "{key}");
    }
}

#[test]
fn the_tag_policy_names_every_tag_key_ami_share_reads_or_writes() {
    let (_, policy) = policy_file("tag-policy-ami-share.json");
    let tags = policy["tags"].as_object().unwrap();
    let mut expected: Vec<&str> = ami_share::markers::RESERVED.to_vec();
    expected.push(ami_share::keys::APPROVAL_TAG);
    let mut listed: Vec<&str> = tags.keys().map(String::as_str).collect();
    expected.sort();
    listed.sort();
    assert_eq!(listed, expected);
    for (key, rule) in tags {
        assert_eq!(
            rule["tag_key"]["@@assign"],
            key.as_str(),
            "{key}: its capitalization"
        );
    }
    assert_eq!(
        tags[ami_share::keys::APPROVAL_TAG]["tag_value"]["@@assign"],
        serde_json::json!([ami_share::keys::APPROVAL_TAG_VALUE])
    );
}
