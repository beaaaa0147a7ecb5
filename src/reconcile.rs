//! The flow: observe the image → select rules → plan → apply, with one [`Outcome`] record of it all.
//!
//! Reads are made only when the plan can use them, independent reads and writes run concurrently, and
//! nothing is written that is already there. The outcome always says what was done, even when a write
//! failed half-way, so the summary log is a faithful record.

use futures::future::join_all;
use serde::Serialize;

use crate::aws::{AwsError, Ec2, ImageLookup};
use crate::config::{Config, CreatedBy};
use crate::observed::{ImageState, ObservedImage};
use crate::plan::{Action, Plan, plan, reads_needed};
use crate::rules::{ImageFacts, desired_for};
use crate::trigger::{EventKind, ImageEvent};

/// Whether to make the planned calls, or only report them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Apply,
    DryRun,
}

/// Everything one reconciliation did and decided: the summary record of an event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub image_id: String,
    pub region: String,
    /// How the image was made, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created_by: Option<CreatedBy>,
    /// Rules that selected the image.
    pub rules: Vec<String>,
    /// The plan's actions that were carried out (in dry-run mode: none).
    pub done: Vec<Action>,
    /// The plan's actions not carried out: dry-run, or their call failed.
    pub not_done: Vec<Action>,
    /// Planned only ([`Mode::DryRun`]): `not_done` is what an apply would do.
    pub dry_run: bool,
    /// Work left for later, and why.
    pub deferred: Vec<String>,
    /// Why nothing was done at all, when that is the case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
    /// Tag keys rules disagreed on.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
    /// AWS calls that failed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<AwsError>,
    /// Why the event must be handled again later although no call failed (EC2 has not caught up with it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<String>,
}

impl Outcome {
    fn new(image_id: &str, region: &str) -> Self {
        Self {
            image_id: image_id.to_string(),
            region: region.to_string(),
            ..Self::default()
        }
    }

    fn skipped(mut self, reason: String) -> Self {
        self.skipped = Some(reason);
        self
    }

    fn failed(mut self, error: AwsError) -> Self {
        self.failures.push(error);
        self
    }

    /// Whether the event was not fully handled: a call failed, or EC2 has not caught up with the event.
    pub fn is_incomplete(&self) -> bool {
        !self.failures.is_empty() || self.retry_reason.is_some()
    }

    /// Whether a retry may complete it (every failure is retryable).
    pub fn retryable(&self) -> bool {
        self.failures.iter().all(|f| f.retryable)
    }

    fn retry_later(mut self, reason: String) -> Self {
        self.retry_reason = Some(reason);
        self
    }

    /// The plan this reconciliation made (done and not done).
    pub fn plan(&self) -> Plan {
        Plan {
            actions: self.done.iter().chain(&self.not_done).cloned().collect(),
            deferred: self.deferred.clone(),
        }
    }

    /// One line for a person: what happened to the image and why.
    pub fn headline(&self) -> String {
        let subject = format!("{} in {}", self.image_id, self.region);
        if let Some(reason) = &self.skipped {
            return format!("{subject}: skipped: {reason}");
        }
        let mut parts = vec![format!("rules [{}]", self.rules.join(", "))];
        if self.done.is_empty() && self.not_done.is_empty() {
            parts.push("already as configured, nothing to do".into());
        }
        parts.extend(self.done.iter().map(|a| format!("done: {a}")));
        let label = if self.dry_run { "would" } else { "not done" };
        parts.extend(self.not_done.iter().map(|a| format!("{label}: {a}")));
        parts.extend(self.deferred.iter().map(|d| format!("deferred: {d}")));
        parts.extend(self.failures.iter().map(|f| format!("failed: {f}")));
        parts.extend(self.retry_reason.iter().map(|r| format!("to retry: {r}")));
        format!("{subject}: {}", parts.join("; "))
    }
}

/// Reconciles the image an event names. `home_region` is used when the event names none.
pub async fn reconcile(
    event: &ImageEvent,
    home_region: &str,
    config: &Config,
    ec2: &impl Ec2,
    mode: Mode,
) -> Outcome {
    let region = event.image.region.as_deref().unwrap_or(home_region);
    let image_id = event.image.image_id.as_str();
    let outcome = Outcome::new(image_id, region);

    // A terminal state reported by the event needs no look: there is nothing left to tag or share.
    if let EventKind::StateChange { state } = &event.kind
        && matches!(state.as_str(), "failed" | "deregistered" | "disabled")
    {
        return outcome.skipped(format!("the state-change event reports the image {state}"));
    }

    let image = match ec2.describe_image(region, image_id).await {
        Ok(ImageLookup::Owned(image)) => image,
        Ok(ImageLookup::NotOwned { owner_id }) => {
            return outcome.skipped(format!(
                "owned by account {owner_id}, not this one: only the owner can tag or share an AMI"
            ));
        }
        // EC2 is eventually consistent: an image an event has just announced may not be visible yet.
        Ok(ImageLookup::NotFound) if event.kind != EventKind::Direct => {
            return outcome.retry_later(format!(
                "EC2 does not show {image_id} in {region} yet (it is eventually consistent); if it persists, the image was deregistered or the event names another region"
            ));
        }
        Ok(ImageLookup::NotFound) => {
            return outcome.skipped(format!("no such image in {region}"));
        }
        Err(e) => return outcome.failed(e),
    };
    let created_by = match &event.kind {
        EventKind::ApiCall(created_by) => *created_by,
        EventKind::StateChange { .. } | EventKind::Direct => image.created_by,
    };
    let lagging = matches!(&event.kind, EventKind::StateChange { state } if state == "available")
        && image.state == ImageState::Pending;
    let outcome = reconcile_image(image, created_by, config, ec2, mode, outcome).await;
    if lagging && !outcome.rules.is_empty() {
        // No later event will come for this image: have this one delivered again.
        return outcome.retry_later(format!(
            "the event says {image_id} is available but DescribeImages still says pending (EC2 is eventually consistent)"
        ));
    }
    outcome
}

/// Selects, observes what the plan needs, plans and (in [`Mode::Apply`]) applies, for a described image.
pub async fn reconcile_image(
    mut image: ObservedImage,
    created_by: CreatedBy,
    config: &Config,
    ec2: &impl Ec2,
    mode: Mode,
    mut outcome: Outcome,
) -> Outcome {
    outcome.created_by = Some(created_by);
    let facts = ImageFacts {
        name: image.name.as_deref(),
        tags: &image.tags,
        owner_id: &image.owner_id,
        created_by,
    };
    let desired = desired_for(config, &facts);
    if desired.is_empty() {
        let name = image.name.as_deref().unwrap_or("(no name)");
        return outcome.skipped(format!("no rule selects it (name {name:?})"));
    }
    outcome.rules = desired.rules.clone();
    outcome.conflicts = desired.conflicts.clone();

    let reads = reads_needed(&desired, &image);
    let snapshot_ids: Vec<String> = image
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect();
    let region = image.region.clone();
    let (permissions, snapshot_tags) = futures::join!(
        async {
            match reads.launch_permissions {
                true => Some(
                    ec2.describe_launch_permissions(&region, &image.image_id)
                        .await,
                ),
                false => None,
            }
        },
        async {
            match reads.snapshot_tags {
                true => Some(ec2.describe_snapshot_tags(&region, &snapshot_ids).await),
                false => None,
            }
        }
    );
    match permissions.transpose() {
        Ok(permissions) => image.launch_permissions = permissions,
        Err(e) => return outcome.failed(e),
    }
    match snapshot_tags.transpose() {
        Ok(Some(mut by_id)) => {
            for snapshot in &mut image.snapshots {
                snapshot.tags = Some(by_id.remove(&snapshot.snapshot_id).unwrap_or_default());
            }
        }
        Ok(None) => {}
        Err(e) => return outcome.failed(e),
    }

    let plan = plan(&desired, &image);
    outcome.deferred = plan.deferred;
    if mode == Mode::DryRun {
        outcome.dry_run = true;
        outcome.not_done = plan.actions;
        return outcome;
    }
    // Tagging and sharing are independent: run them together.
    let results = join_all(plan.actions.iter().map(|action| apply(ec2, action))).await;
    for (action, result) in plan.actions.into_iter().zip(results) {
        match result {
            Ok(()) => outcome.done.push(action),
            Err(e) => {
                outcome.not_done.push(action);
                outcome.failures.push(e);
            }
        }
    }
    outcome
}

async fn apply(ec2: &impl Ec2, action: &Action) -> Result<(), AwsError> {
    match action {
        Action::CreateTags {
            region,
            resources,
            tags,
        } => ec2.create_tags(region, resources, tags).await,
        Action::AddLaunchPermissions {
            region,
            image_id,
            permissions,
        } => {
            ec2.add_launch_permissions(region, image_id, permissions)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    use super::*;
    use crate::observed::{ObservedSnapshot, Tags};
    use crate::targets::LaunchPermission;
    use crate::trigger::ImageRef;

    /// An in-memory EC2 with one image; records every call and can fail chosen operations.
    struct FakeEc2 {
        image: Mutex<ObservedImage>,
        snapshot_tags: Mutex<BTreeMap<String, Tags>>,
        calls: Mutex<Vec<&'static str>>,
        failing: Vec<&'static str>,
    }

    impl FakeEc2 {
        fn new(state: ImageState) -> Self {
            Self {
                image: Mutex::new(ObservedImage {
                    image_id: "ami-12345678".into(),
                    region: "eu-west-1".into(),
                    name: Some("golden-1".into()),
                    owner_id: "123456789012".into(),
                    state,
                    tags: Tags::new(),
                    created_by: CreatedBy::CreateImage,
                    snapshots: vec![ObservedSnapshot {
                        snapshot_id: "snap-1".into(),
                        tags: None,
                    }],
                    launch_permissions: None,
                }),
                snapshot_tags: Mutex::new([("snap-1".to_string(), Tags::new())].into()),
                calls: Mutex::new(Vec::new()),
                failing: Vec::new(),
            }
        }

        fn call(&self, operation: &'static str, region: &str) -> Result<(), AwsError> {
            assert_eq!(region, "eu-west-1", "{operation} in the image's region");
            self.calls.lock().unwrap().push(operation);
            if self.failing.contains(&operation) {
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

        fn calls(&self) -> Vec<&'static str> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl Ec2 for FakeEc2 {
        async fn describe_image(&self, region: &str, _: &str) -> Result<ImageLookup, AwsError> {
            self.call("DescribeImages", region)?;
            Ok(ImageLookup::Owned(self.image.lock().unwrap().clone()))
        }
        async fn describe_launch_permissions(
            &self,
            region: &str,
            _: &str,
        ) -> Result<BTreeSet<LaunchPermission>, AwsError> {
            self.call("DescribeImageAttribute", region)?;
            Ok(self
                .image
                .lock()
                .unwrap()
                .launch_permissions
                .clone()
                .unwrap_or_default())
        }
        async fn describe_snapshot_tags(
            &self,
            region: &str,
            _: &[String],
        ) -> Result<BTreeMap<String, Tags>, AwsError> {
            self.call("DescribeSnapshots", region)?;
            Ok(self.snapshot_tags.lock().unwrap().clone())
        }
        async fn create_tags(
            &self,
            region: &str,
            resources: &[String],
            tags: &Tags,
        ) -> Result<(), AwsError> {
            self.call("CreateTags", region)?;
            let mut image = self.image.lock().unwrap();
            let mut snapshots = self.snapshot_tags.lock().unwrap();
            for r in resources {
                if *r == image.image_id {
                    image.tags.extend(tags.clone());
                } else {
                    snapshots.entry(r.clone()).or_default().extend(tags.clone());
                }
            }
            Ok(())
        }
        async fn add_launch_permissions(
            &self,
            region: &str,
            _: &str,
            permissions: &[LaunchPermission],
        ) -> Result<(), AwsError> {
            self.call("ModifyImageAttribute", region)?;
            let mut image = self.image.lock().unwrap();
            image
                .launch_permissions
                .get_or_insert_default()
                .extend(permissions.iter().cloned());
            Ok(())
        }
    }

    fn config(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    fn sharing_config() -> Config {
        config(
            "[[rule]]\nname = \"golden\"\nmatch.name = [\"golden-*\"]\ntags = { t = \"1\" }\nshare.accounts = [\"210987654321\"]\n",
        )
    }

    fn event(kind: EventKind) -> ImageEvent {
        ImageEvent {
            image: ImageRef {
                region: None,
                image_id: "ami-12345678".into(),
            },
            kind,
            account: None,
            event_id: None,
        }
    }

    const WRITES: [&str; 2] = ["CreateTags", "ModifyImageAttribute"];

    #[tokio::test]
    async fn apply_then_reapply_writes_once() {
        let ec2 = FakeEc2::new(ImageState::Available);
        let e = event(EventKind::Direct);
        let first = reconcile(&e, "eu-west-1", &sharing_config(), &ec2, Mode::Apply).await;
        assert_eq!(first.done.len(), 2, "{}", first.headline());
        let writes_before = ec2.calls().iter().filter(|c| WRITES.contains(c)).count();
        let second = reconcile(&e, "eu-west-1", &sharing_config(), &ec2, Mode::Apply).await;
        assert!(second.done.is_empty() && second.not_done.is_empty());
        assert_eq!(
            ec2.calls().iter().filter(|c| WRITES.contains(c)).count(),
            writes_before
        );
        assert!(
            second.headline().contains("nothing to do"),
            "{}",
            second.headline()
        );
    }

    #[tokio::test]
    async fn a_dry_run_reads_but_never_writes() {
        let ec2 = FakeEc2::new(ImageState::Available);
        let outcome = reconcile(
            &event(EventKind::Direct),
            "eu-west-1",
            &sharing_config(),
            &ec2,
            Mode::DryRun,
        )
        .await;
        assert_eq!(outcome.not_done.len(), 2);
        assert!(outcome.done.is_empty());
        assert!(
            !ec2.calls().iter().any(|c| WRITES.contains(c)),
            "{:?}",
            ec2.calls()
        );
        assert_eq!(outcome.plan().actions.len(), 2);
        assert!(
            outcome
                .headline()
                .contains("would: tag ami-12345678, snap-1"),
            "{}",
            outcome.headline()
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_recorded_beside_what_succeeded() {
        let mut ec2 = FakeEc2::new(ImageState::Available);
        ec2.failing = vec!["CreateTags"];
        let outcome = reconcile(
            &event(EventKind::Direct),
            "eu-west-1",
            &sharing_config(),
            &ec2,
            Mode::Apply,
        )
        .await;
        assert!(outcome.is_incomplete() && outcome.retryable());
        assert!(matches!(
            outcome.done.as_slice(),
            [Action::AddLaunchPermissions { .. }]
        ));
        assert!(matches!(
            outcome.not_done.as_slice(),
            [Action::CreateTags { .. }]
        ));
        let headline = outcome.headline();
        assert!(
            headline.contains("done: share") && headline.contains("not done: tag"),
            "{headline}"
        );
        assert!(headline.contains("RequestLimitExceeded"), "{headline}");
    }

    #[tokio::test]
    async fn reads_the_plan_cannot_use_are_not_made() {
        // Tags only, snapshots untagged: no DescribeImageAttribute, no DescribeSnapshots.
        let ec2 = FakeEc2::new(ImageState::Available);
        let c = config("[[rule]]\nname = \"t\"\ntags = { t = \"1\" }\ntag_snapshots = false\n");
        reconcile(
            &event(EventKind::Direct),
            "eu-west-1",
            &c,
            &ec2,
            Mode::Apply,
        )
        .await;
        assert_eq!(ec2.calls(), ["DescribeImages", "CreateTags"]);
        // A pending image: no launch permission read either.
        let ec2 = FakeEc2::new(ImageState::Pending);
        let outcome = reconcile(
            &event(EventKind::Direct),
            "eu-west-1",
            &sharing_config(),
            &ec2,
            Mode::Apply,
        )
        .await;
        assert_eq!(
            ec2.calls(),
            ["DescribeImages", "DescribeSnapshots", "CreateTags"]
        );
        assert_eq!(outcome.deferred.len(), 1);
    }

    #[tokio::test]
    async fn a_terminal_state_event_makes_no_call_and_no_rule_means_no_write() {
        let ec2 = FakeEc2::new(ImageState::Available);
        let failed = event(EventKind::StateChange {
            state: "failed".into(),
        });
        let outcome = reconcile(&failed, "eu-west-1", &sharing_config(), &ec2, Mode::Apply).await;
        assert!(
            outcome
                .skipped
                .unwrap()
                .contains("reports the image failed")
        );
        assert!(ec2.calls().is_empty());
        let c = config(
            "[[rule]]\nname = \"other\"\nmatch.name = [\"other-*\"]\ntags = { t = \"1\" }\n",
        );
        let outcome = reconcile(
            &event(EventKind::Direct),
            "eu-west-1",
            &c,
            &ec2,
            Mode::Apply,
        )
        .await;
        assert!(
            outcome
                .skipped
                .unwrap()
                .contains("no rule selects it (name \"golden-1\")")
        );
        assert_eq!(ec2.calls(), ["DescribeImages"]);
    }

    #[tokio::test]
    async fn created_by_comes_from_the_event_before_the_image() {
        let ec2 = FakeEc2::new(ImageState::Available);
        let c = config(
            "[[rule]]\nname = \"reg\"\nmatch.created_by = [\"RegisterImage\"]\ntags = { t = \"1\" }\n",
        );
        let by_event = event(EventKind::ApiCall(CreatedBy::RegisterImage));
        let outcome = reconcile(&by_event, "eu-west-1", &c, &ec2, Mode::DryRun).await;
        assert_eq!(outcome.rules, ["reg"]);
        let by_image = event(EventKind::StateChange {
            state: "available".into(),
        });
        let outcome = reconcile(&by_image, "eu-west-1", &c, &ec2, Mode::DryRun).await;
        assert_eq!(outcome.created_by, Some(CreatedBy::CreateImage));
        assert!(outcome.rules.is_empty());
    }
}
