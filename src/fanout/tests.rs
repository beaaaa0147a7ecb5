use super::*;
use crate::test_support::fake_aws::*;

#[test]
fn a_work_message_is_read_and_every_field_checked() {
    let item = WorkItem::parse(
        r#"{"reason": "sweep", "region": "us-east-1", "images": ["ami-0123456789abcdef0", "ami-12345678"]}"#,
    )
    .unwrap();
    assert_eq!(item.reason, WorkReason::Sweep);
    assert_eq!(item.images.len(), 2);
    assert_eq!(
        WorkItem::parse(&item.message(Duration::ZERO).body),
        Ok(item)
    );
    for (body, says) in [
        ("not json", "not a work message"),
        (
            r#"{"reason": "sweep", "region": "us-east-1"}"#,
            "missing field `images`",
        ),
        (
            r#"{"reason": "purge", "region": "us-east-1", "images": ["ami-12345678"]}"#,
            "unknown variant `purge`",
        ),
        (
            r#"{"reason": "sweep", "region": "useast1", "images": ["ami-12345678"]}"#,
            "not an AWS region code",
        ),
        (
            r#"{"reason": "sweep", "region": "us-east-1", "images": []}"#,
            "0 images; expected 1 to 100",
        ),
        (
            r#"{"reason": "sweep", "region": "us-east-1", "images": ["snap-12345678"]}"#,
            "\"snap-12345678\" is not an AMI id",
        ),
        (
            r#"{"reason": "sweep", "region": "us-east-1", "images": ["ami-12345678"], "extra": 1}"#,
            "unknown field `extra`",
        ),
    ] {
        let error = WorkItem::parse(body).unwrap_err();
        assert!(error.contains(says), "{body}: {error}");
        assert!(error.contains("expected"), "{body}: {error}");
    }
}

fn listed(n: usize) -> Vec<ObservedImage> {
    (0..n)
        .map(|i| ObservedImage {
            image_id: format!("ami-{i:017x}"),
            region: REGION.into(),
            creation_date: crate::time::Timestamp::parse(&format!(
                "2026-{:02}-01T00:00:00.000Z",
                1 + i % 12
            )),
            ..ObservedImage::default()
        })
        .collect()
}

#[test]
fn a_sweep_is_cut_into_messages_of_at_most_100_images_newest_first_each_image_once() {
    let items = sweep_items(REGION, listed(250));
    assert_eq!(
        items.iter().map(|i| i.images.len()).collect::<Vec<_>>(),
        [100, 100, 50]
    );
    let mut all: Vec<&String> = items.iter().flat_map(|i| &i.images).collect();
    assert_eq!(all.len(), 250);
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 250, "each image in one message");
    for item in &items {
        assert!(WorkItem::parse(&item.message(Duration::ZERO).body).is_ok());
    }
    assert!(sweep_items(REGION, Vec::new()).is_empty());
}

#[test]
fn sqs_records_are_answered_for_one_by_one_a_malformed_body_too() {
    let event = serde_json::json!({"Records": [
        {"messageId": "m-1", "eventSource": "aws:sqs", "body": r#"{"reason": "sweep", "region": "us-east-1", "images": ["ami-12345678"]}"#},
        {"messageId": "m-2", "eventSource": "aws:sqs", "body": "garbage"},
    ]});
    let crate::trigger::Trigger::Work(records) = crate::trigger::parse(event).unwrap() else {
        panic!("not work")
    };
    assert_eq!(records.len(), 2);
    assert!(records[0].item.is_ok());
    assert!(
        records[1]
            .item
            .as_ref()
            .unwrap_err()
            .contains("not a work message")
    );
    let other = serde_json::json!({"Records": [{"messageId": "m-1", "eventSource": "aws:s3"}]});
    let error = crate::trigger::parse(other).unwrap_err().to_string();
    assert!(error.contains("eventSource is Some(\"aws:s3\")"), "{error}");
}

fn queue() -> WorkQueue {
    WorkQueue {
        url: "https://sqs.us-east-1.amazonaws.com/123456789012/ami-share-work".into(),
        key_recheck_delay: Duration::from_secs(60),
    }
}

fn record(id: &str, item: &WorkItem) -> WorkRecord {
    WorkRecord {
        message_id: id.into(),
        item: WorkItem::parse(&item.message(Duration::ZERO).body),
    }
}

#[tokio::test]
async fn a_message_is_reconciled_with_one_describe_and_a_key_write_sends_a_delayed_recheck() {
    let aws = FakeAws::new(ImageState::Available, Some(CMK));
    let config = sharing_config();
    let reconciler = reconciler(&aws, &config, Mode::Apply);
    let item = WorkItem {
        reason: WorkReason::Sweep,
        region: REGION.into(),
        images: vec![IMAGE.into(), "ami-0000000000000dead".into()],
        recheck: 0,
    };
    let consumed = consume(
        &reconciler,
        &queue(),
        &[record("m-1", &item)],
        4,
        None,
        &mut |_| {},
    )
    .await;
    assert!(consumed.failed.is_empty(), "{:?}", consumed.failed);
    assert_eq!(
        consumed.report.reconciled, 1,
        "the image that is gone is passed over"
    );
    assert_eq!(aws.image(IMAGE).launch_permissions, Some(partner()));
    let calls = aws.calls();
    assert_eq!(
        calls.iter().filter(|c| **c == "DescribeImages").count(),
        1,
        "{calls:?}"
    );
    assert_eq!(
        calls.iter().filter(|c| **c == "DescribeSnapshots").count(),
        1,
        "{calls:?}"
    );
    let queued = aws.state.lock().unwrap().queued.clone();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].delay, Duration::from_secs(60));
    let recheck = WorkItem::parse(&queued[0].body).unwrap();
    assert_eq!(
        (recheck.reason, recheck.recheck),
        (WorkReason::KeyRecheck, 1)
    );
    assert_eq!(recheck.images, [IMAGE]);
}

#[tokio::test]
async fn a_malformed_or_failing_message_is_reported_alone_and_the_others_are_done() {
    let mut aws = FakeAws::new(ImageState::Available, None);
    aws.failing_in.push(("DescribeImages", WEST));
    let config = sharing_config();
    let reconciler = reconciler(&aws, &config, Mode::Apply);
    let good = WorkItem {
        reason: WorkReason::Sweep,
        region: REGION.into(),
        images: vec![IMAGE.into()],
        recheck: 0,
    };
    let throttled = WorkItem {
        region: WEST.into(),
        ..good.clone()
    };
    let records = [
        WorkRecord {
            message_id: "m-bad".into(),
            item: Err("not a work message".into()),
        },
        record("m-west", &throttled),
        record("m-good", &good),
    ];
    let consumed = consume(&reconciler, &queue(), &records, 4, None, &mut |_| {}).await;
    let failed: Vec<&str> = consumed.failed.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(failed, ["m-bad", "m-west"]);
    assert_eq!(aws.image(IMAGE).launch_permissions, Some(partner()));
}

#[tokio::test]
async fn images_not_started_before_the_deadline_are_sent_on_and_the_message_succeeds() {
    let aws = FakeAws::new(ImageState::Available, None);
    let config = sharing_config();
    let reconciler = reconciler(&aws, &config, Mode::Apply);
    let item = WorkItem {
        reason: WorkReason::Sweep,
        region: REGION.into(),
        images: vec![IMAGE.into()],
        recheck: 0,
    };
    let consumed = consume(
        &reconciler,
        &queue(),
        &[record("m-1", &item)],
        4,
        Some(Instant::now()),
        &mut |_| {},
    )
    .await;
    assert!(consumed.failed.is_empty());
    assert_eq!(consumed.report.reconciled, 0);
    assert!(
        aws.writes().iter().all(|w| *w == "SendMessageBatch"),
        "{:?}",
        aws.writes()
    );
    let queued = aws.state.lock().unwrap().queued.clone();
    assert_eq!(
        WorkItem::parse(&queued[0].body).unwrap(),
        item,
        "sent on as it was"
    );
}

#[test]
fn a_key_recheck_is_followed_by_at_most_three() {
    let first = key_recheck(REGION, vec![IMAGE.into()], 0).unwrap();
    assert_eq!(first.recheck, 1);
    assert_eq!(
        key_recheck(REGION, vec![IMAGE.into()], 2).unwrap().recheck,
        3
    );
    assert!(key_recheck(REGION, vec![IMAGE.into()], MAX_KEY_RECHECKS).is_none());
    assert!(key_recheck(REGION, Vec::new(), 0).is_none());
}

#[test]
fn the_queue_comes_from_the_environment_or_refuses_to_start_saying_why() {
    assert_eq!(WorkQueue::from_env_values(None, None), Ok(None));
    assert_eq!(WorkQueue::from_env_values(Some(" "), Some("5")), Ok(None));
    let queue = WorkQueue::from_env_values(Some(&queue().url), None)
        .unwrap()
        .unwrap();
    assert_eq!(queue.key_recheck_delay, KEY_RECHECK_DELAY);
    let quick = WorkQueue::from_env_values(Some(&queue.url), Some("2"))
        .unwrap()
        .unwrap();
    assert_eq!(quick.key_recheck_delay, Duration::from_secs(2));
    let error = WorkQueue::from_env_values(Some(&queue.url), Some("901")).unwrap_err();
    assert!(error.contains("from 0 to 900"), "{error}");
    let error = WorkQueue::from_env_values(Some("ami-share-work"), None).unwrap_err();
    assert!(error.contains("expected a queue URL"), "{error}");
}

#[test]
fn a_copy_travels_in_its_sources_message_and_a_forged_one_on_its_own_terms() {
    let mut images = listed(150);
    // Among the oldest (January): in the last message, which has room; the copies are the newest.
    let source = images[0].image_id.clone();
    let copy = |id: &str, ec2_source: Option<&str>| ObservedImage {
        image_id: id.into(),
        region: REGION.into(),
        created_by: crate::observed::CreatedBy::CopyImage,
        creation_date: crate::time::Timestamp::parse("2026-12-31T00:00:00.000Z"),
        source: ec2_source.map(|s| crate::observed::SourceImage {
            image_id: s.into(),
            region: Some(REGION.into()),
        }),
        tags: [
            (
                crate::markers::COPY_KIND,
                crate::markers::CopyKind::Reencrypted.as_str(),
            ),
            (crate::markers::SOURCE_IMAGE, source.as_str()),
            (crate::markers::SOURCE_REGION, REGION),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
        ..ObservedImage::default()
    };
    images.push(copy("ami-00000000000000c0f", Some(&source)));
    // Marked as the source's copy, but EC2 records no such copy: an image of its own.
    images.push(copy("ami-0000000000000f0e9", None));
    assert_eq!(sweep::selection(images.clone()).left_to_source.len(), 1);
    let items = sweep_items(REGION, images);
    let home = items.iter().find(|i| i.images.contains(&source)).unwrap();
    assert!(
        home.images.contains(&"ami-00000000000000c0f".to_string()),
        "{items:?}"
    );
    let all: Vec<&String> = items.iter().flat_map(|i| &i.images).collect();
    assert_eq!(all.len(), 152);
    // The forged one is ordered as an image of its own: the newest, in the first message.
    assert!(
        items[0]
            .images
            .contains(&"ami-0000000000000f0e9".to_string())
    );
}
