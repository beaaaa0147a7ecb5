//! Fuzzing of the two inputs ami-share takes from outside: EventBridge events and the config file.
//!
//! `cargo fuzz` needs a nightly toolchain (libFuzzer's sanitizer flags), which this project's builds do
//! not use; these targets run on stable instead: proptest strategies generate inputs (mutations of the
//! real samples, and arbitrary values), and each target runs for a time budget, not a case count:
//! `FUZZ_SECONDS` (default 20, what CI runs; a longer run is e.g.
//! `FUZZ_SECONDS=3600 cargo nextest run --release -E 'test(/^fuzz::/)'`). `FUZZ_SEED` replays a run.
//!
//! Properties: no input panics; every rejection is a clear error (an event error says what was found and
//! what was expected; a config error says where and what is wrong); every event accepted names a valid image id
//! and region code.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use ami_share::config::Config;
use ami_share::trigger::{self, Trigger};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use serde_json::{Map, Value, json};

fn repo_path(relative: &str) -> String {
    format!("{}/{relative}", env!("CARGO_MANIFEST_DIR"))
}

fn budget() -> Duration {
    let seconds = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    Duration::from_secs(seconds)
}

/// Runs `check` on values of `strategy` until the budget is spent; a panic fails the test with the
/// input that caused it (and the seed to replay the run).
fn fuzz<S: Strategy>(name: &str, strategy: S, check: impl Fn(&S::Value))
where
    S::Value: std::fmt::Debug,
{
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let started = Instant::now();
    let mut cases = 0u64;
    while started.elapsed() < budget() {
        let input = strategy.new_tree(&mut runner).unwrap().current();
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| check(&input))) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!(
                "{name}: after {cases} cases (FUZZ_SEED={seed}), this input failed: {message}\n{input:#?}"
            );
        }
        cases += 1;
    }
    println!(
        "{name}: {cases} cases in {:.0} s, none failed (FUZZ_SEED={seed})",
        started.elapsed().as_secs_f64()
    );
}

/// Strings that matter to the parsers, and arbitrary ones.
fn interesting_string() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "",
            "aws.ec2",
            "aws.events",
            "Scheduled Event",
            "EC2 AMI State Change",
            "AWS API Call via CloudTrail",
            "CreateImage",
            "CopyImage",
            "RegisterImage",
            "ec2.amazonaws.com",
            "available",
            "failed",
            "pending",
            "ami-12345678",
            "ami-0123456789abcdef0",
            "ami-",
            "ami-0123456789ABCDEF0",
            "us-east-1",
            "us-gov-west-1",
            "us-east-1.evil/",
            "123456789012",
            "Client.InvalidAMIName.Duplicate",
        ])
        .prop_map(str::to_string),
        ".{0,40}",
        "ami-[0-9a-f]{0,20}",
        "[a-z]{2}-[a-z]{0,10}-[0-9]{0,2}",
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|n| json!(n)),
        interesting_string().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(interesting_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn sample_events() -> Vec<Value> {
    let mut events = Vec::new();
    for entry in std::fs::read_dir(repo_path("events")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            events.push(serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap());
        }
    }
    events.sort_by_key(|e: &Value| e.to_string());
    events
}

/// One change to a JSON document: at the `path` (indices into the keys/items met on the way down,
/// taken modulo their number), delete the member or replace it with `value`.
#[derive(Debug, Clone)]
struct Mutation {
    path: Vec<usize>,
    delete: bool,
    value: Value,
}

fn mutate(node: &mut Value, path: &[usize], mutation: &Mutation) {
    let Some((step, rest)) = path.split_first() else {
        *node = mutation.value.clone();
        return;
    };
    match node {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(step % map.len()).unwrap().clone();
            match (rest.is_empty(), mutation.delete) {
                (true, true) => {
                    map.remove(&key);
                }
                (true, false) => {
                    map.insert(key, mutation.value.clone());
                }
                (false, _) => mutate(map.get_mut(&key).unwrap(), rest, mutation),
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = step % items.len();
            match (rest.is_empty(), mutation.delete) {
                (true, true) => {
                    items.remove(i);
                }
                (true, false) => items[i] = mutation.value.clone(),
                (false, _) => mutate(&mut items[i], rest, mutation),
            }
        }
        other => *other = mutation.value.clone(),
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        prop::collection::vec(any::<usize>(), 1..4),
        any::<bool>(),
        json_value(),
    )
        .prop_map(|(path, delete, value)| Mutation {
            path,
            delete,
            value,
        })
}

fn check_event(event: &Value) {
    match trigger::parse(event.clone()) {
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.starts_with("unsupported event: ")
                    && text.contains("expected an EventBridge event"),
                "unclear rejection: {text}"
            );
            assert!(
                !e.problem.trim().is_empty(),
                "a rejection that names no problem: {text}"
            );
        }
        Ok(Trigger::Images(images)) => {
            assert!(!images.is_empty(), "an image trigger that names no image");
            for image in &images {
                let id = &image.image.image_id;
                let hex = id
                    .strip_prefix("ami-")
                    .unwrap_or_else(|| panic!("accepted image id {id:?}"));
                assert!(
                    matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_hexdigit()),
                    "accepted image id {id:?}"
                );
                if let Some(region) = &image.image.region {
                    assert!(
                        ami_share::distribution::RegionName::try_from(region.clone()).is_ok(),
                        "accepted region {region:?}"
                    );
                }
            }
        }
        Ok(Trigger::Ignore { reason }) => assert!(!reason.is_empty()),
        Ok(Trigger::Sweep { .. }) => {}
        Ok(Trigger::Work(records)) => {
            assert!(!records.is_empty(), "a work trigger with no message");
            for record in &records {
                assert!(!record.message_id.is_empty() || record.item.is_err());
                if let Err(problem) = &record.item {
                    assert!(problem.contains("expected"), "unclear: {problem}");
                }
            }
        }
    }
}

#[test]
fn fuzz_event_parsing() {
    let samples = sample_events();
    assert!(samples.len() >= 5);
    let mutated = (
        prop::sample::select(samples),
        prop::collection::vec(mutation(), 1..5),
    )
        .prop_map(|(mut event, mutations)| {
            for m in &mutations {
                mutate(&mut event, &m.path, m);
            }
            event
        });
    fuzz(
        "event parsing",
        prop_oneof![4 => mutated, 1 => json_value()],
        check_event,
    );
}

/// A change to the config's text.
#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(usize),
    DuplicateLine(usize),
    /// Replace the text after the first `=` of a line.
    ReplaceValue(usize, String),
    Insert(usize, String),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let value = prop_oneof![
        interesting_string().prop_map(|s| format!("{s:?}")),
        prop::sample::select(vec![
            "true",
            "1",
            "-1",
            "3651",
            "[]",
            "[\"\"]",
            "{}",
            "[{ region = \"mars-1\" }]",
            "\"arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5\"",
            "\"o-a1b2c3d4e5\"",
            "[\"{nope}\"]",
            "\"alias/\"",
            "{ region = \"us-west-2\" }",
            "\"/a/{rule}\"",
        ])
        .prop_map(str::to_string),
        ".{0,30}",
    ];
    prop_oneof![
        any::<usize>().prop_map(Edit::DeleteLine),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), value).prop_map(|(l, v)| Edit::ReplaceValue(l, v)),
        (any::<usize>(), ".{0,12}").prop_map(|(at, s)| Edit::Insert(at, s)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply_edit(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let n = lines.len();
    match edit {
        Edit::DeleteLine(i) => {
            lines.remove(i % n);
        }
        Edit::DuplicateLine(i) => {
            let line = lines[i % n].clone();
            lines.insert(i % n, line);
        }
        Edit::ReplaceValue(i, value) => {
            let line = &mut lines[i % n];
            if let Some(at) = line.find('=') {
                line.truncate(at + 1);
                line.push(' ');
                line.push_str(value);
            }
        }
        Edit::Insert(at, s) => {
            let mut joined = lines.join("\n");
            let mut at = at % (joined.len() + 1);
            while !joined.is_char_boundary(at) {
                at -= 1;
            }
            joined.insert_str(at, s);
            return joined;
        }
        Edit::Truncate(at) => {
            let joined = lines.join("\n");
            let mut at = at % (joined.len() + 1);
            while !joined.is_char_boundary(at) {
                at -= 1;
            }
            return joined[..at].to_string();
        }
    }
    lines.join("\n")
}

fn check_config(text: &str) {
    match Config::parse(text) {
        Ok(config) => {
            // Accepted: every rule is named, and the names are unique.
            let mut names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
            names.sort();
            names.dedup();
            assert_eq!(
                names.len(),
                config.rules.len(),
                "duplicate rule names accepted"
            );
        }
        Err(message) => {
            // Where: a TOML error gives the line and column; a validation error names the rule (and
            // says what was expected); or there is no rule at all.
            let located = message.contains("line ")
                || message.contains("rule #")
                || message.starts_with("no rules");
            assert!(located, "a rejection that does not say where: {message}");
            assert!(
                message.trim().len() >= 20,
                "a rejection that says nothing: {message}"
            );
        }
    }
}

#[test]
fn fuzz_config_parsing() {
    let examples: Vec<String> = ["config/ami-share.toml", "scripts/demo-config.toml"]
        .iter()
        .map(|p| std::fs::read_to_string(repo_path(p)).unwrap())
        .collect();
    let mutated = (
        prop::sample::select(examples),
        prop::collection::vec(edit(), 1..6),
    )
        .prop_map(|(text, edits)| edits.iter().fold(text, |text, e| apply_edit(&text, e)));
    fuzz(
        "config parsing",
        prop_oneof![5 => mutated, 1 => ".{0,300}"],
        |text: &String| check_config(text),
    );
}
