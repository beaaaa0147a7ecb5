//! The AWS edge: the few calls the core needs, behind one trait.
//!
//! The reconciler is generic over [`Ec2`], so unit tests can drive it with an in-memory fake and the
//! integration tests drive the real implementation ([`sdk::SdkEc2`]) against the emulator. Every AWS call
//! of the product lives under this module; a change in AWS behaviour is a change here.

pub mod sdk;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;

use serde::Serialize;

use crate::observed::{ObservedImage, Tags};
use crate::targets::LaunchPermission;

/// What DescribeImages found for an image id in a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLookup {
    /// The image exists and this account owns it.
    Owned(ObservedImage),
    /// The image exists but another account owns it (shared with us, or public): only the owner can share.
    NotOwned { owner_id: String },
    /// No such image in the region (never existed, or deregistered).
    NotFound,
}

/// The EC2 operations ami-share uses. Each takes the region: AMIs are regional.
pub trait Ec2: Send + Sync {
    /// DescribeImages for one image id, telling owned, not owned and not found apart.
    fn describe_image(
        &self,
        region: &str,
        image_id: &str,
    ) -> impl Future<Output = Result<ImageLookup, AwsError>> + Send;

    /// DescribeImageAttribute launchPermission.
    fn describe_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
    ) -> impl Future<Output = Result<BTreeSet<LaunchPermission>, AwsError>> + Send;

    /// DescribeSnapshots: the tags of each snapshot id.
    fn describe_snapshot_tags(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, Tags>, AwsError>> + Send;

    /// CreateTags: the same tags on every listed resource, in one call.
    fn create_tags(
        &self,
        region: &str,
        resources: &[String],
        tags: &Tags,
    ) -> impl Future<Output = Result<(), AwsError>> + Send;

    /// ModifyImageAttribute launchPermission Add, all permissions in one call.
    fn add_launch_permissions(
        &self,
        region: &str,
        image_id: &str,
        permissions: &[LaunchPermission],
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
    /// What to do about the errors an operator is most likely to meet.
    fn hint(&self) -> Option<&'static str> {
        match self.code.as_deref()? {
            "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => Some(
                "the function's role lacks this permission: see template.yaml and README \"IAM\"",
            ),
            "InvalidAMIID.Unavailable" => {
                Some("the image is not available yet; the state-change event will retry")
            }
            "InvalidParameter" | "InvalidAMIAttributeItemValue" => {
                Some("AWS refused a launch permission: check the ARNs in the config")
            }
            _ => None,
        }
    }
}
