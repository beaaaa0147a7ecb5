//! The operator CLI: `validate` (exit codes and messages scripts can rely on) and `plan`, which shows the
//! actions against the emulator and changes nothing.

mod common;

use std::process::Command;

use common::*;

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
            "would: let account 210987654321 use KMS key {key} in us-east-1 (ami-share's statements in its key policy)"
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
