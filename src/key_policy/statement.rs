//! One statement of ami-share's: how it is written for its grantees (with an operator's narrowing kept),
//! and how a statement found in a policy is read back, or refused when it would widen what ami-share
//! writes.

use super::*;

pub(super) fn dns_suffix(partition: &str) -> &'static str {
    match partition {
        "aws-cn" => "amazonaws.com.cn",
        _ => "amazonaws.com",
    }
}

/// Whether `value` limits `kms:ViaService` to EC2 in named regions only: each entry a literal
/// `ec2.<region>.<suffix>`, no wildcard. That is narrower than [`via_ec2`], so it is kept.
pub(super) fn names_ec2_regions(value: &Value, partition: &str) -> bool {
    let suffix = format!(".{}", dns_suffix(partition));
    strings(value).is_some_and(|values| {
        !values.is_empty()
            && values.iter().all(|v| {
                v.strip_prefix("ec2.")
                    .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                    .is_some_and(|region| {
                        !region.is_empty()
                            && region
                                .bytes()
                                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    })
            })
    })
}

/// What an operator changed in one of ami-share's statements that only narrows it: kept on every merge.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Narrowing {
    /// Some of ami-share's actions, when the operator removed the others.
    pub(super) actions: Option<BTreeSet<String>>,
    /// Condition entries to put over ami-share's own, operator → key → value: entries ami-share does not
    /// write, and a `kms:ViaService` limited to named regions.
    pub(super) conditions: Map<String, Value>,
}

impl Narrowing {
    pub(super) fn add_condition(&mut self, operator: &str, key: &str, value: Value) {
        let entries = self
            .conditions
            .entry(operator.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(entries) = entries {
            entries.insert(key.to_string(), value);
        }
    }
}

/// One of ami-share's statements as found in a policy.
pub(super) struct Found {
    pub(super) grantees: BTreeSet<String>,
    pub(super) narrowing: Narrowing,
    /// Written before statements carried `kms:ViaService`: to be limited to EC2.
    pub(super) legacy: bool,
}

/// ami-share's conditions of a statement for `grantees`, operator → key → value, or `None` when
/// nobody is to be admitted.
pub(super) fn conditions(
    audience: Audience,
    purpose: Purpose,
    grantees: &KeyGrantees,
    partition: &str,
) -> Option<Map<String, Value>> {
    let mut condition = Map::new();
    match audience {
        Audience::Organizations | Audience::OrganizationalUnits => {
            let org_ids: BTreeSet<&str> = match audience {
                Audience::Organizations => {
                    grantees.organizations.iter().map(String::as_str).collect()
                }
                _ => grantees
                    .ou_paths
                    .iter()
                    .filter_map(|path| path.split('/').next())
                    .collect(),
            };
            // The one guard that keeps "anyone" from ever being written without an organization.
            if org_ids.is_empty() {
                return None;
            }
            condition.insert("StringEquals".into(), json!({ ORG_ID_KEY: org_ids }));
            if audience == Audience::OrganizationalUnits {
                condition.insert(
                    "ForAnyValue:StringLike".into(),
                    json!({ ORG_PATHS_KEY: grantees.ou_paths }),
                );
            }
        }
        Audience::Accounts => {
            if grantees.accounts.is_empty() {
                return None;
            }
        }
    }
    // Every use of the key only through EC2; describing it (metadata) the receiver may do itself.
    if purpose != Purpose::DescribeKey {
        condition.insert(
            VIA_SERVICE_OPERATOR.into(),
            json!({ VIA_SERVICE_KEY: via_ec2(partition) }),
        );
    }
    if purpose == Purpose::CreateGrant {
        condition.insert("Bool".into(), json!({ GRANT_FOR_AWS_RESOURCE: "true" }));
    }
    Some(condition)
}

/// The statement ami-share writes for `audience` and `purpose`, with what an operator narrowed in it
/// kept, or `None` when nobody is to be admitted.
pub(super) fn render(
    audience: Audience,
    purpose: Purpose,
    grantees: &KeyGrantees,
    partition: &str,
    narrowing: Option<&Narrowing>,
) -> Option<Value> {
    let mut condition = conditions(audience, purpose, grantees, partition)?;
    let principal = match audience {
        Audience::Organizations | Audience::OrganizationalUnits => json!({ "AWS": "*" }),
        Audience::Accounts => {
            let roots: Vec<String> = grantees
                .accounts
                .iter()
                .map(|account| format!("arn:{partition}:iam::{account}:root"))
                .collect();
            json!({ "AWS": roots })
        }
    };
    let mut action = match purpose {
        Purpose::UseKey => json!(USE_ACTIONS),
        Purpose::CreateGrant => json!("kms:CreateGrant"),
        Purpose::DescribeKey => json!("kms:DescribeKey"),
    };
    if let Some(narrowing) = narrowing {
        if let Some(actions) = &narrowing.actions {
            action = json!(actions);
        }
        for (operator, entries) in &narrowing.conditions {
            let into = condition
                .entry(operator.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let (Value::Object(into), Value::Object(entries)) = (into, entries) {
                for (key, value) in entries {
                    into.insert(key.clone(), value.clone());
                }
            }
        }
    }
    let mut statement = Map::new();
    statement.insert("Sid".into(), json!(sid_of(audience, purpose)));
    statement.insert("Effect".into(), json!("Allow"));
    statement.insert("Principal".into(), principal);
    statement.insert("Action".into(), action);
    statement.insert("Resource".into(), json!("*"));
    // The accounts' DescribeKey statement has none: its principals are the accounts themselves.
    if !condition.is_empty() {
        statement.insert("Condition".into(), Value::Object(condition));
    }
    Some(Value::Object(statement))
}

/// The statement elements ami-share writes; any other (`NotAction`, `NotPrincipal`, …) widens or
/// changes what a statement means.
pub(super) const STATEMENT_ELEMENTS: [&str; 6] = [
    "Sid",
    "Effect",
    "Principal",
    "Action",
    "Resource",
    "Condition",
];

/// The grantees an owned statement names, and what an operator narrowed in it. Refuses a statement
/// that admits more than what [`render`] writes for those grantees (another action or principal, one of
/// ami-share's conditions removed or loosened, a malformed id): rewriting it would widen, or lose, what
/// someone changed by hand. A statement without `kms:ViaService` is one an earlier version wrote: it is
/// read, and marked to be limited to EC2. (If a later version writes more actions, statements of this
/// version read as narrowed to these, and keep them.)
pub(super) fn read_owned(
    statement: &Value,
    audience: Audience,
    purpose: Purpose,
    partition: &str,
) -> Result<Found, KeyPolicyError> {
    let sid = sid_of(audience, purpose);
    let problem = |problem: String| KeyPolicyError::ForeignEdit {
        sid: sid.to_string(),
        problem,
    };
    let element = |name: &str| statement.get(name);
    if let Some(other) = statement
        .as_object()
        .and_then(|s| s.keys().find(|k| !STATEMENT_ELEMENTS.contains(&k.as_str())))
    {
        return Err(problem(format!(
            "it has {other}, which ami-share never writes"
        )));
    }
    if element("Effect") != Some(&json!("Allow")) {
        return Err(problem("its Effect is not Allow".into()));
    }
    if element("Resource").and_then(strings) != Some(["*".to_string()].into()) {
        return Err(problem("its Resource is not \"*\" (the key itself)".into()));
    }
    let found_conditions: Map<String, Value> = match element("Condition") {
        None => Map::new(),
        Some(Value::Object(c)) if c.values().all(Value::is_object) => c.clone(),
        Some(_) => {
            return Err(problem(
                "its Condition is not an object of operators, each an object of keys".into(),
            ));
        }
    };
    let condition_values =
        |operator: &str, key: &str| -> Result<BTreeSet<String>, KeyPolicyError> {
            let value = found_conditions
                .get(operator)
                .and_then(|o| o.get(key))
                .ok_or_else(|| problem(format!("it has no {operator} {key} condition")))?;
            strings(value)
                .ok_or_else(|| problem(format!("its {operator} {key} is not a list of strings")))
        };
    let anyone = || {
        if element("Principal").is_some_and(|p| same_policy_value(p, &json!({"AWS": "*"}))) {
            Ok(())
        } else {
            Err(problem(
                "its Principal is not {\"AWS\": \"*\"} (limited by the organization condition)"
                    .into(),
            ))
        }
    };
    let grantees: BTreeSet<String> = match audience {
        Audience::Organizations => {
            anyone()?;
            let org_ids = condition_values("StringEquals", ORG_ID_KEY)?;
            if let Some(bad) = org_ids.iter().find(|id| !is_org_id(id)) {
                return Err(problem(format!(
                    "{bad:?} in its {ORG_ID_KEY} condition is not an organization id"
                )));
            }
            org_ids
        }
        Audience::OrganizationalUnits => {
            anyone()?;
            let paths = condition_values("ForAnyValue:StringLike", ORG_PATHS_KEY)?;
            if let Some(bad) = paths.iter().find(|path| !is_ou_path(path)) {
                return Err(problem(format!(
                    "{bad:?} in its {ORG_PATHS_KEY} condition is not an OU path of the form o-…/*/ou-…/*"
                )));
            }
            paths
        }
        Audience::Accounts => {
            let arns = element("Principal")
                .and_then(|p| p.as_object().filter(|p| p.len() == 1))
                .and_then(|p| p.get("AWS"))
                .and_then(strings)
                .ok_or_else(|| {
                    problem("its Principal is not {\"AWS\": [account root ARNs]}".into())
                })?;
            arns.iter()
                .map(|arn| {
                    arn.strip_prefix(&format!("arn:{partition}:iam::"))
                        .and_then(|rest| rest.strip_suffix(":root"))
                        .filter(|account| is_account_id(account))
                        .map(str::to_string)
                        .ok_or_else(|| {
                            problem(format!(
                                "its principal {arn:?} is not an account root (arn:{partition}:iam::<account>:root)"
                            ))
                        })
                })
                .collect::<Result<_, _>>()?
        }
    };

    let mut narrowing = Narrowing::default();
    let actions = element("Action")
        .and_then(strings)
        .ok_or_else(|| problem("its Action is not a string or a list of strings".into()))?;
    let ours = purpose.actions();
    if actions != ours {
        let others: Vec<&str> = actions.difference(&ours).map(String::as_str).collect();
        if !others.is_empty() || actions.is_empty() {
            return Err(problem(format!(
                "its Action has {}, which ami-share does not grant",
                if others.is_empty() {
                    "nothing".to_string()
                } else {
                    others.join(", ")
                }
            )));
        }
        narrowing.actions = Some(actions);
    }

    let mut named = KeyGrantees::default();
    named.set_mut(audience).extend(grantees.iter().cloned());
    let expected = conditions(audience, purpose, &named, partition)
        .ok_or_else(|| problem("it names nobody".into()))?;
    let mut legacy = false;
    for (operator, entries) in &expected {
        for (key, value) in entries.as_object().into_iter().flatten() {
            match found_conditions.get(operator).and_then(|o| o.get(key)) {
                None if key == VIA_SERVICE_KEY => legacy = true,
                None => return Err(problem(format!("it has no {operator} {key} condition"))),
                Some(found) if same_policy_value(found, value) => {}
                Some(found) if key == VIA_SERVICE_KEY && names_ec2_regions(found, partition) => {
                    narrowing.add_condition(operator, key, found.clone());
                }
                Some(_) => {
                    return Err(problem(format!(
                        "its {operator} {key} condition differs from what ami-share writes for the grantees it names"
                    )));
                }
            }
        }
    }
    // Every condition entry ami-share does not write is the operator's, and narrows: keep it.
    for (operator, entries) in &found_conditions {
        for (key, value) in entries.as_object().into_iter().flatten() {
            if expected.get(operator).and_then(|o| o.get(key)).is_none() {
                narrowing.add_condition(operator, key, value.clone());
            }
        }
    }
    Ok(Found {
        grantees,
        narrowing,
        legacy,
    })
}

/// `o-…/*/ou-…/*`, as [`KeyGrantees::for_launch_permissions`] derives it from an OU ARN.
pub(super) fn is_ou_path(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    matches!(parts.as_slice(), [org, "*", ou, "*"] if is_org_id(org) && is_ou_id(ou))
}

/// Equality as policy documents mean it: a string equals a list of that one string, and the order of a
/// list's items, or of an object's keys, does not matter.
pub(super) fn same_policy_value(a: &Value, b: &Value) -> bool {
    let contains = |list: &[Value], item: &Value| list.iter().any(|x| same_policy_value(x, item));
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_policy_value(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len()
                && x.iter().all(|i| contains(y, i))
                && y.iter().all(|i| contains(x, i))
        }
        (Value::String(_), Value::Array(list)) | (Value::Array(list), Value::String(_)) => {
            let string = if a.is_string() { a } else { b };
            list.len() == 1 && list[0] == *string
        }
        _ => a == b,
    }
}

/// A JSON string or list of strings, as policy documents write one or several values.
pub(super) fn strings(value: &Value) -> Option<BTreeSet<String>> {
    match value {
        Value::String(s) => Some([s.clone()].into()),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}
