//! An in-memory AWS account (images, snapshots, keys, parameters, in two regions) that records every
//! call and fails chosen ones, and the builders of configs and events the reconciler's and the sweep's
//! tests share.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use crate::aws::{Aws, AwsError, ImageLookup, QueuedMessage, StoredParameter};
use crate::config::Config;
use crate::markers;
use crate::markers::CopyKind;
pub use crate::observed::{
    CreatedBy, ImageState, KeyManager, ObservedImage, ObservedKey, Protection,
};
use crate::observed::{ObservedSnapshot, SnapshotFacts, SourceImage, Tags};
use crate::outcome::Outcome;
use crate::plan::ImageCopy;
pub use crate::reconcile::{KeyPolicyWrites, Mode, Reconciler};
pub use crate::targets::{LaunchPermission, VolumePermission};
pub use crate::time::Timestamp;
use crate::trigger::ImageRef;
use crate::trigger::{EventKind, ImageEvent};

pub const REGION: &str = "eu-west-1";
pub const IMAGE: &str = "ami-12345678";
pub const CMK: &str = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
pub const AWS_EBS: &str =
    "arn:aws:kms:eu-west-1:123456789012:key/99999999-12ab-34cd-56ef-1234567890ab";
/// Another region, with its own key under the same alias.
pub const WEST: &str = "us-west-2";
pub const WEST_KEY: &str =
    "arn:aws:kms:us-west-2:123456789012:key/55555555-12ab-34cd-56ef-1234567890ab";
pub const COPY_KEY: &str =
    "arn:aws:kms:eu-west-1:123456789012:key/77777777-12ab-34cd-56ef-1234567890ab";
pub const DEFAULT_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"Enable IAM User Permissions","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"}]}"#;

#[derive(Default)]
pub struct FakeState {
    pub images: BTreeMap<String, ObservedImage>,
    pub snapshots: BTreeMap<String, SnapshotFacts>,
    pub keys: BTreeMap<String, ObservedKey>,
    /// (region, alias) → key ARN.
    pub aliases: BTreeMap<(String, String), String>,
    /// Puts after which a "concurrent writer" puts back the policy it read before them.
    pub overwrites_left: usize,
    /// CopyImage client tokens and the copies they made (as EC2, a token names its copy for good, even
    /// once the copy is deregistered).
    pub copy_tokens: BTreeMap<String, String>,
    /// The name each token was used with: as EC2, the token with another name is refused.
    pub copy_token_names: BTreeMap<String, String>,
    /// DescribeImages does not list a new copy for this many reads (EC2's eventual consistency).
    pub unlisted_reads: usize,
    /// Every copy is deregistered as soon as it is made (a cleanup job racing ami-share).
    pub lose_copies: bool,
    /// Snapshot id → who has createVolumePermission.
    pub volume_permissions: BTreeMap<String, BTreeSet<VolumePermission>>,
    /// (region, name) → value.
    pub parameters: BTreeMap<(String, String), Vec<StoredParameter>>,
    /// Messages sent to the work queue.
    pub queued: Vec<QueuedMessage>,
}

/// An in-memory AWS account in one region: images, snapshots, keys. Records every call and can fail
/// chosen operations.
pub struct FakeAws {
    pub state: Mutex<FakeState>,
    pub calls: Mutex<Vec<&'static str>>,
    /// The region of each call in `calls`.
    pub regions_called: Mutex<Vec<String>>,
    pub failing: Vec<&'static str>,
    /// Regions where every call fails (throttled).
    pub failing_regions: Vec<&'static str>,
    /// (operation, region): that call fails in that region only.
    pub failing_in: Vec<(&'static str, &'static str)>,
}

impl FakeAws {
    /// One image, `golden-1`, its snapshot `snap-1` encrypted with `key` (`None`: unencrypted).
    pub fn new(state: ImageState, key: Option<&str>) -> Self {
        let image = ObservedImage {
            image_id: IMAGE.into(),
            region: REGION.into(),
            name: Some("golden-1".into()),
            owner_id: "123456789012".into(),
            state,
            tags: Tags::new(),
            created_by: CreatedBy::CreateImage,
            snapshots: vec![ObservedSnapshot {
                snapshot_id: "snap-1".into(),
                encrypted: Some(key.is_some()),
                kms_key_id: None,
                tags: None,
                create_volume_permissions: None,
                other_images: None,
            }],
            launch_permissions: Some(BTreeSet::new()),
            creation_date: Timestamp::parse("2026-11-25T10:00:00.000Z"),
            ..ObservedImage::default()
        };
        let mut fake = FakeState::default();
        fake.images.insert(IMAGE.into(), image);
        fake.snapshots.insert(
            "snap-1".into(),
            SnapshotFacts {
                tags: Tags::new(),
                encrypted: key.is_some(),
                kms_key_id: key.map(str::to_string),
            },
        );
        // CMK's owner tagged it for ami-share; the keys behind alias/ami-share are approved by the
        // configs that name that alias (reencrypt.kms_key, copy.regions).
        let approved: Tags = [(
            crate::keys::APPROVAL_TAG.to_string(),
            crate::keys::APPROVAL_TAG_VALUE.to_string(),
        )]
        .into();
        for (arn, manager, tags) in [
            (CMK, KeyManager::Customer, approved),
            (AWS_EBS, KeyManager::Aws, Tags::new()),
            (COPY_KEY, KeyManager::Customer, Tags::new()),
            (WEST_KEY, KeyManager::Customer, Tags::new()),
        ] {
            fake.keys.insert(
                arn.into(),
                ObservedKey {
                    arn: arn.into(),
                    manager,
                    state: "Enabled".into(),
                    policy: Some(DEFAULT_POLICY.into()),
                    tags: Some(tags),
                    aliases: Vec::new(),
                },
            );
        }
        fake.aliases
            .insert((REGION.into(), "alias/ami-share".into()), COPY_KEY.into());
        fake.aliases
            .insert((WEST.into(), "alias/ami-share".into()), WEST_KEY.into());
        Self {
            state: Mutex::new(fake),
            calls: Mutex::new(Vec::new()),
            regions_called: Mutex::new(Vec::new()),
            failing: Vec::new(),
            failing_regions: Vec::new(),
            failing_in: Vec::new(),
        }
    }

    pub fn call(&self, operation: &'static str, region: &str) -> Result<(), AwsError> {
        self.calls.lock().unwrap().push(operation);
        self.regions_called.lock().unwrap().push(region.to_string());
        if self.failing.contains(&operation)
            || self.failing_regions.contains(&region)
            || self.failing_in.contains(&(operation, region))
        {
            return Err(AwsError {
                operation,
                region: region.into(),
                resource: "x".into(),
                code: Some("RequestLimitExceeded".into()),
                message: "slow down".into(),
                retryable: true,
            });
        }
        Ok(())
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().unwrap().clone()
    }

    pub fn writes(&self) -> Vec<&'static str> {
        self.calls()
            .into_iter()
            .filter(|c| !["Describe", "Get", "List"].iter().any(|p| c.starts_with(p)))
            .collect()
    }

    pub fn image(&self, id: &str) -> ObservedImage {
        self.state.lock().unwrap().images[id].clone()
    }

    /// A parameter's value now (its newest version).
    pub fn parameter(&self, region: &str, name: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        let versions = state
            .parameters
            .get(&(region.to_string(), name.to_string()))?;
        versions.last().map(|v| v.value.clone())
    }

    pub fn policy(&self, arn: &str) -> String {
        self.state.lock().unwrap().keys[arn].policy.clone().unwrap()
    }

    /// The id of the one image besides IMAGE (the copy a test made).
    pub fn only_copy(&self) -> String {
        let state = self.state.lock().unwrap();
        let mut others = state.images.keys().filter(|id| *id != IMAGE);
        let copy = others.next().expect("a copy").clone();
        assert!(others.next().is_none(), "one copy");
        copy
    }

    /// Someone deregisters the image: EC2 no longer lists it.
    pub fn deregister(&self, id: &str) {
        self.state
            .lock()
            .unwrap()
            .images
            .remove(id)
            .expect("an image");
    }

    pub fn set_state(&self, id: &str, state: ImageState) {
        self.state.lock().unwrap().images.get_mut(id).unwrap().state = state;
    }
}

impl Aws for FakeAws {
    async fn describe_image(&self, region: &str, id: &str) -> Result<ImageLookup, AwsError> {
        self.call("DescribeImages", region)?;
        let mut state = self.state.lock().unwrap();
        if state.unlisted_reads > 0 && state.copy_tokens.values().any(|c| c == id) {
            state.unlisted_reads -= 1;
            return Ok(ImageLookup::NotFound);
        }
        Ok(match state.images.get(id).filter(|i| i.region == region) {
            Some(image) => {
                let mut image = image.clone();
                image.launch_permissions = None;
                ImageLookup::Owned(Box::new(image))
            }
            None => ImageLookup::NotFound,
        })
    }
    async fn list_owned_images(&self, region: &str) -> Result<Vec<ObservedImage>, AwsError> {
        self.call("DescribeImages", region)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .images
            .values()
            .filter(|i| i.region == region)
            .map(|i| ObservedImage {
                launch_permissions: None,
                ..i.clone()
            })
            .collect())
    }
    async fn list_owned_images_among(
        &self,
        region: &str,
        image_ids: &[String],
    ) -> Result<Vec<ObservedImage>, AwsError> {
        Ok(self
            .list_owned_images(region)
            .await?
            .into_iter()
            .filter(|i| image_ids.contains(&i.image_id))
            .collect())
    }
    async fn list_owned_snapshots_among(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        let mut snapshots = self.list_owned_snapshots(region).await?;
        snapshots.retain(|id, _| snapshot_ids.contains(id));
        Ok(snapshots)
    }
    async fn send_messages(
        &self,
        _queue_url: &str,
        messages: &[QueuedMessage],
    ) -> Result<(), AwsError> {
        self.call("SendMessageBatch", REGION)?;
        self.state
            .lock()
            .unwrap()
            .queued
            .extend(messages.iter().cloned());
        Ok(())
    }
    async fn images_on_snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<Vec<ObservedImage>, AwsError> {
        self.call("DescribeImages", region)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .images
            .values()
            .filter(|i| {
                i.region == region
                    && i.snapshots
                        .iter()
                        .any(|s| snapshot_ids.contains(&s.snapshot_id))
            })
            .cloned()
            .collect())
    }
    async fn describe_launch_permissions(
        &self,
        region: &str,
        id: &str,
    ) -> Result<BTreeSet<LaunchPermission>, AwsError> {
        self.call("DescribeImageAttribute", region)?;
        Ok(self.image(id).launch_permissions.unwrap_or_default())
    }
    async fn describe_snapshots(
        &self,
        region: &str,
        ids: &[String],
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        self.call("DescribeSnapshots", region)?;
        let state = self.state.lock().unwrap();
        Ok(ids
            .iter()
            .filter_map(|id| Some((id.clone(), state.snapshots.get(id)?.clone())))
            .collect())
    }
    async fn list_owned_snapshots(
        &self,
        region: &str,
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        self.call("DescribeSnapshots", region)?;
        Ok(self.state.lock().unwrap().snapshots.clone())
    }
    async fn create_tags(
        &self,
        region: &str,
        resources: &[String],
        tags: &Tags,
    ) -> Result<(), AwsError> {
        self.call("CreateTags", region)?;
        let mut state = self.state.lock().unwrap();
        for r in resources {
            if let Some(image) = state.images.get_mut(r) {
                image.tags.extend(tags.clone());
            } else {
                state
                    .snapshots
                    .get_mut(r)
                    .unwrap()
                    .tags
                    .extend(tags.clone());
            }
        }
        Ok(())
    }
    async fn add_launch_permissions(
        &self,
        region: &str,
        id: &str,
        permissions: &[LaunchPermission],
    ) -> Result<(), AwsError> {
        self.call("ModifyImageAttribute", region)?;
        let mut state = self.state.lock().unwrap();
        let image = state.images.get_mut(id).unwrap();
        assert_eq!(
            image.state,
            ImageState::Available,
            "EC2 shares only available images"
        );
        image
            .launch_permissions
            .get_or_insert_default()
            .extend(permissions.iter().cloned());
        Ok(())
    }
    async fn image_block_public_access(&self, region: &str) -> Result<bool, AwsError> {
        self.call("GetImageBlockPublicAccessState", region)?;
        Ok(false)
    }
    async fn remove_launch_permissions(
        &self,
        region: &str,
        id: &str,
        permissions: &[LaunchPermission],
    ) -> Result<(), AwsError> {
        self.call("ModifyImageAttribute", region)?;
        let mut state = self.state.lock().unwrap();
        let image = state.images.get_mut(id).unwrap();
        let have = image.launch_permissions.get_or_insert_default();
        for p in permissions {
            have.remove(p);
        }
        Ok(())
    }
    async fn find_copies(
        &self,
        region: &str,
        source_region: &str,
        source: &str,
        kind: CopyKind,
    ) -> Result<Vec<ObservedImage>, AwsError> {
        self.call("DescribeImages", region)?;
        let state = self.state.lock().unwrap();
        let marks = markers::copy_tags(kind, source, source_region);
        Ok(state
            .images
            .values()
            .filter(|i| i.region == region && marks.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
            .map(|i| ObservedImage {
                launch_permissions: None,
                ..i.clone()
            })
            .collect())
    }
    async fn copy_image(&self, copy: &ImageCopy) -> Result<String, AwsError> {
        self.call("CopyImage", &copy.region)?;
        let mut state = self.state.lock().unwrap();
        // As EC2: a repeated client token returns the copy it made, with other parameters it is refused;
        // AMI names are unique.
        if let Some(id) = state.copy_tokens.get(&copy.client_token) {
            if state.copy_token_names.get(&copy.client_token) != Some(&copy.name) {
                return Err(AwsError {
                    operation: "CopyImage",
                    region: copy.region.clone(),
                    resource: copy.source_image_id.clone(),
                    code: Some("IdempotentParameterMismatch".into()),
                    message: "The client token was already used with other parameters.".into(),
                    retryable: true,
                });
            }
            return Ok(id.clone());
        }
        if state
            .images
            .values()
            .any(|i| i.name.as_deref() == Some(&copy.name))
        {
            return Err(AwsError {
                operation: "CopyImage",
                region: copy.region.clone(),
                resource: copy.source_image_id.clone(),
                code: Some("InvalidAMIName.Duplicate".into()),
                message: format!("AMI name {} is already in use", copy.name),
                retryable: false,
            });
        }
        // A new id, never one a deregistered copy had (EC2 never reuses one).
        let id = (state.images.len()..)
            .map(|n| format!("ami-c{n:07}"))
            .find(|id| {
                !state.images.contains_key(id) && !state.copy_tokens.values().any(|v| v == id)
            })
            .unwrap();
        state
            .copy_tokens
            .insert(copy.client_token.clone(), id.clone());
        state
            .copy_token_names
            .insert(copy.client_token.clone(), copy.name.clone());
        let snapshot = format!("snap-{id}");
        let mut image = state.images[&copy.source_image_id].clone();
        image.image_id = id.clone();
        image.region = copy.region.clone();
        image.name = Some(copy.name.clone());
        image.state = ImageState::Pending;
        image.tags = copy.tags.clone();
        image.created_by = CreatedBy::CopyImage;
        // As EC2 records every copy's source.
        image.source = Some(SourceImage {
            image_id: copy.source_image_id.clone(),
            region: Some(copy.source_region.clone()),
        });
        image.launch_permissions = Some(BTreeSet::new());
        image.snapshots = vec![ObservedSnapshot {
            snapshot_id: snapshot.clone(),
            encrypted: Some(true),
            kms_key_id: None,
            tags: None,
            create_volume_permissions: None,
            other_images: None,
        }];
        if !state.lose_copies {
            state.images.insert(id.clone(), image);
        }
        state.snapshots.insert(
            snapshot,
            SnapshotFacts {
                tags: copy.snapshot_tags.clone(),
                encrypted: true,
                kms_key_id: copy.kms_key_arn.clone(),
            },
        );
        Ok(id)
    }
    async fn describe_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
    ) -> Result<BTreeSet<VolumePermission>, AwsError> {
        self.call("DescribeSnapshotAttribute", region)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .volume_permissions
            .get(snapshot_id)
            .cloned()
            .unwrap_or_default())
    }
    async fn remove_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
        permissions: &[VolumePermission],
    ) -> Result<(), AwsError> {
        self.call("ModifySnapshotAttribute", region)?;
        let mut state = self.state.lock().unwrap();
        if let Some(have) = state.volume_permissions.get_mut(snapshot_id) {
            for p in permissions {
                have.remove(p);
            }
        }
        Ok(())
    }
    async fn add_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
        accounts: &[String],
    ) -> Result<(), AwsError> {
        self.call("ModifySnapshotAttribute", region)?;
        let mut state = self.state.lock().unwrap();
        let have = state
            .volume_permissions
            .entry(snapshot_id.to_string())
            .or_default();
        have.extend(
            accounts
                .iter()
                .map(|a| VolumePermission::Account(a.parse().unwrap())),
        );
        Ok(())
    }
    async fn enable_image_deprecation(
        &self,
        region: &str,
        image_id: &str,
        at: Timestamp,
    ) -> Result<(), AwsError> {
        self.call("EnableImageDeprecation", region)?;
        let mut state = self.state.lock().unwrap();
        state.images.get_mut(image_id).unwrap().deprecation_time = Some(at);
        Ok(())
    }
    async fn enable_image_deregistration_protection(
        &self,
        region: &str,
        image_id: &str,
        with_cooldown: bool,
    ) -> Result<(), AwsError> {
        self.call("EnableImageDeregistrationProtection", region)?;
        let mut state = self.state.lock().unwrap();
        state.images.get_mut(image_id).unwrap().protection = match with_cooldown {
            true => Protection::WithCooldown,
            false => Protection::On,
        };
        Ok(())
    }
    async fn get_parameter(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Option<StoredParameter>, AwsError> {
        self.call("GetParameter", region)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .parameters
            .get(&(region.to_string(), name.to_string()))
            .and_then(|versions| versions.last().cloned()))
    }
    async fn put_parameter(
        &self,
        region: &str,
        name: &str,
        image_id: &str,
    ) -> Result<i64, AwsError> {
        self.call("PutParameter", region)?;
        let mut state = self.state.lock().unwrap();
        let versions = state
            .parameters
            .entry((region.to_string(), name.to_string()))
            .or_default();
        let version = versions.last().map_or(1, |v| v.version + 1);
        versions.push(StoredParameter {
            value: image_id.to_string(),
            version,
        });
        Ok(version)
    }
    async fn parameter_history(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Vec<StoredParameter>, AwsError> {
        self.call("GetParameterHistory", region)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .parameters
            .get(&(region.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default())
    }
    async fn describe_key(&self, region: &str, key: &str) -> Result<Option<ObservedKey>, AwsError> {
        self.call("DescribeKey", region)?;
        let state = self.state.lock().unwrap();
        let arn = state
            .aliases
            .get(&(region.to_string(), key.to_string()))
            .map(String::as_str)
            .unwrap_or(key);
        Ok(state.keys.get(arn).map(|k| ObservedKey {
            policy: None,
            tags: None,
            ..k.clone()
        }))
    }
    async fn list_key_tags(&self, region: &str, arn: &str) -> Result<Tags, AwsError> {
        self.call("ListResourceTags", region)?;
        let state = self.state.lock().unwrap();
        Ok(state.keys[arn].tags.clone().unwrap_or_default())
    }
    async fn list_key_aliases(&self, region: &str, arn: &str) -> Result<Vec<String>, AwsError> {
        self.call("ListAliases", region)?;
        let state = self.state.lock().unwrap();
        Ok(state
            .aliases
            .iter()
            .filter(|((r, _), key)| r == region && key.as_str() == arn)
            .map(|((_, alias), _)| alias.clone())
            .collect())
    }
    async fn get_key_policy(&self, region: &str, arn: &str) -> Result<String, AwsError> {
        self.call("GetKeyPolicy", region)?;
        Ok(self.policy(arn))
    }
    async fn put_key_policy(&self, region: &str, arn: &str, policy: &str) -> Result<(), AwsError> {
        self.call("PutKeyPolicy", region)?;
        let mut state = self.state.lock().unwrap();
        let before = state.keys[arn].policy.clone();
        let overwritten = state.overwrites_left > 0;
        if overwritten {
            state.overwrites_left -= 1;
        }
        let key = state.keys.get_mut(arn).unwrap();
        // A concurrent writer that read the policy before this write lands its own after it.
        key.policy = if overwritten {
            before
        } else {
            Some(policy.into())
        };
        Ok(())
    }
}

pub fn config(text: &str) -> Config {
    Config::parse(text).unwrap()
}

pub fn sharing_config() -> Config {
    config(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\n",
    )
}

pub fn reencrypting_config() -> Config {
    config(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\nreencrypt.kms_key = \"alias/ami-share\"\n",
    )
}

pub fn event(kind: EventKind) -> ImageEvent {
    event_for(IMAGE, kind)
}

pub fn event_for(image_id: &str, kind: EventKind) -> ImageEvent {
    ImageEvent {
        image: ImageRef {
            region: None,
            image_id: image_id.into(),
        },
        kind,
        account: None,
        event_id: None,
    }
}

pub async fn run(aws: &FakeAws, config: &Config, event: &ImageEvent, mode: Mode) -> Outcome {
    reconciler(aws, config, mode).reconcile(event).await
}

pub async fn apply(aws: &FakeAws, config: &Config) -> Outcome {
    run(aws, config, &event(EventKind::Direct), Mode::Apply).await
}

pub fn partner() -> BTreeSet<LaunchPermission> {
    [LaunchPermission::Account("210987654321".parse().unwrap())].into()
}

pub fn reconciler<'a>(aws: &'a FakeAws, config: &'a Config, mode: Mode) -> Reconciler<'a, FakeAws> {
    Reconciler::new(config, aws, REGION, mode)
        .with_key_policy_writes(KeyPolicyWrites {
            max_writes: 3,
            recheck_after: Some(std::time::Duration::ZERO),
        })
        .with_copy_read_back(&[])
}

/// The source in REGION, unencrypted, and ami-share's available copy of it in WEST, encrypted with the
/// WEST key, not yet shared.
pub fn with_west_copy() -> FakeAws {
    let aws = FakeAws::new(ImageState::Available, None);
    let mut state = aws.state.lock().unwrap();
    let mut copy = state.images[IMAGE].clone();
    copy.image_id = "ami-0west".into();
    copy.region = WEST.into();
    copy.tags = markers::copy_tags(CopyKind::Regional, IMAGE, REGION);
    copy.created_by = CreatedBy::CopyImage;
    copy.source = Some(SourceImage {
        image_id: IMAGE.into(),
        region: Some(REGION.into()),
    });
    copy.snapshots[0].snapshot_id = "snap-west".into();
    copy.snapshots[0].encrypted = Some(true);
    state.images.insert("ami-0west".into(), copy);
    state.snapshots.insert(
        "snap-west".into(),
        SnapshotFacts {
            tags: Tags::new(),
            encrypted: true,
            kms_key_id: Some(WEST_KEY.into()),
        },
    );
    drop(state);
    aws
}

pub fn distributing_config() -> Config {
    config(&format!(
        "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\nshare.accounts = [\"210987654321\"]\nssm_parameter = \"/ami-share/{{rule}}/latest\"\ncopy.regions = [{{ region = \"{WEST}\", kms_key = \"alias/ami-share\" }}]\n"
    ))
}

pub fn west_event(image_id: &str) -> ImageEvent {
    ImageEvent {
        image: ImageRef {
            region: Some(WEST.into()),
            image_id: image_id.into(),
        },
        kind: EventKind::StateChange {
            state: ImageState::Available,
        },
        account: None,
        event_id: None,
    }
}

/// `with_west_copy`, but the copy in WEST is a scratch AMI someone tagged with the copy's marks: EC2
/// records `source` (`None`: none) as what it was made from.
pub fn with_forged_west_copy(source: Option<&str>) -> FakeAws {
    let aws = with_west_copy();
    let mut state = aws.state.lock().unwrap();
    let forged = state.images.get_mut("ami-0west").unwrap();
    forged.name = Some("scratch-1".into());
    // Registered from a snapshot (no source), or a copy of another image.
    forged.created_by = match source {
        None => CreatedBy::RegisterImage,
        Some(_) => CreatedBy::CopyImage,
    };
    forged.source = source.map(|id| SourceImage {
        image_id: id.into(),
        region: Some(REGION.into()),
    });
    drop(state);
    aws
}
