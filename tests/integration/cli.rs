//! The operator CLI: `validate` (exit codes and messages scripts can rely on) and `plan`, which shows the
//! actions against the emulator and changes nothing.

use std::process::Command;

use crate::common::*;
use serde_json::Value;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ami-share"))
}

#[test]
fn validate_accepts_the_example_config_and_lists_its_rules() {
    let out = cli()
        .arg("validate")
        .arg(repo_path("config/ami-share.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains("valid, 2 rule(s)") && stdout.contains("golden-images"),
        "{stdout}"
    );
}

#[test]
fn validate_refuses_a_bad_config_with_exit_code_2_and_every_problem() {
    let path = std::env::temp_dir().join(format!("ami-share-cli-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[[rule]]\nname = \"a\"\n[[rule]]\nname = \"a\"\ntags = { k = \"v\" }\n",
    )
    .unwrap();
    let out = cli().arg("validate").arg(&path).output().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("rule #1 (\"a\"): the rule does nothing"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rule #2 (\"a\"): name is used by an earlier rule"),
        "{stderr}"
    );
    let missing = cli()
        .args(["validate", "/nonexistent.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&missing.stderr)
            .contains("cannot read config file /nonexistent.toml")
    );
}

#[tokio::test]
async fn plan_prints_the_actions_and_changes_nothing() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let policy_before = key_policy(&kms, &key).await;
    let (image, snapshots) = create_image_with(
        &ec2,
        "golden-al2023",
        &[("stage", "release")],
        RootVolume::Key(&key),
    )
    .await;
    let config = std::env::temp_dir().join(format!("ami-share-plan-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { shared = \"yes\" }\nshare.accounts = [\"210987654321\"]\n",
    )
    .unwrap();
    let event = std::env::temp_dir().join(format!("ami-share-plan-{}.json", std::process::id()));
    std::fs::write(
        &event,
        sample_event("create-image.json", &image, REGION).to_string(),
    )
    .unwrap();

    let before = emulator.requests().len();
    let out = cli()
        .envs(emulator.aws_env())
        .arg("plan")
        .arg("--config")
        .arg(&config)
        .arg("--event")
        .arg(&event)
        .output()
        .unwrap();
    std::fs::remove_file(&config).unwrap();
    std::fs::remove_file(&event).unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.contains(&format!(
            "would: tag {image}, {} in us-east-1: shared=yes",
            snapshots[0]
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "would: let account 210987654321 use KMS key {key} in us-east-1 through EC2 (ami-share's statements in its key policy)"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "would: share {image} in us-east-1 with account 210987654321"
        )),
        "{stdout}"
    );
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(key_policy(&kms, &key).await, policy_before);
    assert!(
        emulator.requests().len() > before,
        "plan reads the real state"
    );
}

/// The demo's rules (scripts/demo-config.toml) for this emulator's organization.
fn demo_config(emulator: &Emulator) -> (String, String, String) {
    let org = emulator.organization(&["engineering", "data"]);
    let org_arn = org["arn"].as_str().unwrap().to_string();
    let ou_arn = org["ous"]["engineering"]["arn"]
        .as_str()
        .unwrap()
        .to_string();
    let text = std::fs::read_to_string(repo_path("scripts/demo-config.toml"))
        .unwrap()
        .replace("@ORG_ARN@", &org_arn)
        .replace("@ENGINEERING_OU_ARN@", &ou_arn);
    (text, org_arn, ou_arn)
}

#[tokio::test]
async fn plan_on_each_sample_event_against_the_demo_state_prints_the_actions_and_changes_nothing() {
    // The demo's state: its organization, its rules, its golden image (made by CreateImage, tagged
    // stage=release, unencrypted).
    let emulator = Emulator::start();
    let (rules, org_arn, ou_arn) = demo_config(&emulator);
    let ec2 = emulator.ec2().await;
    let (image, snapshots) =
        create_image(&ec2, "golden-al2023-2026.11.25", &[("stage", "release")]).await;
    let dir = std::env::temp_dir().join(format!("ami-share-plan-samples-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("demo.toml");
    std::fs::write(&config, rules).unwrap();

    let before = emulator.requests().len();
    let mut files: Vec<String> = std::fs::read_dir(repo_path("events"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".json"))
        .collect();
    files.sort();
    let mut planned = Vec::new();
    for file in &files {
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(repo_path(&format!("events/{file}"))).unwrap(),
        )
        .unwrap();
        // Events that name an image get the demo's image.
        let names_an_image = raw["detail"].get("ImageId").is_some()
            || raw["detail"]["responseElements"].get("imageId").is_some()
            || file == "create-tags.json";
        let event = if names_an_image {
            sample_event(file, &image, REGION)
        } else {
            raw
        };
        let path = dir.join(file);
        std::fs::write(&path, event.to_string()).unwrap();
        let out = cli()
            .envs(emulator.aws_env())
            .args(["plan", "--config"])
            .arg(&config)
            .arg("--event")
            .arg(&path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        println!(
            "$ ami-share plan --event events/{file}  (exit {:?})\n{stdout}{stderr}",
            out.status.code()
        );
        match file.as_str() {
            "create-image.json"
            | "register-image.json"
            | "copy-image.json"
            | "create-tags.json"
            | "ami-state-available.json" => {
                assert_eq!(out.status.code(), Some(0), "{file}: {stderr}");
                // One line per action, readable at a glance.
                let expected = [
                    format!("{image} in us-east-1:"),
                    "  rules [golden-images, engineering-ou]".to_string(),
                    format!(
                        "  would: tag {image}, {} in us-east-1: ami-share:distributed=org, cost-center=platform",
                        snapshots[0]
                    ),
                    format!(
                        "  would: share {image} in us-east-1 with organization {org_arn}, OU {ou_arn}, account 210987654321"
                    ),
                ];
                assert_eq!(stdout.lines().collect::<Vec<_>>(), expected, "{file}");
                planned.push(file.clone());
            }
            "create-tags-instance.json" => {
                assert_eq!(out.status.code(), Some(0), "{file}: {stderr}");
                assert!(
                    stdout.starts_with(
                        "nothing to do: CreateTags names no AMI (i-0123456789abcdef0)"
                    ),
                    "{file}: {stdout}"
                );
            }
            "create-image-failed.json" => {
                assert_eq!(out.status.code(), Some(0), "{file}: {stderr}");
                assert!(
                    stdout.starts_with("nothing to do: CreateImage failed"),
                    "{file}: {stdout}"
                );
            }
            "scheduled-sweep.json" => {
                assert_eq!(out.status.code(), Some(2), "{file}: {stdout}");
                assert!(stderr.contains("run `ami-share sweep"), "{file}: {stderr}");
            }
            other => panic!("events/{other} is new: add what `plan` must print for it here"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(planned.len(), 5, "{planned:?}");
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new(),
        "plan changes nothing"
    );
    assert!(launch_permissions(&ec2, &image).await.is_empty());
}
