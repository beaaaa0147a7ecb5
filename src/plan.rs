//! Planning: what the selecting rules want × what AWS has → the calls still needed.
//!
//! Pure and total. The plan holds only what is missing, so applying it and planning again on the state
//! it produced yields an empty plan: duplicate events, retries and re-runs change nothing. Calls are
//! grouped to the fewest: one CreateTags per distinct set of missing tags (normally one for the image and
//! all its snapshots), one ModifyImageAttribute for all missing launch permissions.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::observed::{ImageState, ObservedImage, Tags};
use crate::rules::Desired;
use crate::targets::LaunchPermission;

/// One AWS call the plan needs. Plain data: it is what `plan` shows a person and what `apply` executes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// EC2 CreateTags: set `tags` on every resource (image and snapshot ids) listed.
    CreateTags {
        region: String,
        resources: Vec<String>,
        tags: Tags,
    },
    /// EC2 ModifyImageAttribute launchPermission Add.
    AddLaunchPermissions {
        region: String,
        image_id: String,
        permissions: Vec<LaunchPermission>,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreateTags {
                region,
                resources,
                tags,
            } => {
                let tags: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(
                    f,
                    "tag {} in {region}: {}",
                    resources.join(", "),
                    tags.join(", ")
                )
            }
            Self::AddLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                let to: Vec<String> = permissions.iter().map(ToString::to_string).collect();
                write!(f, "share {image_id} in {region} with {}", to.join(", "))
            }
        }
    }
}

/// The actions for one image, and what was left for later and why.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Work deliberately not planned now (e.g. sharing a pending image), with the reason.
    pub deferred: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

/// Which extra reads planning needs for this image, so that the edge makes no call the plan won't use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reads {
    pub launch_permissions: bool,
    pub snapshot_tags: bool,
}

pub fn reads_needed(desired: &Desired, image: &ObservedImage) -> Reads {
    let shareable = image.state == ImageState::Available;
    let taggable = matches!(image.state, ImageState::Available | ImageState::Pending);
    Reads {
        launch_permissions: shareable && !desired.launch_permissions.is_empty(),
        snapshot_tags: taggable && !desired.snapshot_tags.is_empty() && !image.snapshots.is_empty(),
    }
}

/// The calls still needed to bring `image` to `desired`.
///
/// - `available`: missing tags and missing launch permissions;
/// - `pending`: missing tags now; sharing is deferred (EC2 refuses to share a pending image with
///   `InvalidAMIID.Unavailable`), it happens on the "available" state-change event;
/// - any other state: nothing.
pub fn plan(desired: &Desired, image: &ObservedImage) -> Plan {
    let mut plan = Plan::default();
    match image.state {
        ImageState::Available => {}
        ImageState::Pending => {
            if !desired.launch_permissions.is_empty() {
                plan.deferred.push(format!(
                    "sharing {} waits until it is available (EC2 cannot share a pending image); the \"EC2 AMI State Change\" event to available triggers it",
                    image.image_id
                ));
            }
        }
        ref other => {
            plan.deferred.push(format!(
                "{} is {other}: nothing to tag or share",
                image.image_id
            ));
            return plan;
        }
    }
    plan.actions.extend(tag_actions(desired, image));
    if image.state == ImageState::Available {
        let current = image.launch_permissions.as_ref();
        let missing: Vec<LaunchPermission> = desired
            .launch_permissions
            .iter()
            .filter(|p| !current.is_some_and(|c| c.contains(p)))
            .cloned()
            .collect();
        if !missing.is_empty() {
            plan.actions.push(Action::AddLaunchPermissions {
                region: image.region.clone(),
                image_id: image.image_id.clone(),
                permissions: missing,
            });
        }
    }
    plan
}

/// The tags each resource lacks (absent, or with another value), grouped by identical sets.
fn tag_actions(desired: &Desired, image: &ObservedImage) -> Vec<Action> {
    let mut by_missing: BTreeMap<Tags, Vec<String>> = BTreeMap::new();
    let empty = Tags::new();
    let mut consider = |resource: &str, want: &Tags, have: &Tags| {
        let missing: Tags = want
            .iter()
            .filter(|(k, v)| have.get(*k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !missing.is_empty() {
            by_missing
                .entry(missing)
                .or_default()
                .push(resource.to_string());
        }
    };
    consider(&image.image_id, &desired.image_tags, &image.tags);
    if !desired.snapshot_tags.is_empty() {
        for snapshot in &image.snapshots {
            let have = snapshot.tags.as_ref().unwrap_or(&empty);
            consider(&snapshot.snapshot_id, &desired.snapshot_tags, have);
        }
    }
    by_missing
        .into_iter()
        .map(|(tags, resources)| Action::CreateTags {
            region: image.region.clone(),
            resources,
            tags,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::observed::ObservedSnapshot;

    const ORG: &str = "arn:aws:organizations::123456789012:organization/o-a1b2c3d4e5";

    fn tags(pairs: &[(&str, &str)]) -> Tags {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn org() -> LaunchPermission {
        LaunchPermission::Organization(ORG.parse().unwrap())
    }

    fn account(id: &str) -> LaunchPermission {
        LaunchPermission::Account(id.parse().unwrap())
    }

    fn image(state: ImageState) -> ObservedImage {
        ObservedImage {
            image_id: "ami-12345678".into(),
            region: "us-east-1".into(),
            name: Some("golden".into()),
            owner_id: "123456789012".into(),
            state,
            tags: Tags::new(),
            created_by: crate::config::CreatedBy::CreateImage,
            snapshots: vec![ObservedSnapshot {
                snapshot_id: "snap-1".into(),
                tags: Some(Tags::new()),
            }],
            launch_permissions: Some(BTreeSet::new()),
        }
    }

    fn desired() -> Desired {
        Desired {
            rules: vec!["r".into()],
            image_tags: tags(&[("team", "platform"), ("shared", "yes")]),
            snapshot_tags: tags(&[("team", "platform"), ("shared", "yes")]),
            launch_permissions: [org(), account("210987654321")].into(),
            conflicts: vec![],
        }
    }

    /// Applies a plan to the observed state the way AWS would: what `plan` promises to converge on.
    fn applied(mut image: ObservedImage, plan: &Plan) -> ObservedImage {
        for action in &plan.actions {
            match action {
                Action::CreateTags {
                    resources, tags, ..
                } => {
                    for r in resources {
                        if *r == image.image_id {
                            image.tags.extend(tags.clone());
                        }
                        for s in image.snapshots.iter_mut().filter(|s| s.snapshot_id == *r) {
                            s.tags.get_or_insert_default().extend(tags.clone());
                        }
                    }
                }
                Action::AddLaunchPermissions { permissions, .. } => {
                    image
                        .launch_permissions
                        .get_or_insert_default()
                        .extend(permissions.iter().cloned());
                }
            }
        }
        image
    }

    #[test]
    fn an_untouched_available_image_gets_one_tag_call_and_one_share_call() {
        let p = plan(&desired(), &image(ImageState::Available));
        assert_eq!(p.actions.len(), 2, "{p:#?}");
        assert_eq!(
            p.actions[0],
            Action::CreateTags {
                region: "us-east-1".into(),
                resources: vec!["ami-12345678".into(), "snap-1".into()],
                tags: desired().image_tags,
            }
        );
        assert_eq!(
            p.actions[1],
            Action::AddLaunchPermissions {
                region: "us-east-1".into(),
                image_id: "ami-12345678".into(),
                permissions: vec![org(), account("210987654321")],
            }
        );
        assert!(p.deferred.is_empty());
    }

    #[test]
    fn planning_again_after_applying_plans_nothing() {
        for state in [ImageState::Available, ImageState::Pending] {
            let first = plan(&desired(), &image(state.clone()));
            let after = applied(image(state), &first);
            assert!(plan(&desired(), &after).is_empty(), "{after:#?}");
        }
    }

    #[test]
    fn only_what_is_missing_is_planned() {
        let mut img = image(ImageState::Available);
        img.tags = tags(&[("team", "platform"), ("other", "kept")]);
        img.snapshots[0].tags = Some(desired().snapshot_tags);
        img.launch_permissions = Some([org()].into());
        let p = plan(&desired(), &img);
        assert_eq!(
            p.actions,
            [
                Action::CreateTags {
                    region: "us-east-1".into(),
                    resources: vec!["ami-12345678".into()],
                    tags: tags(&[("shared", "yes")]),
                },
                Action::AddLaunchPermissions {
                    region: "us-east-1".into(),
                    image_id: "ami-12345678".into(),
                    permissions: vec![account("210987654321")],
                }
            ]
        );
    }

    #[test]
    fn a_tag_with_another_value_is_set_to_the_configured_value() {
        let mut img = image(ImageState::Available);
        img.tags = tags(&[("team", "someone-else"), ("shared", "yes")]);
        img.snapshots.clear();
        img.launch_permissions = Some(desired().launch_permissions);
        let p = plan(&desired(), &img);
        assert_eq!(
            p.actions,
            [Action::CreateTags {
                region: "us-east-1".into(),
                resources: vec!["ami-12345678".into()],
                tags: tags(&[("team", "platform")]),
            }]
        );
    }

    #[test]
    fn a_pending_image_is_tagged_now_and_shared_later() {
        let p = plan(&desired(), &image(ImageState::Pending));
        assert!(
            matches!(p.actions.as_slice(), [Action::CreateTags { .. }]),
            "{p:#?}"
        );
        assert_eq!(p.deferred.len(), 1);
        assert!(p.deferred[0].contains("waits until it is available"));
    }

    #[test]
    fn failed_deregistered_disabled_and_unknown_images_are_left_alone() {
        for state in [
            ImageState::Failed,
            ImageState::Deregistered,
            ImageState::Disabled,
            ImageState::Other("transient".into()),
        ] {
            let p = plan(&desired(), &image(state.clone()));
            assert!(p.is_empty(), "{state}");
            assert!(p.deferred[0].contains(&state.to_string()));
        }
    }

    #[test]
    fn snapshots_with_different_missing_tags_get_separate_calls() {
        let mut d = desired();
        d.snapshot_tags = tags(&[("team", "platform")]);
        let mut img = image(ImageState::Available);
        img.snapshots.push(ObservedSnapshot {
            snapshot_id: "snap-2".into(),
            tags: Some(tags(&[("team", "platform")])),
        });
        img.launch_permissions = Some(d.launch_permissions.clone());
        let p = plan(&d, &img);
        assert_eq!(p.actions.len(), 2, "{p:#?}");
        let resources: Vec<Vec<String>> = p
            .actions
            .iter()
            .map(|a| match a {
                Action::CreateTags { resources, .. } => resources.clone(),
                other => panic!("{other}"),
            })
            .collect();
        assert!(resources.contains(&vec!["ami-12345678".to_string()]));
        assert!(resources.contains(&vec!["snap-1".to_string()]));
    }

    #[test]
    fn reads_are_asked_only_when_the_plan_uses_them() {
        let d = desired();
        let r = reads_needed(&d, &image(ImageState::Available));
        assert!(r.launch_permissions && r.snapshot_tags);
        let r = reads_needed(&d, &image(ImageState::Pending));
        assert!(!r.launch_permissions && r.snapshot_tags);
        let mut only_tags = d.clone();
        only_tags.launch_permissions.clear();
        only_tags.snapshot_tags.clear();
        let r = reads_needed(&only_tags, &image(ImageState::Available));
        assert!(!r.launch_permissions && !r.snapshot_tags);
        let r = reads_needed(&d, &image(ImageState::Failed));
        assert!(!r.launch_permissions && !r.snapshot_tags);
    }

    #[test]
    fn actions_print_for_a_person() {
        let p = plan(&desired(), &image(ImageState::Available));
        assert_eq!(
            p.actions[0].to_string(),
            "tag ami-12345678, snap-1 in us-east-1: shared=yes, team=platform"
        );
        assert_eq!(
            p.actions[1].to_string(),
            format!(
                "share ami-12345678 in us-east-1 with organization {ORG}, account 210987654321"
            )
        );
    }
}
