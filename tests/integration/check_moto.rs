//! `ami-share check`, run as the CLI with a receiving account's credentials against the emulator (its
//! fixes: another account's image is listed to the accounts its launch permissions admit, Allowed AMIs
//! hides what its criteria refuse, KMS evaluates a key policy for another account's DescribeKey).

use std::process::{Command, Output};

use crate::common::*;
use serde_json::{Value, json};

const OWNER: &str = "123456789012";
const MEMBER: &str = "222233334444";
const GUARDED: &str = "333344445555";

/// `ami-share check` as `account` (a principal of that account, by moto's STS).
fn check(emulator: &Emulator, account: &str, args: &[&str]) -> Output {
    let creds = emulator.control("credentials", Some(json!({ "account": account })));
    Command::new(env!("CARGO_BIN_EXE_ami-share"))
        .arg("check")
        .args(args)
        .args(["--region", REGION, "--endpoint-url", &emulator.endpoint])
        .env_remove("AWS_PROFILE")
        .env(
            "AWS_ACCESS_KEY_ID",
            creds["access_key_id"].as_str().unwrap(),
        )
        .env(
            "AWS_SECRET_ACCESS_KEY",
            creds["secret_access_key"].as_str().unwrap(),
        )
        .env(
            "AWS_SESSION_TOKEN",
            creds["session_token"].as_str().unwrap(),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap()
}

/// Its output, also printed (`--no-capture` shows what an operator reads).
fn stdout(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    println!("exit {:?}\n{text}", out.status.code());
    text
}

fn json_checks(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            stdout(out),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// An organization with `MEMBER` and `GUARDED` in it, and an AMI of `OWNER` shared with it.
async fn shared_ami(emulator: &Emulator, root: RootVolume<'_>) -> String {
    let org = emulator.organization(&[]);
    for account in [MEMBER, GUARDED] {
        emulator.control(
            "member",
            Some(json!({ "account": account, "org_id": org["id"] })),
        );
    }
    let ec2 = emulator.ec2().await;
    let (image, _) = create_image_with(&ec2, "golden-1", &[], root).await;
    grant_launch(
        &ec2,
        &image,
        aws_sdk_ec2::types::LaunchPermission::builder()
            .organization_arn(org["arn"].as_str().unwrap())
            .build(),
    )
    .await;
    image
}

/// The EC2 client of a principal in `account`.
async fn ec2_as(emulator: &Emulator, account: &str) -> aws_sdk_ec2::Client {
    let creds = emulator.control("credentials", Some(json!({ "account": account })));
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&emulator.endpoint)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            creds["access_key_id"].as_str().unwrap(),
            creds["secret_access_key"].as_str().unwrap(),
            creds["session_token"].as_str().map(str::to_string),
            None,
            "tests",
        ))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&config)
}

async fn allow_only(emulator: &Emulator, account: &str, providers: &[&str]) {
    let ec2 = ec2_as(emulator, account).await;
    ec2.replace_image_criteria_in_allowed_images_settings()
        .image_criteria(
            aws_sdk_ec2::types::ImageCriterionRequest::builder()
                .set_image_providers(Some(providers.iter().map(|p| p.to_string()).collect()))
                .build(),
        )
        .send()
        .await
        .expect("ReplaceImageCriteriaInAllowedImagesSettings");
    ec2.enable_allowed_images_settings()
        .allowed_images_settings_state(
            aws_sdk_ec2::types::AllowedImagesSettingsEnabledState::Enabled,
        )
        .send()
        .await
        .expect("EnableAllowedImagesSettings");
}

#[tokio::test]
async fn an_org_member_is_ready_and_an_account_whose_allowed_amis_refuse_the_owner_is_told_the_fix()
{
    let emulator = Emulator::start();
    let image = shared_ami(&emulator, RootVolume::Unencrypted).await;

    let ready = check(&emulator, MEMBER, &["--image-id", &image]);
    assert_eq!(ready.status.code(), Some(0), "{}", stdout(&ready));
    let text = stdout(&ready);
    assert!(
        text.contains(&format!(
            "ok       image                {image} is visible in {REGION}"
        )) && text.contains("Allowed AMIs is disabled")
            && text.contains("ready: this account can launch"),
        "{text}"
    );

    // The guarded account allows only Amazon's AMIs: the shared AMI is hidden from it.
    allow_only(&emulator, GUARDED, &["amazon"]).await;
    let hidden = check(&emulator, GUARDED, &["--image-id", &image, "--json"]);
    assert_eq!(hidden.status.code(), Some(1), "{}", stdout(&hidden));
    let answer = json_checks(&hidden);
    assert_eq!(answer["ready"], false);
    assert_eq!(answer["checks"][0]["verdict"], "problem");
    assert!(
        answer["checks"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("hidden by Allowed AMIs"),
        "{answer:#}"
    );
    assert_eq!(answer["checks"][1]["verdict"], "unknown", "{answer:#}");
    // Named, the owner is judged: the fix names the criterion to add.
    let told = check(
        &emulator,
        GUARDED,
        &["--image-id", &image, "--owner", OWNER],
    );
    assert_eq!(told.status.code(), Some(1));
    let text = stdout(&told);
    assert!(
        text.contains("problem  allowed-amis")
            && text.contains("no criterion's ImageProviders names owner 123456789012")
            && text.contains(r#"a criterion with ImageProviders = ["123456789012"]"#),
        "{text}"
    );

    // With the owner admitted, the same account is ready.
    allow_only(&emulator, GUARDED, &["amazon", OWNER]).await;
    let admitted = check(&emulator, GUARDED, &["--image-id", &image]);
    assert_eq!(admitted.status.code(), Some(0), "{}", stdout(&admitted));
    assert!(stdout(&admitted).contains(&format!(
        "Allowed AMIs is enabled in {REGION} and admits it"
    )));

    // An account outside the organization sees nothing.
    let outsider = check(&emulator, "444455556666", &["--image-id", &image]);
    assert_eq!(outsider.status.code(), Some(1));
    assert!(stdout(&outsider).contains("it is not shared with this account"));
}

#[tokio::test]
async fn keys_are_judged_by_what_kms_tells_the_receiving_account() {
    let emulator = Emulator::start();
    let kms = emulator.kms().await;
    let key = create_key(&kms).await;
    let image = shared_ami(&emulator, RootVolume::Key(&key)).await;

    // The snapshot's key is not visible to a receiver without create-volume permission.
    let unseen = check(&emulator, MEMBER, &["--image-id", &image]);
    assert_eq!(unseen.status.code(), Some(3), "{}", stdout(&unseen));
    assert!(stdout(&unseen).contains("--kms-key"), "{}", stdout(&unseen));

    // A key policy that admits the organization directly (as AWS's documented example does).
    let org = emulator.organization(&[]);
    let admits_org = json!({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Owner", "Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{OWNER}:root")},
             "Action": "kms:*", "Resource": "*"},
            {"Sid": "Organization", "Effect": "Allow", "Principal": {"AWS": "*"},
             "Action": ["kms:DescribeKey", "kms:Decrypt", "kms:CreateGrant"], "Resource": "*",
             "Condition": {"StringEquals": {"aws:PrincipalOrgID": org["id"]}}}
        ]
    });
    put_key_policy(&kms, &key, &admits_org.to_string()).await;
    let named_key = check(
        &emulator,
        MEMBER,
        &["--image-id", &image, "--kms-key", &key],
    );
    // KMS answers this account; whether the key named is the snapshot's, it cannot see (no
    // create-volume permission): not "ready", and said.
    assert_eq!(named_key.status.code(), Some(3), "{}", stdout(&named_key));
    assert!(stdout(&named_key).contains(
        "is enabled and its policy lets this account call DescribeKey, but this account cannot see whether it is the key"
    ));
    let outsider = check(
        &emulator,
        "444455556666",
        &["--image-id", &image, "--kms-key", &key],
    );
    assert_eq!(
        outsider.status.code(),
        Some(1),
        "the image is not shared with it either"
    );

    // The default policy (the owner only): KMS refuses, and the check names the problem.
    let default = json!({
        "Version": "2012-10-17",
        "Statement": [{"Sid": "Owner", "Effect": "Allow",
                       "Principal": {"AWS": format!("arn:aws:iam::{OWNER}:root")},
                       "Action": "kms:*", "Resource": "*"}]
    });
    put_key_policy(&kms, &key, &default.to_string()).await;
    let refused = check(
        &emulator,
        MEMBER,
        &["--image-id", &image, "--kms-key", &key, "--json"],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", stdout(&refused));
    let answer = json_checks(&refused);
    let key_check = answer["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "key")
        .unwrap();
    assert_eq!(key_check["verdict"], "problem");
    stdout(&check(
        &emulator,
        MEMBER,
        &["--image-id", &image, "--kms-key", &key],
    ));
    assert!(
        key_check["detail"]
            .as_str()
            .unwrap()
            .contains("does not admit this account"),
        "{answer:#}"
    );

    // The policy ami-share writes when it shares the AMI with the organization: the member may
    // describe the key (DescribeKey, without kms:ViaService); everything else only through EC2.
    let config = ami_share::config::Config::parse(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.organizations = [\"{}\"]\n",
        org["arn"].as_str().unwrap()
    ))
    .unwrap();
    let handler = ami_share::handler::Handler::new(
        config,
        ami_share::aws::sdk::SdkAws::new(emulator.sdk_config().await),
        REGION,
    );
    let shared = handler
        .handle(sample_event("create-image.json", &image, REGION))
        .await
        .expect("ami-share shares the AMI");
    assert_eq!(shared["status"], "done", "{shared:#}");
    let opened = check(
        &emulator,
        MEMBER,
        &["--image-id", &image, "--kms-key", &key],
    );
    assert!(
        stdout(&opened).contains("is enabled and its policy lets this account call DescribeKey"),
        "{}",
        stdout(&opened)
    );
    let outsider = check(
        &emulator,
        "444455556666",
        &["--image-id", &image, "--kms-key", &key],
    );
    assert_eq!(outsider.status.code(), Some(1));

    // A disabled key is a problem, named.
    put_key_policy(&kms, &key, &admits_org.to_string()).await;
    let key_id = key.rsplit('/').next().unwrap();
    kms.disable_key().key_id(key_id).send().await.unwrap();
    let disabled = check(
        &emulator,
        MEMBER,
        &["--image-id", &image, "--kms-key", &key],
    );
    assert_eq!(disabled.status.code(), Some(1), "{}", stdout(&disabled));
    assert!(stdout(&disabled).contains("is Disabled: EBS cannot decrypt the snapshot"));

    // Bad input: a clear error, exit 2.
    let bad = check(
        &emulator,
        MEMBER,
        &["--image-id", "i-0123", "--kms-key", &key],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected an AMI id (ami-…)"));
}
