//! A receiving account's readiness check: can this account launch this AMI, and if not, what exactly to
//! fix. Pure: it judges what the receiver sees (the image as DescribeImages shows it there, the region's
//! Allowed AMIs settings, each snapshot key as KMS answers this account); `ami-share check` reads those
//! with the receiver's credentials (`aws::receiver`).
//!
//! Why each check (AWS EC2 guide, "Allowed AMIs" and "Share an AMI"): a shared AMI the receiver's Allowed
//! AMIs criteria exclude is neither listed nor launchable there, and the owner sees no error; an encrypted
//! snapshot launches only if its key admits the receiver (else the launch fails with
//! `Client.InternalError`); image block public access only stops public sharing, never a share.

use serde::Serialize;

use crate::keys::{APPROVAL_TAG, APPROVAL_TAG_VALUE};
use crate::observed::ImageState;
use crate::time::Timestamp;

/// The image as the receiving account's DescribeImages shows it.
#[derive(Debug, Clone, Default)]
pub struct SeenImage {
    pub owner_id: String,
    /// `ImageOwnerAlias`: `amazon`, `aws-marketplace`, or none for an account's own AMI.
    pub owner_alias: Option<String>,
    pub name: Option<String>,
    pub state: ImageState,
    pub creation_date: Option<Timestamp>,
    pub deprecation_time: Option<Timestamp>,
    pub product_codes: Vec<String>,
    /// `ImageAllowed`, which EC2 reports while Allowed AMIs is enabled or in audit mode.
    pub image_allowed: Option<bool>,
    /// The ids of its encrypted EBS snapshots (the receiver sees that they are encrypted, not with what).
    pub encrypted_snapshots: Vec<String>,
}

/// The region's Allowed AMIs settings (GetAllowedImagesSettings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedImages {
    Disabled,
    Enabled {
        criteria: Vec<Criterion>,
        by_policy: bool,
    },
    AuditMode {
        criteria: Vec<Criterion>,
        by_policy: bool,
    },
    /// The settings could not be read (e.g. `ec2:GetAllowedImagesSettings` denied): why.
    Unread(String),
}

/// One Allowed AMIs image criterion: an image matches it when every parameter it sets matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Criterion {
    pub providers: Vec<String>,
    pub names: Vec<String>,
    pub product_codes: Vec<String>,
    pub max_days_since_created: Option<u32>,
    pub max_days_since_deprecated: Option<u32>,
    /// Parameters this check does not evaluate (image watermarks, Inspector scan results).
    pub unevaluated: Vec<String>,
}

/// One snapshot key, as KMS answered DescribeKey from this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyView {
    /// KMS described it to this account: its `KeyState` (`Enabled`, `Disabled`, `PendingDeletion`, …).
    /// `on_snapshot`: this account saw the key on the snapshot; otherwise the operator named it
    /// (`--kms-key`), and whether it is the snapshot's key cannot be seen from here.
    Described {
        arn: String,
        state: String,
        on_snapshot: bool,
    },
    /// KMS refused (AccessDenied): its message.
    Refused { arn: String, message: String },
    /// No such key (deleted, or a wrong ARN).
    Missing { arn: String },
    /// Which key encrypts the snapshot is not visible from this account.
    Unseen { snapshot_id: String },
    /// KMS answered DescribeKey with another error: its message.
    Unreadable { arn: String, message: String },
}

/// Everything the check judges.
#[derive(Debug, Clone)]
pub struct ReceiverView {
    pub image_id: String,
    pub region: String,
    pub image: Option<SeenImage>,
    /// The owner account the operator named (`--owner`), for when the image cannot be seen.
    pub owner_hint: Option<String>,
    pub allowed: AllowedImages,
    pub keys: Vec<KeyView>,
    pub now: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Problem,
    /// Not verifiable from this account; the detail says how to find out.
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &'static str, detail: String) -> Check {
    Check {
        check,
        verdict: Verdict::Ok,
        detail,
        fix: None,
    }
}

fn problem(check: &'static str, detail: String, fix: String) -> Check {
    Check {
        check,
        verdict: Verdict::Problem,
        detail,
        fix: Some(fix),
    }
}

fn unknown(check: &'static str, detail: String, fix: String) -> Check {
    Check {
        check,
        verdict: Verdict::Unknown,
        detail,
        fix: Some(fix),
    }
}

/// Ready when every check is ok.
pub fn is_ready(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.verdict == Verdict::Ok)
}

/// The checks, in order: the image, Allowed AMIs, deprecation, each key, block public access.
pub fn checks(view: &ReceiverView) -> Vec<Check> {
    let mut checks = vec![visibility(view)];
    checks.push(allowed(view));
    if let Some(image) = &view.image {
        checks.push(deprecation(image, view.now));
    }
    checks.extend(view.keys.iter().map(key));
    checks.push(ok(
        "block-public-access",
        "image block public access does not apply: it stops public sharing, never a share with accounts, OUs or organizations".into(),
    ));
    checks
}

fn visibility(view: &ReceiverView) -> Check {
    let (id, region) = (&view.image_id, &view.region);
    let Some(image) = &view.image else {
        let hidden = matches!(view.allowed, AllowedImages::Enabled { .. });
        return problem(
            "image",
            format!(
                "this account cannot see {id} in {region}{}",
                if hidden {
                    " (not shared with it, or hidden by Allowed AMIs: see below)"
                } else {
                    ": it is not shared with this account (or does not exist there)"
                }
            ),
            format!(
                "the owner shares it with this account, its OU or its organization (an ami-share rule's share targets), in {region}: AMIs are regional, a copy in another region is shared on its own"
            ),
        );
    };
    let owner = &image.owner_id;
    match image.state {
        ImageState::Available => ok(
            "image",
            format!("{id} is visible in {region} (owner {owner}, available)"),
        ),
        ImageState::Pending | ImageState::Transient => problem(
            "image",
            format!("{id} is {} in {region}", image.state),
            "wait until it is available: a pending AMI cannot be launched (and is shared once available)".into(),
        ),
        _ => problem(
            "image",
            format!("{id} is {} in {region}", image.state),
            format!("ask its owner ({owner}) for a usable AMI: this one can no longer be launched"),
        ),
    }
}

fn allowed(view: &ReceiverView) -> Check {
    let (criteria, by_policy, enforced) = match &view.allowed {
        AllowedImages::Disabled => {
            return ok(
                "allowed-amis",
                format!("Allowed AMIs is disabled in {}", view.region),
            );
        }
        AllowedImages::Unread(why) => {
            return unknown(
                "allowed-amis",
                format!(
                    "could not read the Allowed AMIs settings of {}: {why}",
                    view.region
                ),
                "run this check with a principal that may call ec2:GetAllowedImagesSettings".into(),
            );
        }
        AllowedImages::Enabled {
            criteria,
            by_policy,
        } => (criteria, *by_policy, true),
        AllowedImages::AuditMode {
            criteria,
            by_policy,
        } => (criteria, *by_policy, false),
    };
    let owner = view
        .image
        .as_ref()
        .map(|i| i.owner_id.clone())
        .or_else(|| view.owner_hint.clone());
    let verdict = match &view.image {
        // EC2's own answer, when it gives one, over this evaluation (which judges no watermarks or
        // scan results, and may lag behind new criteria).
        Some(image) => Some(match (image.image_allowed, admits(criteria, image, view.now)) {
            (Some(false), Admission::Admitted(why)) => Admission::Refused(vec![format!(
                "EC2 reports ImageAllowed = false (by this check's reading, {why}: look at the criteria it does not judge)"
            )]),
            (Some(true), Admission::Refused(_)) => {
                Admission::Admitted("EC2 reports ImageAllowed = true".into())
            }
            (_, admission) => admission,
        }),
        None => owner.as_ref().map(|owner| {
            // Not visible: only the owner can be judged.
            let as_owner = SeenImage {
                owner_id: owner.clone(),
                ..SeenImage::default()
            };
            match criteria.iter().any(|c| c.providers.is_empty() || provider_matches(c, &as_owner)) {
                true => Admission::Undecided(
                    "a criterion admits images of this owner, but its other parameters (names, age, deprecation) cannot be judged without seeing the image".into(),
                ),
                false => Admission::Refused(vec![format!(
                    "no criterion's ImageProviders names owner {owner}"
                )]),
            }
        }),
    };
    let where_to_fix = match by_policy {
        true => {
            "the organization's declarative policy sets it (ec2_attributes.allowed_images_settings): its administrators add"
        }
        false => {
            "add, with ec2:ReplaceImageCriteriaInAllowedImagesSettings or the EC2 console (AMIs > Allowed AMIs),"
        }
    };
    let owner_text = owner.as_deref().unwrap_or("<owner account>");
    match (verdict, enforced) {
        (None, _) => unknown(
            "allowed-amis",
            format!(
                "Allowed AMIs is {} in {}, and without seeing the image its owner is not known",
                if enforced { "enabled" } else { "in audit mode" },
                view.region
            ),
            "run the check again with --owner <the AMI owner's account id>".into(),
        ),
        (Some(Admission::Undecided(why)), _) => unknown(
            "allowed-amis",
            format!("Allowed AMIs is {} in {}: {why}", if enforced { "enabled" } else { "in audit mode" }, view.region),
            "make the image visible to this account first (see the image check), then run the check again".into(),
        ),
        (Some(Admission::Admitted(why)), true) => ok(
            "allowed-amis",
            format!(
                "Allowed AMIs is enabled in {} and admits it: {why}",
                view.region
            ),
        ),
        (Some(Admission::Admitted(why)), false) => ok(
            "allowed-amis",
            format!(
                "Allowed AMIs is in audit mode in {} and would admit it: {why}",
                view.region
            ),
        ),
        (Some(Admission::Refused(why)), enforced) => {
            let detail = format!(
                "Allowed AMIs is {} in {} and its criteria refuse this image: {}",
                if enforced { "enabled" } else { "in audit mode" },
                view.region,
                why.join("; ")
            );
            let fix = format!(
                "{where_to_fix} a criterion with ImageProviders = [\"{owner_text}\"] (and, if you use them, image names that match ami-share's copy names and an age that fits copies, which are dated when copied)"
            );
            match enforced {
                true => problem("allowed-amis", detail, fix),
                false => ok(
                    "allowed-amis",
                    format!(
                        "{detail} (audit mode: launches still work; they would not once it is enabled: {fix})"
                    ),
                ),
            }
        }
    }
}

enum Admission {
    Admitted(String),
    /// Not decidable from what this account sees: why.
    Undecided(String),
    /// Why each criterion refuses.
    Refused(Vec<String>),
}

/// Whether any criterion admits the image (Allowed AMIs: one matching criterion suffices; within a
/// criterion every parameter it sets must match).
fn admits(criteria: &[Criterion], image: &SeenImage, now: Timestamp) -> Admission {
    if criteria.is_empty() {
        return Admission::Refused(vec![
            "there are no criteria, so no image of another account is allowed".into(),
        ]);
    }
    let mut why = Vec::new();
    for (n, criterion) in criteria.iter().enumerate() {
        match refusal(criterion, image, now) {
            None => {
                let mut admitted = format!("criterion {} matches", n + 1);
                if !criterion.unevaluated.is_empty() {
                    admitted.push_str(&format!(
                        " (its {} not judged here)",
                        criterion.unevaluated.join(", ")
                    ));
                }
                return Admission::Admitted(admitted);
            }
            Some(reason) => why.push(format!("criterion {}: {reason}", n + 1)),
        }
    }
    Admission::Refused(why)
}

fn provider_matches(criterion: &Criterion, image: &SeenImage) -> bool {
    criterion
        .providers
        .iter()
        .any(|p| *p == image.owner_id || image.owner_alias.as_deref() == Some(p.as_str()))
}

/// Why `criterion` refuses the image, or `None` when it admits it.
fn refusal(criterion: &Criterion, image: &SeenImage, now: Timestamp) -> Option<String> {
    if !criterion.providers.is_empty() && !provider_matches(criterion, image) {
        return Some(format!(
            "ImageProviders [{}] does not name owner {}",
            criterion.providers.join(", "),
            image.owner_id
        ));
    }
    if !criterion.names.is_empty() {
        let name = image.name.as_deref().unwrap_or_default();
        if !criterion.names.iter().any(|p| wildcard_matches(p, name)) {
            return Some(format!(
                "ImageNames [{}] does not match its name {name:?}",
                criterion.names.join(", ")
            ));
        }
    }
    if !criterion.product_codes.is_empty()
        && !image
            .product_codes
            .iter()
            .any(|c| criterion.product_codes.contains(c))
    {
        return Some(format!(
            "MarketplaceProductCodes [{}] names none of its product codes",
            criterion.product_codes.join(", ")
        ));
    }
    if let Some(days) = criterion.max_days_since_created {
        let age = image.creation_date.map(|c| days_between(c, now));
        let too_old = image
            .creation_date
            .is_none_or(|c| now.secs() - c.secs() > i64::from(days) * 86_400);
        if too_old {
            return Some(format!(
                "CreationDateCondition allows images up to {days} days old; it is {}",
                age.map_or("of unknown age".into(), |a| format!("{a} days old"))
            ));
        }
    }
    if let Some(days) = criterion.max_days_since_deprecated
        && let Some(deprecated) = image.deprecation_time.filter(|t| *t <= now)
    {
        let since = days_between(deprecated, now);
        if now.secs() - deprecated.secs() > i64::from(days) * 86_400 {
            return Some(format!(
                "DeprecationTimeCondition allows images deprecated up to {days} days ago; it was deprecated {since} days ago"
            ));
        }
    }
    None
}

fn days_between(from: Timestamp, to: Timestamp) -> i64 {
    (to.secs() - from.secs()).div_euclid(86_400)
}

/// Allowed AMIs' name wildcards: `*` any run of characters, `?` one.
fn wildcard_matches(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

fn deprecation(image: &SeenImage, now: Timestamp) -> Check {
    match image.deprecation_time {
        Some(at) if at <= now => ok(
            "deprecation",
            format!(
                "deprecated since {at}: still launchable by its id, but listed only with IncludeDeprecated (and Allowed AMIs' DeprecationTimeCondition counts from then)"
            ),
        ),
        Some(at) => ok(
            "deprecation",
            format!("not deprecated (deprecation set for {at})"),
        ),
        None => ok("deprecation", "not deprecated".into()),
    }
}

fn key(view: &KeyView) -> Check {
    match view {
        KeyView::Described {
            arn,
            state,
            on_snapshot: true,
        } if state == "Enabled" => ok(
            "key",
            format!("{arn} encrypts the snapshot, is enabled, and its policy lets this account call DescribeKey (the calls EBS makes with it at launch, through EC2, cannot be tried from here)"),
        ),
        KeyView::Described {
            arn,
            state,
            on_snapshot: false,
        } if state == "Enabled" => unknown(
            "key",
            format!("{arn} is enabled and its policy lets this account call DescribeKey, but this account cannot see whether it is the key of the AMI's snapshots (--kms-key)"),
            "ask the owner to confirm the key (aws ec2 describe-snapshots in the owner account), or to grant this account create-volume permission on the snapshots so the check can see it".into(),
        ),
        KeyView::Unreadable { arn, message } => unknown(
            "key",
            format!("KMS answered DescribeKey on {arn} with an error: {message}"),
            "run the check again; if it persists, look at the error".into(),
        ),
        KeyView::Described { arn, state, .. } => problem(
            "key",
            format!("{arn} is {state}: EBS cannot decrypt the snapshot, so a launch fails"),
            "its owner enables the key (or cancels its deletion)".into(),
        ),
        // ami-share's keys let their receivers call DescribeKey themselves (its DescribeKey statements):
        // a refusal means this account is not among them. (A key whose owner admits receivers only
        // through EC2, by hand, would be refused too: the detail says so.)
        KeyView::Refused { arn, message } => problem(
            "key",
            format!("KMS refuses this account DescribeKey on {arn} ({message}): most likely the key's policy does not admit this account, and a launch would fail with Client.InternalError; or this account's IAM policy does not allow kms:DescribeKey on it, or the key's policy admits it only through EC2 (a key ami-share opened before it wrote DescribeKey statements, until its next write, or one opened by hand)"),
            format!("the key's policy must admit this account: with ami-share, this account (or its OU or organization) must be among the share targets of a rule that selects the AMI, and the key approved by its owner (the {APPROVAL_TAG}={APPROVAL_TAG_VALUE} tag, or an alias in ApprovedKeyAliases); this account's IAM policy must allow the KMS actions too (README, \"Encrypted AMIs\")"),
        ),
        KeyView::Missing { arn } => problem(
            "key",
            format!("{arn} does not exist: the snapshot cannot be decrypted"),
            "ask the owner which key encrypts the AMI's snapshots (it may have been deleted)".into(),
        ),
        KeyView::Unseen { snapshot_id } => unknown(
            "key",
            format!("{snapshot_id} is encrypted, but this account cannot see with which key (a shared AMI's snapshots are visible only with create-volume permission)"),
            "run the check again with --kms-key <key ARN> (the owner finds it with aws ec2 describe-snapshots --snapshot-ids <id>)".into(),
        ),
    }
}

/// The check's lines: `ok`, `problem` or `unknown`, the check, what was found, and the fix.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let verdict = match c.verdict {
            Verdict::Ok => "ok",
            Verdict::Problem => "problem",
            Verdict::Unknown => "unknown",
        };
        out.push_str(&format!("{verdict:<8} {:<20} {}", c.check, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("\n{:<29} fix: {fix}", ""));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: &str = "123456789012";

    fn now() -> Timestamp {
        Timestamp::parse("2026-12-02T00:00:00Z").unwrap()
    }

    fn image() -> SeenImage {
        SeenImage {
            owner_id: OWNER.into(),
            name: Some("golden-al2023-us-west-2".into()),
            state: ImageState::Available,
            creation_date: Timestamp::parse("2026-11-22T00:00:00Z"),
            ..SeenImage::default()
        }
    }

    fn view(allowed: AllowedImages) -> ReceiverView {
        ReceiverView {
            image_id: "ami-0abc".into(),
            region: "us-west-2".into(),
            image: Some(image()),
            owner_hint: None,
            allowed,
            keys: vec![],
            now: now(),
        }
    }

    fn enabled(criteria: Vec<Criterion>) -> AllowedImages {
        AllowedImages::Enabled {
            criteria,
            by_policy: false,
        }
    }

    fn providers(p: &[&str]) -> Criterion {
        Criterion {
            providers: p.iter().map(|s| s.to_string()).collect(),
            ..Criterion::default()
        }
    }

    fn verdict_of(checks: &[Check], name: &str) -> (Verdict, String) {
        let c = checks.iter().find(|c| c.check == name).unwrap();
        (
            c.verdict,
            format!("{} | {}", c.detail, c.fix.clone().unwrap_or_default()),
        )
    }

    #[test]
    fn a_visible_image_with_allowed_amis_off_and_no_key_is_ready() {
        let checks = checks(&view(AllowedImages::Disabled));
        assert!(is_ready(&checks), "{}", render(&checks));
        assert_eq!(
            checks.len(),
            4,
            "image, allowed-amis, deprecation, block-public-access"
        );
    }

    #[test]
    fn allowed_amis_admits_by_provider_and_names_what_refuses() {
        let admitted = checks(&view(enabled(vec![
            providers(&["amazon"]),
            providers(&[OWNER]),
        ])));
        assert!(is_ready(&admitted), "{}", render(&admitted));
        assert!(
            verdict_of(&admitted, "allowed-amis")
                .1
                .contains("criterion 2 matches")
        );

        let refused = checks(&view(enabled(vec![providers(&["amazon", "111122223333"])])));
        let (verdict, text) = verdict_of(&refused, "allowed-amis");
        assert_eq!(verdict, Verdict::Problem);
        assert!(
            text.contains("does not name owner 123456789012")
                && text.contains(r#"ImageProviders = ["123456789012"]"#)
                && text.contains("ReplaceImageCriteriaInAllowedImagesSettings"),
            "{text}"
        );
        assert!(!is_ready(&refused));

        let by_policy = checks(&view(AllowedImages::Enabled {
            criteria: vec![],
            by_policy: true,
        }));
        let (verdict, text) = verdict_of(&by_policy, "allowed-amis");
        assert_eq!(verdict, Verdict::Problem);
        assert!(
            text.contains("no criteria") && text.contains("declarative policy"),
            "{text}"
        );
    }

    #[test]
    fn names_ages_and_deprecation_narrow_a_criterion() {
        let mut named = providers(&[OWNER]);
        named.names = vec!["golden-*-us-east-1".into()];
        let (verdict, text) =
            verdict_of(&checks(&view(enabled(vec![named.clone()]))), "allowed-amis");
        assert_eq!(verdict, Verdict::Problem);
        assert!(
            text.contains(r#"does not match its name "golden-al2023-us-west-2""#),
            "{text}"
        );
        named.names.push("golden-?l2023-*".into());
        assert!(is_ready(&checks(&view(enabled(vec![named])))));

        let mut young = providers(&[OWNER]);
        young.max_days_since_created = Some(7);
        let (verdict, text) =
            verdict_of(&checks(&view(enabled(vec![young.clone()]))), "allowed-amis");
        assert_eq!(verdict, Verdict::Problem);
        assert!(
            text.contains("up to 7 days old; it is 10 days old"),
            "{text}"
        );
        young.max_days_since_created = Some(10);
        assert!(is_ready(&checks(&view(enabled(vec![young])))));

        let mut fresh = providers(&[OWNER]);
        fresh.max_days_since_deprecated = Some(0);
        let mut v = view(enabled(vec![fresh]));
        v.image.as_mut().unwrap().deprecation_time = Timestamp::parse("2026-11-30T00:00:00Z");
        let checks = checks(&v);
        let (verdict, text) = verdict_of(&checks, "allowed-amis");
        assert_eq!(verdict, Verdict::Problem);
        assert!(text.contains("deprecated 2 days ago"), "{text}");
        assert!(
            verdict_of(&checks, "deprecation")
                .1
                .contains("still launchable by its id")
        );
    }

    #[test]
    fn audit_mode_never_blocks_but_says_what_enabling_it_would_do() {
        let checks = checks(&view(AllowedImages::AuditMode {
            criteria: vec![providers(&["amazon"])],
            by_policy: false,
        }));
        assert!(is_ready(&checks));
        let (_, text) = verdict_of(&checks, "allowed-amis");
        assert!(
            text.contains("audit mode") && text.contains("would not once it is enabled"),
            "{text}"
        );
    }

    #[test]
    fn an_invisible_image_is_a_problem_and_its_owner_can_be_judged_when_named() {
        let mut v = view(enabled(vec![providers(&["amazon"])]));
        v.image = None;
        let c = checks(&v);
        assert_eq!(verdict_of(&c, "image").0, Verdict::Problem);
        assert!(verdict_of(&c, "image").1.contains("hidden by Allowed AMIs"));
        assert_eq!(verdict_of(&c, "allowed-amis").0, Verdict::Unknown);
        v.owner_hint = Some(OWNER.into());
        let (verdict, text) = verdict_of(&checks(&v), "allowed-amis");
        assert_eq!(verdict, Verdict::Problem);
        assert!(text.contains("names owner 123456789012"), "{text}");
        v.allowed = enabled(vec![providers(&[OWNER])]);
        let (verdict, text) = verdict_of(&checks(&v), "allowed-amis");
        assert_eq!(
            verdict,
            Verdict::Unknown,
            "names and ages cannot be judged unseen"
        );
        assert!(
            text.contains("cannot be judged without seeing the image"),
            "{text}"
        );
    }

    #[test]
    fn keys_are_ok_only_when_kms_describes_them_enabled_to_this_account() {
        let mut v = view(AllowedImages::Disabled);
        let arn = "arn:aws:kms:us-west-2:123456789012:key/1111".to_string();
        v.keys = vec![KeyView::Described {
            arn: arn.clone(),
            state: "Enabled".into(),
            on_snapshot: true,
        }];
        assert!(is_ready(&checks(&v)));
        v.keys = vec![KeyView::Described {
            arn: arn.clone(),
            state: "Enabled".into(),
            on_snapshot: false,
        }];
        let named = checks(&v);
        assert_eq!(
            verdict_of(&named, "key").0,
            Verdict::Unknown,
            "a key only named by the operator"
        );
        assert!(!is_ready(&named));
        v.keys = vec![KeyView::Described {
            arn: arn.clone(),
            state: "PendingDeletion".into(),
            on_snapshot: false,
        }];
        assert_eq!(verdict_of(&checks(&v), "key").0, Verdict::Problem);
        v.keys = vec![KeyView::Missing { arn: arn.clone() }];
        assert_eq!(verdict_of(&checks(&v), "key").0, Verdict::Problem);
        v.keys = vec![KeyView::Refused {
            arn: arn.clone(),
            message: "AccessDeniedException".into(),
        }];
        let c = checks(&v);
        assert_eq!(verdict_of(&c, "key").0, Verdict::Problem);
        assert!(!is_ready(&c));
        v.keys = vec![KeyView::Unseen {
            snapshot_id: "snap-1".into(),
        }];
        assert!(verdict_of(&checks(&v), "key").1.contains("--kms-key"));
    }

    #[test]
    fn wildcards_are_allowed_amis_star_and_question_mark() {
        for (pattern, text, expected) in [
            ("golden-*", "golden-1", true),
            ("golden-*", "golden-", true),
            ("*-us-west-2", "golden-al2023-us-west-2", true),
            ("golden-?", "golden-12", false),
            ("g*n-*-2", "golden-al2023-us-west-2", true),
            ("golden", "golden-1", false),
            ("*", "", true),
        ] {
            assert_eq!(
                wildcard_matches(pattern, text),
                expected,
                "{pattern} {text}"
            );
        }
    }
}
