//! The fanned-out sweep, end to end: the real bootstrap through the Runtime API, the emulator's SQS as
//! the work queue, and the test playing the event source mapping (common/event_source.rs). A scheduled
//! event sends the region's AMIs to the queue; short invocations reconcile them message by message,
//! sending on what they could not start; a second sweep changes nothing; a poisoned message is retried
//! alone and dead-lettered; a key grant dropped after ami-share's read-back is put back by the delayed
//! re-check.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::common::event_source::WorkQueue;
use crate::common::runtime_api::{Function, RuntimeApi, binary, write_config};
use crate::common::*;
use ami_share::key_policy;
use serde_json::Value;

const PARTNER: &str = "210987654321";

fn schedule() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo_path("events/scheduled-sweep.json")).unwrap(),
    )
    .unwrap()
}

fn start(emulator: &Emulator, queue: &WorkQueue, config: &str) -> (RuntimeApi, Function) {
    let api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.to_string()));
    env.push(("AMI_SHARE_WORK_QUEUE_URL", queue.url.clone()));
    env.push(("AMI_SHARE_KEY_RECHECK_SECONDS", "1".into()));
    let function = Function::start(&binary(), &api, &env);
    (api, function)
}

/// AWS requests other than the queue's own (SQS is how the work moves, not work on AMIs).
fn image_requests(emulator: &Emulator, since: usize) -> Vec<String> {
    emulator
        .requests()
        .into_iter()
        .skip(since)
        .filter(|r| !r.starts_with("sqs:"))
        .collect()
}

fn count_by_operation(requests: &[String]) -> std::collections::BTreeMap<&str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for request in requests {
        *counts.entry(request.as_str()).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_scheduled_sweep_reaches_2000_amis_through_the_queue_in_short_invocations_and_again_changes_nothing()
 {
    const IMAGES: usize = 2000;
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let kms = emulator.kms().await;
    // Half of them encrypted, on two keys.
    let (key_a, key_b) = (create_key(&kms).await, create_key(&kms).await);
    let mut images = emulator.seed_images(IMAGES / 2, "golden-a", Some(&key_a), 2);
    images.extend(emulator.seed_images(IMAGES / 2, "golden-b", Some(&key_b), 2));
    let queue = WorkQueue::create(&emulator, "ami-share-work", 3).await;
    let config = write_config(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = {{ shared = \"yes\" }}\nshare.accounts = [\"{PARTNER}\"]\n"
    ));
    let (mut api, _function) = start(&emulator, &queue, &config.env());

    let before = emulator.requests().len();
    let answer = api.invoke(schedule());
    assert_eq!(answer.body["status"], "enqueued", "{answer:?}");
    assert_eq!(answer.body["images"], IMAGES);
    assert_eq!(answer.body["messages"], IMAGES / 100);
    // Each invocation has 5 s: it starts images for 2.5, then sends on what is left.
    let first = queue.drain(&mut api, 5, Duration::from_secs(5)).await;
    let first_requests = image_requests(&emulator, before);
    println!(
        "first sweep: {IMAGES} images, {} invocations, {} deliveries, {} calls ({:.2} per image): {:?}",
        first.invocations,
        first.delivered,
        first_requests.len(),
        first_requests.len() as f64 / IMAGES as f64,
        count_by_operation(&first_requests)
    );
    assert_eq!(first.failed, 0, "{:?}", first.answers);
    assert!(
        first.delivered > IMAGES / 100,
        "short invocations sent images on: {first:?}"
    );
    let shares = first_requests
        .iter()
        .filter(|r| *r == "ec2:ModifyImageAttribute")
        .count();
    assert_eq!(shares, IMAGES, "each image shared once");
    for image in images.iter().step_by(97) {
        assert!(
            launch_permissions(&ec2, image)
                .await
                .contains(&format!("account={PARTNER}"))
        );
        assert_eq!(
            image_tags(&ec2, image)
                .await
                .get("shared")
                .map(String::as_str),
            Some("yes")
        );
    }
    for key in [&key_a, &key_b] {
        let admitted = key_policy::admitted(&key_policy(&kms, key).await, "aws").unwrap();
        assert_eq!(admitted.accounts, BTreeSet::from([PARTNER.to_string()]));
    }

    // The second sweep: every image looked at, nothing written, about one call per image.
    let before = emulator.requests().len();
    let answer = api.invoke(schedule());
    assert_eq!(answer.body["status"], "enqueued", "{answer:?}");
    let second = queue.drain(&mut api, 5, Duration::from_secs(5)).await;
    let second_requests = image_requests(&emulator, before);
    let mutating: Vec<&String> = second_requests.iter().filter(|r| is_mutating(r)).collect();
    assert_eq!(mutating, Vec::<&String>::new());
    assert_eq!(second.failed, 0);
    let per_image = second_requests.len() as f64 / IMAGES as f64;
    println!(
        "second sweep: {} invocations, {} calls ({per_image:.3} per image): {:?}",
        second.invocations,
        second_requests.len(),
        count_by_operation(&second_requests)
    );
    assert!(per_image <= 1.1, "{} calls", second_requests.len());
    assert_eq!(queue.depth(&queue.dead_letters).await, 0);
}

#[tokio::test]
async fn a_poisoned_message_is_retried_alone_and_ends_in_the_dead_letter_queue() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "golden-1", &[]).await;
    let queue = WorkQueue::create(&emulator, "ami-share-work", 2).await;
    let config = write_config(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.accounts = [\"{PARTNER}\"]\n"
    ));
    let (mut api, function) = start(&emulator, &queue, &config.env());
    let malformed = "{\"reason\": \"sweep\", \"images\": \"all\"}".to_string();
    // Well-formed, but for a region this stack does not serve: refused as an event of it would be.
    let elsewhere =
        format!("{{\"reason\": \"sweep\", \"region\": \"eu-west-3\", \"images\": [\"{image}\"]}}");
    queue.send(&malformed).await;
    queue.send(&elsewhere).await;
    queue
        .send(&format!(
            "{{\"reason\": \"sweep\", \"region\": \"{REGION}\", \"images\": [\"{image}\"]}}"
        ))
        .await;
    let drained = queue.drain(&mut api, 10, Duration::from_secs(30)).await;
    // The good message once; the poisoned ones at each of their two receives, then dead-lettered.
    assert_eq!(drained.failed, 4, "{drained:?}");
    assert_eq!(drained.delivered, 5, "{drained:?}");
    assert!(
        launch_permissions(&ec2, &image)
            .await
            .contains(&format!("account={PARTNER}"))
    );
    let mut dead = queue.dead_lettered().await;
    dead.sort();
    let mut expected = vec![malformed, elsewhere];
    expected.sort();
    assert_eq!(dead, expected);
    let log = function.log.lock().unwrap().join("\n");
    assert!(
        log.contains("not a work message") && log.contains("expected {\\\"reason\\\""),
        "the log says what is wrong and the expected form: {log}"
    );
    assert!(log.contains("which this stack does not serve"), "{log}");
}

#[tokio::test]
async fn a_grant_another_writer_drops_after_the_read_back_is_put_back_by_the_delayed_recheck() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let original = key_policy(&kms, &key).await;
    let (image, _) = create_image_with(&ec2, "golden-1", &[], RootVolume::Key(&key)).await;
    let queue = WorkQueue::create(&emulator, "ami-share-work", 3).await;
    let config = write_config(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.accounts = [\"{PARTNER}\"]\n"
    ));
    let (mut api, _function) = start(&emulator, &queue, &config.env());
    let answer = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(answer.body["status"], "done", "{answer:?}");
    assert!(
        launch_permissions(&ec2, &image)
            .await
            .contains(&format!("account={PARTNER}"))
    );
    // Another writer, which read the policy before ami-share wrote it, writes what it read: after
    // ami-share's read-back, so the event saw nothing wrong.
    kms.put_key_policy()
        .key_id(&key)
        .policy_name("default")
        .policy(&original)
        .send()
        .await
        .unwrap();
    assert_eq!(
        queue.depth(&queue.url).await,
        1,
        "the re-check is queued, delayed"
    );
    let before = emulator.requests().len();
    let drained = queue.drain(&mut api, 10, Duration::from_secs(30)).await;
    let admitted = key_policy::admitted(&key_policy(&kms, &key).await, "aws").unwrap();
    assert_eq!(
        admitted.accounts,
        BTreeSet::from([PARTNER.to_string()]),
        "put back"
    );
    let puts = emulator
        .mutating_requests_since(before)
        .into_iter()
        .filter(|r| r == "kms:PutKeyPolicy")
        .count();
    assert_eq!(puts, 1);
    // The re-check that wrote sent one more, which found the grant in place.
    assert_eq!(drained.delivered, 2, "{drained:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_50_amis_on_one_key_all_end_shared_with_each_audience_once_in_the_policy() {
    // An image factory's release: 50 AMIs on one key, each shared with its own account by its own rule,
    // delivered at once (each delivery reads, merges and writes the one key policy while the others do),
    // then the key re-checks the writes sent.
    const N: usize = 50;
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let accounts: Vec<String> = (0..N as u64)
        .map(|i| (700_000_000_000 + i).to_string())
        .collect();
    let rules: String = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!("[[rule]]\nname = \"r{i}\"\nmatch.name = [\"team{i:02}-*\"]\nshare.accounts = [\"{a}\"]\n")
        })
        .collect();
    let queue = WorkQueue::create(&emulator, "ami-share-work", 3).await;
    let handler = ami_share::handler::Handler::new(
        ami_share::config::Config::parse(&rules).unwrap(),
        ami_share::aws::sdk::SdkAws::new(emulator.sdk_config().await),
        REGION,
    )
    .with_work_queue(ami_share::fanout::WorkQueue {
        url: queue.url.clone(),
        key_recheck_delay: Duration::from_secs(1),
    });
    let mut images = Vec::new();
    for i in 0..N {
        let name = format!("team{i:02}-base");
        images.push(
            create_image_with(&ec2, &name, &[], RootVolume::Key(&key))
                .await
                .0,
        );
    }
    let before = emulator.requests().len();
    let mut pending: Vec<&String> = images.iter().collect();
    let mut redeliveries = 0;
    while !pending.is_empty() {
        let answers = futures::future::join_all(
            pending
                .iter()
                .map(|image| handler.handle(sample_event("create-image.json", image, REGION))),
        )
        .await;
        // A delivery to be retried (a key policy that kept losing its grant) comes again, as Lambda's
        // asynchronous retry would deliver it.
        pending = pending
            .into_iter()
            .zip(answers)
            .filter_map(|(image, answer)| answer.is_err().then_some(image))
            .collect();
        redeliveries += pending.len();
    }
    let handler = &handler;
    let rechecks = queue
        .drain_with(
            10,
            |event| async move { handler.handle(event).await.unwrap() },
        )
        .await;
    let puts = emulator
        .mutating_requests_since(before)
        .into_iter()
        .filter(|r| r == "kms:PutKeyPolicy")
        .count();
    println!(
        "burst of {N}: {puts} PutKeyPolicy, {redeliveries} redeliveries, {} re-checks delivered",
        rechecks.delivered
    );
    for (image, account) in images.iter().zip(&accounts) {
        assert_eq!(
            launch_permissions(&ec2, image).await,
            BTreeSet::from([format!("account={account}")])
        );
    }
    let policy = key_policy(&kms, &key).await;
    let admitted = key_policy::admitted(&policy, "aws").unwrap();
    assert_eq!(
        admitted.accounts,
        accounts.iter().cloned().collect::<BTreeSet<_>>()
    );
    let statements: Vec<Value> = serde_json::from_str::<Value>(&policy).unwrap()["Statement"]
        .as_array()
        .unwrap()
        .clone();
    let sids: Vec<&str> = statements
        .iter()
        .filter_map(|s| s["Sid"].as_str())
        .collect();
    let unique: BTreeSet<&str> = sids.iter().copied().collect();
    assert_eq!(sids.len(), unique.len(), "each statement once: {sids:?}");
    for account in &accounts {
        let principal = format!("arn:aws:iam::{account}:root");
        for statement in &statements {
            let named = statement.to_string().matches(&principal).count();
            assert!(named <= 1, "{account} twice in {statement}");
        }
    }
    assert_eq!(queue.depth(&queue.dead_letters).await, 0);
}
