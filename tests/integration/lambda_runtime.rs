//! The real `ami-share-lambda` binary, run as Lambda runs it: through the Runtime API (tests/common/
//! runtime_api.rs), with its config file and the emulator as AWS.
//!
//! `AMI_SHARE_BOOTSTRAP` names another binary to run instead: CI sets it to the `bootstrap` that
//! `sam build` made (scripts/test), so the artifact SAM would deploy is the one tested.

use crate::common::runtime_api::{Answer, Function, RuntimeApi, binary, write_config};
use crate::common::*;
use ami_share::markers;
use serde_json::json;

#[tokio::test]
async fn the_bootstrap_tags_and_shares_through_the_runtime_api_and_logs_json_with_the_request_id() {
    let emulator = Emulator::start();
    let org = emulator.organization(&["eng"]);
    let org_arn = org["arn"].as_str().unwrap();
    let ou_arn = org["ous"]["eng"]["arn"].as_str().unwrap();
    let ec2 = emulator.ec2().await;
    let (image, snapshots) = create_image(&ec2, "golden-al2023", &[("stage", "release")]).await;
    let config = write_config(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = {{ shared = \"org\" }}\nshare.organizations = [\"{org_arn}\"]\nshare.organizational_units = [\"{ou_arn}\"]\n"
    ));

    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    let function = Function::start(&binary(), &api, &env);

    let answer = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(answer.kind, "response", "{answer:?}");
    assert_eq!(answer.body["status"], "done");
    assert_eq!(
        image_tags(&ec2, &image).await,
        tags(&[("stage", "release"), ("shared", "org")])
    );
    assert_eq!(
        snapshot_tags(&ec2, &snapshots[0]).await,
        tags(&[("shared", "org")])
    );
    assert_eq!(
        launch_permissions(&ec2, &image).await,
        [format!("org={org_arn}"), format!("ou={ou_arn}")].into()
    );

    // A duplicate delivery, a failed call and an unsupported event, to the same warm process.
    let before = emulator.requests().len();
    let duplicate = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(duplicate.body["outcome"]["done"], json!([]));
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
    let failed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("events/create-image-failed.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(api.invoke(failed).body["status"], "ignored");
    let unsupported =
        api.invoke(json!({"source": "aws.s3", "detail-type": "Object Created", "detail": {}}));
    assert_eq!(unsupported.kind, "error");
    assert_eq!(unsupported.body["errorType"], "UnsupportedEvent");
    assert!(
        unsupported.body["errorMessage"]
            .as_str()
            .unwrap()
            .contains("source is \"aws.s3\"")
    );

    // The log: JSON lines; one summary per event, carrying the Lambda request id.
    let summaries_of =
        |log: &[serde_json::Value]| log.iter().filter(|l| l["outcome"].is_string()).count();
    for _ in 0..100 {
        if summaries_of(&function.json_log()) >= 4 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = function.json_log();
    let summaries: Vec<_> = log.iter().filter(|l| l["outcome"].is_string()).collect();
    assert_eq!(summaries.len(), 4, "{log:#?}");
    assert_eq!(summaries[0]["outcome"], "done");
    assert_eq!(summaries[0]["image_id"], image.as_str());
    assert_eq!(summaries[0]["actions_done"], 2);
    assert_eq!(
        summaries[0]["span"]["requestId"],
        "req-0001-0000-4000-8000-000000000000"
    );
    assert_eq!(summaries[1]["actions_done"], 0);
    assert_eq!(summaries[2]["outcome"], "ignored");
    assert_eq!(summaries[3]["outcome"], "unsupported_event");
    assert_eq!(
        summaries[3]["span"]["requestId"],
        "req-0004-0000-4000-8000-000000000000"
    );
}

#[tokio::test]
async fn a_scheduled_event_sweeps_the_region_within_the_deadline_and_prints_emf_metrics() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    // Two images whose events were missed, and one no rule selects.
    let (first, _) = create_image(&ec2, "golden-1", &[]).await;
    let (second, _) = create_image(&ec2, "golden-2", &[]).await;
    let (other, _) = create_image(&ec2, "scratch", &[]).await;
    let config = write_config(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.accounts = [\"210987654321\"]\n",
    );
    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    env.push(("AWS_LAMBDA_FUNCTION_NAME", "ami-share-test".into()));
    let function = Function::start(&binary(), &api, &env);
    let schedule: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("events/scheduled-sweep.json")).unwrap(),
    )
    .unwrap();

    // No time left (a sweep stops starting images half-way to a deadline closer than its margin): it
    // starts no image, and says so.
    let before = emulator.requests().len();
    let short = api.invoke_with(schedule.clone(), std::time::Duration::ZERO);
    assert_eq!(short.kind, "response", "{short:?}");
    assert_eq!(short.body["status"], "incomplete");
    assert_eq!(short.body["sweep"]["not_started"], 3);
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );

    let answer = api.invoke(schedule.clone());
    assert_eq!(answer.body["status"], "done", "{answer:?}");
    assert!(
        answer.body["summary"]
            .as_str()
            .unwrap()
            .starts_with("swept 3 of 3 image(s) in 1 region(s)"),
        "{answer:?}"
    );
    for image in [&first, &second] {
        assert_eq!(
            launch_permissions(&ec2, image).await,
            ["account=210987654321".to_string()].into()
        );
    }
    assert!(launch_permissions(&ec2, &other).await.is_empty());
    let before = emulator.requests().len();
    assert_eq!(api.invoke(schedule).body["sweep"]["changed"], 0);
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );

    // The log: a summary record for each image that changed, one per sweep, and one EMF line per sweep.
    let emf_of = |log: &[serde_json::Value]| -> Vec<serde_json::Value> {
        log.iter()
            .filter(|l| l["_aws"].is_object())
            .cloned()
            .collect()
    };
    for _ in 0..100 {
        if emf_of(&function.json_log()).len() >= 3 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let log = function.json_log();
    let emf = emf_of(&log);
    assert_eq!(emf.len(), 3, "{log:#?}");
    let directive = &emf[1]["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], "AmiShare");
    assert_eq!(emf[1]["FunctionName"], "ami-share-test");
    assert_eq!(
        (
            &emf[0]["Images"],
            &emf[1]["Images"],
            &emf[1]["Shared"],
            &emf[2]["Shared"]
        ),
        (&json!(0), &json!(3), &json!(2), &json!(0))
    );
    let outcomes: Vec<&str> = log.iter().filter_map(|l| l["outcome"].as_str()).collect();
    assert_eq!(
        outcomes,
        ["sweep_incomplete", "done", "done", "swept", "swept"],
        "{log:#?}"
    );
    let swept = log.iter().find(|l| l["outcome"] == "swept").unwrap();
    assert_eq!(
        swept["span"]["requestId"],
        "req-0002-0000-4000-8000-000000000000"
    );
}

#[test]
fn the_bootstrap_refuses_to_start_with_an_invalid_config() {
    let config = write_config("[[rule]]\nname = \"r\"\nshare.organizations = [\"o-a1b2c3d4e5\"]\n");
    let api = RuntimeApi::start();
    let mut function = Function::start(
        &binary(),
        &api,
        &[
            ("AMI_SHARE_CONFIG", config.env()),
            ("AWS_REGION", REGION.into()),
        ],
    );
    let code = function.wait_exit();
    assert_ne!(code, Some(0));
    let log = function.json_log();
    let refusal = log
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("refusing to start"))
        })
        .unwrap_or_else(|| panic!("no refusal in {log:#?}"));
    let message = refusal["message"].as_str().unwrap();
    assert!(
        message.contains("bare organization id") && message.contains("line 3"),
        "{message}"
    );
}

#[test]
fn the_bootstrap_refuses_to_start_without_a_config_file() {
    let api = RuntimeApi::start();
    let mut function = Function::start(
        &binary(),
        &api,
        &[
            ("AMI_SHARE_CONFIG", "/nonexistent/ami-share.toml".into()),
            ("AWS_REGION", REGION.into()),
        ],
    );
    assert_ne!(function.wait_exit(), Some(0));
    let log = function.json_log();
    assert!(
        log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot read config file /nonexistent/ami-share.toml"))),
        "{log:#?}"
    );
}

#[tokio::test]
async fn events_of_other_accounts_and_of_regions_the_stack_does_not_serve_are_skipped_not_retried()
{
    let emulator = Emulator::start();
    let west = emulator.ec2_in("us-west-2").await;
    let (west_image, _) = create_image(&west, "golden-west", &[]).await;
    let config = write_config(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { shared = \"yes\" }\n",
    );
    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    env.push(("AMI_SHARE_EVENT_REGIONS", "us-west-2".into()));
    let _function = Function::start(&binary(), &api, &env);

    // An organization bus forwards another account's CreateImage: the function's ARN (the Runtime API's
    // Lambda-Runtime-Invoked-Function-Arn) names account 123456789012.
    let before = emulator.requests().len();
    let mut foreign = sample_event("create-image.json", "ami-0a1b2c3d4e5f67890", REGION);
    foreign["account"] = json!("999988887777");
    let answer = api.invoke(foreign);
    assert_eq!(
        answer.kind, "response",
        "not an error, so never retried: {answer:?}"
    );
    assert_eq!(answer.body["status"], "skipped", "{:#}", answer.body);
    let summary = answer.body["summary"].as_str().unwrap();
    assert!(
        summary.contains("an event of account 999988887777")
            && summary.contains("acts for account 123456789012 only"),
        "{summary}"
    );
    // A region this stack does not serve.
    let elsewhere = api.invoke(sample_event(
        "ami-state-available.json",
        "ami-0a1b2c3d4e5f67890",
        "eu-west-1",
    ));
    assert_eq!(elsewhere.body["status"], "skipped", "{:#}", elsewhere.body);
    assert!(
        elsewhere.body["summary"]
            .as_str()
            .unwrap()
            .contains("an event of eu-west-1: this stack serves us-east-1, us-west-2"),
        "{:#}",
        elsewhere.body
    );
    assert_eq!(emulator.requests().len(), before, "no AWS call for either");
    // A forwarded region it serves is handled.
    let forwarded = api.invoke(sample_event(
        "ami-state-available.json",
        &west_image,
        "us-west-2",
    ));
    assert_eq!(forwarded.body["status"], "done", "{:#}", forwarded.body);
    assert_eq!(
        image_tags(&west, &west_image).await,
        tags(&[("shared", "yes")])
    );
}

#[tokio::test]
async fn a_tag_written_after_the_ami_was_made_shares_it_within_that_tag_event_and_an_instances_tags_are_skipped()
 {
    let emulator = Emulator::start();
    let org = emulator.organization(&["eng"]);
    let org_arn = org["arn"].as_str().unwrap();
    let ec2 = emulator.ec2().await;
    // As Packer does: the AMI is made without tags, and tagged once it is available.
    let (image, _) = create_image(&ec2, "golden-al2023", &[]).await;
    let config = write_config(&format!(
        "[[rule]]\nname = \"tagged\"\nmatch.tags = {{ share = \"org\" }}\nshare.organizations = [\"{org_arn}\"]\n"
    ));
    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    let _function = Function::start(&binary(), &api, &env);

    let created = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(created.body["status"], "skipped", "{created:?}");
    assert_eq!(launch_permissions(&ec2, &image).await, Default::default());

    ec2.create_tags()
        .resources(&image)
        .tags(
            aws_sdk_ec2::types::Tag::builder()
                .key("share")
                .value("org")
                .build(),
        )
        .send()
        .await
        .expect("CreateTags");
    let tagged = api.invoke(sample_event("create-tags.json", &image, REGION));
    assert_eq!(tagged.kind, "response", "{tagged:?}");
    assert_eq!(tagged.body["status"], "done", "{tagged:?}");
    assert_eq!(tagged.body["outcome"]["rules"], json!(["tagged"]));
    assert_eq!(
        launch_permissions(&ec2, &image).await,
        [format!("org={org_arn}")].into()
    );

    // An instance's tags: skipped without an error and without a call to AWS.
    let before = emulator.requests().len();
    let instance = api.invoke(
        serde_json::from_str(
            &std::fs::read_to_string(repo_path("events/create-tags-instance.json")).unwrap(),
        )
        .unwrap(),
    );
    assert_eq!(instance.kind, "response", "{instance:?}");
    assert_eq!(instance.body["status"], "ignored");
    assert!(
        instance.body["reason"]
            .as_str()
            .unwrap()
            .contains("names no AMI (i-0123456789abcdef0)"),
        "{instance:?}"
    );
    assert_eq!(emulator.requests().len(), before);
}

#[tokio::test]
async fn rules_past_aws_limits_leave_fifty_tags_and_a_thousand_shares_and_the_summary_names_each_limit()
 {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, snapshots) = create_image(&ec2, "golden-al2023", &[]).await;
    let tags = |prefix: &str| {
        (0..30)
            .map(|i| format!("{prefix}{i:02} = \"v\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let accounts = (0..1001)
        .map(|i| format!("\"2000000{i:05}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = write_config(&format!(
        "[[rule]]\nname = \"a\"\nmatch.name = [\"golden-*\"]\ntags = {{ {} }}\nshare.accounts = [{accounts}]\n\
         [[rule]]\nname = \"b\"\nmatch.name = [\"golden-*\"]\ntags = {{ {} }}\n",
        tags("a"),
        tags("b")
    ));
    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    let _function = Function::start(&binary(), &api, &env);

    let answer = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(answer.kind, "response", "{answer:?}");
    assert_eq!(answer.body["status"], "done", "{answer:?}");
    assert_eq!(image_tags(&ec2, &image).await.len(), 50);
    assert_eq!(snapshot_tags(&ec2, &snapshots[0]).await.len(), 50);
    assert_eq!(launch_permissions(&ec2, &image).await.len(), 1000);
    let summary = answer.body["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("over a limit: 10 of the rules' tags left out of {image} in us-east-1: EC2 allows 50 tags per resource")),
        "{summary}"
    );
    assert!(
        summary.contains("over a limit: 1 share target(s) left out of")
            && summary.contains("AWS shares an AMI with at most 1000 entities"),
        "{summary}"
    );
    // A second delivery changes nothing and says the same.
    let before = emulator.requests().len();
    let again = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(again.body["outcome"]["done"], json!([]), "{again:?}");
    assert_eq!(again.body["outcome"]["limits"].as_array().unwrap().len(), 3);
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_copy_someone_deregistered_is_made_again_by_the_next_event_through_the_bootstrap() {
    let emulator = Emulator::start();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "golden-al2023", &[]).await;
    let config = write_config(
        "[[rule]]\nname = \"regional\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\ncopy.regions = [{ region = \"us-west-2\" }]\n",
    );
    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    let _function = Function::start(&binary(), &api, &env);
    let west = |answer: &Answer| answer.body["outcome"]["regions"]["us-west-2"].clone();

    let first = api.invoke(sample_event("ami-state-available.json", &image, REGION));
    assert_eq!(west(&first)["status"], "copying", "{first:?}");
    let lost = west(&first)["image_id"].as_str().unwrap().to_string();
    emulator
        .ec2_in("us-west-2")
        .await
        .deregister_image()
        .image_id(&lost)
        .send()
        .await
        .expect("DeregisterImage");

    let again = api.invoke(sample_event("ami-state-available.json", &image, REGION));
    assert_eq!(west(&again)["status"], "copying", "{again:?}");
    let copy = west(&again)["image_id"].as_str().unwrap().to_string();
    assert_ne!(copy, lost, "a new copy, not the dead one: {again:?}");
    let copies = copies_of(&emulator, "us-west-2", &image).await;
    assert_eq!(
        copies.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        [copy.as_str()]
    );
}

#[tokio::test]
async fn an_ami_an_exclusive_rule_stops_selecting_loses_that_rules_grants_on_its_delete_tags_event()
{
    let emulator = Emulator::start();
    let org = emulator.organization(&[]);
    let org_arn = org["arn"].as_str().unwrap();
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image(&ec2, "golden-al2023", &[("share", "org")]).await;
    let config = write_config(&format!(
        "[[rule]]\nname = \"org-only\"\nmatch.tags = {{ share = \"org\" }}\nshare.organizations = [\"{org_arn}\"]\nshare.exclusive = true\n\n\
         [[rule]]\nname = \"partner\"\nmatch.name = [\"golden-*\"]\nshare.accounts = [\"210987654321\"]\n"
    ));
    let mut api = RuntimeApi::start();
    let mut env = emulator.aws_env();
    env.push(("AMI_SHARE_CONFIG", config.env()));
    let _function = Function::start(&binary(), &api, &env);

    let first = api.invoke(sample_event("create-image.json", &image, REGION));
    assert_eq!(first.body["status"], "done", "{first:?}");
    assert_eq!(
        launch_permissions(&ec2, &image).await,
        [format!("org={org_arn}"), "account=210987654321".to_string()].into()
    );
    assert_eq!(image_tags(&ec2, &image).await[markers::EXCLUSIVE], "true");

    // The tag goes: the exclusive rule no longer selects the AMI. Someone also shares it by hand.
    ec2.delete_tags()
        .resources(&image)
        .tags(aws_sdk_ec2::types::Tag::builder().key("share").build())
        .send()
        .await
        .expect("DeleteTags");
    grant_launch(
        &ec2,
        &image,
        aws_sdk_ec2::types::LaunchPermission::builder()
            .user_id("333344445555")
            .build(),
    )
    .await;
    let mut deleted = sample_event("create-tags.json", &image, REGION);
    deleted["detail"]["eventName"] = json!("DeleteTags");
    let answer = api.invoke(deleted.clone());
    assert_eq!(answer.kind, "response", "{answer:?}");
    assert_eq!(
        launch_permissions(&ec2, &image).await,
        [
            "account=210987654321".to_string(),
            "account=333344445555".to_string()
        ]
        .into(),
        "the exclusive rule's organization goes; the other rule's account and the hand-made share stay: {answer:?}"
    );
    assert_eq!(image_tags(&ec2, &image).await[markers::EXCLUSIVE], "false");

    let before = emulator.requests().len();
    api.invoke(deleted);
    assert_eq!(
        emulator.mutating_requests_since(before),
        Vec::<String>::new(),
        "nothing more to take back"
    );
}
