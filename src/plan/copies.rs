//! Copies: the copies to the rules' other regions, and the re-encrypted copy (with the status an image that
//! cannot be shared as it is carries), each planned like an image of its own under its source's rules.

use super::*;

/// The copies to the rules' other regions: made once the source is available; each copy, once there,
/// planned like an image of its own under the source's rules (tags, key, shares), and never copied again.
pub(super) fn regional_copies(
    desired: &Desired,
    wanted: &CopyWanted,
    observed: &Observed,
    plan: &mut Plan,
) {
    let source = &observed.image;
    let targets = copy_targets(wanted, source);
    if targets.is_empty() {
        return;
    }
    if source.state != ImageState::Available {
        let names: Vec<&str> = targets.iter().map(|(r, _)| r.as_str()).collect();
        plan.deferred.push(format!(
            "copies to {} wait until {} is available (CopyImage needs an available source)",
            names.join(", "),
            source.image_id
        ));
        for (region, _) in targets {
            plan.regions.insert(region.clone(), RegionCopy::Waiting);
        }
        return;
    }
    // What a key's owner has not approved is not copied to other keys either.
    let unapproved = copy_blockers(desired, source);
    if !unapproved.is_empty() {
        let why = unapproved
            .iter()
            .map(|b| b.detail.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        for (region, _) in targets {
            let reason = format!("not copied: {why}");
            plan.blocked.push(format!("no copy in {region}: {reason}"));
            plan.regions
                .insert(region.clone(), RegionCopy::Blocked { reason });
        }
        return;
    }
    for (region, key_ref) in targets {
        let status = match observed.regional.get(region.as_str()) {
            Some(Some(found)) => region_copy(
                desired,
                wanted,
                observed,
                region,
                key_ref.as_ref(),
                found,
                plan,
            ),
            None | Some(None) => RegionCopy::Unread,
        };
        plan.regions.insert(region.clone(), status);
    }
}

pub(super) fn region_copy(
    desired: &Desired,
    wanted: &CopyWanted,
    observed: &Observed,
    region: &str,
    key_ref: Option<&KeyRef>,
    found: &ObservedCopies,
    plan: &mut Plan,
) -> RegionCopy {
    let source = &observed.image;
    let copy_desired = desired_for_copy(desired, source, CopyKind::Regional);
    plan.notes.extend(found.ignored.iter().cloned());
    if let Some(copy) = chosen_copy(&found.copies) {
        let copy_plan = self::plan(
            &copy_desired,
            &Observed {
                image: copy.clone(),
                now: observed.now,
                ..Observed::default()
            },
        );
        let blocked = copy_plan.blocked.first().cloned();
        plan.actions.extend(copy_plan.actions);
        plan.deferred.extend(copy_plan.deferred);
        plan.blocked.extend(copy_plan.blocked);
        plan.notes.extend(copy_plan.notes);
        plan.blocked
            .extend(duplicate_copies(&found.copies, copy, source, "copies"));
        return RegionCopy::Copy {
            image_id: copy.image_id.clone(),
            state: copy.state.clone(),
            blocked,
        };
    }
    let mut blocked = |reason: String| {
        plan.blocked.push(format!("no copy in {region}: {reason}"));
        RegionCopy::Blocked { reason }
    };
    let failed = failed_copies(&found.copies);
    if failed.len() >= MAX_FAILED_COPIES {
        return blocked(too_many_failed(&failed, "copies"));
    }
    let key = match copy_key(key_ref, found.key.as_ref(), &source.owner_id, region) {
        Ok(key) => key,
        Err(why) => return blocked(why),
    };
    let values = TemplateValues {
        name: source.name.as_deref().unwrap_or(&source.image_id),
        description: source.description.as_deref().unwrap_or_default(),
        image_id: &source.image_id,
        source_region: &source.region,
        region,
    };
    let own = match wanted.source_tags {
        true => own_tags(source),
        false => Tags::new(),
    };
    plan.actions.push(Action::CopyImage(new_copy(CopyDraft {
        kind: CopyKind::Regional,
        source,
        region,
        key: key.as_ref(),
        name: wanted.name.render(&values, MAX_NAME_CHARS),
        description: wanted.description.render(&values, MAX_DESCRIPTION_CHARS),
        tags: copy_tags(
            own,
            copy_desired.image_tags,
            &format!("the copy of {} in {region}", source.image_id),
            &mut plan.limits,
        ),
        snapshot_tags: copy_snapshot_tags(
            &desired.snapshot_tags,
            &format!("the copy of {} in {region}", source.image_id),
            &mut plan.limits,
        ),
        previous: &failed.into_iter().collect::<Vec<_>>(),
    })));
    plan.deferred.push(format!(
        "sharing the copy of {} in {region} waits until the copy is available",
        source.image_id
    ));
    RegionCopy::ToCopy
}

/// The ids of ami-share's copies (of one kind, in one region) that can no longer be used.
pub(super) fn failed_copies(copies: &[ObservedImage]) -> BTreeSet<&str> {
    copies.iter().map(|c| c.image_id.as_str()).collect()
}

/// Why no more copies are made; `what`: "copies" or "re-encrypted copies".
pub(super) fn too_many_failed(failed: &BTreeSet<&str>, what: &str) -> String {
    let ids: Vec<&str> = failed.iter().copied().collect();
    format!(
        "{} {what} failed ({}): deregister them to have ami-share try again",
        ids.len(),
        ids.join(", ")
    )
}

/// A note on usable copies beside the chosen one (made outside ami-share's idempotency, e.g. by hand).
pub(super) fn duplicate_copies(
    copies: &[ObservedImage],
    chosen: &ObservedImage,
    source: &ObservedImage,
    what: &str,
) -> Option<String> {
    let duplicates: Vec<&str> = usable(copies)
        .filter(|c| c.image_id != chosen.image_id)
        .map(|c| c.image_id.as_str())
        .collect();
    (!duplicates.is_empty()).then(|| {
        format!(
            "{} also {what} of {} in {}; ami-share shares only {}: deregister the others",
            duplicates.join(", "),
            source.image_id,
            chosen.region,
            chosen.image_id
        )
    })
}

/// At most this many copies of one image (re-encrypted, or in one region) may fail before ami-share stops
/// making new ones.
pub(super) const MAX_FAILED_COPIES: usize = 3;

/// The status tags for an image that cannot be shared as it is, and the plan of its re-encrypted copy.
pub(super) fn status_and_reencrypted_copy(
    desired: &Desired,
    observed: &Observed,
    blocked: &[Blocker],
) -> (Tags, Option<Plan>) {
    let image = &observed.image;
    // Lead with what a copy cannot cure: it is what the operator must act on.
    let mut ordered: Vec<&Blocker> = blocked.iter().collect();
    ordered.sort_by_key(|b| b.cured_by_copy);
    let cause = match ordered.as_slice() {
        [one] => one.summary.clone(),
        [first, rest @ ..] => format!("{} (+{} more)", first.summary, rest.len()),
        [] => unreachable!("blocked has a reason"),
    };
    let curable = blocked.iter().all(|b| b.cured_by_copy);
    let not_shared = |reason: String| markers::status_tags(Status::NotShared, &reason);
    let key_ref = match &desired.reencrypt_with {
        Some(key_ref) if curable => key_ref,
        None if curable => {
            // ami-share never copies its own copies: a regional copy is cured at its making.
            let remedy = match provenance(image) {
                Provenance::Copy(copy) if copy.kind == CopyKind::Regional => format!(
                    "to share copies in {}, set its kms_key in the rule's copy.regions",
                    image.region
                ),
                _ => "to share a re-encrypted copy instead, set reencrypt.kms_key".to_string(),
            };
            return (not_shared(format!("{cause}; {remedy}")), None);
        }
        _ => return (not_shared(cause), None),
    };
    let mut shared_as_copy = markers::status_tags(
        Status::SharedAsCopy,
        &format!(
            "{cause}; shared instead: a copy re-encrypted with {key_ref} (tag {})",
            markers::REENCRYPTED_COPY
        ),
    );
    let Some(reencryption) = &observed.reencryption else {
        // Not observed: nothing can be planned for the copy yet (the reconciler observes it when needed).
        return (shared_as_copy, None);
    };
    if let Some(copy) = chosen_copy(&reencryption.copies) {
        shared_as_copy.insert(markers::REENCRYPTED_COPY.into(), copy.image_id.clone());
        let mut copy_plan = plan(
            &desired_for_copy(desired, image, CopyKind::Reencrypted),
            &Observed {
                image: copy.clone(),
                now: observed.now,
                ..Observed::default()
            },
        );
        copy_plan.blocked.extend(duplicate_copies(
            &reencryption.copies,
            copy,
            image,
            "re-encrypted copies",
        ));
        return (shared_as_copy, Some(copy_plan));
    }
    // No usable copy: the ones found failed; the one the image names may have been deregistered since.
    let failed = failed_copies(&reencryption.copies);
    if failed.len() >= MAX_FAILED_COPIES {
        let why = too_many_failed(&failed, "re-encrypted copies");
        return (
            not_shared(format!("{cause}; {why}")),
            Some(Plan {
                blocked: vec![why],
                ..Plan::default()
            }),
        );
    }
    let mut previous = failed;
    previous.extend(
        image
            .tags
            .get(markers::REENCRYPTED_COPY)
            .map(String::as_str),
    );
    let previous: Vec<&str> = previous.into_iter().collect();
    let key = copy_key(
        Some(key_ref),
        reencryption.key.as_ref(),
        &image.owner_id,
        &image.region,
    );
    match key {
        Ok(key) => {
            let description = format!(
                "{} re-encrypted with {key_ref} by ami-share, to be shared in its place",
                image.image_id
            );
            let marks = desired_for_copy(desired, image, CopyKind::Reencrypted).image_tags;
            let mut limits = Vec::new();
            let tags = copy_tags(
                own_tags(image),
                marks,
                &format!("the re-encrypted copy of {}", image.image_id),
                &mut limits,
            );
            let copy = new_copy(CopyDraft {
                kind: CopyKind::Reencrypted,
                source: image,
                region: &image.region,
                key: key.as_ref(),
                name: image.name.clone().unwrap_or_else(|| image.image_id.clone()),
                description: description.chars().take(MAX_DESCRIPTION_CHARS).collect(),
                tags,
                snapshot_tags: copy_snapshot_tags(
                    &desired.snapshot_tags,
                    &format!("the re-encrypted copy of {}", image.image_id),
                    &mut limits,
                ),
                previous: &previous,
            });
            (
                shared_as_copy,
                Some(Plan {
                    actions: vec![Action::CopyImage(copy)],
                    deferred: vec![format!(
                        "sharing the re-encrypted copy of {} waits until the copy is available",
                        image.image_id
                    )],
                    limits,
                    ..Plan::default()
                }),
            )
        }
        Err(why) => (
            not_shared(format!("{cause}; no re-encrypted copy: {why}")),
            Some(Plan {
                blocked: vec![format!("no re-encrypted copy: {why}")],
                ..Plan::default()
            }),
        ),
    }
}

/// What a copy of `source` must have: the source's wanted tags, shares, snapshot permissions,
/// deprecation and parameters, plus its marks; never a copy of its own.
pub fn desired_for_copy(desired: &Desired, source: &ObservedImage, kind: CopyKind) -> Desired {
    let mut image_tags = desired.image_tags.clone();
    image_tags.extend(markers::copy_tags(kind, &source.image_id, &source.region));
    Desired {
        image_tags,
        // A copy is as old as its source, as EC2 dates the source (copies are never copied: a source is
        // always an image of its own).
        family_created: source.creation_date,
        reencrypt_with: None,
        copy: None,
        conflicts: Vec::new(),
        ..desired.clone()
    }
}

/// The key a copy in `region` is to be encrypted with: `None` when none is configured, else the
/// configured key as KMS resolved it there, which must be an enabled customer managed key of the account
/// in that region; or why it cannot be used.
pub(super) fn copy_key(
    key_ref: Option<&KeyRef>,
    key: Option<&Option<ObservedKey>>,
    owner_id: &str,
    region: &str,
) -> Result<Option<KeyArn>, String> {
    let Some(key_ref) = key_ref else {
        return Ok(None);
    };
    let key = match key {
        None => return Err(format!("KMS key {key_ref} was not read")),
        Some(None) => {
            return Err(format!(
                "KMS key {key_ref} not found in {region}: create it there (an alias names a key per region)"
            ));
        }
        Some(Some(key)) => key,
    };
    let arn: KeyArn = key.arn.parse()?;
    if key.manager != KeyManager::Customer {
        return Err(format!("KMS key {key_ref} is not customer managed"));
    }
    if arn.account() != owner_id || arn.region() != region {
        return Err(format!(
            "KMS key {key_ref} is not of account {owner_id} in {region}"
        ));
    }
    if !key.is_enabled() {
        return Err(format!("KMS key {key_ref} is {}", key.state));
    }
    Ok(Some(arn))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::plan::*;

    #[test]
    fn with_reencrypt_an_unshareable_image_gets_a_marked_re_encrypted_copy() {
        let mut obs = reencryption(vec![], Some(Some(key(REENCRYPT_KEY, KeyManager::Customer))));
        obs.image.tags = tags(&[("Name", "golden"), ("aws:cloudformation:stack-name", "x")]);
        let p = plan(&reencrypting(), &obs);
        let copy = p
            .actions
            .iter()
            .find(|a| matches!(a, Action::CopyImage(_)))
            .unwrap_or_else(|| panic!("{p:#?}"));
        let Action::CopyImage(ImageCopy {
            region,
            source_image_id,
            name,
            kms_key_arn,
            client_token,
            tags: copy_tags,
            snapshot_tags,
            ..
        }) = copy
        else {
            unreachable!()
        };
        assert_eq!(
            (region.as_str(), source_image_id.as_str(), name.as_str()),
            ("us-east-1", "ami-12345678", "golden-reencrypted")
        );
        assert_eq!(kms_key_arn.as_deref(), Some(REENCRYPT_KEY));
        assert!(
            client_token.starts_with("ami-share-ami-12345678-") && client_token.len() <= 64,
            "{client_token}"
        );
        assert_eq!(copy_tags[markers::SOURCE_IMAGE], "ami-12345678");
        assert_eq!(copy_tags[markers::COPY_KIND], "re-encrypted");
        assert_eq!(copy_tags["Name"], "golden", "the source's own tags");
        assert_eq!(copy_tags["team"], "platform", "the rule's tags");
        assert!(!copy_tags.contains_key("aws:cloudformation:stack-name"));
        assert_eq!(*snapshot_tags, desired().snapshot_tags);
        assert!(
            !p.actions
                .iter()
                .any(|a| matches!(a, Action::AddLaunchPermissions { .. }))
        );
        let status = status_of(&p);
        assert_eq!(status[markers::STATUS], "shared-as-copy");
        assert_eq!(
            status[markers::STATUS_REASON],
            "snap-1 uses the AWS managed key aws/ebs, which cannot be shared; shared instead: a copy re-encrypted with alias/ami-share (tag ami-share:reencrypted-copy)"
        );
        assert!(
            !status.contains_key(markers::REENCRYPTED_COPY),
            "its id is not known yet"
        );
        assert!(p.deferred[0].contains("waits until the copy is available"));
    }

    #[test]
    fn an_existing_copy_is_finished_not_copied_again() {
        let mut copy = encrypted(
            REENCRYPT_KEY,
            Some(key(REENCRYPT_KEY, KeyManager::Customer)),
        );
        copy.image_id = "ami-copy0001".into();
        copy.state = ImageState::Pending;
        copy.tags = desired_for_copy(
            &reencrypting(),
            &encrypted(AWS_EBS, None),
            CopyKind::Reencrypted,
        )
        .image_tags;
        copy.snapshots[0].tags = Some(desired().snapshot_tags);
        copy.launch_permissions = None;
        let p = plan(&reencrypting(), &reencryption(vec![copy.clone()], None));
        assert!(
            !p.actions.iter().any(|a| matches!(a, Action::CopyImage(_))),
            "{p:#?}"
        );
        assert!(
            p.deferred
                .iter()
                .any(|d| d.contains("sharing ami-copy0001 waits")),
            "{p:#?}"
        );

        copy.state = ImageState::Available;
        copy.launch_permissions = Some(BTreeSet::new());
        let p = plan(&reencrypting(), &reencryption(vec![copy], None));
        let on_copy: Vec<String> = p
            .actions
            .iter()
            .filter(|a| !matches!(a, Action::CreateTags { .. } | Action::SetStatus { .. }))
            .map(ToString::to_string)
            .collect();
        assert_eq!(on_copy.len(), 2, "{p:#?}");
        assert!(on_copy[0].contains(REENCRYPT_KEY), "{on_copy:?}");
        assert!(on_copy[1].starts_with("share ami-copy0001"), "{on_copy:?}");
        assert_eq!(status_of(&p)[markers::REENCRYPTED_COPY], "ami-copy0001");
    }

    #[test]
    fn after_a_failed_or_vanished_copy_a_new_one_gets_its_own_token_and_name() {
        let key = || Some(Some(key(REENCRYPT_KEY, KeyManager::Customer)));
        let first = plan(&reencrypting(), &reencryption(vec![], key()));
        let first = copy_of(&first).unwrap().clone();
        let again = plan(&reencrypting(), &reencryption(vec![], key()));
        assert_eq!(
            copy_of(&again),
            Some(&first),
            "a retry repeats the token: EC2 returns the same copy"
        );

        let after_failure = plan(
            &reencrypting(),
            &reencryption(vec![failed_copy("ami-failed01")], key()),
        );
        let after_failure = copy_of(&after_failure).unwrap();
        assert_ne!(after_failure.client_token, first.client_token);
        assert!(
            after_failure.name.starts_with("golden-reencrypted-")
                && after_failure.name != first.name
        );

        // The copy the image names was deregistered: EC2 no longer lists it.
        let mut obs = reencryption(vec![], key());
        obs.image
            .tags
            .insert(markers::REENCRYPTED_COPY.into(), "ami-gone0001".into());
        let after_vanished = plan(&reencrypting(), &obs);
        let after_vanished = copy_of(&after_vanished).unwrap();
        assert_ne!(after_vanished.client_token, first.client_token);
        assert_ne!(after_vanished.client_token, after_failure.client_token);
    }

    #[test]
    fn after_three_failed_copies_no_more_are_made() {
        let failed = vec![
            failed_copy("ami-failed01"),
            failed_copy("ami-failed02"),
            failed_copy("ami-failed03"),
        ];
        let p = plan(
            &reencrypting(),
            &reencryption(failed, Some(Some(key(REENCRYPT_KEY, KeyManager::Customer)))),
        );
        assert!(copy_of(&p).is_none(), "{p:#?}");
        let status = status_of(&p);
        assert_eq!(status[markers::STATUS], "not-shared");
        assert!(
            status[markers::STATUS_REASON].contains("3 re-encrypted copies failed"),
            "{status:?}"
        );
    }

    #[test]
    fn a_copy_is_made_only_for_what_a_copy_cures() {
        let mut disabled = key(CMK, KeyManager::Customer);
        disabled.state = "Disabled".into();
        let obs = Observed {
            image: encrypted(CMK, Some(disabled)),
            reencryption: Some(ObservedCopies {
                copies: vec![],
                key: Some(Some(key(REENCRYPT_KEY, KeyManager::Customer))),
                ..ObservedCopies::default()
            }),
            regional: BTreeMap::new(),
            now: None,
        };
        assert!(!wants_reencrypted_copy(&reencrypting(), &obs.image));
        let p = plan(&reencrypting(), &obs);
        assert!(copy_of(&p).is_none(), "{p:#?}");
        assert_eq!(status_of(&p)[markers::STATUS], "not-shared");
        assert!(wants_reencrypted_copy(
            &reencrypting(),
            &encrypted(AWS_EBS, Some(key(AWS_EBS, KeyManager::Aws)))
        ));
    }

    #[test]
    fn no_copy_is_read_for_an_image_a_key_policy_keeps_from_sharing_after_the_copy_too() {
        assert!(wants_reencrypted_copy(
            &reencrypting(),
            &on_aws_ebs_and_cmk(KEY_POLICY)
        ));
        assert!(!wants_reencrypted_copy(
            &reencrypting(),
            &on_aws_ebs_and_cmk("not a policy")
        ));
    }

    #[test]
    fn what_another_accounts_key_protects_is_re_encrypted_or_copied_only_if_the_config_names_it() {
        let foreign = "arn:aws:kms:us-east-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let image = encrypted(foreign, None);
        assert!(!wants_reencrypted_copy(&reencrypting(), &image));
        let mut named = reencrypting();
        named.approved_keys = vec![foreign.parse().unwrap()];
        assert!(
            wants_reencrypted_copy(&named, &image),
            "its owner's consent, by ARN"
        );
        // Copies to other regions: likewise.
        let west = || ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&distributing(), &with_regions(image.clone(), Some(west())));
        assert!(copies(&p).is_empty(), "{p:#?}");
        assert!(
            matches!(&p.regions["us-west-2"], RegionCopy::Blocked { reason }
                if reason.contains("of account 210987654321") && reason.contains("keys.approved")),
            "{:?}",
            p.regions
        );
        let mut distributing_named = distributing();
        distributing_named
            .approved_keys
            .push(foreign.parse().unwrap());
        let p = plan(&distributing_named, &with_regions(image, Some(west())));
        assert_eq!(copies(&p).len(), 2, "{p:#?}");
    }

    #[test]
    fn duplicate_copies_are_reported_and_the_lowest_id_is_shared() {
        let mut a = encrypted(
            REENCRYPT_KEY,
            Some(key(REENCRYPT_KEY, KeyManager::Customer)),
        );
        a.image_id = "ami-copy000a".into();
        let mut b = a.clone();
        b.image_id = "ami-copy000b".into();
        let p = plan(&reencrypting(), &reencryption(vec![b, a], None));
        assert!(
            p.blocked
                .iter()
                .any(|m| m.contains("ami-copy000b also re-encrypted copies")
                    && m.contains("shares only ami-copy000a")),
            "{p:#?}"
        );
        assert_eq!(status_of(&p)[markers::REENCRYPTED_COPY], "ami-copy000a");
    }

    #[test]
    fn an_unusable_reencrypt_key_leaves_the_image_unshared_with_the_reason() {
        let other_region =
            "arn:aws:kms:eu-west-1:123456789012:key/77777777-12ab-34cd-56ef-1234567890ab";
        let cases = [
            (None, "KMS key alias/ami-share not found in us-east-1"),
            (
                Some(key(AWS_EBS, KeyManager::Aws)),
                "is not customer managed",
            ),
            (
                Some(key(other_region, KeyManager::Customer)),
                "is not of account 123456789012 in us-east-1",
            ),
        ];
        for (k, expected) in cases {
            let p = plan(&reencrypting(), &reencryption(vec![], Some(k)));
            assert!(
                !p.actions.iter().any(|a| matches!(a, Action::CopyImage(_))),
                "{p:#?}"
            );
            let status = status_of(&p);
            assert_eq!(status[markers::STATUS], "not-shared");
            assert!(
                status[markers::STATUS_REASON].contains(expected),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_copy_of_an_image_whose_rules_bring_47_tags_carries_at_most_50_with_its_marks_and_names_the_rest()
     {
        let mut wish = distributing();
        wish.image_tags = (0..47)
            .map(|i| (format!("t{i:02}"), "v".to_string()))
            .collect();
        wish.snapshot_tags = (0..55)
            .map(|i| (format!("s{i:02}"), "v".to_string()))
            .collect();
        let mut source = image(ImageState::Available);
        source.tags = tags(&[("os", "al2023")]);
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&wish, &with_regions(source, Some(west)));
        let made = copies(&p);
        assert_eq!(made.len(), 2, "{p:#?}");
        for copy in &made {
            assert_eq!(copy.tags.len(), TAGS_PER_RESOURCE, "{copy:#?}");
            assert_eq!(copy.snapshot_tags.len(), TAGS_PER_RESOURCE, "{copy:#?}");
            for mark in [
                markers::COPY_KIND,
                markers::SOURCE_IMAGE,
                markers::SOURCE_REGION,
            ] {
                assert!(copy.tags.contains_key(mark), "{mark} kept");
            }
        }
        let west: Vec<&String> = p
            .limits
            .iter()
            .filter(|l| l.contains("us-west-2"))
            .collect();
        assert_eq!(west.len(), 2, "{:#?}", p.limits);
        assert!(
            west[0].starts_with("1 tag(s) left out of the copy of ami-12345678 in us-west-2: EC2 allows 50 tags per resource, and ami-share's copy marks take 3")
                && west[0].ends_with("Left out: os"),
            "the rules' tags win over the source's own: {}",
            west[0]
        );
        assert!(
            west[1]
                .starts_with("5 snapshot tag(s) left out of the copy of ami-12345678 in us-west-2"),
            "{}",
            west[1]
        );
    }

    #[test]
    fn copies_wait_for_an_available_source() {
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Pending), None),
        );
        assert!(copies(&p).is_empty());
        assert_eq!(
            p.regions,
            BTreeMap::from([
                ("eu-central-1".to_string(), RegionCopy::Waiting),
                ("us-west-2".to_string(), RegionCopy::Waiting)
            ]),
            "the source's own region is never a target"
        );
        assert!(
            p.deferred
                .iter()
                .any(|d| d.contains("CopyImage needs an available source"))
        );
    }

    #[test]
    fn each_region_gets_one_marked_copy_with_its_key_name_and_tags() {
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west)),
        );
        let made = copies(&p);
        assert_eq!(made.len(), 2, "{p:#?}");
        let west = made.iter().find(|c| c.region == "us-west-2").unwrap();
        let frankfurt = made.iter().find(|c| c.region == "eu-central-1").unwrap();
        assert_eq!(west.kind, CopyKind::Regional);
        assert_eq!(west.source_region, "us-east-1");
        assert_eq!(west.name, "golden-us-west-2");
        assert_eq!(west.description, "Golden (from ami-12345678 in us-east-1)");
        assert_eq!(west.kms_key_arn.as_deref(), Some(WEST_KEY));
        assert_eq!(frankfurt.kms_key_arn, None, "no key: EC2's default");
        assert_ne!(
            west.client_token, frankfurt.client_token,
            "a token per region"
        );
        assert_eq!(west.tags["os"], "al2023", "the source's own tags");
        assert_eq!(west.tags["team"], "platform", "the rule's tags");
        assert!(
            !west.tags.contains_key("aws:ec2launchtemplate:id"),
            "never aws: tags"
        );
        assert_eq!(
            (
                west.tags[markers::COPY_KIND].as_str(),
                west.tags[markers::SOURCE_REGION].as_str(),
                west.tags[markers::SOURCE_IMAGE].as_str()
            ),
            ("regional", "us-east-1", "ami-12345678")
        );
        assert!(
            !west.tags.contains_key(markers::SOURCE_CREATED),
            "a copy's age is read from its source, never from a tag"
        );
        assert_eq!(p.regions["us-west-2"], RegionCopy::ToCopy);
        // The same state plans the same calls: a retry reuses the tokens, so EC2 returns the same copies.
        let again = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(ObservedCopies {
                    copies: vec![],
                    key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
                    ..ObservedCopies::default()
                }),
            ),
        );
        assert_eq!(copies(&again), made);
    }

    #[test]
    fn an_existing_copy_is_finished_under_the_sources_rules_and_never_copied() {
        let mut copy = image(ImageState::Available);
        copy.image_id = "ami-0west".into();
        copy.region = "us-west-2".into();
        copy.tags = markers::copy_tags(CopyKind::Regional, "ami-12345678", "us-east-1");
        let west = ObservedCopies {
            copies: vec![copy],
            ..ObservedCopies::default()
        };
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west)),
        );
        assert_eq!(copies(&p).len(), 1, "only Frankfurt's: {p:#?}");
        let in_west: Vec<&Action> = p
            .actions
            .iter()
            .filter(|a| matches!(a, Action::CreateTags { region, .. } | Action::AddLaunchPermissions { region, .. } | Action::DeprecateImage { region, .. } if region == "us-west-2"))
            .collect();
        assert_eq!(
            in_west.len(),
            3,
            "tags, share and deprecation of the copy: {p:#?}"
        );
        assert!(in_west.iter().any(|a| matches!(a, Action::DeprecateImage { image_id, deprecate_at, .. } if image_id == "ami-0west" && deprecate_at.to_string() == "2026-12-25T10:00:00Z")), "deprecated with its source");
        assert_eq!(
            p.regions["us-west-2"],
            RegionCopy::Copy {
                image_id: "ami-0west".into(),
                state: ImageState::Available,
                blocked: None,
            }
        );
    }

    #[test]
    fn what_an_unapproved_key_protects_is_not_copied_to_other_regions() {
        let mut source = encrypted(CMK, Some(unapproved_key()));
        source.launch_permissions = Some(BTreeSet::new());
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&distributing(), &with_regions(source, Some(west)));
        assert!(copies(&p).is_empty(), "{p:#?}");
        for region in ["us-west-2", "eu-central-1"] {
            assert!(
                matches!(&p.regions[region], RegionCopy::Blocked { reason }
                    if reason.contains("not copied") && reason.contains("has not approved ami-share")),
                "{region}: {:?}",
                p.regions[region]
            );
        }
        // Approved, it is copied.
        let mut approved = encrypted(CMK, Some(key(CMK, KeyManager::Customer)));
        approved.launch_permissions = Some(BTreeSet::new());
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(&distributing(), &with_regions(approved, Some(west)));
        assert_eq!(copies(&p).len(), 2, "{p:#?}");
    }

    #[test]
    fn a_missing_key_blocks_its_region_only_and_an_unread_region_plans_nothing() {
        let p = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(ObservedCopies {
                    copies: vec![],
                    key: Some(None),
                    ..ObservedCopies::default()
                }),
            ),
        );
        assert!(
            matches!(&p.regions["us-west-2"], RegionCopy::Blocked { reason } if reason.contains("alias/ami-share not found in us-west-2"))
        );
        assert_eq!(copies(&p).len(), 1);
        assert!(
            p.blocked
                .iter()
                .any(|b| b.starts_with("no copy in us-west-2"))
        );
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), None),
        );
        assert_eq!(p.regions["us-west-2"], RegionCopy::Unread);
        assert!(copies(&p).iter().all(|c| c.region != "us-west-2"));
    }

    #[test]
    fn after_three_failed_copies_in_a_region_none_is_made_and_a_new_attempt_gets_a_new_name() {
        let failed = |id: &str| {
            let mut c = failed_copy(id);
            c.region = "us-west-2".into();
            c
        };
        let west = |copies: Vec<ObservedImage>| ObservedCopies {
            copies,
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let first = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west(vec![]))),
        );
        let retry = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(west(vec![failed("ami-f1")])),
            ),
        );
        let name = |p: &Plan| {
            copies(p)
                .iter()
                .find(|c| c.region == "us-west-2")
                .unwrap()
                .name
                .clone()
        };
        assert_ne!(
            name(&first),
            name(&retry),
            "AMI names are unique per region"
        );
        assert!(name(&retry).starts_with("golden-us-west-2-"));
        let p = plan(
            &distributing(),
            &with_regions(
                image(ImageState::Available),
                Some(west(vec![
                    failed("ami-f1"),
                    failed("ami-f2"),
                    failed("ami-f3"),
                ])),
            ),
        );
        assert!(
            matches!(&p.regions["us-west-2"], RegionCopy::Blocked { reason } if reason.contains("3 copies failed"))
        );
    }
}
