//! The EventBridge pattern of template.yaml, against the sample events of `events/` and the tag writes
//! it must leave out, evaluated as EventBridge matches (AWS's "Event patterns" documentation: a field's
//! list holds if any of its values matches; an array in the event holds if any element does; `prefix`,
//! `anything-but` with a value, a list or a `prefix`, `exists`; `$or` of sub-patterns). No emulator
//! checks this: moto's matcher does not descend into arrays of objects, as
//! `requestParameters.resourcesSet.items` is.

use crate::common::*;
use serde_json::{Value, json};

const ACCOUNT: &str = "123456789012";
/// The name CloudFormation gave the function's role in this imagined stack.
const ROLE_NAME: &str = "ami-share-AmiShareFunctionRole-Q1W2E3R4T5Y6";

/// The AmiEvents rule's pattern with the stack's values in place of its `!Sub`.
fn pattern() -> Value {
    let mut pattern =
        template()["Resources"]["AmiShareFunction"]["Properties"]["Events"]["AmiEvents"]["Properties"]["Pattern"].take();
    assert!(
        pattern.is_object(),
        "template.yaml has no AmiEvents pattern"
    );
    resolve(&mut pattern);
    pattern
}

/// Replaces the intrinsic functions the pattern uses with what CloudFormation would put there.
fn resolve(value: &mut Value) {
    let substituted = match value {
        Value::Object(map) if map.len() == 1 && map.contains_key("Fn::Sub") => Some(
            map["Fn::Sub"]
                .as_str()
                .expect("a plain Fn::Sub")
                .replace("${AWS::Partition}", "aws")
                .replace("${AWS::AccountId}", ACCOUNT)
                .replace("${AmiShareFunctionRole}", ROLE_NAME),
        ),
        Value::Object(map) if map.len() == 1 && map.contains_key("Ref") => {
            assert_eq!(
                map["Ref"], "AWS::AccountId",
                "a Ref this test does not know"
            );
            Some(ACCOUNT.to_string())
        }
        _ => None,
    };
    if let Some(text) = substituted {
        assert!(!text.contains("${"), "unresolved: {text}");
        *value = Value::String(text);
        return;
    }
    match value {
        Value::Object(map) => map.values_mut().for_each(resolve),
        Value::Array(items) => items.iter_mut().for_each(resolve),
        _ => {}
    }
}

/// The event's values under `key` of `node`, arrays flattened, as EventBridge sees them.
fn values<'a>(node: &'a Value, key: &str) -> Vec<&'a Value> {
    match node {
        Value::Object(map) => map.get(key).into_iter().flat_map(flatten).collect(),
        Value::Array(items) => items.iter().flat_map(|item| values(item, key)).collect(),
        _ => Vec::new(),
    }
}

fn flatten(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        other => vec![other],
    }
}

fn matches(pattern: &Value, event: &[&Value]) -> bool {
    pattern
        .as_object()
        .expect("a pattern is an object")
        .iter()
        .all(|(key, wanted)| {
            if key == "$or" {
                return wanted.as_array().unwrap().iter().any(|p| matches(p, event));
            }
            let found: Vec<&Value> = event.iter().flat_map(|node| values(node, key)).collect();
            match wanted {
                Value::Object(_) => {
                    let objects: Vec<&Value> =
                        found.into_iter().filter(|v| v.is_object()).collect();
                    !objects.is_empty() && matches(wanted, &objects)
                }
                Value::Array(filters) => filters.iter().any(|filter| holds(filter, &found)),
                other => panic!("a pattern leaf must be a list, not {other}"),
            }
        })
}

fn holds(filter: &Value, found: &[&Value]) -> bool {
    let Some(operator) = filter.as_object() else {
        return found.contains(&filter);
    };
    let (name, operand) = operator.iter().next().expect("one operator");
    let starts = |v: &Value, prefix: &Value| {
        v.as_str()
            .is_some_and(|v| v.starts_with(prefix.as_str().unwrap()))
    };
    match name.as_str() {
        "prefix" => found.iter().any(|v| starts(v, operand)),
        "exists" => found.is_empty() != operand.as_bool().unwrap(),
        "anything-but" => found.iter().any(|v| match operand {
            Value::Object(inner) if inner.contains_key("prefix") => {
                v.is_string() && !starts(v, &inner["prefix"])
            }
            Value::Array(excluded) => !excluded.contains(v),
            excluded => *v != excluded,
        }),
        other => panic!("an operator this test does not know: {other}"),
    }
}

fn delivered(pattern: &Value, event: &Value) -> bool {
    matches(pattern, &[event])
}

fn sample(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo_path(&format!("events/{name}"))).unwrap())
        .unwrap()
}

#[test]
fn the_ami_events_and_the_tag_writes_that_name_an_ami_reach_the_function() {
    let pattern = pattern();
    for name in [
        "create-image.json",
        "copy-image.json",
        "register-image.json",
        "ami-state-available.json",
        "create-image-failed.json",
        "create-tags.json",
    ] {
        assert!(
            delivered(&pattern, &sample(name)),
            "{name} is not delivered"
        );
    }
    let mut delete = sample("create-tags.json");
    delete["detail"]["eventName"] = json!("DeleteTags");
    assert!(delivered(&pattern, &delete));
    // An AMI among other resources, by an IAM user (no session): delivered.
    let mut mixed = sample("create-tags.json");
    mixed["detail"]["requestParameters"]["resourcesSet"]["items"] =
        json!([{"resourceId": "snap-0123456789abcdef0"}, {"resourceId": "ami-12345678"}]);
    mixed["detail"]["userIdentity"] =
        json!({"type": "IAMUser", "arn": "arn:aws:iam::123456789012:user/alice"});
    assert!(delivered(&pattern, &mixed));
}

#[test]
fn tag_writes_on_other_resources_and_ami_shares_own_tag_writes_do_not() {
    let pattern = pattern();
    assert!(!delivered(&pattern, &sample("create-tags-instance.json")));
    assert!(!delivered(&pattern, &sample("scheduled-sweep.json")));

    let own_session = format!(
        "arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE_NAME}/ami-share-AmiShareFunction-A1B2C3"
    );
    let mut own = sample("create-tags.json");
    own["detail"]["userIdentity"]["arn"] = json!(own_session);
    assert!(
        !delivered(&pattern, &own),
        "ami-share's own tag write is delivered"
    );

    // A role whose name only begins like the function's is somebody else's: its writes are delivered.
    let mut lookalike = sample("create-tags.json");
    lookalike["detail"]["userIdentity"]["arn"] = json!(format!(
        "arn:aws:sts::{ACCOUNT}:assumed-role/{ROLE_NAME}X/session"
    ));
    assert!(delivered(&pattern, &lookalike));

    let mut other_account = sample("create-tags.json");
    other_account["account"] = json!("210987654321");
    assert!(!delivered(&pattern, &other_account));

    let mut other_call = sample("create-tags.json");
    other_call["detail"]["eventName"] = json!("CreateSnapshot");
    assert!(!delivered(&pattern, &other_call));
}
