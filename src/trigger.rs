//! Event intake: an EventBridge event in, the image it is about (or why it is skipped) out.
//!
//! Two kinds are understood, both from `source: aws.ec2`:
//! - "AWS API Call via CloudTrail" for CreateImage / CopyImage / RegisterImage: the new image id is in
//!   `detail.responseElements.imageId`; a failed call (`detail.errorCode`) made no image and is skipped;
//! - the same for CreateTags / DeleteTags: every AMI of `detail.requestParameters.resourcesSet.items`
//!   (tags select rules, so a tag written after the AMI was made, as Packer writes them, changes what
//!   is wanted); a call that names no AMI (an instance's, a snapshot's tags) is skipped;
//! - "EC2 AMI State Change": `detail.ImageId` and `detail.State`.
//!
//! The envelope is `aws_lambda_events`' `EventBridgeEvent`. The details use types of our own that read only
//! what ami-share needs: the crate's CloudTrail type makes fields such as `userAgent` mandatory, and a
//! CloudTrail record that lacks one (they do, e.g. for calls made by AWS services) must not be refused.

use aws_lambda_events::event::eventbridge::EventBridgeEvent;
use serde::Deserialize;
use serde_json::Value;

use crate::fanout::{WorkItem, WorkRecord};
use crate::json::json_kind;
use crate::observed::{CreatedBy, ImageState};

pub const CLOUDTRAIL_DETAIL_TYPE: &str = "AWS API Call via CloudTrail";
pub const STATE_CHANGE_DETAIL_TYPE: &str = "EC2 AMI State Change";
pub const SCHEDULED_DETAIL_TYPE: &str = "Scheduled Event";
const EXPECTED: &str = "an EventBridge event from source \"aws.ec2\" with detail-type \"AWS API Call via CloudTrail\" (eventName CreateImage, CopyImage, RegisterImage, CreateTags or DeleteTags) or \"EC2 AMI State Change\", or a \"Scheduled Event\" from source \"aws.events\" (the scheduled sweep), or the SQS event of the function's work queue";

/// An image in a region. AMIs are regional: the id alone does not find one.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    /// `None` when the event did not say; the caller uses its own region.
    pub region: Option<String>,
    pub image_id: String,
}

/// What the event says happened to the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A successful CloudTrail-recorded call that made the image.
    ApiCall(CreatedBy),
    /// The image reached `state` (available, failed, deregistered, disabled, …).
    StateChange { state: ImageState },
    /// A successful CloudTrail-recorded CreateTags or DeleteTags call named the image: the rules that
    /// select it may have changed.
    TagsChanged,
    /// Named directly by an operator or a sweep, not by an event.
    Direct,
}

/// An event that names an image ami-share should reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEvent {
    pub image: ImageRef,
    pub kind: EventKind,
    /// The account the event comes from (the envelope's `account`).
    pub account: Option<String>,
    /// The EventBridge event id, for logs.
    pub event_id: Option<String>,
}

/// The outcome of reading an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Reconcile these images: one for an AMI event, each AMI it names for a tag event (never none).
    Images(Vec<ImageEvent>),
    /// A well-formed event that calls for no work, and why (e.g. a failed CreateImage call).
    Ignore { reason: String },
    /// An EventBridge schedule fired: sweep the function's region (every AMI this account owns there).
    Sweep { event_id: Option<String> },
    /// Messages of the function's work queue, as the SQS event source mapping delivers them: each is
    /// answered for on its own ([`crate::fanout`]), a malformed one included.
    Work(Vec<WorkRecord>),
}

/// An event ami-share cannot use. Says what was found and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unsupported event: {problem}; expected {EXPECTED}")]
pub struct TriggerError {
    pub problem: String,
}

fn unsupported(problem: impl Into<String>) -> TriggerError {
    TriggerError {
        problem: problem.into(),
    }
}

/// The parts of a CloudTrail record ami-share reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiCallDetail {
    event_name: Option<String>,
    event_source: Option<String>,
    error_code: Option<String>,
    error_message: Option<String>,
    response_elements: Option<Value>,
    request_parameters: Option<Value>,
    aws_region: Option<String>,
}

/// The resources of a CreateTags / DeleteTags call (`requestParameters.resourcesSet`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaggedResources {
    #[serde(default)]
    resources_set: ResourceSet,
}

#[derive(Debug, Default, Deserialize)]
struct ResourceSet {
    #[serde(default)]
    items: Vec<TaggedResource>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TaggedResource {
    resource_id: String,
}

/// The detail of an "EC2 AMI State Change" event.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StateChangeDetail {
    image_id: Option<String>,
    state: Option<String>,
}

/// Reads one EventBridge event.
pub fn parse(event: Value) -> Result<Trigger, TriggerError> {
    if !event.is_object() {
        return Err(unsupported(format!(
            "the payload is JSON {}, not an object",
            json_kind(&event)
        )));
    }
    if let Some(records) = event.get("Records") {
        return parse_work(records).map(Trigger::Work);
    }
    let envelope: EventBridgeEvent<Value> = serde_json::from_value(event)
        .map_err(|e| unsupported(format!("not an EventBridge envelope ({e})")))?;
    if envelope.source == "aws.events" && envelope.detail_type == SCHEDULED_DETAIL_TYPE {
        return Ok(Trigger::Sweep {
            event_id: envelope.id,
        });
    }
    if envelope.source != "aws.ec2" {
        return Err(unsupported(format!("source is {:?}", envelope.source)));
    }
    match envelope.detail_type.as_str() {
        CLOUDTRAIL_DETAIL_TYPE => parse_api_call(&envelope),
        STATE_CHANGE_DETAIL_TYPE => parse_state_change(&envelope),
        other => Err(unsupported(format!("detail-type is {other:?}"))),
    }
}

/// The records of an SQS event: each its message id and its body read as a work item (or what is wrong
/// with it). A record without a message id cannot be answered for, so it refuses the whole event.
fn parse_work(records: &Value) -> Result<Vec<WorkRecord>, TriggerError> {
    let records = records.as_array().ok_or_else(|| {
        unsupported(format!(
            "Records is JSON {}, not an array",
            json_kind(records)
        ))
    })?;
    if records.is_empty() {
        return Err(unsupported("Records is empty"));
    }
    records
        .iter()
        .enumerate()
        .map(|(n, record)| {
            let source = record.get("eventSource").and_then(Value::as_str);
            if source != Some("aws:sqs") {
                return Err(unsupported(format!(
                    "Records[{n}].eventSource is {source:?}, not \"aws:sqs\""
                )));
            }
            let message_id = record
                .get("messageId")
                .and_then(Value::as_str)
                .ok_or_else(|| unsupported(format!("Records[{n}] has no messageId")))?;
            let item = match record.get("body").and_then(Value::as_str) {
                Some(body) => WorkItem::parse(body),
                None => Err("the message has no body".to_string()),
            };
            Ok(WorkRecord {
                message_id: message_id.to_string(),
                item,
            })
        })
        .collect()
}

fn parse_api_call(envelope: &EventBridgeEvent<Value>) -> Result<Trigger, TriggerError> {
    let detail: ApiCallDetail = serde_json::from_value(envelope.detail.clone())
        .map_err(|e| unsupported(format!("the CloudTrail detail is malformed ({e})")))?;
    let name = detail.event_name.clone().unwrap_or_default();
    let created_by = match name.as_str() {
        "CreateImage" => Some(CreatedBy::CreateImage),
        "CopyImage" => Some(CreatedBy::CopyImage),
        "RegisterImage" => Some(CreatedBy::RegisterImage),
        "CreateTags" | "DeleteTags" => None,
        "" => return Err(unsupported("the CloudTrail detail has no eventName")),
        other => return Err(unsupported(format!("CloudTrail eventName is {other:?}"))),
    };
    if let Some(source) = detail.event_source.as_deref()
        && source != "ec2.amazonaws.com"
    {
        return Err(unsupported(format!("CloudTrail eventSource is {source:?}")));
    }
    if let Some(code) = &detail.error_code {
        let message = detail.error_message.as_deref().unwrap_or_default();
        let made = match created_by {
            Some(_) => "it made no image",
            None => "it changed no tag",
        };
        return Ok(Trigger::Ignore {
            reason: format!("{name} failed ({code}: {message}); {made}"),
        });
    }
    let region = envelope.region.clone().or(detail.aws_region.clone());
    let Some(created_by) = created_by else {
        return parse_tag_call(envelope, &detail, &name, region);
    };
    let image_id = detail
        .response_elements
        .as_ref()
        .and_then(|r| r.get("imageId"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            unsupported(format!(
                "{name} event without errorCode has no detail.responseElements.imageId"
            ))
        })?;
    image_event(envelope, image_id, region, EventKind::ApiCall(created_by))
}

/// A CreateTags or DeleteTags call: every AMI it names, once each, in the order named.
fn parse_tag_call(
    envelope: &EventBridgeEvent<Value>,
    detail: &ApiCallDetail,
    name: &str,
    region: Option<String>,
) -> Result<Trigger, TriggerError> {
    let parameters = detail.request_parameters.clone().ok_or_else(|| {
        unsupported(format!(
            "{name} event without errorCode has no detail.requestParameters"
        ))
    })?;
    let tagged: TaggedResources = serde_json::from_value(parameters).map_err(|e| {
        unsupported(format!(
            "{name} event's detail.requestParameters.resourcesSet is malformed ({e}); expected {{\"items\": [{{\"resourceId\": \"ami-…\"}}, …]}}"
        ))
    })?;
    let ids: Vec<&str> = tagged
        .resources_set
        .items
        .iter()
        .map(|r| r.resource_id.as_str())
        .collect();
    let mut images: Vec<ImageEvent> = Vec::new();
    for id in ids.iter().filter(|id| id.starts_with("ami-")) {
        if images.iter().any(|e| e.image.image_id == *id) {
            continue;
        }
        match image_event(envelope, id, region.clone(), EventKind::TagsChanged)? {
            Trigger::Images(one) => images.extend(one),
            other => unreachable!("image_event gives images, not {other:?}"),
        }
    }
    if images.is_empty() {
        let named = match ids.is_empty() {
            true => "no resource".to_string(),
            false => ids.join(", "),
        };
        return Ok(Trigger::Ignore {
            reason: format!(
                "{name} names no AMI ({named}): only an AMI's own tags select ami-share's rules"
            ),
        });
    }
    Ok(Trigger::Images(images))
}

fn parse_state_change(envelope: &EventBridgeEvent<Value>) -> Result<Trigger, TriggerError> {
    let detail: StateChangeDetail = serde_json::from_value(envelope.detail.clone())
        .map_err(|e| unsupported(format!("the AMI state change detail is malformed ({e})")))?;
    let image_id = detail
        .image_id
        .ok_or_else(|| unsupported("the AMI state change has no detail.ImageId"))?;
    let state = detail
        .state
        .ok_or_else(|| unsupported("the AMI state change has no detail.State"))?;
    let kind = EventKind::StateChange {
        state: ImageState::from_name(&state),
    };
    image_event(envelope, &image_id, envelope.region.clone(), kind)
}

fn image_event(
    envelope: &EventBridgeEvent<Value>,
    image_id: &str,
    region: Option<String>,
    kind: EventKind,
) -> Result<Trigger, TriggerError> {
    if !is_image_id(image_id) {
        return Err(unsupported(format!(
            "{image_id:?} is not an image id (ami- and 8 or 17 hex digits)"
        )));
    }
    // The region becomes part of an endpoint's host name: only a region code may get that far.
    if let Some(region) = &region
        && crate::distribution::RegionName::try_from(region.clone()).is_err()
    {
        return Err(unsupported(format!(
            "region {region:?} is not a region code (e.g. us-east-1)"
        )));
    }
    Ok(Trigger::Images(vec![ImageEvent {
        image: ImageRef {
            region,
            image_id: image_id.to_string(),
        },
        kind,
        account: envelope.account.clone(),
        event_id: envelope.id.clone(),
    }]))
}

fn is_image_id(id: &str) -> bool {
    id.strip_prefix("ami-").is_some_and(|hex| {
        matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample(name: &str) -> Value {
        let path = format!("{}/events/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn image_event(trigger: Trigger) -> ImageEvent {
        match trigger {
            Trigger::Images(mut events) if events.len() == 1 => events.remove(0),
            other => panic!("expected one image event, got {other:?}"),
        }
    }

    fn images(trigger: Trigger) -> Vec<ImageEvent> {
        match trigger {
            Trigger::Images(events) => events,
            other => panic!("expected image events, got {other:?}"),
        }
    }

    #[test]
    fn every_sample_event_parses() {
        let dir = format!("{}/events", env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "json") {
                let text = std::fs::read_to_string(&path).unwrap();
                let value: Value = serde_json::from_str(&text).unwrap();
                parse(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 8, "only {seen} samples");
    }

    #[test]
    fn create_image_sample() {
        let e = image_event(parse(sample("create-image.json")).unwrap());
        assert_eq!(e.kind, EventKind::ApiCall(CreatedBy::CreateImage));
        assert_eq!(e.image.image_id, "ami-0a1b2c3d4e5f67890");
        assert_eq!(e.image.region.as_deref(), Some("us-east-1"));
        assert_eq!(e.account.as_deref(), Some("123456789012"));
    }

    #[test]
    fn copy_and_register_samples() {
        let e = image_event(parse(sample("copy-image.json")).unwrap());
        assert_eq!(e.kind, EventKind::ApiCall(CreatedBy::CopyImage));
        assert_eq!(e.image.region.as_deref(), Some("eu-west-1"));
        let e = image_event(parse(sample("register-image.json")).unwrap());
        assert_eq!(e.kind, EventKind::ApiCall(CreatedBy::RegisterImage));
    }

    #[test]
    fn state_change_sample() {
        let e = image_event(parse(sample("ami-state-available.json")).unwrap());
        assert_eq!(
            e.kind,
            EventKind::StateChange {
                state: ImageState::Available
            }
        );
        assert_eq!(e.image.image_id, "ami-0a1b2c3d4e5f67890");
    }

    #[test]
    fn a_tag_event_names_each_ami_it_tagged_and_nothing_else() {
        let e = image_event(parse(sample("create-tags.json")).unwrap());
        assert_eq!(e.kind, EventKind::TagsChanged);
        assert_eq!(e.image.image_id, "ami-0a1b2c3d4e5f67890");
        assert_eq!(e.image.region.as_deref(), Some("us-east-1"));
        assert_eq!(e.account.as_deref(), Some("123456789012"));

        // An AMI and its snapshots in one call, an AMI named twice, DeleteTags: each AMI once, in order.
        let mut event = sample("create-tags.json");
        event["detail"]["eventName"] = json!("DeleteTags");
        event["detail"]["requestParameters"]["resourcesSet"]["items"] = json!([
            {"resourceId": "ami-22222222"}, {"resourceId": "snap-0123456789abcdef0"},
            {"resourceId": "ami-11111111"}, {"resourceId": "ami-22222222"}
        ]);
        let ids: Vec<String> = images(parse(event).unwrap())
            .into_iter()
            .map(|e| {
                assert_eq!(e.kind, EventKind::TagsChanged);
                e.image.image_id
            })
            .collect();
        assert_eq!(ids, ["ami-22222222", "ami-11111111"]);
    }

    #[test]
    fn a_tag_event_that_names_no_ami_is_ignored_with_what_it_named() {
        match parse(sample("create-tags-instance.json")).unwrap() {
            Trigger::Ignore { reason } => {
                assert!(
                    reason.contains("CreateTags names no AMI (i-0123456789abcdef0)"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut failed = sample("create-tags.json");
        failed["detail"]["errorCode"] = json!("Client.UnauthorizedOperation");
        failed["detail"]["errorMessage"] = json!("You are not authorized");
        match parse(failed).unwrap() {
            Trigger::Ignore { reason } => {
                assert!(reason.contains("CreateTags failed (Client.UnauthorizedOperation: You are not authorized); it changed no tag"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tag_event_of_the_wrong_shape_is_refused_with_the_expected_form() {
        let mut event = sample("create-tags.json");
        event["detail"]["requestParameters"]["resourcesSet"] = json!({"items": "ami-12345678"});
        let error = parse(event).unwrap_err().to_string();
        assert!(
            error.contains("requestParameters.resourcesSet is malformed"),
            "{error}"
        );
        assert!(
            error.contains(r#"expected {"items": [{"resourceId": "ami-…"}, …]}"#),
            "{error}"
        );

        let mut event = sample("create-tags.json");
        event["detail"]["requestParameters"]["resourcesSet"]["items"] =
            json!([{"resourceId": "ami-nothex!"}]);
        let error = parse(event).unwrap_err().to_string();
        assert!(
            error.contains("\"ami-nothex!\" is not an image id"),
            "{error}"
        );

        let mut event = sample("create-tags.json");
        event["detail"]
            .as_object_mut()
            .unwrap()
            .remove("requestParameters");
        let error = parse(event).unwrap_err().to_string();
        assert!(
            error.contains("CreateTags event without errorCode has no detail.requestParameters"),
            "{error}"
        );
    }

    #[test]
    fn a_failed_call_is_ignored_with_its_error() {
        match parse(sample("create-image-failed.json")).unwrap() {
            Trigger::Ignore { reason } => {
                assert!(reason.contains("CreateImage failed"), "{reason}");
                assert!(reason.contains("InvalidAMIName.Duplicate"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cloudtrail_record_missing_optional_fields_still_parses() {
        // No userAgent, sourceIPAddress, eventVersion, eventType: the aws_lambda_events type would refuse it.
        let event = json!({
            "detail-type": "AWS API Call via CloudTrail", "source": "aws.ec2", "region": "us-west-2",
            "detail": {"eventName": "CopyImage", "responseElements": {"imageId": "ami-12345678"}}
        });
        let e = image_event(parse(event).unwrap());
        assert_eq!(e.image.image_id, "ami-12345678");
        assert_eq!(e.account, None);
    }

    #[test]
    fn region_falls_back_to_the_cloudtrail_region() {
        let event = json!({
            "detail-type": "AWS API Call via CloudTrail", "source": "aws.ec2",
            "detail": {"eventName": "CreateImage", "awsRegion": "ap-south-1", "responseElements": {"imageId": "ami-12345678"}}
        });
        assert_eq!(
            image_event(parse(event).unwrap()).image.region.as_deref(),
            Some("ap-south-1")
        );
    }

    #[test]
    fn a_region_that_is_not_a_region_code_is_refused() {
        let mut event = sample("ami-state-available.json");
        event["region"] = json!("us-east-1.evil.example/");
        let error = parse(event).unwrap_err().to_string();
        assert!(
            error.contains("region \"us-east-1.evil.example/\" is not a region code"),
            "{error}"
        );
    }

    #[test]
    fn a_scheduled_event_asks_for_a_sweep() {
        assert_eq!(
            parse(sample("scheduled-sweep.json")).unwrap(),
            Trigger::Sweep {
                event_id: Some("5c4e7b2a-9d31-4f6e-b8a0-7e2f1c3d4b5a".into())
            }
        );
        // Only EventBridge's own schedule: the same detail-type from another source is not one.
        let forged =
            json!({"detail-type": SCHEDULED_DETAIL_TYPE, "source": "custom.app", "detail": {}});
        let error = parse(forged).unwrap_err().to_string();
        assert!(error.contains("source is \"custom.app\""), "{error}");
        assert!(
            error.contains("\"Scheduled Event\" from source \"aws.events\""),
            "{error}"
        );
    }

    #[test]
    fn unsupported_events_say_what_was_found_and_expected() {
        let cases = [
            (json!([1, 2]), "JSON array"),
            (json!("CreateImage"), "JSON string"),
            (json!({"hello": "world"}), "not an EventBridge envelope"),
            (
                json!({"detail-type": "Object Created", "source": "aws.s3", "detail": {}}),
                "source is \"aws.s3\"",
            ),
            (
                json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2", "detail": {}}),
                "detail-type is \"EC2 Instance State-change Notification\"",
            ),
            (
                json!({"detail-type": CLOUDTRAIL_DETAIL_TYPE, "source": "aws.ec2", "detail": {"eventName": "RunInstances"}}),
                "eventName is \"RunInstances\"",
            ),
            (
                json!({"detail-type": CLOUDTRAIL_DETAIL_TYPE, "source": "aws.ec2", "detail": {"eventName": "CreateImage"}}),
                "has no detail.responseElements.imageId",
            ),
            (
                json!({"detail-type": CLOUDTRAIL_DETAIL_TYPE, "source": "aws.ec2", "detail": {}}),
                "no eventName",
            ),
            (
                json!({"detail-type": CLOUDTRAIL_DETAIL_TYPE, "source": "aws.ec2", "detail": "x"}),
                "CloudTrail detail is malformed",
            ),
            (
                json!({"detail-type": STATE_CHANGE_DETAIL_TYPE, "source": "aws.ec2", "detail": {"State": "available"}}),
                "no detail.ImageId",
            ),
            (
                json!({"detail-type": STATE_CHANGE_DETAIL_TYPE, "source": "aws.ec2", "detail": {"ImageId": "ami-12345678"}}),
                "no detail.State",
            ),
            (
                json!({"detail-type": STATE_CHANGE_DETAIL_TYPE, "source": "aws.ec2", "detail": {"ImageId": "snap-12345678", "State": "available"}}),
                "not an image id",
            ),
        ];
        for (event, expected) in cases {
            let e = parse(event.clone())
                .expect_err(&event.to_string())
                .to_string();
            assert!(e.contains(expected), "{event}: {e}");
            assert!(e.contains("expected an EventBridge event"), "{e}");
        }
    }

    #[test]
    fn image_ids_have_eight_or_seventeen_hex_digits() {
        assert!(is_image_id("ami-12345678"));
        assert!(is_image_id("ami-0a1b2c3d4e5f67890"));
        assert!(!is_image_id("ami-1234567"));
        assert!(!is_image_id("ami-0a1b2c3d4e5f6789z"));
        assert!(!is_image_id("AMI-12345678"));
    }
}
