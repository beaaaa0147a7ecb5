//! What ami-share saw in AWS, as plain data: the input of rule selection and planning.
//!
//! Built by the AWS edge (`aws::sdk`) from describe calls; built by hand in unit tests. No SDK types here,
//! so the pure core never depends on the SDK's shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::config::CreatedBy;
use crate::targets::LaunchPermission;

/// An image's lifecycle state (EC2 `ImageState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageState {
    Pending,
    Available,
    Failed,
    Deregistered,
    Disabled,
    /// A state this version does not know (`invalid`, `transient`, `error`, or a new one).
    Other(String),
}

impl ImageState {
    pub fn from_name(name: &str) -> Self {
        match name {
            "pending" => Self::Pending,
            "available" => Self::Available,
            "failed" => Self::Failed,
            "deregistered" => Self::Deregistered,
            "disabled" => Self::Disabled,
            other => Self::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ImageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pending => "pending",
            Self::Available => "available",
            Self::Failed => "failed",
            Self::Deregistered => "deregistered",
            Self::Disabled => "disabled",
            Self::Other(name) => name,
        })
    }
}

pub type Tags = BTreeMap<String, String>;

/// An EBS snapshot behind one of the image's block devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedSnapshot {
    pub snapshot_id: String,
    /// `None` until read (DescribeSnapshots is only called when snapshot tags are wanted).
    pub tags: Option<Tags>,
}

/// The image as DescribeImages (plus the attribute and snapshot reads) showed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedImage {
    pub image_id: String,
    pub region: String,
    pub name: Option<String>,
    pub owner_id: String,
    pub state: ImageState,
    pub tags: Tags,
    /// How the image was made, as the image tells: `SourceInstanceId` is set only by CreateImage,
    /// `SourceImageId` (without it) by CopyImage, neither by RegisterImage. So every event about one image
    /// selects the same rules. (AMIs made before AWS added these fields in 2024 read as RegisterImage;
    /// CreateRestoreImageTask reads as CopyImage.)
    pub created_by: CreatedBy,
    pub snapshots: Vec<ObservedSnapshot>,
    /// `None` until read (DescribeImageAttribute is only called when sharing is wanted).
    pub launch_permissions: Option<BTreeSet<LaunchPermission>>,
}
