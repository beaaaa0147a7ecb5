//! What the reconciler writes: the plan's actions in three phases, each region held back on its own, the
//! key policy write confirmed by reading it back, and a parameter write checked against the writes made
//! beside it.

use super::*;

impl<A: Aws> Reconciler<'_, A> {
    /// Three phases, each concurrent within (at most [`MAX_CONCURRENT_CALLS`] calls at once): tags,
    /// deprecation, key policies, copies, and the shares of regions with no key to patch; then the other
    /// launch and snapshot permissions; then status tags and SSM parameters. Each region is held back on its own: a region whose key policy patch failed gets
    /// no share (receivers could not launch from it), and a region where anything failed gets no status
    /// or parameter (they never claim what did not happen); the other regions go on.
    pub(super) async fn apply(&self, actions: Vec<Action>, outcome: &mut Outcome) {
        let (last, actions): (Vec<Action>, Vec<Action>) = actions
            .into_iter()
            .partition(|a| matches!(a, Action::SetStatus { .. } | Action::PutParameter { .. }));
        // A share waits only for the key patches of its region; where none is needed, it goes out with the
        // first phase (one round trip less).
        let patched: Vec<String> = actions
            .iter()
            .filter(|a| matches!(a, Action::PatchKeyPolicy { .. }))
            .map(|a| a.region().to_string())
            .collect();
        let (shares, first): (Vec<Action>, Vec<Action>) = actions.into_iter().partition(|a| {
            matches!(
                a,
                Action::AddLaunchPermissions { .. } | Action::AddCreateVolumePermission { .. }
            ) && patched.iter().any(|r| r == a.region())
        });
        // Key policy writes first: each merges into a read made just before this phase, and should not
        // wait behind other calls for a slot.
        let (mut first, others): (Vec<Action>, Vec<Action>) = first
            .into_iter()
            .partition(|a| matches!(a, Action::PatchKeyPolicy { .. }));
        first.extend(others);
        self.apply_phase(first, outcome).await;
        let key_failed: Vec<String> = outcome
            .not_done
            .iter()
            .filter_map(|a| match a {
                Action::PatchKeyPolicy { region, .. } => Some(region.clone()),
                _ => None,
            })
            .collect();
        let (held, shares): (Vec<Action>, Vec<Action>) = shares
            .into_iter()
            .partition(|a| key_failed.contains(&a.region().to_string()));
        if !held.is_empty() {
            let mut regions: Vec<&str> = held.iter().map(Action::region).collect();
            regions.dedup();
            outcome.blocked.push(format!(
                "not shared yet in {}: a key policy there could not be patched (see the failure), and receivers could not launch from it",
                regions.join(", ")
            ));
            outcome.not_done.extend(held);
        }
        // The written key policies are read back beside the shares (see `confirm_key_policy`).
        let written: Vec<(String, String, KeyGrantees)> = outcome
            .done
            .iter()
            .filter_map(|a| match a {
                Action::PatchKeyPolicy {
                    region,
                    key_arn,
                    grantees,
                    ..
                } => Some((region.clone(), key_arn.clone(), grantees.clone())),
                _ => None,
            })
            .collect();
        let confirmations = join_all(
            written
                .iter()
                .map(|(region, key, grantees)| self.confirm_key_policy(region, key, grantees)),
        );
        let ((), confirmed) = futures::join!(self.apply_phase(shares, outcome), confirmations);
        let confirmed_all = confirmed.iter().all(Result::is_ok);
        outcome
            .failures
            .extend(confirmed.into_iter().filter_map(Result::err));
        let (held, last): (Vec<Action>, Vec<Action>) = last.into_iter().partition(|a| {
            let region = a.region();
            outcome.failures.iter().any(|f| f.region == region)
        });
        outcome.not_done.extend(held);
        self.apply_phase(last, outcome).await;
        // A writer that read the policy before ours and wrote it after the read-back above dropped our
        // grantees unseen. Where no delayed re-check is sent for the key (the CLI; see `handler`), the
        // policy is read once more after a pause, after the shares, so the share waits for nothing.
        if let (Some(pause), false, true) = (
            self.key_policy_writes.recheck_after,
            written.is_empty(),
            confirmed_all,
        ) {
            tokio::time::sleep(pause).await;
            let confirmed = join_all(
                written
                    .iter()
                    .map(|(region, key, grantees)| self.confirm_key_policy(region, key, grantees)),
            )
            .await;
            outcome
                .failures
                .extend(confirmed.into_iter().filter_map(Result::err));
        }
    }

    /// PutParameter, and then the writes made since the version read before deciding. SSM has no
    /// conditional write: two deliveries for two images of one rule may both read the same version and
    /// both write, in either order. The one that writes last sees the other's write in the history
    /// (GetParameterHistory); if that named a newer image (by its family's `CreationDate`), it writes
    /// that image again. Whatever the order, the parameter ends on the newest image.
    async fn put_newest(
        &self,
        region: &str,
        name: &str,
        image_id: &str,
        after_version: Option<i64>,
        created: Option<Timestamp>,
    ) -> Result<(), AwsError> {
        let (mut ours, mut ours_created, mut after) =
            (image_id.to_string(), created, after_version);
        for write in 1..=MAX_PARAMETER_WRITES {
            let version = self.aws.put_parameter(region, name, &ours).await?;
            let history = self.aws.parameter_history(region, name).await?;
            let mut beside: Vec<&str> = history
                .iter()
                .filter(|p| after.is_none_or(|a| p.version > a) && p.version < version)
                .map(|p| p.value.as_str())
                .filter(|v| *v != ours && v.starts_with("ami-"))
                .collect();
            beside.sort_unstable();
            beside.dedup();
            let mut newer: Option<(String, Timestamp)> = None;
            for id in beside {
                // A value that cannot be looked at now cannot be shown newer: it is passed over (and
                // said), rather than failing a write that succeeded.
                let image = match self.aws.describe_image(region, id).await {
                    Ok(ImageLookup::Owned(image)) => image,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(
                            parameter = name,
                            region,
                            "could not compare {id} with {ours}: {e}"
                        );
                        continue;
                    }
                };
                let theirs = match self.family_created(&image).await {
                    Ok(Some(theirs)) => theirs,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(parameter = name, region, "could not date {id}: {e}");
                        continue;
                    }
                };
                if ours_created.is_none_or(|o| theirs > o)
                    && newer.as_ref().is_none_or(|(_, n)| theirs > *n)
                {
                    newer = Some((id.to_string(), theirs));
                }
            }
            let Some((id, theirs)) = newer else {
                return Ok(());
            };
            if write == MAX_PARAMETER_WRITES {
                // Still overtaken after as many writes as one reconciliation makes: have the event
                // delivered again rather than claim the parameter is right.
                return Err(AwsError {
                    operation: "PutParameter",
                    region: region.to_string(),
                    resource: name.to_string(),
                    code: None,
                    message: format!(
                        "{name} was written {write} times and concurrent writes still left it on {ours}, older than {id}"
                    ),
                    retryable: true,
                });
            }
            tracing::info!(
                parameter = name,
                region,
                "{ours} was written to {name} after {id}, which is newer: writing {id} again"
            );
            (ours, ours_created, after) = (id, Some(theirs), Some(version));
        }
        Ok(())
    }

    pub(super) async fn apply_phase(&self, actions: Vec<Action>, outcome: &mut Outcome) {
        let results: Vec<Result<Option<String>, AwsError>> =
            futures::stream::iter(actions.iter().map(|action| self.apply_one(action)))
                .buffered(MAX_CONCURRENT_CALLS)
                .collect()
                .await;
        for (action, result) in actions.into_iter().zip(results) {
            match result {
                Ok(made) => {
                    if let (Action::CopyImage(copy), Some(id)) = (&action, made)
                        && copy.kind == CopyKind::Regional
                    {
                        outcome.made.insert(copy.region.clone(), id);
                    }
                    outcome.done.push(action);
                }
                Err(e) => {
                    outcome.not_done.push(action);
                    outcome.failures.push(e);
                }
            }
        }
    }

    /// Makes the call of one action; for a CopyImage, returns the new image id.
    pub(super) async fn apply_one(&self, action: &Action) -> Result<Option<String>, AwsError> {
        match action {
            Action::CreateTags {
                region,
                resources,
                tags,
            } => {
                self.aws.create_tags(region, resources, tags).await?;
                self.shared.note_tags_written(region, resources, tags);
            }
            Action::SetStatus {
                region,
                image_id,
                tags,
            } => {
                self.aws
                    .create_tags(region, std::slice::from_ref(image_id), tags)
                    .await?
            }
            Action::AddLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                self.aws
                    .add_launch_permissions(region, image_id, permissions)
                    .await?
            }
            Action::PatchKeyPolicy {
                region,
                key_arn,
                grantees,
                policy,
                ..
            } => {
                self.write_key_policy(region, key_arn, grantees, policy)
                    .await?
            }
            Action::RemoveLaunchPermissions {
                region,
                image_id,
                permissions,
            } => {
                self.aws
                    .remove_launch_permissions(region, image_id, permissions)
                    .await?
            }
            Action::AddCreateVolumePermission {
                region,
                snapshot_id,
                accounts,
            } => {
                self.aws
                    .add_create_volume_permissions(region, snapshot_id, accounts)
                    .await?
            }
            Action::RemoveCreateVolumePermission {
                region,
                snapshot_id,
                permissions,
            } => {
                self.aws
                    .remove_create_volume_permissions(region, snapshot_id, permissions)
                    .await?
            }
            Action::DeprecateImage {
                region,
                image_id,
                deprecate_at,
            } => {
                self.aws
                    .enable_image_deprecation(region, image_id, *deprecate_at)
                    .await?
            }
            Action::ProtectImage {
                region,
                image_id,
                with_cooldown,
            } => {
                self.aws
                    .enable_image_deregistration_protection(region, image_id, *with_cooldown)
                    .await?
            }
            Action::PutParameter {
                region,
                name,
                image_id,
                after_version,
                created,
            } => {
                self.put_newest(region, name, image_id, *after_version, *created)
                    .await?
            }
            Action::CopyImage(copy) => return self.copy_image(copy).await.map(Some),
        }
        Ok(None)
    }

    /// Makes a copy and returns its id, making sure the id names a copy that lives. A client token EC2 has
    /// seen answers with the copy it made then, even when that copy has since been deregistered or failed
    /// (EC2's idempotency has no expiry for CopyImage), and a token spent with other parameters (another
    /// name, other tags) is refused: either way the region would wait for ever. So the answer is read back
    /// (one DescribeImages; a copy not listed is looked for again over a few seconds, for EC2's eventual
    /// consistency), and a copy that is gone or failed, or a spent token, is made again under a token
    /// chained on it, which a later event derives the same way (so it finds the same new copy, not a
    /// third). Dead answers cost no copy: at most [`MAX_LOST_COPIES`] of them, then the error names them.
    async fn copy_image(&self, copy: &ImageCopy) -> Result<String, AwsError> {
        let mut attempt = copy.clone();
        let mut dead: Vec<String> = Vec::new();
        loop {
            let (spent, why) = match self.copy_once(&attempt).await {
                Ok(copy_id) => match self.read_back(&attempt.region, &copy_id).await? {
                    ImageLookup::Owned(image) if image.state.is_terminal() => {
                        (copy_id, image.state.to_string())
                    }
                    ImageLookup::Owned(image) => {
                        self.restore_marks(&attempt, &image).await;
                        tracing::info!(
                            image_id = %copy.source_image_id,
                            copy_id = %copy_id,
                            copy_region = %copy.region,
                            "made {} copy {copy_id} of {} in {}",
                            copy.kind,
                            copy.source_image_id,
                            copy.region
                        );
                        return Ok(copy_id);
                    }
                    // Not this account's: no copy ami-share made (EC2 answers a token with the copy it
                    // made in this account), so none to wait on.
                    ImageLookup::NotOwned { .. } => (copy_id, "not this account's".to_string()),
                    ImageLookup::NotFound => (copy_id, "gone (deregistered)".to_string()),
                },
                Err(e) if e.code.as_deref() == Some("IdempotentParameterMismatch") => (
                    attempt.client_token.clone(),
                    "a client token spent with other parameters".to_string(),
                ),
                Err(e) => return Err(e),
            };
            tracing::warn!(
                image_id = %copy.source_image_id,
                copy_region = %copy.region,
                "CopyImage answered for the copy of {} in {} with {spent}, which is {why}: copying again under a new client token",
                copy.source_image_id,
                copy.region
            );
            dead.push(format!("{spent} ({why})"));
            if dead.len() >= MAX_LOST_COPIES {
                return Err(AwsError {
                    operation: "CopyImage",
                    region: copy.region.clone(),
                    resource: copy.source_image_id.clone(),
                    code: None,
                    message: format!(
                        "CopyImage answered {} times with an earlier copy that can no longer be used: {}; something keeps ending the copies of {} in {} (a cleanup deregistering them, a failing snapshot copy): stop it, or turn on deregistration_protection for the rule",
                        dead.len(),
                        dead.join(", "),
                        copy.source_image_id,
                        copy.region
                    ),
                    retryable: false,
                });
            }
            attempt = attempt.after_lost(&spent);
        }
    }

    /// DescribeImages of the copy CopyImage answered with; not listed, it is looked for again after each
    /// of the reconciler's read-back waits before it is taken for gone.
    async fn read_back(&self, region: &str, copy_id: &str) -> Result<ImageLookup, AwsError> {
        let mut lookup = self.aws.describe_image(region, copy_id).await?;
        for wait in self.copy_read_back {
            if lookup != ImageLookup::NotFound {
                break;
            }
            tokio::time::sleep(*wait).await;
            lookup = self.aws.describe_image(region, copy_id).await?;
        }
        Ok(lookup)
    }

    /// The copy CopyImage answered with is ami-share's (its client token says so, and EC2's record of its
    /// source agrees): marks someone changed or removed since are written again, or the copy's own events
    /// and the source's would not take it for ami-share's copy while CopyImage keeps answering with it.
    /// Best effort: the copy stands either way.
    async fn restore_marks(&self, copy: &ImageCopy, image: &ObservedImage) {
        let recorded = image.source.as_ref().is_some_and(|s| {
            s.image_id == copy.source_image_id
                && s.region.as_deref().is_none_or(|r| r == copy.source_region)
        });
        if !recorded {
            return;
        }
        let marks: Tags = copy
            .tags
            .iter()
            .filter(|(k, v)| {
                markers::COPY_MARKS.contains(&k.as_str()) && image.tags.get(*k) != Some(v)
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if marks.is_empty() {
            return;
        }
        tracing::warn!(
            copy_id = %image.image_id,
            "the marks of {} were changed by someone: writing them again ({})",
            image.image_id,
            marks.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        if let Err(e) = self
            .aws
            .create_tags(&copy.region, std::slice::from_ref(&image.image_id), &marks)
            .await
        {
            tracing::warn!(copy_id = %image.image_id, "could not write its marks again: {e}");
        }
    }

    /// One CopyImage. A name taken in the copy's region by an image ami-share did not make (its own
    /// copies are found by their marks) gets the copy a name of its own rather than failing for good.
    /// The suffix is random: a name anyone can compute in advance could be taken too. (A retry finds
    /// the copy by its marks, so a new name makes no second copy.)
    async fn copy_once(&self, copy: &ImageCopy) -> Result<String, AwsError> {
        match self.aws.copy_image(copy).await {
            Err(e) if e.code.as_deref() == Some("InvalidAMIName.Duplicate") => {
                let salt = std::hash::BuildHasher::hash_one(
                    &std::collections::hash_map::RandomState::new(),
                    &copy.client_token,
                );
                let renamed = copy.renamed(salt);
                tracing::warn!(
                    copy_region = %copy.region,
                    "the name {:?} is taken in {}: copying as {:?}",
                    copy.name,
                    copy.region,
                    renamed.name
                );
                self.aws.copy_image(&renamed).await
            }
            other => other,
        }
    }

    /// Admits `grantees` to the key: writes `planned` (the policy as merged into the planning read), or,
    /// when that read may be old (a sweep reads each key once), merges into a fresh read and writes that.
    /// [`Self::confirm_key_policy`] then reads it back, beside the shares.
    pub(super) async fn write_key_policy(
        &self,
        region: &str,
        key_arn: &str,
        grantees: &KeyGrantees,
        planned: &str,
    ) -> Result<(), AwsError> {
        if !self.shared.reads_keys_once() {
            return self.aws.put_key_policy(region, key_arn, planned).await;
        }
        let partition = self.key_partition(region, key_arn)?;
        let writer = self.shared.key_writer(region, key_arn);
        let _one_writer = writer.lock().await;
        let current = self.aws.get_key_policy(region, key_arn).await?;
        match self.merge_into(region, key_arn, &current, grantees, &partition)? {
            None => Ok(()),
            Some(merged) => {
                self.aws
                    .put_key_policy(region, key_arn, &merged.policy)
                    .await
            }
        }
    }

    /// Reads a written key policy back and, while a concurrent writer has dropped `grantees` from it (KMS
    /// has no conditional write: a writer that read before ours and wrote after it replaced ours), merges
    /// into what is there now and writes again, at most `max_writes` writes in all. It runs beside the
    /// shares, with no pause: a writer that replaces the policy after this read is met by the key's
    /// re-check (the function sends one per key write, delayed; see `handler`), and by every later
    /// event and sweep on the key.
    pub(super) async fn confirm_key_policy(
        &self,
        region: &str,
        key_arn: &str,
        grantees: &KeyGrantees,
    ) -> Result<(), AwsError> {
        let partition = self.key_partition(region, key_arn)?;
        let max_writes = self.key_policy_writes.max_writes;
        let mut writes = 1;
        loop {
            let current = self.aws.get_key_policy(region, key_arn).await?;
            let Some(merged) = self.merge_into(region, key_arn, &current, grantees, &partition)?
            else {
                self.shared.note_policy_written(region, key_arn, &current);
                return Ok(());
            };
            let lost = match merged.admitted.is_empty() {
                true => "kms:ViaService limit".to_string(),
                false => format!("grantees ({})", merged.admitted),
            };
            if writes >= max_writes {
                return Err(self.key_policy_error(
                    region,
                    key_arn,
                    format!(
                        "the key policy lost ami-share's {lost} after each of {max_writes} writes: another writer keeps replacing it. If CloudFormation, Terraform or a script manages this key's policy, add ami-share's statements there (README, \"Encrypted AMIs\")"
                    ),
                    true,
                ));
            }
            tracing::warn!(
                key_arn,
                writes,
                missing = %lost,
                "the policy of {key_arn} lost ami-share's {lost} after write {writes}: another writer replaced it; merging again"
            );
            // Writers that keep overwriting each other (a burst of AMIs on one key) spread out: each
            // waits a random part of a window that doubles with each loss, then merges into a fresh read.
            tokio::time::sleep(jitter(KEY_WRITE_BACKOFF * 2u32.pow(writes - 1))).await;
            let writer = self.shared.key_writer(region, key_arn);
            let _one_writer = writer.lock().await;
            let current = self.aws.get_key_policy(region, key_arn).await?;
            // None: the other writer kept ours after all.
            let Some(merged) = self.merge_into(region, key_arn, &current, grantees, &partition)?
            else {
                self.shared.note_policy_written(region, key_arn, &current);
                return Ok(());
            };
            self.aws
                .put_key_policy(region, key_arn, &merged.policy)
                .await?;
            writes += 1;
        }
    }

    /// `grantees` merged into `current`: `None` when it admits them already.
    fn merge_into(
        &self,
        region: &str,
        key_arn: &str,
        current: &str,
        grantees: &KeyGrantees,
        partition: &str,
    ) -> Result<Option<key_policy::Merged>, AwsError> {
        key_policy::merge(current, grantees, partition).map_err(|e| {
            self.key_policy_error(
                region,
                key_arn,
                format!("the key policy changed into one ami-share cannot merge into: {e}"),
                false,
            )
        })
    }

    fn key_partition(&self, region: &str, key_arn: &str) -> Result<String, AwsError> {
        key_arn
            .parse::<KeyArn>()
            .map(|arn| arn.partition().to_string())
            .map_err(|e| self.key_policy_error(region, key_arn, e, false))
    }

    fn key_policy_error(
        &self,
        region: &str,
        key_arn: &str,
        message: String,
        retryable: bool,
    ) -> AwsError {
        AwsError {
            operation: "PutKeyPolicy",
            region: region.to_string(),
            resource: key_arn.to_string(),
            code: None,
            message,
            retryable,
        }
    }
}

/// The first backoff window after a key policy write was lost to another writer (then 2×, 4×, …).
const KEY_WRITE_BACKOFF: Duration = Duration::from_millis(100);

/// A random duration up to `window` ("full jitter"): std's per-process random hash keys, fed the time.
fn jitter(window: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    let millis = window.as_millis().max(1) as u64;
    Duration::from_millis(hasher.finish() % millis)
}

/// At most this many calls of one apply phase run at once: many regions' copies and shares go out
/// together without meeting EC2's request rate limits all at once.
pub(super) const MAX_CONCURRENT_CALLS: usize = 8;

/// Writes of one parameter in one reconciliation: ours, and corrections after concurrent writes.
const MAX_PARAMETER_WRITES: usize = 3;
