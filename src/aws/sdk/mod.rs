//! [`Aws`] over aws-sdk-ec2, aws-sdk-kms, aws-sdk-ssm and aws-sdk-sqs: one client per service and region,
//! made once and reused across invocations.
//!
//! The SDK retries throttling and transient errors itself (standard retry mode); what reaches here is
//! final for this invocation and is classified as retryable or not for the caller (`errors`). `convert`
//! reads the SDK's shapes into ami-share's plain data and back; `calls` makes each call of [`Aws`].

use std::collections::HashMap;
use std::sync::Mutex;

use aws_config::SdkConfig;
use aws_sdk_ec2::config::Region;
use aws_sdk_ec2::types::LaunchPermissionModifications;

use super::{Aws, AwsError, ImageLookup, QueuedMessage, StoredParameter};
use crate::markers::{self, CopyKind};
use crate::observed::CreatedBy;
use crate::observed::{
    ImageState, KeyManager, ObservedImage, ObservedKey, ObservedSnapshot, SnapshotFacts,
    SourceImage, Tags,
};
use crate::plan::ImageCopy;
use crate::targets::{LaunchPermission, VolumePermission};
use crate::time::Timestamp;

/// The SDK config names no region.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "no region: give --region, or set one in the AWS config (AWS_REGION, or region in the profile)"
)]
pub struct NoRegion;

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
    /// The function's work queue is in its own region: one client, built on first use.
    sqs: std::sync::OnceLock<aws_sdk_sqs::Client>,
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
            sqs: std::sync::OnceLock::new(),
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

    /// The region of the shared config (`AWS_REGION` in Lambda, `--region` or the profile for the CLI):
    /// where events that name none are handled. The one rule for both faces: there is no default.
    pub fn home_region(&self) -> Result<&str, NoRegion> {
        self.base.region().map(Region::as_ref).ok_or(NoRegion)
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

    fn sqs(&self) -> &aws_sdk_sqs::Client {
        self.sqs
            .get_or_init(|| aws_sdk_sqs::Client::new(&self.base))
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

mod calls;
mod convert;
mod errors;
mod receiver;

use convert::*;
use errors::*;
