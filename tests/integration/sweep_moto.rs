//! `ami-share sweep` against the emulator: an account seeded with 200 AMIs converges in one sweep, and a
//! second sweep makes no mutating call. The figures (images/s, calls) are printed, never asserted.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

use crate::common::*;
use ami_share::key_policy;
use futures::StreamExt;
use serde_json::Value;

const IMAGES: usize = 200;
const PARTNER: &str = "210987654321";

/// Seeds `IMAGES` AMIs: most `golden-…` (every fourth encrypted with `key`), every tenth `scratch-…`,
/// which no rule selects. Returns (image id, name, snapshot ids).
async fn seed(emulator: &Emulator, key: &str) -> Vec<(String, String, Vec<String>)> {
    let ec2 = emulator.ec2().await;
    futures::stream::iter(0..IMAGES)
        .map(|i| {
            let ec2 = ec2.clone();
            async move {
                let name = if i % 10 == 0 {
                    format!("scratch-{i:03}")
                } else {
                    format!("golden-{i:03}")
                };
                let root = if i % 4 == 1 {
                    RootVolume::Key(key)
                } else {
                    RootVolume::Unencrypted
                };
                let (image, snapshots) = create_image_with(&ec2, &name, &[], root).await;
                (image, name, snapshots)
            }
        })
        .buffered(8)
        .collect()
        .await
}

fn sweep(emulator: &Emulator, config: &std::path::Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ami-share"))
        // Credentials only: the region and the endpoint come from the options, as an operator gives them.
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["sweep", "--region", REGION, "--endpoint-url"])
        .arg(&emulator.endpoint)
        .arg("--config")
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8(out.stdout).unwrap())
}

fn count_by_action(requests: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for request in requests {
        *counts.entry(request.clone()).or_insert(0) += 1;
    }
    counts
}

#[tokio::test]
async fn a_sweep_converges_200_images_and_a_second_sweep_changes_nothing() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let original_policy = key_policy(&kms, &key).await;
    let seeded = seed(&emulator, &key).await;
    let golden: Vec<_> = seeded
        .iter()
        .filter(|(_, name, _)| name.starts_with("golden-"))
        .collect();
    let config = std::env::temp_dir().join(format!("ami-share-sweep-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = {{ shared = \"yes\" }}\nshare.accounts = [\"{PARTNER}\"]\n"
        ),
    )
    .unwrap();

    // A dry run first: it plans for every golden image and changes nothing.
    let before = emulator.requests().len();
    let (code, dry) = sweep(&emulator, &config, &["--dry-run"]);
    assert_eq!(code, Some(0), "{dry}");
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    assert_eq!(
        dry.lines().filter(|l| l.contains("would: share")).count(),
        golden.len(),
        "{dry}"
    );

    let before = emulator.requests().len();
    let started = Instant::now();
    let (code, first) = sweep(&emulator, &config, &[]);
    let first_elapsed = started.elapsed();
    assert_eq!(code, Some(0), "{first}");
    let first_requests: Vec<String> = emulator.requests().into_iter().skip(before).collect();
    let summary = first.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with(&format!(
            "swept {IMAGES} of {IMAGES} image(s) in 1 region(s)"
        )),
        "{first}"
    );
    assert!(
        summary.contains(&format!("{} changed", golden.len())),
        "{summary}"
    );

    // Every golden image (and its snapshots) tagged and shared, the key opened once for the partner;
    // the scratch images untouched.
    for (image, name, snapshots) in &seeded {
        let selected = name.starts_with("golden-");
        let shared = launch_permissions(&ec2, image).await;
        assert_eq!(
            shared.contains(&format!("account={PARTNER}")),
            selected,
            "{name}"
        );
        assert_eq!(
            image_tags(&ec2, image)
                .await
                .get("shared")
                .map(String::as_str),
            selected.then_some("yes"),
            "{name}"
        );
        assert_eq!(
            snapshot_tags(&ec2, &snapshots[0])
                .await
                .get("shared")
                .map(String::as_str),
            selected.then_some("yes"),
            "{name}'s snapshot"
        );
    }
    let policy: Value = serde_json::from_str(&key_policy(&kms, &key).await).unwrap();
    let original: Value = serde_json::from_str(&original_policy).unwrap();
    let statements = policy["Statement"].as_array().unwrap();
    assert_eq!(
        statements[0], original["Statement"][0],
        "the key's own statement kept"
    );
    let sids: Vec<&str> = statements[1..]
        .iter()
        .map(|s| s["Sid"].as_str().unwrap())
        .collect();
    assert_eq!(
        sids,
        [
            key_policy::OWNED_SIDS[4],
            key_policy::OWNED_SIDS[5],
            key_policy::OWNED_SIDS[8]
        ],
        "one statement per purpose, for accounts"
    );
    assert!(policy.to_string().contains(PARTNER));

    let mutating = count_by_action(
        &first_requests
            .iter()
            .filter(|r| is_mutating(r))
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert_eq!(mutating.get("ec2:CreateTags"), Some(&golden.len()));
    assert_eq!(
        mutating.get("ec2:ModifyImageAttribute"),
        Some(&golden.len())
    );

    // The second sweep finds everything as configured.
    let before = emulator.requests().len();
    let started = Instant::now();
    let (code, second) = sweep(&emulator, &config, &["--json"]);
    let second_elapsed = started.elapsed();
    std::fs::remove_file(&config).unwrap();
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    let report: Value = serde_json::from_str(&second).unwrap();
    assert_eq!(report["reconciled"], IMAGES);
    assert_eq!(report["changed"], 0);
    assert_eq!(report["listed"][REGION], IMAGES);
    let second_calls = emulator.requests().len() - before;
    let second_by_action = count_by_action(
        &emulator
            .requests()
            .into_iter()
            .skip(before)
            .collect::<Vec<_>>(),
    );

    println!(
        "first sweep: {IMAGES} images ({} selected) in {:.2} s, {:.0} images/s, {} calls ({} mutating: {:?})",
        golden.len(),
        first_elapsed.as_secs_f64(),
        IMAGES as f64 / first_elapsed.as_secs_f64(),
        first_requests.len(),
        mutating.values().sum::<usize>(),
        mutating
    );
    println!(
        "second sweep: {IMAGES} images in {:.2} s, {:.0} images/s, {second_calls} calls, 0 mutating: {second_by_action:?}",
        second_elapsed.as_secs_f64(),
        IMAGES as f64 / second_elapsed.as_secs_f64(),
    );
    println!("CLI's own figure, first sweep: {summary}");
}
