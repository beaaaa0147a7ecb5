//! Paths no emulator reproduces, covered with recorded AWS responses replayed through the real SDK
//! clients and their deserializers (aws-smithy-mocks): an AMI encrypted with another account's key (moto
//! keeps each account's keys apart), KMS as AWS answers it for the AWS managed `aws/ebs` key and for a
//! function whose IAM only reaches tagged keys, KMS refusing a policy, KMS throttling, and a region at
//! its CopyImage limit while another region's copy goes from pending to available.
//!
//! The bodies below are written by hand in the shapes AWS's API reference documents for these operations
//! (EC2 query protocol XML, KMS JSON 1.1), not captured from a live account: nothing here may reach AWS.
//! Ids and ARNs are examples. What they prove is that the real SDK deserializers read these shapes the
//! way ami-share expects (e.g. `kmsKeyId` as a key ARN, `KeyManager` AWS) and how ami-share acts on them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ami_share::aws::sdk::SdkAws;
use ami_share::config::Config;
use ami_share::handler::Handler;
use ami_share::reconcile::KeyPolicyWrites;
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use aws_smithy_mocks::{MockResponseInterceptor, Rule, RuleMode, create_mock_http_client, mock};
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::http::StatusCode;
use aws_smithy_types::body::SdkBody;
use serde_json::{Value, json};

const REGION: &str = "us-east-1";
const IMAGE: &str = "ami-0abcdef1234567890";
const SNAPSHOT: &str = "snap-1234567890abcdef0";
const OWN_KEY: &str = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const FOREIGN_KEY: &str =
    "arn:aws:kms:us-east-1:999988887777:key/0987dcba-09fe-87dc-65ba-ab0987654321";
const DEFAULT_POLICY: &str = r#"{
  "Version" : "2012-10-17",
  "Id" : "key-default-1",
  "Statement" : [ {
    "Sid" : "Enable IAM User Permissions",
    "Effect" : "Allow",
    "Principal" : {
      "AWS" : "arn:aws:iam::123456789012:root"
    },
    "Action" : "kms:*",
    "Resource" : "*"
  } ]
}"#;

fn response(status: u16, body: impl Into<String>) -> HttpResponse {
    HttpResponse::new(
        StatusCode::try_from(status).unwrap(),
        SdkBody::from(body.into()),
    )
}

/// DescribeImages for an available AMI made by CreateImage whose one EBS snapshot is encrypted.
const DESCRIBE_IMAGES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>
    <imagesSet>
        <item>
            <imageId>ami-0abcdef1234567890</imageId>
            <imageLocation>123456789012/golden-al2023-2026.11.25</imageLocation>
            <imageState>available</imageState>
            <imageOwnerId>123456789012</imageOwnerId>
            <creationDate>2026-11-25T09:12:44.000Z</creationDate>
            <isPublic>false</isPublic>
            <architecture>x86_64</architecture>
            <imageType>machine</imageType>
            <sriovNetSupport>simple</sriovNetSupport>
            <name>golden-al2023-2026.11.25</name>
            <rootDeviceType>ebs</rootDeviceType>
            <rootDeviceName>/dev/xvda</rootDeviceName>
            <blockDeviceMapping>
                <item>
                    <deviceName>/dev/xvda</deviceName>
                    <ebs>
                        <snapshotId>snap-1234567890abcdef0</snapshotId>
                        <volumeSize>8</volumeSize>
                        <deleteOnTermination>true</deleteOnTermination>
                        <volumeType>gp3</volumeType>
                        <iops>3000</iops>
                        <throughput>125</throughput>
                        <encrypted>true</encrypted>
                    </ebs>
                </item>
            </blockDeviceMapping>
            <virtualizationType>hvm</virtualizationType>
            <hypervisor>xen</hypervisor>
            <enaSupport>true</enaSupport>
            <bootMode>uefi-preferred</bootMode>
            <sourceInstanceId>i-1234567890abcdef0</sourceInstanceId>
            <sourceImageId>ami-0fedcba0987654321</sourceImageId>
        </item>
    </imagesSet>
</DescribeImagesResponse>"#;

const NO_LAUNCH_PERMISSIONS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeImageAttributeResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>
    <imageId>ami-0abcdef1234567890</imageId>
    <launchPermission/>
</DescribeImageAttributeResponse>"#;

fn describe_snapshots(kms_key_id: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeSnapshotsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>6b7a3c8d-5bc1-4a4c-8e7c-0c5dEXAMPLE</requestId>
    <snapshotSet>
        <item>
            <snapshotId>snap-1234567890abcdef0</snapshotId>
            <volumeId>vol-049df61146c4d7901</volumeId>
            <status>completed</status>
            <startTime>2026-11-25T09:10:02.000Z</startTime>
            <progress>100%</progress>
            <ownerId>123456789012</ownerId>
            <volumeSize>8</volumeSize>
            <description>Created by CreateImage(i-1234567890abcdef0) for ami-0abcdef1234567890</description>
            <encrypted>true</encrypted>
            <kmsKeyId>{kms_key_id}</kmsKeyId>
            <storageTier>standard</storageTier>
        </item>
    </snapshotSet>
</DescribeSnapshotsResponse>"#
    )
}

const EC2_TRUE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<CreateTagsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</requestId>
    <return>true</return>
</CreateTagsResponse>"#;

const MODIFY_IMAGE_ATTRIBUTE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ModifyImageAttributeResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</requestId>
    <return>true</return>
</ModifyImageAttributeResponse>"#;

fn describe_key(arn: &str, manager: &str) -> String {
    let description = match manager {
        "AWS" => "Default key that protects my EBS volumes when no other key is defined",
        _ => "golden images",
    };
    json!({"KeyMetadata": {
        "AWSAccountId": "123456789012", "Arn": arn, "CreationDate": 1.764061964526E9,
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "Description": description, "Enabled": true,
        "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"], "KeyId": arn.rsplit('/').next().unwrap(),
        "KeyManager": manager, "KeySpec": "SYMMETRIC_DEFAULT", "KeyState": "Enabled",
        "KeyUsage": "ENCRYPT_DECRYPT", "MultiRegion": false, "Origin": "AWS_KMS"
    }})
    .to_string()
}

/// ListResourceTags of a key its owner approved for ami-share (`approved`), or of one with a tag of its
/// own only.
fn key_tags(approved: bool) -> Rule {
    let tag = match approved {
        true => json!({"TagKey": "ami-share:manage-key-policy", "TagValue": "true"}),
        false => json!({"TagKey": "team", "TagValue": "payroll"}),
    };
    mock!(aws_sdk_kms::Client::list_resource_tags).then_http_response(move || {
        response(
            200,
            json!({"Tags": [tag.clone()], "Truncated": false}).to_string(),
        )
    })
}

fn kms_error(kind: &str, message: &str) -> HttpResponse {
    response(400, json!({"__type": kind, "message": message}).to_string())
}

/// A client of `$krate` that answers from `$rules` instead of HTTP, with quick retries.
macro_rules! recorded_client {
    ($krate:ident, $rules:expr) => {{
        let mut interceptor = MockResponseInterceptor::new().rule_mode(RuleMode::MatchAny);
        for rule in $rules {
            interceptor = interceptor.with_rule(rule);
        }
        $krate::Client::from_conf(
            $krate::config::Builder::new()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(REGION))
                .credentials_provider(Credentials::new(
                    "recorded", "recorded", None, None, "recorded",
                ))
                .http_client(create_mock_http_client())
                .retry_config(
                    RetryConfig::standard()
                        .with_max_attempts(3)
                        .with_initial_backoff(Duration::from_millis(1)),
                )
                .interceptor(interceptor)
                .build(),
        )
    }};
}

fn handler(ec2_rules: &[&Rule], kms_rules: &[&Rule]) -> Handler<SdkAws> {
    handler_in(
        r#"
        [[rule]]
        name = "golden"
        match.name = ["golden-*"]
        tags = { "cost-center" = "platform" }
        tag_snapshots = false
        share.organizations = ["arn:aws:organizations::111111111111:organization/o-a1b2c3d4e5"]
        share.accounts = ["210987654321"]
        "#,
        &[(REGION, ec2_rules, kms_rules)],
    )
}

/// A handler with this config whose clients in each listed region answer from that region's rules.
fn handler_in(config: &str, regions: &[(&str, &[&Rule], &[&Rule])]) -> Handler<SdkAws> {
    let base = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .build();
    let mut aws = SdkAws::new(base);
    for (region, ec2_rules, kms_rules) in regions {
        let ec2 = recorded_client!(aws_sdk_ec2, ec2_rules.iter().copied());
        let kms = recorded_client!(aws_sdk_kms, kms_rules.iter().copied());
        aws = aws.with_region_clients(region, ec2, kms);
    }
    Handler::new(Config::parse(config).unwrap(), aws, REGION).with_key_policy_writes(
        KeyPolicyWrites {
            max_writes: 3,
            recheck_after: Some(std::time::Duration::ZERO),
        },
    )
}

fn event() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("events/create-image.json"),
    )
    .unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    event["region"] = json!(REGION);
    event["detail"]["responseElements"]["imageId"] = json!(IMAGE);
    event
}

/// The EC2 answers every scenario shares; CreateTags requests are captured.
struct Ec2Answers {
    rules: Vec<Rule>,
    /// Every (key, value) of every CreateTags request.
    tagged: Arc<Mutex<Vec<(String, String)>>>,
    shares: Rule,
}

fn ec2_answers(snapshot_key: &str) -> Ec2Answers {
    let tagged = Arc::new(Mutex::new(Vec::new()));
    let capture = tagged.clone();
    let snapshots = describe_snapshots(snapshot_key);
    let shares = mock!(aws_sdk_ec2::Client::modify_image_attribute)
        .then_http_response(|| response(200, MODIFY_IMAGE_ATTRIBUTE));
    Ec2Answers {
        rules: vec![
            mock!(aws_sdk_ec2::Client::describe_images)
                .then_http_response(|| response(200, DESCRIBE_IMAGES)),
            mock!(aws_sdk_ec2::Client::describe_image_attribute)
                .then_http_response(|| response(200, NO_LAUNCH_PERMISSIONS)),
            mock!(aws_sdk_ec2::Client::describe_snapshots)
                .then_http_response(move || response(200, snapshots.clone())),
            mock!(aws_sdk_ec2::Client::create_tags)
                .match_requests(move |req| {
                    capture.lock().unwrap().extend(
                        req.tags().iter().map(|t| {
                            (t.key().unwrap().to_string(), t.value().unwrap().to_string())
                        }),
                    );
                    true
                })
                .then_http_response(|| response(200, EC2_TRUE)),
        ],
        tagged,
        shares,
    }
}

impl Ec2Answers {
    fn all(&self) -> Vec<&Rule> {
        self.rules.iter().chain([&self.shares]).collect()
    }

    fn status_tags(&self) -> Vec<(String, String)> {
        self.tagged
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("ami-share:status"))
            .cloned()
            .collect()
    }
}

#[tokio::test]
async fn an_ami_on_another_accounts_key_is_not_shared_and_kms_is_not_called() {
    // Recorded: moto keeps each account's keys apart, so no emulated snapshot has another account's key.
    let ec2 = ec2_answers(FOREIGN_KEY);
    let any_kms =
        mock!(aws_sdk_kms::Client::describe_key).then_http_response(|| response(500, "{}"));
    let answer = handler(&ec2.all(), &[&any_kms])
        .handle(event())
        .await
        .unwrap();
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    let blocked = answer["outcome"]["blocked"][0].as_str().unwrap();
    assert!(
        blocked.contains("of account 999988887777: only that account can let others use it"),
        "{blocked}"
    );
    assert_eq!(
        any_kms.num_calls(),
        0,
        "another account's key policy cannot be changed from here"
    );
    assert_eq!(ec2.shares.num_calls(), 0);
    let status = ec2.status_tags();
    assert_eq!(status[0], ("ami-share:status".into(), "not-shared".into()));
    assert_eq!(
        status[1].1,
        format!(
            "{SNAPSHOT} uses KMS key 0987dcba-09fe-87dc-65ba-ab0987654321 of account 999988887777; to share a re-encrypted copy, list the key in keys.approved (with its owner's consent) and set reencrypt.kms_key"
        )
    );
}

#[tokio::test]
async fn aws_ebs_as_kms_describes_it_is_blocked_even_when_its_policy_cannot_be_read() {
    // Recorded: KMS's KeyManager AWS for aws/ebs, and the AccessDeniedException GetKeyPolicy gives a
    // function whose IAM reaches only tagged keys (template parameter KmsKeyScope=tagged).
    let ec2 = ec2_answers(OWN_KEY);
    let describe = mock!(aws_sdk_kms::Client::describe_key)
        .then_http_response(|| response(200, describe_key(OWN_KEY, "AWS")));
    let get = mock!(aws_sdk_kms::Client::get_key_policy).then_http_response(|| {
        kms_error(
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/ami-share/fn is not authorized to perform: kms:GetKeyPolicy on this resource because no identity-based policy allows the kms:GetKeyPolicy action",
        )
    });
    let put = mock!(aws_sdk_kms::Client::put_key_policy).then_http_response(|| response(200, "{}"));
    let tags = mock!(aws_sdk_kms::Client::list_resource_tags).then_http_response(|| {
        kms_error(
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/ami-share/fn is not authorized to perform: kms:ListResourceTags on this resource",
        )
    });
    let answer = handler(&ec2.all(), &[&describe, &get, &put, &tags])
        .handle(event())
        .await
        .unwrap();
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    assert!(answer["outcome"].get("failures").is_none(), "{answer:#}");
    assert_eq!(put.num_calls(), 0);
    assert_eq!(ec2.shares.num_calls(), 0);
    assert!(ec2.status_tags()[1].1.contains("AWS managed key aws/ebs"));
}

#[tokio::test]
async fn a_key_whose_policy_the_role_may_not_read_and_that_is_not_approved_blocks_the_share_only() {
    // Recorded: the answers a function with the template's default IAM (KmsKeyScope=approved-keys) gets
    // for a key nobody approved: its tags are readable, its policy is not (GetKeyPolicy is allowed on
    // approved keys only). No emulator enforces IAM.
    let ec2 = ec2_answers(OWN_KEY);
    let describe = mock!(aws_sdk_kms::Client::describe_key)
        .then_http_response(|| response(200, describe_key(OWN_KEY, "CUSTOMER")));
    let get = mock!(aws_sdk_kms::Client::get_key_policy).then_http_response(|| {
        kms_error(
            "AccessDeniedException",
            "User: arn:aws:sts::123456789012:assumed-role/ami-share/fn is not authorized to perform: kms:GetKeyPolicy on this resource because no identity-based policy allows the kms:GetKeyPolicy action",
        )
    });
    let put = mock!(aws_sdk_kms::Client::put_key_policy).then_http_response(|| response(200, "{}"));
    let tags = key_tags(false);
    let answer = handler(&ec2.all(), &[&describe, &get, &put, &tags])
        .handle(event())
        .await
        .unwrap();
    assert_eq!(answer["status"], "blocked", "{answer:#}");
    assert!(
        answer["outcome"].get("failures").is_none(),
        "not a failure: {answer:#}"
    );
    assert_eq!(put.num_calls(), 0);
    assert_eq!(ec2.shares.num_calls(), 0);
    let reason = &ec2.status_tags()[1].1;
    assert!(
        reason.contains("not approved for ami-share")
            && reason.contains("ami-share:manage-key-policy=true"),
        "{reason}"
    );
}

#[tokio::test]
async fn kms_refusing_the_policy_is_a_clear_final_error_and_the_ami_stays_unshared() {
    let ec2 = ec2_answers(OWN_KEY);
    let describe = mock!(aws_sdk_kms::Client::describe_key)
        .then_http_response(|| response(200, describe_key(OWN_KEY, "CUSTOMER")));
    let get = mock!(aws_sdk_kms::Client::get_key_policy).then_http_response(|| {
        response(
            200,
            json!({"Policy": DEFAULT_POLICY, "PolicyName": "default"}).to_string(),
        )
    });
    let put = mock!(aws_sdk_kms::Client::put_key_policy).then_http_response(|| {
        kms_error(
            "MalformedPolicyDocumentException",
            "The new key policy will not allow you to update the key policy in the future.",
        )
    });
    // Not retryable: retrying cannot cure it, so the invocation is not failed (and not retried); the
    // answer and the summary log say what failed and what was not done.
    let tags = key_tags(true);
    let answer = handler(&ec2.all(), &[&describe, &get, &put, &tags])
        .handle(event())
        .await
        .unwrap();
    assert_eq!(answer["status"], "failed", "{answer:#}");
    let failure = &answer["outcome"]["failures"][0];
    assert_eq!(failure["retryable"], false);
    let message = format!(
        "{} {}; not done: {}",
        failure["resource"], failure["message"], answer["outcome"]["not_done"]
    );
    assert_eq!(failure["code"], "MalformedPolicyDocumentException");
    let summary = answer["summary"].as_str().unwrap();
    assert!(
        summary.contains("MalformedPolicyDocumentException")
            && summary.contains("the key is unchanged")
            && summary.contains("not done: share"),
        "{summary}"
    );
    assert!(
        message.contains("arn:aws:kms:us-east-1:123456789012:key/")
            && message.contains("will not allow you to update"),
        "{message}"
    );
    assert!(
        answer["outcome"]["not_done"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "add_launch_permissions"),
        "{answer:#}"
    );
    assert_eq!(put.num_calls(), 1, "a refusal is not retried");
    assert_eq!(
        ec2.shares.num_calls(),
        0,
        "no share the receivers could not launch"
    );
}

#[tokio::test]
async fn kms_throttling_is_retried_by_the_sdk_and_the_ami_is_shared() {
    // A recorded KMS that remembers what was put, so the read-back after the write sees it.
    let ec2 = ec2_answers(OWN_KEY);
    let stored = Arc::new(Mutex::new(DEFAULT_POLICY.to_string()));
    let describe = mock!(aws_sdk_kms::Client::describe_key)
        .then_http_response(|| response(200, describe_key(OWN_KEY, "CUSTOMER")));
    let read = stored.clone();
    let get = mock!(aws_sdk_kms::Client::get_key_policy).then_http_response(move || {
        response(
            200,
            json!({"Policy": *read.lock().unwrap(), "PolicyName": "default"}).to_string(),
        )
    });
    let write = stored.clone();
    // The SDK's retries replay the same rule: two throttled attempts, then the write.
    let put = mock!(aws_sdk_kms::Client::put_key_policy)
        .match_requests(move |req| {
            *write.lock().unwrap() = req.policy().unwrap().to_string();
            true
        })
        .sequence()
        .http_response(|| kms_error("ThrottlingException", "Rate exceeded"))
        .times(2)
        .http_response(|| response(200, ""))
        .build();
    let tags = key_tags(true);
    let answer = handler(&ec2.all(), &[&describe, &get, &put, &tags])
        .handle(event())
        .await
        .unwrap();
    assert_eq!(answer["status"], "done", "{answer:#}");
    assert_eq!(put.num_calls(), 3, "two throttled attempts, then the write");
    assert_eq!(ec2.shares.num_calls(), 1);
    let policy: Value = serde_json::from_str(&stored.lock().unwrap()).unwrap();
    assert_eq!(policy["Id"], "key-default-1");
    let sids: Vec<&str> = policy["Statement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["Sid"].as_str().unwrap())
        .collect();
    assert_eq!(
        sids,
        [
            "Enable IAM User Permissions",
            "AmiShareOrganizationsUseKey",
            "AmiShareOrganizationsCreateGrant",
            "AmiShareAccountsUseKey",
            "AmiShareAccountsCreateGrant",
            "AmiShareOrganizationsDescribeKey",
            "AmiShareAccountsDescribeKey"
        ],
        "no OU in this config: no OU statements"
    );
}

/// EC2's answer to a refused call (query protocol).
fn ec2_error(code: &str, message: &str) -> HttpResponse {
    response(
        400,
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>ea966190-f9aa-478e-9ede-example</RequestID></Response>"#
        ),
    )
}

const NO_IMAGES: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>
    <imagesSet/>
</DescribeImagesResponse>"#;

const COPY_IN_FRANKFURT: &str = "ami-0c0ffee0c0ffee001";

/// ami-share's copy of IMAGE in eu-central-1, in `state`, as DescribeImages reports it (marks included).
fn frankfurt_copy(state: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="UTF-8"?>
<DescribeImagesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
    <requestId>59dbff89-35bd-4eac-99ed-be587EXAMPLE</requestId>
    <imagesSet>
        <item>
            <imageId>{COPY_IN_FRANKFURT}</imageId>
            <imageState>{state}</imageState>
            <imageOwnerId>123456789012</imageOwnerId>
            <creationDate>2026-11-25T09:30:00.000Z</creationDate>
            <isPublic>false</isPublic>
            <name>golden-al2023-2026.11.25</name>
            <rootDeviceType>ebs</rootDeviceType>
            <rootDeviceName>/dev/xvda</rootDeviceName>
            <blockDeviceMapping>
                <item>
                    <deviceName>/dev/xvda</deviceName>
                    <ebs>
                        <snapshotId>snap-0c0ffee0c0ffee001</snapshotId>
                        <volumeSize>8</volumeSize>
                        <encrypted>false</encrypted>
                    </ebs>
                </item>
            </blockDeviceMapping>
            <tagSet>
                <item><key>ami-share:copy-kind</key><value>regional</value></item>
                <item><key>ami-share:source-image</key><value>{IMAGE}</value></item>
                <item><key>ami-share:source-region</key><value>{REGION}</value></item>
                <item><key>ami-share:source-created</key><value>2026-11-25T09:12:44.000Z</value></item>
            </tagSet>
            <sourceImageId>{IMAGE}</sourceImageId>
            <sourceImageRegion>{REGION}</sourceImageRegion>
        </item>
    </imagesSet>
</DescribeImagesResponse>"#
    )
}

#[tokio::test]
async fn a_region_at_its_copy_limit_fails_alone_and_a_pending_copy_is_shared_once_available() {
    // Recorded: the emulator has no copy limit (ResourceLimitExceeded is AWS's answer when too many
    // copies are in progress in a region), and its copies do not turn available by themselves.
    let unencrypted = DESCRIBE_IMAGES.replace(
        "<encrypted>true</encrypted>",
        "<encrypted>false</encrypted>",
    );
    let source = [
        mock!(aws_sdk_ec2::Client::describe_images)
            .then_http_response(move || response(200, unencrypted.clone())),
        mock!(aws_sdk_ec2::Client::describe_image_attribute)
            .sequence()
            .http_response(|| response(200, NO_LAUNCH_PERMISSIONS))
            .http_response(|| {
                response(
                    200,
                    NO_LAUNCH_PERMISSIONS.replace(
                        "<launchPermission/>",
                        "<launchPermission><item><userId>210987654321</userId></item></launchPermission>",
                    ),
                )
            })
            .repeatedly()
            .build(),
    ];
    let source_shares = mock!(aws_sdk_ec2::Client::modify_image_attribute)
        .then_http_response(|| response(200, MODIFY_IMAGE_ATTRIBUTE));
    let west_copies = mock!(aws_sdk_ec2::Client::copy_image).then_http_response(|| {
        ec2_error(
            "ResourceLimitExceeded",
            "You have reached the maximum number of concurrent CopyImage requests for this Region.",
        )
    });
    let west_find =
        mock!(aws_sdk_ec2::Client::describe_images).then_http_response(|| response(200, NO_IMAGES));
    // Looking for a copy (none), CopyImage's answer read back (pending), the redelivery's look (still
    // pending), then available.
    let frankfurt_find = mock!(aws_sdk_ec2::Client::describe_images)
        .sequence()
        .http_response(|| response(200, NO_IMAGES))
        .http_response(|| response(200, frankfurt_copy("pending")))
        .http_response(|| response(200, frankfurt_copy("pending")))
        .http_response(|| response(200, frankfurt_copy("available")))
        .repeatedly()
        .build();
    let frankfurt_copies = mock!(aws_sdk_ec2::Client::copy_image)
        .match_requests(|req| {
            // Called in the copy's region, naming the source's; no key configured: none sent.
            req.source_region() == Some(REGION)
                && req.source_image_id() == Some(IMAGE)
                && req.kms_key_id().is_none()
                && req.encrypted().is_none()
                && req.client_token().is_some_and(|t| t.starts_with("ami-share-"))
        })
        .then_http_response(|| {
        response(
            200,
            format!(
                r#"<CopyImageResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>60bc441d-fa2c-494d-b155-example</requestId><imageId>{COPY_IN_FRANKFURT}</imageId></CopyImageResponse>"#
            ),
        )
    });
    let frankfurt_permissions = mock!(aws_sdk_ec2::Client::describe_image_attribute)
        .then_http_response(|| {
            response(200, NO_LAUNCH_PERMISSIONS.replace(IMAGE, COPY_IN_FRANKFURT))
        });
    let frankfurt_shares = mock!(aws_sdk_ec2::Client::modify_image_attribute)
        .then_http_response(|| response(200, MODIFY_IMAGE_ATTRIBUTE));
    let source_rules: Vec<&Rule> = source.iter().chain([&source_shares]).collect();
    let handler = handler_in(
        r#"
        [[rule]]
        name = "golden"
        share.accounts = ["210987654321"]
        copy.regions = [{ region = "us-west-2" }, { region = "eu-central-1" }]
        "#,
        &[
            (REGION, &source_rules, &[]),
            ("us-west-2", &[&west_find, &west_copies], &[]),
            (
                "eu-central-1",
                &[
                    &frankfurt_find,
                    &frankfurt_copies,
                    &frankfurt_permissions,
                    &frankfurt_shares,
                ],
                &[],
            ),
        ],
    );

    // 1. us-west-2 refuses the copy: the invocation fails, retryably, naming it; the others are done.
    let error = handler.handle(event()).await.unwrap_err();
    assert_eq!(error.error_type(), "Retryable");
    let message = error.to_string();
    assert!(
        message.contains("us-west-2: failed")
            && message.contains(
                "CopyImage on ami-0abcdef1234567890 in us-west-2 failed with ResourceLimitExceeded"
            )
            && message.contains("a retry makes room")
            && message.contains(&format!("eu-central-1: copying {COPY_IN_FRANKFURT}")),
        "{message}"
    );
    assert_eq!(
        source_shares.num_calls(),
        1,
        "the source is shared all the same"
    );
    assert_eq!(frankfurt_copies.num_calls(), 1);

    // 2. The redelivery: Frankfurt's copy is pending (waits), us-west-2 is tried again, the source is
    //    already shared.
    let message = handler.handle(event()).await.unwrap_err().to_string();
    assert!(
        message.contains(&format!("eu-central-1: pending {COPY_IN_FRANKFURT}")),
        "{message}"
    );
    assert_eq!(
        frankfurt_copies.num_calls(),
        1,
        "a pending copy is never made again"
    );
    assert_eq!(
        frankfurt_shares.num_calls(),
        0,
        "EC2 cannot share a pending image"
    );
    assert_eq!(west_copies.num_calls(), 2);
    assert_eq!(source_shares.num_calls(), 1);

    // 3. Frankfurt's copy is available: shared there, in its region.
    let message = handler.handle(event()).await.unwrap_err().to_string();
    assert!(
        message.contains(&format!("eu-central-1: done {COPY_IN_FRANKFURT}")),
        "{message}"
    );
    assert!(
        message.contains(&format!(
            "done: share {COPY_IN_FRANKFURT} in eu-central-1 with account 210987654321"
        )),
        "{message}"
    );
    assert_eq!(frankfurt_shares.num_calls(), 1);
    assert_eq!(frankfurt_copies.num_calls(), 1);
}

#[tokio::test]
async fn the_public_ami_quota_is_a_final_named_failure_and_the_other_shares_stand() {
    // Recorded: the emulator has no public-AMI quota (AWS answers ResourceLimitExceeded to the share
    // that would make a sixth AMI of the region public, by default).
    let unencrypted = DESCRIBE_IMAGES.replace(
        "<encrypted>true</encrypted>",
        "<encrypted>false</encrypted>",
    );
    let images = mock!(aws_sdk_ec2::Client::describe_images)
        .then_http_response(move || response(200, unencrypted.clone()));
    let permissions = mock!(aws_sdk_ec2::Client::describe_image_attribute)
        .then_http_response(|| response(200, NO_LAUNCH_PERMISSIONS));
    let unblocked = mock!(aws_sdk_ec2::Client::get_image_block_public_access_state)
        .then_http_response(|| {
            response(
                200,
                r#"<GetImageBlockPublicAccessStateResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>5e1c2b7a-example</requestId><imageBlockPublicAccessState>unblocked</imageBlockPublicAccessState></GetImageBlockPublicAccessStateResponse>"#,
            )
        });
    let account_share = mock!(aws_sdk_ec2::Client::modify_image_attribute)
        .match_requests(|req| {
            req.launch_permission()
                .is_some_and(|p| p.add().iter().all(|lp| lp.user_id().is_some()))
        })
        .then_http_response(|| response(200, MODIFY_IMAGE_ATTRIBUTE));
    let public_share = mock!(aws_sdk_ec2::Client::modify_image_attribute)
        .match_requests(|req| {
            req.launch_permission()
                .is_some_and(|p| p.add().iter().any(|lp| lp.group().is_some()))
        })
        .then_http_response(|| {
            ec2_error(
                "ResourceLimitExceeded",
                "You have reached the maximum number of public images for this Region.",
            )
        });
    let handler = handler_in(
        r#"
        [[rule]]
        name = "public"
        share.accounts = ["210987654321"]
        share.public = true
        "#,
        &[(
            REGION,
            &[
                &images,
                &permissions,
                &unblocked,
                &account_share,
                &public_share,
            ],
            &[],
        )],
    );
    // Not retried: no retry raises a quota. The invocation succeeds with status failed, naming it.
    let answer = handler
        .handle(event())
        .await
        .expect("a final failure is not retried");
    assert_eq!(answer["status"], "failed", "{answer:#}");
    let summary = answer["summary"].as_str().unwrap();
    assert!(
        summary.contains("failed with ResourceLimitExceeded")
            && summary.contains("5 public AMIs per region by default")
            && summary.contains("Service Quotas"),
        "{summary}"
    );
    assert!(
        summary
            .contains("done: share ami-0abcdef1234567890 in us-east-1 with account 210987654321"),
        "{summary}"
    );
    assert_eq!(
        account_share.num_calls(),
        1,
        "the account share is a call of its own"
    );
    assert_eq!(public_share.num_calls(), 1);
}
