//! Each call of [`Aws`], over the SDK clients.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{
    self as ec2, ImageAttributeName, LaunchPermissionModifications, ResourceType, TagSpecification,
};
use aws_sdk_kms::types::KeyManagerType;

use super::*;
use crate::limits;

/// The policy name KMS uses for a key's one key policy.
pub(super) const DEFAULT_POLICY: &str = "default";

impl Aws for SdkAws {
    async fn describe_image(&self, region: &str, image_id: &str) -> Result<ImageLookup, AwsError> {
        const OP: &str = "DescribeImages";
        let client = self.ec2(region);
        // Owners=self makes AWS answer only for our own images, so ownership needs no account id.
        let own = client
            .describe_images()
            .image_ids(image_id)
            .owners("self")
            .send()
            .await;
        let own = match own {
            Ok(output) => output,
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID.")) => {
                return Ok(ImageLookup::NotFound);
            }
            Err(e) => return Err(aws_error(OP, region, image_id, e)),
        };
        if let Some(image) = own.images().iter().find(|i| i.image_id() == Some(image_id)) {
            return Ok(ImageLookup::Owned(Box::new(observed_image(region, image))));
        }
        // Not ours, or gone: one more call, on this rare path only, to say which.
        let any = client.describe_images().image_ids(image_id).send().await;
        match any {
            Ok(output) => Ok(match output.images().first().and_then(|i| i.owner_id()) {
                Some(owner) => ImageLookup::NotOwned {
                    owner_id: owner.to_string(),
                },
                None => ImageLookup::NotFound,
            }),
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidAMIID.")) => {
                Ok(ImageLookup::NotFound)
            }
            Err(e) => Err(aws_error(OP, region, image_id, e)),
        }
    }

    async fn list_owned_images(&self, region: &str) -> Result<Vec<ObservedImage>, AwsError> {
        let images: Vec<ec2::Image> = self
            .ec2(region)
            .describe_images()
            .owners("self")
            // Pages of 500: the listing of a large account stays a handful of calls.
            .max_results(500)
            .into_paginator()
            .items()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("DescribeImages", region, "images owned by self", e))?;
        Ok(images.iter().map(|i| observed_image(region, i)).collect())
    }

    async fn list_owned_images_among(
        &self,
        region: &str,
        image_ids: &[String],
    ) -> Result<Vec<ObservedImage>, AwsError> {
        let mut images = Vec::new();
        for ids in image_ids.chunks(limits::EC2_FILTER_VALUES) {
            let page: Vec<ec2::Image> = self
                .ec2(region)
                .describe_images()
                .owners("self")
                .filters(filter("image-id", ids))
                .into_paginator()
                .items()
                .send()
                .collect::<Result<_, _>>()
                .await
                .map_err(|e| aws_error("DescribeImages", region, &ids.join(","), e))?;
            images.extend(page.iter().map(|i| observed_image(region, i)));
        }
        Ok(images)
    }

    async fn list_owned_snapshots_among(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        let mut facts = BTreeMap::new();
        for ids in snapshot_ids.chunks(limits::EC2_FILTER_VALUES) {
            let page: Vec<ec2::Snapshot> = self
                .ec2(region)
                .describe_snapshots()
                .owner_ids("self")
                .filters(filter("snapshot-id", ids))
                .into_paginator()
                .items()
                .send()
                .collect::<Result<_, _>>()
                .await
                .map_err(|e| aws_error("DescribeSnapshots", region, &ids.join(","), e))?;
            facts.extend(page.iter().filter_map(snapshot_facts));
        }
        Ok(facts)
    }

    async fn send_messages(
        &self,
        queue_url: &str,
        messages: &[QueuedMessage],
    ) -> Result<(), AwsError> {
        const OP: &str = "SendMessageBatch";
        let region = self.home_region().unwrap_or_default().to_string();
        for batch in messages.chunks(limits::SQS_BATCH_ENTRIES) {
            let entries = batch
                .iter()
                .enumerate()
                .map(|(n, m)| {
                    aws_sdk_sqs::types::SendMessageBatchRequestEntry::builder()
                        .id(n.to_string())
                        .message_body(&m.body)
                        .delay_seconds(m.delay.as_secs().min(limits::SQS_MAX_DELAY_SECONDS) as i32)
                        .build()
                        .expect("id and body are set")
                })
                .collect();
            let output = self
                .sqs()
                .send_message_batch()
                .queue_url(queue_url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| aws_error(OP, &region, queue_url, e))?;
            if let Some(failed) = output.failed().first() {
                return Err(AwsError {
                    operation: OP,
                    region,
                    resource: queue_url.to_string(),
                    code: Some(failed.code().to_string()),
                    message: format!(
                        "{} of {} message(s) not taken: {}",
                        output.failed().len(),
                        batch.len(),
                        failed.message().unwrap_or_default()
                    ),
                    // SQS says whether the sender is at fault; anything else may pass on a retry.
                    retryable: !failed.sender_fault(),
                });
            }
        }
        Ok(())
    }

    async fn images_on_snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<Vec<ObservedImage>, AwsError> {
        let images: Vec<ec2::Image> = self
            .ec2(region)
            .describe_images()
            .owners("self")
            .filters(filter("block-device-mapping.snapshot-id", snapshot_ids))
            .into_paginator()
            .items()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("DescribeImages", region, &snapshot_ids.join(","), e))?;
        Ok(images.iter().map(|i| observed_image(region, i)).collect())
    }

    async fn describe_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
    ) -> Result<BTreeSet<LaunchPermission>, AwsError> {
        let output = self
            .ec2(region)
            .describe_image_attribute()
            .image_id(image_id)
            .attribute(ImageAttributeName::LaunchPermission)
            .send()
            .await
            .map_err(|e| aws_error("DescribeImageAttribute", region, image_id, e))?;
        Ok(output
            .launch_permissions()
            .iter()
            .filter_map(launch_permission)
            .collect())
    }

    async fn describe_snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        let output = self
            .ec2(region)
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshot_ids.to_vec()))
            .send()
            .await
            .map_err(|e| aws_error("DescribeSnapshots", region, &snapshot_ids.join(","), e))?;
        Ok(output
            .snapshots()
            .iter()
            .filter_map(snapshot_facts)
            .collect())
    }

    async fn list_owned_snapshots(
        &self,
        region: &str,
    ) -> Result<BTreeMap<String, SnapshotFacts>, AwsError> {
        let snapshots: Vec<ec2::Snapshot> = self
            .ec2(region)
            .describe_snapshots()
            .owner_ids("self")
            // Pages of 1,000: the snapshots of a large account stay a handful of calls.
            .max_results(1000)
            .into_paginator()
            .items()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("DescribeSnapshots", region, "snapshots owned by self", e))?;
        Ok(snapshots.iter().filter_map(snapshot_facts).collect())
    }

    async fn create_tags(
        &self,
        region: &str,
        resources: &[String],
        tags: &Tags,
    ) -> Result<(), AwsError> {
        self.ec2(region)
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(sdk_tags(tags)))
            .send()
            .await
            .map_err(|e| aws_error("CreateTags", region, &resources.join(","), e))?;
        Ok(())
    }

    async fn add_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
        permissions: &[LaunchPermission],
    ) -> Result<(), AwsError> {
        let add = permissions.iter().map(sdk_launch_permission).collect();
        let change = LaunchPermissionModifications::builder().set_add(Some(add));
        self.modify_launch_permissions(region, image_id, change.build())
            .await
    }

    async fn image_block_public_access(&self, region: &str) -> Result<bool, AwsError> {
        let output = self
            .ec2(region)
            .get_image_block_public_access_state()
            .send()
            .await
            .map_err(|e| aws_error("GetImageBlockPublicAccessState", region, region, e))?;
        // "unblocked" lets new public sharing; "block-new-sharing" (and anything newer) does not.
        Ok(output.image_block_public_access_state() != Some("unblocked"))
    }

    async fn remove_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
        permissions: &[LaunchPermission],
    ) -> Result<(), AwsError> {
        let remove = permissions.iter().map(sdk_launch_permission).collect();
        let change = LaunchPermissionModifications::builder().set_remove(Some(remove));
        self.modify_launch_permissions(region, image_id, change.build())
            .await
    }

    async fn find_copies(
        &self,
        region: &str,
        source_region: &str,
        source_image_id: &str,
        kind: CopyKind,
    ) -> Result<Vec<ObservedImage>, AwsError> {
        let tag_filter =
            |key: &str, value: &str| filter(format!("tag:{key}"), &[value.to_string()]);
        let images: Vec<ec2::Image> = self
            .ec2(region)
            .describe_images()
            .owners("self")
            .filters(tag_filter(markers::SOURCE_IMAGE, source_image_id))
            .filters(tag_filter(markers::SOURCE_REGION, source_region))
            .filters(tag_filter(markers::COPY_KIND, kind.as_str()))
            .into_paginator()
            .items()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("DescribeImages", region, source_image_id, e))?;
        Ok(images.iter().map(|i| observed_image(region, i)).collect())
    }

    async fn copy_image(&self, copy: &ImageCopy) -> Result<String, AwsError> {
        let region = copy.region.as_str();
        let mut specs = vec![
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .set_tags(Some(sdk_tags(&copy.tags)))
                .build(),
        ];
        if !copy.snapshot_tags.is_empty() {
            specs.push(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .set_tags(Some(sdk_tags(&copy.snapshot_tags)))
                    .build(),
            );
        }
        let mut request = self
            .ec2(region)
            .copy_image()
            .source_image_id(&copy.source_image_id)
            .source_region(&copy.source_region)
            .name(&copy.name)
            .client_token(&copy.client_token)
            .set_tag_specifications(Some(specs));
        if !copy.description.is_empty() {
            request = request.description(&copy.description);
        }
        if let Some(key) = &copy.kms_key_arn {
            request = request.encrypted(true).kms_key_id(key);
        }
        let output = request
            .send()
            .await
            .map_err(|e| aws_error("CopyImage", region, &copy.source_image_id, e))?;
        output.image_id().map(str::to_string).ok_or_else(|| {
            incomplete_answer(
                "CopyImage",
                region,
                &copy.source_image_id,
                "the new image id",
            )
        })
    }

    async fn describe_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
    ) -> Result<BTreeSet<VolumePermission>, AwsError> {
        let output = self
            .ec2(region)
            .describe_snapshot_attribute()
            .snapshot_id(snapshot_id)
            .attribute(ec2::SnapshotAttributeName::CreateVolumePermission)
            .send()
            .await
            .map_err(|e| aws_error("DescribeSnapshotAttribute", region, snapshot_id, e))?;
        Ok(output
            .create_volume_permissions()
            .iter()
            .filter_map(|p| match (p.user_id(), p.group()) {
                (Some(id), _) => id.parse().ok().map(VolumePermission::Account),
                (None, Some(ec2::PermissionGroup::All)) => Some(VolumePermission::Public),
                _ => None,
            })
            .collect())
    }

    async fn remove_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
        permissions: &[VolumePermission],
    ) -> Result<(), AwsError> {
        let accounts: Vec<String> = permissions
            .iter()
            .filter_map(|p| match p {
                VolumePermission::Account(id) => Some(id.as_str().to_string()),
                VolumePermission::Public => None,
            })
            .collect();
        let public = permissions.contains(&VolumePermission::Public);
        let mut request = self
            .ec2(region)
            .modify_snapshot_attribute()
            .snapshot_id(snapshot_id)
            .attribute(ec2::SnapshotAttributeName::CreateVolumePermission)
            .operation_type(ec2::OperationType::Remove);
        if !accounts.is_empty() {
            request = request.set_user_ids(Some(accounts));
        }
        if public {
            request = request.group_names("all");
        }
        request
            .send()
            .await
            .map_err(|e| aws_error("ModifySnapshotAttribute", region, snapshot_id, e))?;
        Ok(())
    }

    async fn add_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
        accounts: &[String],
    ) -> Result<(), AwsError> {
        // The OperationType + UserIds form: AWS documents it beside CreateVolumePermission.Add, and it
        // is the one the emulator implements.
        self.ec2(region)
            .modify_snapshot_attribute()
            .snapshot_id(snapshot_id)
            .attribute(ec2::SnapshotAttributeName::CreateVolumePermission)
            .operation_type(ec2::OperationType::Add)
            .set_user_ids(Some(accounts.to_vec()))
            .send()
            .await
            .map_err(|e| aws_error("ModifySnapshotAttribute", region, snapshot_id, e))?;
        Ok(())
    }

    async fn enable_image_deprecation(
        &self,
        region: &str,
        image_id: &str,
        deprecate_at: Timestamp,
    ) -> Result<(), AwsError> {
        self.ec2(region)
            .enable_image_deprecation()
            .image_id(image_id)
            .deprecate_at(aws_smithy_types::DateTime::from_secs(deprecate_at.secs()))
            .send()
            .await
            .map_err(|e| aws_error("EnableImageDeprecation", region, image_id, e))?;
        Ok(())
    }

    async fn enable_image_deregistration_protection(
        &self,
        region: &str,
        image_id: &str,
        with_cooldown: bool,
    ) -> Result<(), AwsError> {
        self.ec2(region)
            .enable_image_deregistration_protection()
            .image_id(image_id)
            .with_cooldown(with_cooldown)
            .send()
            .await
            .map_err(|e| aws_error("EnableImageDeregistrationProtection", region, image_id, e))?;
        Ok(())
    }

    async fn get_parameter(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Option<StoredParameter>, AwsError> {
        match self.ssm(region).get_parameter().name(name).send().await {
            Ok(output) => Ok(output.parameter().and_then(|p| {
                Some(StoredParameter {
                    value: p.value()?.to_string(),
                    version: p.version(),
                })
            })),
            Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(aws_error("GetParameter", region, name, e)),
        }
    }

    async fn put_parameter(
        &self,
        region: &str,
        name: &str,
        image_id: &str,
    ) -> Result<i64, AwsError> {
        let output = self
            .ssm(region)
            .put_parameter()
            .name(name)
            .value(image_id)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .map_err(|e| aws_error("PutParameter", region, name, e))?;
        Ok(output.version())
    }

    async fn parameter_history(
        &self,
        region: &str,
        name: &str,
    ) -> Result<Vec<StoredParameter>, AwsError> {
        // SSM keeps a parameter's last 100 versions: two pages of 50 at most.
        let pages: Vec<_> = self
            .ssm(region)
            .get_parameter_history()
            .name(name)
            .max_results(50)
            .into_paginator()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("GetParameterHistory", region, name, e))?;
        let mut versions: Vec<StoredParameter> = pages
            .iter()
            .flat_map(|page: &aws_sdk_ssm::operation::get_parameter_history::GetParameterHistoryOutput| page.parameters())
            .filter_map(|p| {
                Some(StoredParameter {
                    value: p.value()?.to_string(),
                    version: p.version(),
                })
            })
            .collect();
        versions.sort_by_key(|p| p.version);
        Ok(versions)
    }

    async fn describe_key(&self, region: &str, key: &str) -> Result<Option<ObservedKey>, AwsError> {
        let output = match self.kms(region).describe_key().key_id(key).send().await {
            Ok(output) => output,
            Err(e) if e.code() == Some("NotFoundException") => return Ok(None),
            Err(e) => return Err(aws_error("DescribeKey", region, key, e)),
        };
        let metadata = output.key_metadata();
        let arn = metadata
            .and_then(|m| m.arn())
            .ok_or_else(|| incomplete_answer("DescribeKey", region, key, "the key's ARN"))?;
        Ok(Some(ObservedKey {
            arn: arn.to_string(),
            manager: match metadata.and_then(|m| m.key_manager()) {
                Some(KeyManagerType::Aws) => KeyManager::Aws,
                Some(KeyManagerType::Customer) => KeyManager::Customer,
                other => KeyManager::Other(other.map_or("(none)", |m| m.as_str()).to_string()),
            },
            state: metadata
                .and_then(|m| m.key_state())
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            policy: None,
            tags: None,
            aliases: Vec::new(),
        }))
    }

    async fn list_key_tags(&self, region: &str, key_arn: &str) -> Result<Tags, AwsError> {
        let tags: Vec<aws_sdk_kms::types::Tag> = self
            .kms(region)
            .list_resource_tags()
            .key_id(key_arn)
            .into_paginator()
            .items()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("ListResourceTags", region, key_arn, e))?;
        Ok(tags.into_iter().map(|t| (t.tag_key, t.tag_value)).collect())
    }

    async fn list_key_aliases(&self, region: &str, key_arn: &str) -> Result<Vec<String>, AwsError> {
        let aliases: Vec<aws_sdk_kms::types::AliasListEntry> = self
            .kms(region)
            .list_aliases()
            .key_id(key_arn)
            .into_paginator()
            .items()
            .send()
            .collect::<Result<_, _>>()
            .await
            .map_err(|e| aws_error("ListAliases", region, key_arn, e))?;
        Ok(aliases
            .iter()
            .filter_map(|a| a.alias_name().map(str::to_string))
            .collect())
    }

    async fn get_key_policy(&self, region: &str, key_arn: &str) -> Result<String, AwsError> {
        let output = self
            .kms(region)
            .get_key_policy()
            .key_id(key_arn)
            .policy_name(DEFAULT_POLICY)
            .send()
            .await
            .map_err(|e| aws_error("GetKeyPolicy", region, key_arn, e))?;
        // Never merge into a policy KMS did not give: the result would lack the owner's statements.
        output
            .policy()
            .map(str::to_string)
            .ok_or_else(|| incomplete_answer("GetKeyPolicy", region, key_arn, "the policy"))
    }

    async fn put_key_policy(
        &self,
        region: &str,
        key_arn: &str,
        policy: &str,
    ) -> Result<(), AwsError> {
        self.kms(region)
            .put_key_policy()
            .key_id(key_arn)
            .policy_name(DEFAULT_POLICY)
            .policy(policy)
            .send()
            .await
            .map_err(|e| aws_error("PutKeyPolicy", region, key_arn, e))?;
        Ok(())
    }
}
