//! The AWS edge: the few EC2 and KMS calls the core needs, behind one trait.
//!
//! The reconciler is generic over [`Aws`], so unit tests can drive it with an in-memory fake and the
//! integration tests drive the real implementation ([`sdk::SdkAws`]) against the emulator or recorded
//! responses. Every AWS call of the product lives under this module; a change in AWS behaviour is a
//! change here.

pub mod sdk;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;

use serde::Serialize;

use crate::markers::CopyKind;
use crate::observed::{ObservedImage, ObservedKey, SnapshotFacts, Tags};
use crate::plan::ImageCopy;
use crate::targets::{LaunchPermission, VolumePermission};
use crate::time::Timestamp;

/// One version of an SSM parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredParameter {
    pub value: String,
    pub version: i64,
}

/// One message for the function's work queue ([`crate::fanout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub body: String,
    /// SQS DelaySeconds: at most 15 minutes.
    pub delay: std::time::Duration,
}

/// What DescribeImages found for an image id in a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLookup {
    /// The image exists and this account owns it.
    Owned(Box<ObservedImage>),
    /// The image exists but another account owns it (shared with us, or public): only the owner can share.
    NotOwned { owner_id: String },
    /// No such image in the region (never existed, or deregistered).
    NotFound,
}

/// The AWS operations ami-share uses. Each takes the region: AMIs, snapshots and KMS keys are regional.
pub trait Aws: Send + Sync {
    /// EC2 DescribeImages for one image id, telling owned, not owned and not found apart.
    fn describe_image(
        &self,
        region: &str,
        image_id: &str,
    ) -> impl Future<Output = Result<ImageLookup, AwsError>> + Send;

    /// EC2 DescribeImages of every image this account owns in `region`, all pages: pending, available and
    /// failed ones (disabled AMIs are not listed: they can be neither shared nor launched).
    fn list_owned_images(
        &self,
        region: &str,
    ) -> impl Future<Output = Result<Vec<ObservedImage>, AwsError>> + Send;

    /// EC2 DescribeImages of this account's images among `image_ids` in `region` (filter `image-id`,
    /// Owners=self, all pages): an id not answered for is gone, or not this account's.
    fn list_owned_images_among(
        &self,
        region: &str,
        image_ids: &[String],
    ) -> impl Future<Output = Result<Vec<ObservedImage>, AwsError>> + Send;

    /// EC2 DescribeSnapshots of this account's snapshots among `snapshot_ids` in `region` (filter
    /// `snapshot-id`, OwnerIds=self, all pages): a snapshot gone is left out, not an error.
    fn list_owned_snapshots_among(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, SnapshotFacts>, AwsError>> + Send;

    /// SQS SendMessageBatch: the messages to the function's own work queue, ten to a call, each with
    /// its delay. Fails unless every message was taken.
    fn send_messages(
        &self,
        queue_url: &str,
        messages: &[QueuedMessage],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 DescribeImages of this account's images in `region` that any of `snapshot_ids` backs
    /// (filter `block-device-mapping.snapshot-id`): several AMIs may be registered on one snapshot.
    fn images_on_snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> impl Future<Output = Result<Vec<ObservedImage>, AwsError>> + Send;

    /// EC2 DescribeImageAttribute launchPermission.
    fn describe_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
    ) -> impl Future<Output = Result<BTreeSet<LaunchPermission>, AwsError>> + Send;

    /// EC2 DescribeSnapshots: tags and encryption of each snapshot id.
    fn describe_snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, SnapshotFacts>, AwsError>> + Send;

    /// EC2 DescribeSnapshots of every snapshot this account owns in `region` (OwnerIds=self), all pages:
    /// tags and encryption by snapshot id.
    fn list_owned_snapshots(
        &self,
        region: &str,
    ) -> impl Future<Output = Result<BTreeMap<String, SnapshotFacts>, AwsError>> + Send;

    /// EC2 CreateTags: the same tags on every listed resource, in one call.
    fn create_tags(
        &self,
        region: &str,
        resources: &[String],
        tags: &Tags,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 ModifyImageAttribute launchPermission Add, all permissions in one call.
    fn add_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
        permissions: &[LaunchPermission],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 GetImageBlockPublicAccessState: whether new public sharing of AMIs is blocked in the region.
    fn image_block_public_access(
        &self,
        region: &str,
    ) -> impl Future<Output = Result<bool, AwsError>> + Send;

    /// EC2 ModifyImageAttribute launchPermission Remove, all permissions in one call.
    fn remove_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
        permissions: &[LaunchPermission],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 DescribeImages of this account's images in `region` marked as ami-share's copies of `kind`
    /// of `source_image_id` in `source_region`, in any state. Found by their marks, which anyone may
    /// write: the caller checks them against EC2's record ([`crate::provenance`]).
    fn find_copies(
        &self,
        region: &str,
        source_region: &str,
        source_image_id: &str,
        kind: CopyKind,
    ) -> impl Future<Output = Result<Vec<ObservedImage>, AwsError>> + Send;

    /// EC2 CopyImage, called in the copy's region, encrypted and tagged as `copy` says. Returns the new
    /// image id.
    fn copy_image(&self, copy: &ImageCopy)
    -> impl Future<Output = Result<String, AwsError>> + Send;

    /// EC2 DescribeSnapshotAttribute createVolumePermission: who may create volumes from it.
    fn describe_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
    ) -> impl Future<Output = Result<BTreeSet<VolumePermission>, AwsError>> + Send;

    /// EC2 ModifySnapshotAttribute createVolumePermission remove (accounts and `Group=all`), one call.
    fn remove_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
        permissions: &[VolumePermission],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 ModifySnapshotAttribute createVolumePermission Add.
    fn add_create_volume_permissions(
        &self,
        region: &str,
        snapshot_id: &str,
        accounts: &[String],
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 EnableImageDeprecation.
    fn enable_image_deprecation(
        &self,
        region: &str,
        image_id: &str,
        deprecate_at: Timestamp,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// EC2 EnableImageDeregistrationProtection (`WithCooldown`: it stays on for 24 hours after it is
    /// turned off).
    fn enable_image_deregistration_protection(
        &self,
        region: &str,
        image_id: &str,
        with_cooldown: bool,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// SSM GetParameter: its value and version, `None` when there is no such parameter.
    fn get_parameter(
        &self,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<Option<StoredParameter>, AwsError>> + Send;

    /// SSM PutParameter with DataType `aws:ec2:image`, overwriting: the version it made.
    fn put_parameter(
        &self,
        region: &str,
        name: &str,
        image_id: &str,
    ) -> impl Future<Output = Result<i64, AwsError>> + Send;

    /// SSM GetParameterHistory: every version SSM keeps of the parameter (its last 100), oldest first.
    fn parameter_history(
        &self,
        region: &str,
        name: &str,
    ) -> impl Future<Output = Result<Vec<StoredParameter>, AwsError>> + Send;

    /// KMS DescribeKey (`key` as key ARN, alias or id). `None`: no such key in the region. The policy is
    /// not read here.
    fn describe_key(
        &self,
        region: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<ObservedKey>, AwsError>> + Send;

    /// KMS ListResourceTags: the key's tags (how its owner approves ami-share, [`crate::keys::APPROVAL_TAG`]).
    fn list_key_tags(
        &self,
        region: &str,
        key_arn: &str,
    ) -> impl Future<Output = Result<Tags, AwsError>> + Send;

    /// KMS ListAliases for one key: its aliases (`alias/…`).
    fn list_key_aliases(
        &self,
        region: &str,
        key_arn: &str,
    ) -> impl Future<Output = Result<Vec<String>, AwsError>> + Send;

    /// KMS GetKeyPolicy (the `default` policy, the only one a key has).
    fn get_key_policy(
        &self,
        region: &str,
        key_arn: &str,
    ) -> impl Future<Output = Result<String, AwsError>> + Send;

    /// KMS PutKeyPolicy (`default`). KMS has no conditional write: see the reconciler for how a
    /// concurrent writer's change is detected and merged.
    fn put_key_policy(
        &self,
        region: &str,
        key_arn: &str,
        policy: &str,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;
}

/// An AWS call that failed, with what an operator needs: which call, on what, AWS's code and message,
/// and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct AwsError {
    pub operation: &'static str,
    pub region: String,
    pub resource: String,
    /// AWS's error code (e.g. `UnauthorizedOperation`), when the service answered with one.
    pub code: Option<String>,
    pub message: String,
    /// Throttling, a 5xx, a time-out, a connection failure or an unreadable answer: a retry may succeed.
    pub retryable: bool,
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} in {} failed",
            self.operation, self.resource, self.region
        )?;
        if let Some(code) = &self.code {
            write!(f, " with {code}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(hint) = self.hint() {
            write!(f, " ({hint})")?;
        }
        Ok(())
    }
}

impl AwsError {
    /// Whether AWS refused the call for want of permission.
    pub fn is_access_denied(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation")
        )
    }

    /// What to do about the errors an operator is most likely to meet.
    fn hint(&self) -> Option<&'static str> {
        let kms = matches!(
            self.operation,
            "DescribeKey" | "GetKeyPolicy" | "PutKeyPolicy"
        );
        match self.code.as_deref()? {
            "OptInRequired" => Some(
                "the account cannot use this region: an opt-in region must be enabled for the account (Account settings, Regions) before ami-share can copy there",
            ),
            "AuthFailure" | "InvalidClientTokenId" | "UnrecognizedClientException" => Some(
                "AWS did not accept the function's credentials in this region: if it is an opt-in region, enable it for the account (Account settings, Regions); otherwise check the role and the clock",
            ),
            "InvalidKMSKey.NotFound" | "InvalidKmsKey.NotFound" => Some(
                "the copy's KMS key does not exist in its region: create it there, or fix kms_key in the rule's copy.regions",
            ),
            "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" if kms => Some(
                "the function's role lacks this KMS permission, or the key's policy does not let IAM policies grant it: see template.yaml (KmsKeyScope) and README \"Encrypted AMIs\"",
            ),
            "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => Some(
                "the function's role lacks this permission: see template.yaml and README \"IAM\"; for another region, is it in the stack's CopyRegions?",
            ),
            "InvalidAMIID.Unavailable" => {
                Some("the image is not available yet; the state-change event will retry")
            }
            "InvalidParameter" | "InvalidAMIAttributeItemValue" => {
                Some("AWS refused a launch permission: check the ARNs in the config")
            }
            "MalformedPolicyDocumentException" => Some(
                "KMS refused the key policy ami-share wrote, so the key is unchanged: KMS refuses a policy that would stop the caller from changing it again, or one with a principal that does not exist; check the key's other statements",
            ),
            "IdempotentParameterMismatch" => Some(
                "an earlier attempt made this copy with other parameters; the next event finds the copy",
            ),
            "InvalidAMIName.Duplicate" => Some(
                "another AMI of this account and region has the copy's name: rename or deregister it, or give copies a name of their own with copy.name (e.g. \"{name}-from-{source_region}\")",
            ),
            "ResourceLimitExceeded" if self.operation == "CopyImage" => {
                Some("too many copies in progress in this region; a retry makes room")
            }
            "ResourceLimitExceeded" => Some(
                "an AMI quota of this account and region: 5 public AMIs per region by default (raise \"Public AMIs\" in Service Quotas, or make an older AMI private) or 1,000 sharing entities per AMI (share with organizations or OUs); not retried, the other shares stand",
            ),
            "LimitExceededException" if kms => Some(
                "the key policy would exceed KMS's 32 KB limit: share with organizations or OUs rather than many accounts",
            ),
            "KMSInvalidStateException" => {
                Some("the key is disabled or pending deletion: nobody could use it")
            }
            _ => None,
        }
    }
}
