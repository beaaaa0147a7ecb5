//! [`Aws`] over aws-sdk-ec2, aws-sdk-kms and aws-sdk-ssm: one client per service and region, made once
//! and reused across invocations.
//!
//! The SDK retries throttling and transient errors itself (standard retry mode); what reaches here is
//! final for this invocation and is classified as retryable or not for the caller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use aws_config::SdkConfig;
use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    self as ec2, Filter, ImageAttributeName, LaunchPermissionModifications, ResourceType,
    TagSpecification,
};
use aws_sdk_kms::types::KeyManagerType;

use super::{Aws, AwsError, ImageLookup};
use crate::config::CreatedBy;
use crate::markers::{self, CopyKind};
use crate::observed::{
    ImageState, KeyManager, ObservedImage, ObservedKey, ObservedSnapshot, SnapshotFacts,
    SourceImage, Tags,
};
use crate::plan::ImageCopy;
use crate::targets::{LaunchPermission, VolumePermission};

/// Clients of one service, one per region, built on demand from the shared SDK config.
struct RegionalClients<C> {
    clients: Mutex<HashMap<String, C>>,
    build: fn(&SdkConfig, Region) -> C,
}

impl<C: Clone> RegionalClients<C> {
    fn new(build: fn(&SdkConfig, Region) -> C) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            build,
        }
    }

    fn get(&self, base: &SdkConfig, region: &str) -> C {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| (self.build)(base, Region::new(region.to_string())))
            .clone()
    }

    fn insert(&self, region: &str, client: C) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients.insert(region.to_string(), client);
    }
}

/// EC2, KMS and SSM clients built from one shared SDK config (credentials, retry, endpoint).
pub struct SdkAws {
    base: SdkConfig,
    ec2: RegionalClients<aws_sdk_ec2::Client>,
    kms: RegionalClients<aws_sdk_kms::Client>,
    ssm: RegionalClients<aws_sdk_ssm::Client>,
}

impl SdkAws {
    pub fn new(base: SdkConfig) -> Self {
        Self {
            base,
            ec2: RegionalClients::new(|base, region| {
                aws_sdk_ec2::Client::from_conf(
                    aws_sdk_ec2::config::Builder::from(base)
                        .region(region)
                        .build(),
                )
            }),
            kms: RegionalClients::new(|base, region| {
                aws_sdk_kms::Client::from_conf(
                    aws_sdk_kms::config::Builder::from(base)
                        .region(region)
                        .build(),
                )
            }),
            ssm: RegionalClients::new(|base, region| {
                aws_sdk_ssm::Client::from_conf(
                    aws_sdk_ssm::config::Builder::from(base)
                        .region(region)
                        .build(),
                )
            }),
        }
    }

    /// Uses these clients for `region` instead of building them (tests replaying recorded responses).
    pub fn with_region_clients(
        self,
        region: &str,
        ec2: aws_sdk_ec2::Client,
        kms: aws_sdk_kms::Client,
    ) -> Self {
        self.ec2.insert(region, ec2);
        self.kms.insert(region, kms);
        self
    }

    /// The region of the shared config (`AWS_REGION` in Lambda): where events without one are handled.
    pub fn home_region(&self) -> Option<&str> {
        self.base.region().map(Region::as_ref)
    }

    fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        self.ec2.get(&self.base, region)
    }

    fn kms(&self, region: &str) -> aws_sdk_kms::Client {
        self.kms.get(&self.base, region)
    }

    fn ssm(&self, region: &str) -> aws_sdk_ssm::Client {
        self.ssm.get(&self.base, region)
    }

    /// EC2 ModifyImageAttribute launchPermission: one call for an Add or a Remove.
    async fn modify_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
        change: LaunchPermissionModifications,
    ) -> Result<(), AwsError> {
        self.ec2(region)
            .modify_image_attribute()
            .image_id(image_id)
            .launch_permission(change)
            .send()
            .await
            .map_err(|e| aws_error("ModifyImageAttribute", region, image_id, e))?;
        Ok(())
    }
}

/// The message of the deepest error in `error`'s source chain, at most 300 characters.
fn innermost_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    let text = cause.to_string();
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

/// Error codes that mean "slow down": always worth a retry.
const THROTTLING_CODES: [&str; 5] = [
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "TooManyRequestsException",
    "RequestThrottled",
];

fn aws_error<E, R>(
    operation: &'static str,
    region: &str,
    resource: &str,
    error: SdkError<E, R>,
) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + HttpStatus,
{
    let code = error.code().map(str::to_string);
    let message = match (error.message(), &error) {
        (Some(message), _) => message.to_string(),
        // An answer with no error code: not AWS's error document (a proxy's page, an emulator's crash,
        // a body cut off). Say so, with the status and the innermost cause, not the whole response.
        (None, SdkError::ServiceError(context)) => format!(
            "the answer could not be read (HTTP {}): {}",
            context.raw().status(),
            innermost_cause(context.err())
        ),
        (None, _) => DisplayErrorContext(&error).to_string(),
    };
    let retryable = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(context) => {
            context.raw().status() >= 500
                // No error code: the answer was unreadable, not a refusal; another attempt may read one.
                || code.is_none()
                || code.as_deref().is_some_and(|c| THROTTLING_CODES.contains(&c))
                // Sharing raced the image becoming available: the state-change event or a retry completes it.
                || code.as_deref() == Some("InvalidAMIID.Unavailable")
                // KMS could not reach the key's store in time.
                || code.as_deref() == Some("DependencyTimeoutException")
                // Too many copies in progress: one finishing makes room.
                || code.as_deref() == Some("ResourceLimitExceeded")
                // An earlier attempt already made this copy (with other parameters): the next event finds it.
                || code.as_deref() == Some("IdempotentParameterMismatch")
        }
        _ => false,
    };
    AwsError {
        operation,
        region: region.to_string(),
        resource: resource.to_string(),
        code,
        message,
        retryable,
    }
}

/// An answer that lacks what the operation exists for: never acted on, and worth a retry.
fn incomplete_answer(
    operation: &'static str,
    region: &str,
    resource: &str,
    missing: &str,
) -> AwsError {
    AwsError {
        operation,
        region: region.to_string(),
        resource: resource.to_string(),
        code: None,
        message: format!("AWS answered without {missing}"),
        retryable: true,
    }
}

/// The HTTP status of a raw response, without naming the SDK's response type in signatures.
trait HttpStatus {
    fn status(&self) -> u16;
}

// One type for every SDK crate: the smithy runtime's HTTP response.
impl HttpStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }
}

fn tags_of(tags: &[ec2::Tag]) -> Tags {
    tags.iter()
        .filter_map(|t| {
            Some((
                t.key()?.to_string(),
                t.value().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

fn sdk_tags(tags: &Tags) -> Vec<ec2::Tag> {
    tags.iter()
        .map(|(k, v)| ec2::Tag::builder().key(k).value(v).build())
        .collect()
}

fn snapshot_facts(s: &ec2::Snapshot) -> Option<(String, SnapshotFacts)> {
    Some((
        s.snapshot_id()?.to_string(),
        SnapshotFacts {
            tags: tags_of(s.tags()),
            encrypted: s.encrypted().unwrap_or(false),
            kms_key_id: s.kms_key_id().map(str::to_string),
        },
    ))
}

fn observed_image(region: &str, image: &ec2::Image) -> ObservedImage {
    // SourceInstanceId appears only for CreateImage; SourceImageId for CreateImage (the instance's AMI),
    // CopyImage and CreateRestoreImageTask; neither for RegisterImage. Hence this order.
    let created_by = if image.source_instance_id().is_some() {
        CreatedBy::CreateImage
    } else if image.source_image_id().is_some() {
        CreatedBy::CopyImage
    } else {
        CreatedBy::RegisterImage
    };
    let snapshots = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs())
        .filter_map(|ebs| {
            Some(ObservedSnapshot {
                snapshot_id: ebs.snapshot_id()?.to_string(),
                encrypted: ebs.encrypted(),
                kms_key_id: None,
                tags: None,
                create_volume_permissions: None,
                other_images: None,
            })
        })
        .collect();
    ObservedImage {
        image_id: image.image_id().unwrap_or_default().to_string(),
        region: region.to_string(),
        name: image.name().map(str::to_string),
        description: image.description().map(str::to_string),
        creation_date: image.creation_date().map(str::to_string),
        deprecation_time: image.deprecation_time().map(str::to_string),
        product_codes: image
            .product_codes()
            .iter()
            .filter_map(|p| p.product_code_id().map(str::to_string))
            .collect(),
        owner_id: image.owner_id().unwrap_or_default().to_string(),
        state: ImageState::from_name(image.state().map(|s| s.as_str()).unwrap_or("unknown")),
        tags: tags_of(image.tags()),
        created_by,
        source: image.source_image_id().map(|id| SourceImage {
            image_id: id.to_string(),
            region: image.source_image_region().map(str::to_string),
        }),
        snapshots,
        ..ObservedImage::default()
    }
}

/// Reads one launch permission as AWS reports it. An entry ami-share cannot read (a form it does not
/// manage) is left out: it can never equal a configured target, so leaving it out changes no plan.
fn launch_permission(p: &ec2::LaunchPermission) -> Option<LaunchPermission> {
    if let Some(arn) = p.organization_arn() {
        return arn.parse().ok().map(LaunchPermission::Organization);
    }
    if let Some(arn) = p.organizational_unit_arn() {
        return arn.parse().ok().map(LaunchPermission::OrganizationalUnit);
    }
    if let Some(id) = p.user_id() {
        return id.parse().ok().map(LaunchPermission::Account);
    }
    (p.group() == Some(&ec2::PermissionGroup::All)).then_some(LaunchPermission::Public)
}

fn sdk_launch_permission(p: &LaunchPermission) -> ec2::LaunchPermission {
    let b = ec2::LaunchPermission::builder();
    match p {
        LaunchPermission::Organization(arn) => b.organization_arn(arn.as_str()),
        LaunchPermission::OrganizationalUnit(arn) => b.organizational_unit_arn(arn.as_str()),
        LaunchPermission::Account(id) => b.user_id(id.as_str()),
        LaunchPermission::Public => b.group(ec2::PermissionGroup::All),
    }
    .build()
}

/// The policy name KMS uses for a key's one key policy.
const DEFAULT_POLICY: &str = "default";

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

    async fn images_on_snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<Vec<ObservedImage>, AwsError> {
        let images: Vec<ec2::Image> = self
            .ec2(region)
            .describe_images()
            .owners("self")
            .filters(
                Filter::builder()
                    .name("block-device-mapping.snapshot-id")
                    .set_values(Some(snapshot_ids.to_vec()))
                    .build(),
            )
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
        let tag_filter = |key: &str, value: &str| {
            Filter::builder()
                .name(format!("tag:{key}"))
                .values(value)
                .build()
        };
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
        deprecate_at: &str,
    ) -> Result<(), AwsError> {
        let at = aws_smithy_types::DateTime::from_str(
            deprecate_at,
            aws_smithy_types::date_time::Format::DateTime,
        )
        .map_err(|e| AwsError {
            operation: "EnableImageDeprecation",
            region: region.to_string(),
            resource: image_id.to_string(),
            code: None,
            message: format!("deprecation time {deprecate_at:?} is not ISO 8601: {e}"),
            retryable: false,
        })?;
        self.ec2(region)
            .enable_image_deprecation()
            .image_id(image_id)
            .deprecate_at(at)
            .send()
            .await
            .map_err(|e| aws_error("EnableImageDeprecation", region, image_id, e))?;
        Ok(())
    }

    async fn get_parameter(&self, region: &str, name: &str) -> Result<Option<String>, AwsError> {
        match self.ssm(region).get_parameter().name(name).send().await {
            Ok(output) => Ok(output
                .parameter()
                .and_then(|p| p.value())
                .map(str::to_string)),
            Err(e) if e.code() == Some("ParameterNotFound") => Ok(None),
            Err(e) => Err(aws_error("GetParameter", region, name, e)),
        }
    }

    async fn put_parameter(
        &self,
        region: &str,
        name: &str,
        image_id: &str,
    ) -> Result<(), AwsError> {
        self.ssm(region)
            .put_parameter()
            .name(name)
            .value(image_id)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .map_err(|e| aws_error("PutParameter", region, name, e))?;
        Ok(())
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
