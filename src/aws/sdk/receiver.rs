//! What a receiving account sees of a shared AMI, read with its own credentials (`ami-share check`):
//! DescribeImages, GetAllowedImagesSettings, DescribeSnapshots (visible only with create-volume
//! permission) and DescribeKey. Read-only; [`crate::check`] judges the result.

use aws_sdk_ec2::types::{self as ec2, ManagedBy};

use super::*;
use crate::check::{AllowedImages, Criterion, KeyView, ReceiverView, SeenImage};

impl SdkAws {
    /// The receiver's view of `image_id` in `region`. `kms_keys`: the snapshot keys, when the operator
    /// names them (a receiver cannot see them otherwise, unless it may create volumes from the snapshots).
    pub async fn receiver_view(
        &self,
        region: &str,
        image_id: &str,
        kms_keys: &[String],
        owner_hint: Option<String>,
    ) -> Result<ReceiverView, AwsError> {
        let ec2 = self.ec2(region);
        let allowed = match ec2.get_allowed_images_settings().send().await {
            Ok(out) => allowed_images(&out),
            Err(e) => AllowedImages::Unread(
                aws_error("GetAllowedImagesSettings", region, "", e).to_string(),
            ),
        };
        let image = match ec2.describe_images().image_ids(image_id).send().await {
            Ok(out) => out.images().first().map(seen_image),
            Err(e) => {
                let e = aws_error("DescribeImages", region, image_id, e);
                match e.code.as_deref() {
                    Some("InvalidAMIID.NotFound" | "InvalidAMIID.Unavailable") => None,
                    _ => return Err(e),
                }
            }
        };
        // The keys seen on the snapshots; where this account cannot see them, the ones the operator
        // named (which it cannot tie to a snapshot), else the snapshot stays unseen.
        let seen = match &image {
            Some(image) if !image.encrypted_snapshots.is_empty() => {
                self.snapshot_keys(region, &image.encrypted_snapshots).await
            }
            _ => Vec::new(),
        };
        let mut keys: Vec<(String, bool)> = Vec::new();
        let mut unseen = Vec::new();
        for key in seen {
            match key {
                Ok(arn) => keys.push((arn, true)),
                Err(snapshot_id) => unseen.push(snapshot_id),
            }
        }
        if (!unseen.is_empty() || image.is_none()) && !kms_keys.is_empty() {
            keys.extend(kms_keys.iter().map(|k| (k.clone(), false)));
            unseen.clear();
        }
        let mut views: Vec<KeyView> = unseen
            .into_iter()
            .map(|snapshot_id| KeyView::Unseen { snapshot_id })
            .collect();
        for (arn, on_snapshot) in keys {
            views.push(self.key_view(region, arn, on_snapshot).await);
        }
        Ok(ReceiverView {
            image_id: image_id.to_string(),
            region: region.to_string(),
            image,
            owner_hint,
            allowed,
            keys: views,
            now: Timestamp::now(),
        })
    }

    /// Each encrypted snapshot's key ARN, or (Err) the snapshot's id where this account cannot see it.
    async fn snapshot_keys(
        &self,
        region: &str,
        snapshots: &[String],
    ) -> Vec<Result<String, String>> {
        let found = self
            .ec2(region)
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshots.to_vec()))
            .send()
            .await;
        let mut keys: Vec<Result<String, String>> = Vec::new();
        for id in snapshots {
            let key = found.as_ref().ok().and_then(|out| {
                out.snapshots()
                    .iter()
                    .find(|s| s.snapshot_id() == Some(id))
                    .and_then(|s| s.kms_key_id().map(str::to_string))
            });
            let key = key.ok_or_else(|| id.clone());
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }

    async fn key_view(&self, region: &str, arn: String, on_snapshot: bool) -> KeyView {
        // A key lives in its own region: the one its ARN names.
        let key_region = arn
            .split(':')
            .nth(3)
            .filter(|r| !r.is_empty())
            .unwrap_or(region);
        match self
            .kms(key_region)
            .describe_key()
            .key_id(&arn)
            .send()
            .await
        {
            Ok(out) => KeyView::Described {
                state: out
                    .key_metadata()
                    .and_then(|m| m.key_state())
                    .map_or("unknown".into(), |s| s.as_str().to_string()),
                arn,
                on_snapshot,
            },
            Err(e) => {
                let e = aws_error("DescribeKey", key_region, &arn, e);
                match e.code.as_deref() {
                    Some("AccessDeniedException") => KeyView::Refused {
                        message: e.message.clone(),
                        arn,
                    },
                    Some("NotFoundException") => KeyView::Missing { arn },
                    _ => KeyView::Unreadable {
                        message: e.to_string(),
                        arn,
                    },
                }
            }
        }
    }
}

fn allowed_images(
    out: &aws_sdk_ec2::operation::get_allowed_images_settings::GetAllowedImagesSettingsOutput,
) -> AllowedImages {
    let by_policy = matches!(out.managed_by(), Some(ManagedBy::DeclarativePolicy));
    let criteria = out.image_criteria().iter().map(criterion).collect();
    match out.state() {
        Some("enabled") => AllowedImages::Enabled {
            criteria,
            by_policy,
        },
        Some("audit-mode") => AllowedImages::AuditMode {
            criteria,
            by_policy,
        },
        Some("disabled") => AllowedImages::Disabled,
        other => AllowedImages::Unread(format!(
            "GetAllowedImagesSettings answered state {other:?}, which this version does not know"
        )),
    }
}

fn criterion(c: &ec2::ImageCriterion) -> Criterion {
    let days = |d: Option<i32>| d.and_then(|d| u32::try_from(d).ok());
    let mut unevaluated = Vec::new();
    if !c.image_watermarks().is_empty() {
        unevaluated.push("image watermarks".to_string());
    }
    if c.scan_result_condition().is_some() {
        unevaluated.push("scan-result condition".to_string());
    }
    Criterion {
        providers: c.image_providers().to_vec(),
        names: c.image_names().to_vec(),
        product_codes: c.marketplace_product_codes().to_vec(),
        max_days_since_created: days(
            c.creation_date_condition()
                .and_then(|d| d.maximum_days_since_created()),
        ),
        max_days_since_deprecated: days(
            c.deprecation_time_condition()
                .and_then(|d| d.maximum_days_since_deprecated()),
        ),
        unevaluated,
    }
}

fn seen_image(image: &ec2::Image) -> SeenImage {
    SeenImage {
        owner_id: image.owner_id().unwrap_or_default().to_string(),
        owner_alias: image.image_owner_alias().map(str::to_string),
        name: image.name().map(str::to_string),
        state: image
            .state()
            .map_or(ImageState::Pending, |s| ImageState::from_name(s.as_str())),
        creation_date: image.creation_date().and_then(Timestamp::parse),
        deprecation_time: image.deprecation_time().and_then(Timestamp::parse),
        product_codes: image
            .product_codes()
            .iter()
            .filter_map(|p| p.product_code_id().map(str::to_string))
            .collect(),
        image_allowed: image.image_allowed(),
        encrypted_snapshots: image
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs())
            .filter(|e| e.encrypted() == Some(true))
            .filter_map(|e| e.snapshot_id().map(str::to_string))
            .collect(),
    }
}
