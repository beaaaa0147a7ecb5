//! [`Ec2`] over aws-sdk-ec2: one client per region, made once and reused across invocations.
//!
//! The SDK retries throttling and transient errors itself (standard retry mode); what reaches here is
//! final for this invocation and is classified as retryable or not for the caller.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use aws_config::SdkConfig;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{self as ec2, ImageAttributeName, LaunchPermissionModifications};

use super::{AwsError, Ec2, ImageLookup};
use crate::config::CreatedBy;
use crate::observed::{ImageState, ObservedImage, ObservedSnapshot, Tags};
use crate::targets::LaunchPermission;

/// EC2 clients built from one shared SDK config (credentials, retry, endpoint), one per region.
pub struct SdkEc2 {
    base: SdkConfig,
    clients: Mutex<HashMap<String, Client>>,
}

impl SdkEc2 {
    pub fn new(base: SdkConfig) -> Self {
        Self {
            base,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The region of the shared config (`AWS_REGION` in Lambda): where events without one are handled.
    pub fn home_region(&self) -> Option<&str> {
        self.base.region().map(Region::as_ref)
    }

    fn client(&self, region: &str) -> Client {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let config = aws_sdk_ec2::config::Builder::from(&self.base)
                    .region(Region::new(region.to_string()))
                    .build();
                Client::from_conf(config)
            })
            .clone()
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
    let message = error
        .message()
        .map(str::to_string)
        .unwrap_or_else(|| DisplayErrorContext(&error).to_string());
    let retryable = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(context) => {
            context.raw().status() >= 500
                || code.as_deref().is_some_and(|c| THROTTLING_CODES.contains(&c))
                // Sharing raced the image becoming available: the state-change event or a retry completes it.
                || code.as_deref() == Some("InvalidAMIID.Unavailable")
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

/// The HTTP status of a raw response, without naming the SDK's response type in signatures.
trait HttpStatus {
    fn status(&self) -> u16;
}

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
        .filter_map(|m| m.ebs()?.snapshot_id())
        .map(|id| ObservedSnapshot {
            snapshot_id: id.to_string(),
            tags: None,
        })
        .collect();
    ObservedImage {
        image_id: image.image_id().unwrap_or_default().to_string(),
        region: region.to_string(),
        name: image.name().map(str::to_string),
        owner_id: image.owner_id().unwrap_or_default().to_string(),
        state: ImageState::from_name(image.state().map(|s| s.as_str()).unwrap_or("unknown")),
        tags: tags_of(image.tags()),
        created_by,
        snapshots,
        launch_permissions: None,
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

impl Ec2 for SdkEc2 {
    async fn describe_image(&self, region: &str, image_id: &str) -> Result<ImageLookup, AwsError> {
        const OP: &str = "DescribeImages";
        let client = self.client(region);
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
            return Ok(ImageLookup::Owned(observed_image(region, image)));
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

    async fn describe_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
    ) -> Result<BTreeSet<LaunchPermission>, AwsError> {
        let output = self
            .client(region)
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

    async fn describe_snapshot_tags(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Result<BTreeMap<String, Tags>, AwsError> {
        let output = self
            .client(region)
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshot_ids.to_vec()))
            .send()
            .await
            .map_err(|e| aws_error("DescribeSnapshots", region, &snapshot_ids.join(","), e))?;
        Ok(output
            .snapshots()
            .iter()
            .filter_map(|s| Some((s.snapshot_id()?.to_string(), tags_of(s.tags()))))
            .collect())
    }

    async fn create_tags(
        &self,
        region: &str,
        resources: &[String],
        tags: &Tags,
    ) -> Result<(), AwsError> {
        let tags = tags
            .iter()
            .map(|(k, v)| ec2::Tag::builder().key(k).value(v).build())
            .collect();
        self.client(region)
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(tags))
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
        self.client(region)
            .modify_image_attribute()
            .image_id(image_id)
            .launch_permission(
                LaunchPermissionModifications::builder()
                    .set_add(Some(add))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| aws_error("ModifyImageAttribute", region, image_id, e))?;
        Ok(())
    }
}
