//! Test support: the emulator (tests/emulator.py, moto with its AWS-fidelity fixes) started per test on a
//! free loopback port, SDK clients aimed at it, and fixtures (organization, OUs, images).

pub mod event_source;
pub mod runtime_api;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use ami_share::observed::Tags;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::types::{LaunchPermission, Tag};
use serde_json::{Value, json};

pub const REGION: &str = "us-east-1";
/// The access key of clients that fault injection applies to.
pub const FAULTY_CLIENT: &str = "AKIAFAULTYCLIENT0000";

pub fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// The Python with the pinned test requirements: `AMI_SHARE_PYTHON`, else the repository's `.venv`.
pub fn python() -> PathBuf {
    if let Some(python) = std::env::var_os("AMI_SHARE_PYTHON") {
        return python.into();
    }
    let venv = repo_path(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/test (it creates the virtualenv with the pinned emulator)",
        venv.display()
    );
    venv
}

/// A running emulator. Dropping it stops the process.
pub struct Emulator {
    pub endpoint: String,
    child: Child,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    pub fn start() -> Self {
        let mut child = Command::new(python())
            .arg(repo_path("tests/emulator.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/emulator.py");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the emulator's endpoint");
        let started: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("emulator printed {line:?} instead of its endpoint: {e}"));
        Self {
            endpoint: started["endpoint"].as_str().unwrap().to_string(),
            child,
        }
    }

    /// Environment for a process (the Lambda binary, the CLI) that should talk to this emulator.
    pub fn aws_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", REGION.into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    pub async fn sdk_config(&self) -> SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await
    }

    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.sdk_config().await)
    }

    pub async fn kms(&self) -> aws_sdk_kms::Client {
        aws_sdk_kms::Client::new(&self.sdk_config().await)
    }

    pub async fn ec2_in(&self, region: &str) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::config::Builder::from(&self.sdk_config().await)
            .region(Region::new(region.to_string()))
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    pub async fn kms_in(&self, region: &str) -> aws_sdk_kms::Client {
        let config = aws_sdk_kms::config::Builder::from(&self.sdk_config().await)
            .region(Region::new(region.to_string()))
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }

    pub async fn ssm_in(&self, region: &str) -> aws_sdk_ssm::Client {
        let config = aws_sdk_ssm::config::Builder::from(&self.sdk_config().await)
            .region(Region::new(region.to_string()))
            .build();
        aws_sdk_ssm::Client::from_conf(config)
    }

    /// Every EC2 call in `region` is refused as AWS refuses them in an opt-in region the account has not
    /// enabled (`"opt-in"`) or when overloaded (`"throttled"`); `None` serves the region again.
    pub fn refuse_region(&self, region: &str, kind: Option<&str>) {
        self.control(
            "region-refusal",
            Some(json!({"region": region, "kind": kind})),
        );
    }

    /// Answers `fraction` of the requests signed with the access key [`FAULTY_CLIENT`] from now on
    /// (chosen by a generator seeded with `seed`) with the service's own throttling error instead of
    /// serving them; 0.0 serves all again. The tests' own set-up and checks use another key.
    pub fn set_faults(&self, fraction: f64, seed: u64) {
        self.control(
            "faults",
            Some(json!({"fraction": fraction, "seed": seed, "access_key": FAULTY_CLIENT})),
        );
    }

    /// The SDK config of a client whose requests [`Emulator::set_faults`] applies to.
    pub async fn faulty_sdk_config(&self) -> SdkConfig {
        self.sdk_config()
            .await
            .into_builder()
            .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
                Credentials::new(FAULTY_CLIENT, "testing", None, None, "tests"),
            ))
            .build()
    }

    /// Answers every `action` request with a body the SDK cannot read (`"html-500"`: moto's answer to
    /// what it does not implement; `"cut-xml"`: a 200 cut off mid-element); `None` serves it again.
    pub fn break_answers(&self, action: &str, kind: Option<&str>) {
        self.control(
            "broken-answer",
            Some(json!({"action": action, "kind": kind})),
        );
    }

    /// The mutating requests after the first `since` that moto served (not answered by an injected
    /// fault), as "service:Action@region", sorted: what was applied.
    pub fn applied_since(&self, since: usize) -> Vec<String> {
        let mut applied: Vec<String> = self
            .control("requests", None)
            .as_array()
            .unwrap()
            .iter()
            .skip(since)
            .filter(|r| r.get("fault").is_none())
            .map(|r| {
                format!(
                    "{}:{}@{}",
                    r["service"].as_str().unwrap_or("?"),
                    r["action"].as_str().unwrap_or("?"),
                    r["region"].as_str().unwrap_or("?")
                )
            })
            .filter(|r| is_mutating(r.split('@').next().unwrap()))
            .collect();
        applied.sort();
        applied
    }

    /// How many requests after the first `since` were answered by an injected fault.
    pub fn faults_since(&self, since: usize) -> usize {
        self.control("requests", None)
            .as_array()
            .unwrap()
            .iter()
            .skip(since)
            .filter(|r| r.get("fault").is_some())
            .count()
    }

    /// Seeds `count` AMIs named `prefix-00000`… (every `encrypted_every`-th on `key`) in the emulator's
    /// own process; returns their ids.
    pub fn seed_images(
        &self,
        count: usize,
        prefix: &str,
        key: Option<&str>,
        encrypted_every: usize,
    ) -> Vec<String> {
        let seeded = self.control(
            "images",
            Some(json!({"count": count, "prefix": prefix, "kms_key": key, "encrypted_every": encrypted_every})),
        );
        seeded["images"]
            .as_array()
            .unwrap_or_else(|| panic!("{seeded}"))
            .iter()
            .map(|i| i["image_id"].as_str().unwrap().to_string())
            .collect()
    }

    /// Every request is answered this much later, as over a real network.
    pub fn set_latency(&self, seconds: f64) {
        self.control("latency", Some(json!({ "seconds": seconds })));
    }

    /// The requests after the first `since` as (region, "service:Action") pairs.
    pub fn requests_by_region_since(&self, since: usize) -> Vec<(String, String)> {
        self.control("requests", None)
            .as_array()
            .unwrap()
            .iter()
            .skip(since)
            .map(|r| {
                (
                    r["region"].as_str().unwrap_or("?").to_string(),
                    format!(
                        "{}:{}",
                        r["service"].as_str().unwrap_or("?"),
                        r["action"].as_str().unwrap_or("?")
                    ),
                )
            })
            .collect()
    }

    /// The number of sequential round trips in the requests after the first `since`: the longest chain
    /// of requests each of which started after the one before it ended (calls made together count once).
    pub fn round_trip_depth_since(&self, since: usize) -> usize {
        let log = self.control("requests", None);
        let spans: Vec<(f64, f64)> = log
            .as_array()
            .unwrap()
            .iter()
            .skip(since)
            .map(|r| (r["start"].as_f64().unwrap(), r["end"].as_f64().unwrap()))
            .collect();
        let mut order: Vec<usize> = (0..spans.len()).collect();
        order.sort_by(|a, b| spans[*a].0.total_cmp(&spans[*b].0));
        let mut depth = vec![0usize; spans.len()];
        for (n, &i) in order.iter().enumerate() {
            depth[i] = 1 + order[..n]
                .iter()
                .filter(|&&j| spans[j].1 <= spans[i].0)
                .map(|&j| depth[j])
                .max()
                .unwrap_or(0);
        }
        depth.into_iter().max().unwrap_or(0)
    }

    /// Right after the next GetKeyPolicy of `key_id` is answered, `statement` is appended to its policy: an
    /// operator's edit that lands between ami-share's reads.
    pub fn edit_key_policy_after_next_read(&self, key_id: &str, statement: Value) {
        self.control(
            "key-policy-edit",
            Some(json!({"region": REGION, "key_id": key_id, "statement": statement})),
        );
    }

    /// The next `writes` PutKeyPolicy calls on `key_id` are each overwritten, right after, by the policy the
    /// key had before: a concurrent writer that read the policy earlier and wrote it later.
    pub fn race_key_policy(&self, key_id: &str, writes: u32) {
        self.control(
            "key-policy-race",
            Some(json!({"region": REGION, "key_id": key_id, "writes": writes})),
        );
    }

    /// Calls a test control endpoint of tests/emulator.py (`None` body: GET).
    pub fn control(&self, what: &str, body: Option<Value>) -> Value {
        let address = self.endpoint.trim_start_matches("http://");
        let mut stream = TcpStream::connect(address).expect("connect to the emulator");
        let (method, body) = match body {
            Some(body) => ("POST", body.to_string()),
            None => ("GET", String::new()),
        };
        write!(
            stream,
            "{method} /_ami_share/{what} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "control {what} failed: {head}\n{body}"
        );
        serde_json::from_str(body).unwrap()
    }

    /// Creates the organization (once) and the named OUs under its root.
    pub fn organization(&self, ous: &[&str]) -> Value {
        self.control("organization", Some(json!({ "ous": ous })))
    }

    pub fn set_image_state(&self, region: &str, image_id: &str, state: &str) {
        self.control(
            "image-state",
            Some(json!({"region": region, "image_id": image_id, "state": state})),
        );
    }

    pub fn set_image_owner(&self, region: &str, image_id: &str, owner_id: &str) {
        self.control(
            "image-owner",
            Some(json!({"region": region, "image_id": image_id, "owner_id": owner_id})),
        );
    }

    /// Every AWS request served so far, as "service:Action" (e.g. "ec2:CreateTags").
    pub fn requests(&self) -> Vec<String> {
        self.control("requests", None)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                format!(
                    "{}:{}",
                    r["service"].as_str().unwrap_or("?"),
                    r["action"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    /// The longest chain of requests after the first `since`, each starting after the one before it
    /// ended, that ends with the first `operation` ("service:Action"): how many sequential round trips
    /// it took to get there. `None` if no such request was made.
    pub fn depth_until(&self, since: usize, operation: &str) -> Option<usize> {
        let requests = self.control("requests", None);
        let entries: Vec<(String, f64, f64)> = requests
            .as_array()
            .unwrap()
            .iter()
            .skip(since)
            .map(|r| {
                let name = format!(
                    "{}:{}",
                    r["service"].as_str().unwrap_or("?"),
                    r["action"].as_str().unwrap_or("?")
                );
                let start = r["start"].as_f64().unwrap();
                (name, start, r["end"].as_f64().unwrap_or(f64::MAX))
            })
            .collect();
        let mut depth = vec![0usize; entries.len()];
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|a, b| entries[*a].1.total_cmp(&entries[*b].1));
        for &i in &order {
            depth[i] = 1 + order
                .iter()
                .filter(|&&j| entries[j].2 <= entries[i].1)
                .map(|&j| depth[j])
                .max()
                .unwrap_or(0);
        }
        order
            .into_iter()
            .find(|&i| entries[i].0 == operation)
            .map(|i| depth[i])
    }

    /// The requests after the first `since`, keeping only calls that change something.
    pub fn mutating_requests_since(&self, since: usize) -> Vec<String> {
        self.requests()
            .into_iter()
            .skip(since)
            .filter(|r| is_mutating(r))
            .collect()
    }
}

/// Reads are Describe*/Get*/List*; everything else changes state.
pub fn is_mutating(request: &str) -> bool {
    let action = request.split_once(':').map(|(_, a)| a).unwrap_or(request);
    !["Describe", "Get", "List"]
        .iter()
        .any(|p| action.starts_with(p))
}

/// How the root volume of the instance behind a new AMI is encrypted.
#[derive(Debug, Clone, Copy)]
pub enum RootVolume<'a> {
    Unencrypted,
    /// With the account's default EBS key, the AWS managed `aws/ebs`.
    DefaultKey,
    /// With this customer managed key.
    Key(&'a str),
}

/// Makes an AMI by CreateImage from a fresh instance, with the given tags. Returns (image id, snapshot ids).
pub async fn create_image(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    tags: &[(&str, &str)],
) -> (String, Vec<String>) {
    create_image_with(ec2, name, tags, RootVolume::Unencrypted).await
}

/// As [`create_image`], the instance's root volume (and so the AMI's snapshot) encrypted as `root` says.
pub async fn create_image_with(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    tags: &[(&str, &str)],
    root: RootVolume<'_>,
) -> (String, Vec<String>) {
    // ami-12c6146b is one of the images moto ships in us-east-1.
    create_image_from(ec2, "ami-12c6146b", name, tags, root).await
}

/// As [`create_image_with`], from an instance of `base` (an AMI id).
pub async fn create_image_from(
    ec2: &aws_sdk_ec2::Client,
    base: &str,
    name: &str,
    tags: &[(&str, &str)],
    root: RootVolume<'_>,
) -> (String, Vec<String>) {
    let ebs = aws_sdk_ec2::types::EbsBlockDevice::builder().volume_size(8);
    let ebs = match root {
        RootVolume::Unencrypted => None,
        RootVolume::DefaultKey => Some(ebs.encrypted(true)),
        RootVolume::Key(key) => Some(ebs.encrypted(true).kms_key_id(key)),
    };
    let run = ec2
        .run_instances()
        .image_id(base)
        .min_count(1)
        .max_count(1)
        .set_block_device_mappings(ebs.map(|ebs| {
            vec![
                aws_sdk_ec2::types::BlockDeviceMapping::builder()
                    .device_name("/dev/sda1")
                    .ebs(ebs.build())
                    .build(),
            ]
        }))
        .send()
        .await
        .expect("RunInstances");
    let instance_id = run.instances()[0].instance_id().unwrap().to_string();
    let image_id = ec2
        .create_image()
        .instance_id(instance_id)
        .name(name)
        .send()
        .await
        .expect("CreateImage")
        .image_id()
        .unwrap()
        .to_string();
    if !tags.is_empty() {
        ec2.create_tags()
            .resources(&image_id)
            .set_tags(Some(
                tags.iter()
                    .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
                    .collect(),
            ))
            .send()
            .await
            .expect("CreateTags");
    }
    let snapshots = image_snapshots(ec2, &image_id).await;
    (image_id, snapshots)
}

pub async fn image_snapshots(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Vec<String> {
    describe_image(ec2, image_id)
        .await
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs()?.snapshot_id().map(str::to_string))
        .collect()
}

pub async fn describe_image(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
) -> aws_sdk_ec2::types::Image {
    ec2.describe_images()
        .image_ids(image_id)
        .send()
        .await
        .expect("DescribeImages")
        .images()[0]
        .clone()
}

pub async fn image_tags(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Tags {
    tag_map(describe_image(ec2, image_id).await.tags())
}

pub async fn snapshot_tags(ec2: &aws_sdk_ec2::Client, snapshot_id: &str) -> Tags {
    tag_map(describe_snapshot(ec2, snapshot_id).await.tags())
}

async fn describe_snapshot(
    ec2: &aws_sdk_ec2::Client,
    snapshot_id: &str,
) -> aws_sdk_ec2::types::Snapshot {
    ec2.describe_snapshots()
        .snapshot_ids(snapshot_id)
        .send()
        .await
        .expect("DescribeSnapshots")
        .snapshots()[0]
        .clone()
}

/// `Ebs.Encrypted` of the image's first block device, as DescribeImages reports it.
pub async fn image_root_encrypted(ec2: &aws_sdk_ec2::Client, image_id: &str) -> Option<bool> {
    describe_image(ec2, image_id).await.block_device_mappings()[0]
        .ebs()?
        .encrypted()
}

fn tag_map(tags: &[Tag]) -> Tags {
    tags.iter()
        .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
        .collect()
}

/// Adds one launch permission by hand (as a person or another tool would).
pub async fn grant_launch(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
    permission: aws_sdk_ec2::types::LaunchPermission,
) {
    ec2.modify_image_attribute()
        .image_id(image_id)
        .launch_permission(
            aws_sdk_ec2::types::LaunchPermissionModifications::builder()
                .add(permission)
                .build(),
        )
        .send()
        .await
        .expect("ModifyImageAttribute");
}

/// DescribeImages' `DeregistrationProtection` of an image.
pub async fn deregistration_protection(
    ec2: &aws_sdk_ec2::Client,
    image_id: &str,
) -> Option<String> {
    ec2.describe_images()
        .image_ids(image_id)
        .send()
        .await
        .unwrap()
        .images()[0]
        .deregistration_protection()
        .map(str::to_string)
}

/// Launch permissions as "kind=value" strings, e.g. "org=arn:…", "ou=arn:…", "account=…", "group=all".
pub async fn launch_permissions(ec2: &aws_sdk_ec2::Client, image_id: &str) -> BTreeSet<String> {
    let output = ec2
        .describe_image_attribute()
        .image_id(image_id)
        .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
        .send()
        .await
        .expect("DescribeImageAttribute");
    output
        .launch_permissions()
        .iter()
        .map(describe_permission)
        .collect()
}

fn describe_permission(p: &LaunchPermission) -> String {
    if let Some(arn) = p.organization_arn() {
        format!("org={arn}")
    } else if let Some(arn) = p.organizational_unit_arn() {
        format!("ou={arn}")
    } else if let Some(id) = p.user_id() {
        format!("account={id}")
    } else {
        format!("group={:?}", p.group())
    }
}

/// A sample event from events/ with its image id (and region) replaced.
pub fn sample_event(file: &str, image_id: &str, region: &str) -> Value {
    let text = std::fs::read_to_string(repo_path(&format!("events/{file}"))).unwrap();
    let mut event: Value = serde_json::from_str(&text).unwrap();
    event["region"] = json!(region);
    let detail = &mut event["detail"];
    if detail.get("ImageId").is_some() {
        detail["ImageId"] = json!(image_id);
        event["resources"] = json!([format!("arn:aws:ec2:{region}::image/{image_id}")]);
    } else if detail["requestParameters"].get("resourcesSet").is_some() {
        // CreateTags / DeleteTags: the resources the call named.
        detail["awsRegion"] = json!(region);
        detail["requestParameters"]["resourcesSet"]["items"] = json!([{ "resourceId": image_id }]);
    } else {
        detail["awsRegion"] = json!(region);
        detail["responseElements"]["imageId"] = json!(image_id);
    }
    event
}

/// A new customer managed key (with KMS's default policy) whose owner approved ami-share, as README's
/// set-up says: tagged `ami-share:manage-key-policy=true`. Returns its ARN.
pub async fn create_key(kms: &aws_sdk_kms::Client) -> String {
    create_key_tagged(kms, &[(ami_share::keys::APPROVAL_TAG, "true")]).await
}

/// A new customer managed key its owner did not approve for ami-share (no approval tag). Returns its ARN.
pub async fn create_unapproved_key(kms: &aws_sdk_kms::Client) -> String {
    create_key_tagged(kms, &[("team", "payroll")]).await
}

async fn create_key_tagged(kms: &aws_sdk_kms::Client, tags: &[(&str, &str)]) -> String {
    let tags = tags.iter().map(|(k, v)| {
        aws_sdk_kms::types::Tag::builder()
            .tag_key(*k)
            .tag_value(*v)
            .build()
            .unwrap()
    });
    kms.create_key()
        .description("ami-share test key")
        .set_tags(Some(tags.collect()))
        .send()
        .await
        .expect("CreateKey")
        .key_metadata()
        .unwrap()
        .arn()
        .unwrap()
        .to_string()
}

pub async fn key_policy(kms: &aws_sdk_kms::Client, key: &str) -> String {
    kms.get_key_policy()
        .key_id(key)
        .policy_name("default")
        .send()
        .await
        .expect("GetKeyPolicy")
        .policy()
        .unwrap()
        .to_string()
}

pub async fn put_key_policy(kms: &aws_sdk_kms::Client, key: &str, policy: &str) {
    kms.put_key_policy()
        .key_id(key)
        .policy_name("default")
        .policy(policy)
        .send()
        .await
        .expect("PutKeyPolicy");
}

/// The snapshot's (encrypted, KMS key id), as DescribeSnapshots reports them.
pub async fn snapshot_encryption(
    ec2: &aws_sdk_ec2::Client,
    snapshot_id: &str,
) -> (bool, Option<String>) {
    let snapshot = describe_snapshot(ec2, snapshot_id).await;
    (
        snapshot.encrypted().unwrap_or(false),
        snapshot.kms_key_id().map(str::to_string),
    )
}

pub fn tags(pairs: &[(&str, &str)]) -> Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// ami-share's copies of `source` in `region` (this account's images marked with it as their source):
/// (image id, tags).
pub async fn copies_of(emulator: &Emulator, region: &str, source: &str) -> Vec<(String, Tags)> {
    let ec2 = emulator.ec2_in(region).await;
    let images = ec2
        .describe_images()
        .owners("self")
        .filters(
            aws_sdk_ec2::types::Filter::builder()
                .name(format!("tag:{}", ami_share::markers::SOURCE_IMAGE))
                .values(source)
                .build(),
        )
        .send()
        .await
        .unwrap();
    images
        .images()
        .iter()
        .map(|i| {
            let tags = i
                .tags()
                .iter()
                .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                .collect();
            (i.image_id().unwrap().to_string(), tags)
        })
        .collect()
}

/// The value of an SSM parameter in `region`, `None` when there is none.
pub async fn ssm_parameter(emulator: &Emulator, region: &str, name: &str) -> Option<String> {
    let ssm = emulator.ssm_in(region).await;
    match ssm.get_parameter().name(name).send().await {
        Ok(out) => out.parameter().and_then(|p| p.value()).map(str::to_string),
        Err(_) => None,
    }
}

/// Who may create volumes from a snapshot: "account=…" or "group=all".
pub async fn volume_permissions(ec2: &aws_sdk_ec2::Client, snapshot_id: &str) -> BTreeSet<String> {
    let output = ec2
        .describe_snapshot_attribute()
        .snapshot_id(snapshot_id)
        .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
        .send()
        .await
        .expect("DescribeSnapshotAttribute");
    output
        .create_volume_permissions()
        .iter()
        .map(|p| match (p.user_id(), p.group()) {
            (Some(id), _) => format!("account={id}"),
            (None, group) => format!("group={}", group.map_or("?", |g| g.as_str())),
        })
        .collect()
}

/// RegisterImage of an AMI whose root device is `snapshot_id` (several AMIs may share one snapshot).
pub async fn register_on_snapshot(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    snapshot_id: &str,
) -> String {
    ec2.register_image()
        .name(name)
        .root_device_name("/dev/sda1")
        .block_device_mappings(
            aws_sdk_ec2::types::BlockDeviceMapping::builder()
                .device_name("/dev/sda1")
                .ebs(
                    aws_sdk_ec2::types::EbsBlockDevice::builder()
                        .snapshot_id(snapshot_id)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .expect("RegisterImage")
        .image_id()
        .unwrap()
        .to_string()
}

/// template.yaml as CloudFormation reads it (intrinsic functions as `Fn::…` objects), via cfn-lint's
/// loader from the test virtualenv.
pub fn template() -> Value {
    let out = std::process::Command::new(python())
        .args([
            "-c",
            "import json, sys\nfrom cfnlint.decode import decode\ntemplate, problems = decode(sys.argv[1])\nassert not problems, problems\nprint(json.dumps(template, default=str))",
        ])
        .arg(repo_path("template.yaml"))
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
