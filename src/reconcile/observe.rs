//! What the reconciler reads beyond the image: only what the plan asks for ([`crate::plan::reads_needed`]),
//! independent reads at once, each region on its own.

use super::*;

impl<A: Aws> Reconciler<'_, A> {
    /// The reads the plan needs, beyond the image itself: its launch permissions, snapshots, keys and
    /// parameters; when it cannot be shared as it is and a rule asks for it, its re-encrypted copy; and its
    /// copies in the rules' other regions. Each region is read concurrently with the others and with the
    /// image's own reads, so the chain of calls is as long for five regions as for one. A region that
    /// cannot be read is recorded in `outcome` and left out; the others go on.
    pub(super) async fn observe(
        &self,
        image: ObservedImage,
        desired: &Desired,
        outcome: &mut Outcome,
    ) -> Result<Observed, AwsError> {
        let regions = self.regional_targets(&image, desired);
        let copy_desired = desired_for_copy(desired, &image, CopyKind::Regional);
        let (source, regional) = futures::join!(
            async {
                let image = self.observe_image(image.clone(), desired).await?;
                let reencryption = match &desired.reencrypt_with {
                    Some(key) if plan::wants_reencrypted_copy(desired, &image) => {
                        let copies = self
                            .observe_copies(
                                &image.region,
                                &image,
                                CopyKind::Reencrypted,
                                Some(key),
                                &desired_for_copy(desired, &image, CopyKind::Reencrypted),
                            )
                            .await?;
                        Some(copies)
                    }
                    _ => None,
                };
                Ok::<_, AwsError>((image, reencryption))
            },
            join_all(regions.iter().map(|(region, key)| self.observe_copies(
                region,
                &image,
                CopyKind::Regional,
                key.as_ref(),
                &copy_desired
            )))
        );
        let (image, reencryption) = source?;
        let chosen =
            |copies: &ObservedCopies| plan::chosen_copy(&copies.copies).map(|c| c.image_id.clone());
        outcome
            .reached
            .extend(reencryption.as_ref().and_then(chosen));
        outcome.reached.extend(
            regional
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .filter_map(chosen),
        );
        let now = Some(Timestamp::now());
        let mut observed = Observed {
            image,
            reencryption,
            regional: BTreeMap::new(),
            now,
        };
        for ((region, _), result) in regions.into_iter().zip(regional) {
            let copies = match result {
                Ok(copies) => Some(copies),
                Err(e) => {
                    outcome.failures.push(e);
                    None
                }
            };
            observed.regional.insert(region, copies);
        }
        Ok(observed)
    }

    /// The regions to look for copies in: the rules' other regions, once the image is available (before,
    /// no copy can be made, and none looked for).
    pub(super) fn regional_targets(
        &self,
        image: &ObservedImage,
        desired: &Desired,
    ) -> Vec<(String, Option<KeyRef>)> {
        match &desired.copy {
            Some(wanted) if image.state == ImageState::Available => {
                plan::copy_targets(wanted, image)
                    .into_iter()
                    .map(|(region, key)| (region.clone(), key.clone()))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// ami-share's copies of `source` of one kind in `region`: the chosen one observed as an image (under
    /// `copy_desired`), or, when there is none, the key to make one with.
    pub(super) async fn observe_copies(
        &self,
        region: &str,
        source: &ObservedImage,
        kind: CopyKind,
        key: Option<&KeyRef>,
        copy_desired: &Desired,
    ) -> Result<ObservedCopies, AwsError> {
        // A source made within the hour most likely has no copy yet: its copy's key is read beside the
        // look for copies (one round trip less before CopyImage), and is unused if a copy turns up.
        let fresh = source
            .creation_date
            .is_some_and(|made| Timestamp::now().secs() - made.secs() < FRESH_SOURCE_SECS);
        let (found, early_key) = futures::join!(
            self.aws
                .find_copies(region, &source.region, &source.image_id, kind),
            async {
                match (fresh, key) {
                    (true, Some(key)) => Some(self.aws.describe_key(region, key.as_str()).await),
                    _ => None,
                }
            }
        );
        let found = found?;
        // Found by their marks, which anyone may write: only those EC2 records as copies of the source are
        // taken for its copies. The others are named, and left alone.
        let (mut copies, impostors): (Vec<ObservedImage>, Vec<ObservedImage>) = found
            .into_iter()
            .partition(|c| provenance::is_copy_of(c, kind, &source.region, &source.image_id));
        let ignored = impostors
            .iter()
            .map(|image| match provenance(image) {
                Provenance::Disputed { reason, .. } => reason,
                _ => format!(
                    "{} is no {kind} copy of {}",
                    image.image_id, source.image_id
                ),
            })
            .map(|reason| {
                format!(
                    "ignored as a {kind} copy of {} in {region}: {reason}",
                    source.image_id
                )
            })
            .collect();
        let key = match plan::chosen_copy(&copies).map(|c| c.image_id.clone()) {
            Some(chosen) => {
                let copy = copies.iter_mut().find(|c| c.image_id == chosen);
                let copy = copy.expect("the chosen copy is among the copies");
                *copy = self.observe_image(copy.clone(), copy_desired).await?;
                None
            }
            None => match (early_key, key) {
                (Some(read), _) => Some(read?),
                (None, Some(key)) => Some(self.aws.describe_key(region, key.as_str()).await?),
                (None, None) => None,
            },
        };
        Ok(ObservedCopies {
            copies,
            key,
            ignored,
        })
    }

    /// Launch permissions, snapshots, snapshot permissions and parameters (concurrently), then the keys
    /// the snapshots name and the images the parameters name (concurrently).
    pub(super) async fn observe_image(
        &self,
        mut image: ObservedImage,
        desired: &Desired,
    ) -> Result<ObservedImage, AwsError> {
        let reads = reads_needed(desired, &image);
        let region = image.region.clone();
        let snapshot_ids: Vec<String> = image
            .snapshots
            .iter()
            .map(|s| s.snapshot_id.clone())
            .collect();
        // The keys DescribeImages names are read beside the snapshots (one round trip less before a
        // share); the snapshots' own word then decides which keys are the image's.
        let named_keys = match reads.keys {
            true => keys_to_read(&image),
            false => Default::default(),
        };
        let (permissions, snapshots, volume_permissions, parameters, public_blocked, prefetched) = futures::join!(
            async {
                match reads.launch_permissions {
                    true => Some(
                        self.aws
                            .describe_launch_permissions(&region, &image.image_id)
                            .await,
                    ),
                    false => None,
                }
            },
            async {
                match reads.snapshots {
                    true => Some(self.snapshots_of(&region, &snapshot_ids).await),
                    false => None,
                }
            },
            async {
                let (permissions, others) = futures::join!(
                    async {
                        match reads.create_volume_permissions {
                            true => join_all(snapshot_ids.iter().map(|id| {
                                self.aws.describe_create_volume_permissions(&region, id)
                            }))
                            .await
                            .into_iter()
                            .collect::<Result<Vec<_>, _>>()
                            .map(Some),
                            false => Ok(None),
                        }
                    },
                    async {
                        match reads.other_images {
                            true => self
                                .aws
                                .images_on_snapshots(&region, &snapshot_ids)
                                .await
                                .map(Some),
                            false => Ok(None),
                        }
                    }
                );
                Ok::<_, AwsError>((permissions?, others?))
            },
            async {
                match reads.parameters {
                    true => self.observe_parameters(&region, desired).await.map(Some),
                    false => Ok(None),
                }
            },
            async {
                match reads.block_public_access {
                    true => Some(self.aws.image_block_public_access(&region).await),
                    false => None,
                }
            },
            join_all(named_keys.iter().map(|arn| self.observe_key(
                &region,
                arn,
                &desired.approved_keys
            )))
        );
        let mut prefetched: BTreeMap<String, Result<ObservedKey, AwsError>> =
            named_keys.into_iter().zip(prefetched).collect();
        image.public_sharing_blocked = public_blocked.transpose()?;
        image.launch_permissions = permissions.transpose()?;
        if let Some(mut by_id) = snapshots.transpose()? {
            for snapshot in &mut image.snapshots {
                match by_id.remove(&snapshot.snapshot_id) {
                    Some(facts) => {
                        snapshot.tags = Some(facts.tags);
                        snapshot.encrypted = Some(facts.encrypted);
                        snapshot.kms_key_id = facts.kms_key_id;
                    }
                    // Not listed: what DescribeImages said of its key is not taken for the snapshot's word.
                    None => {
                        snapshot.tags = Some(Default::default());
                        snapshot.kms_key_id = None;
                    }
                }
            }
        }
        let (volume_permissions, others) = volume_permissions?;
        if let Some(accounts) = volume_permissions {
            for (snapshot, permissions) in image.snapshots.iter_mut().zip(accounts) {
                snapshot.create_volume_permissions = Some(permissions);
            }
        }
        if let Some(others) = others {
            self.what_other_images_grant(&mut image, &others);
        }
        if let Some(parameters) = parameters? {
            image.parameters = parameters;
        }
        if reads.keys {
            let arns = keys_to_read(&image);
            let keys = join_all(arns.iter().map(|arn| {
                let read = prefetched.remove(arn);
                let region = &region;
                async move {
                    match read {
                        Some(read) => read,
                        None => self.observe_key(region, arn, &desired.approved_keys).await,
                    }
                }
            }))
            .await;
            for (arn, key) in arns.into_iter().zip(keys) {
                image.keys.insert(arn, key?);
            }
        }
        Ok(image)
    }

    /// For each snapshot of `image`, the other AMIs of `others` it backs and the createVolumePermission
    /// their selecting rules grant on it.
    pub(super) fn what_other_images_grant(
        &self,
        image: &mut ObservedImage,
        others: &[ObservedImage],
    ) {
        for snapshot in &mut image.snapshots {
            let mut found = OtherImages::default();
            for other in others.iter().filter(|o| {
                o.image_id != image.image_id
                    && o.snapshots
                        .iter()
                        .any(|s| s.snapshot_id == snapshot.snapshot_id)
            }) {
                found.image_ids.push(other.image_id.clone());
                let wanted = desired_for(self.config, &facts_of(other, other.created_by));
                found
                    .create_volume_accounts
                    .extend(wanted.create_volume_accounts);
            }
            snapshot.other_images = Some(found);
        }
    }

    /// Each rule parameter's value, and the creation date of the image it names (to never move it back to
    /// an older image).
    pub(super) async fn observe_parameters(
        &self,
        region: &str,
        desired: &Desired,
    ) -> Result<BTreeMap<String, ObservedParameter>, AwsError> {
        let names: Vec<&String> = desired.ssm_parameters.iter().collect();
        let observed = join_all(names.iter().map(|name| async move {
            let stored = self.aws.get_parameter(region, name).await?;
            let version = stored.as_ref().map(|s| s.version);
            let value = stored.map(|s| s.value);
            let value_created = match value.as_deref() {
                Some(id) if id.starts_with("ami-") => {
                    match self.aws.describe_image(region, id).await? {
                        ImageLookup::Owned(image) => self.family_created(&image).await?,
                        _ => None,
                    }
                }
                _ => None,
            };
            Ok::<_, AwsError>(ObservedParameter {
                value,
                version,
                value_created,
            })
        }))
        .await;
        names
            .into_iter()
            .zip(observed)
            .map(|(name, p)| Ok((name.clone(), p?)))
            .collect()
    }

    /// When an image's family began, as EC2 dates it: for ami-share's copy (as EC2 vouches), its
    /// source's `CreationDate`, read from the source (`None` when the source is gone or not this
    /// account's); for any other image, its own. Parameters follow the newest family.
    pub(super) async fn family_created(
        &self,
        image: &ObservedImage,
    ) -> Result<Option<Timestamp>, AwsError> {
        match provenance(image) {
            Provenance::Copy(copy) => Ok(
                match self
                    .aws
                    .describe_image(&copy.source_region, &copy.source_image)
                    .await?
                {
                    ImageLookup::Owned(source) => source.creation_date,
                    _ => None,
                },
            ),
            Provenance::Own | Provenance::Disputed { .. } => Ok(image.creation_date),
        }
    }

    /// DescribeKey, GetKeyPolicy and what tells whether the key's owner approved ami-share
    /// (ListResourceTags; ListAliases when the config names keys by alias), together, so an encrypted
    /// AMI costs no extra round trip; in a sweep, once per key ([`SharedReads`]). The policy is kept only
    /// of an enabled customer managed key that is approved: no other key's policy is ever changed, and
    /// reading it may be denied by the template's IAM (as may reading an AWS managed key's tags), which is
    /// then no failure.
    pub(super) async fn observe_key(
        &self,
        region: &str,
        arn: &str,
        approved: &[KeyRef],
    ) -> Result<ObservedKey, AwsError> {
        let parsed = arn.parse::<KeyArn>().ok();
        // A key the config names by ARN or id is approved whatever its tags and aliases.
        let by_arn = parsed
            .as_ref()
            .is_some_and(|a| approved.iter().any(|r| !r.is_alias() && r.names(a, &[])));
        let of = KeyReadsOf {
            region: region.to_string(),
            arn: arn.to_string(),
            tags: !by_arn,
            aliases: !by_arn && approved.iter().any(KeyRef::is_alias),
        };
        let reads = match self.shared.key_cell(&of) {
            Some(cell) => cell.get_or_try_init(|| self.read_key(&of)).await?.clone(),
            None => self.read_key(&of).await?,
        };
        let Some(mut key) = reads.key else {
            return Ok(ObservedKey {
                arn: arn.to_string(),
                manager: KeyManager::Customer,
                state: "not found (deleted?)".into(),
                policy: None,
                tags: None,
                aliases: Vec::new(),
            });
        };
        let is_approved = parsed.is_some_and(|parsed| {
            keys::approval(&parsed, key.tags.as_ref(), &key.aliases, approved).is_some()
        });
        if key.manager == KeyManager::Customer && key.is_enabled() && is_approved {
            key.policy = Some(reads.policy?);
        }
        Ok(key)
    }

    /// The reads of one key, as [`KeyReadsOf`] says. Fails (and so is not kept for other images) when a
    /// read that matters failed: the metadata, readable tags or aliases, or the policy of an enabled
    /// customer managed key for any reason but a denial.
    async fn read_key(&self, of: &KeyReadsOf) -> Result<KeyReads, AwsError> {
        let (region, arn) = (of.region.as_str(), of.arn.as_str());
        let (key, policy, tags, aliases) = futures::join!(
            self.aws.describe_key(region, arn),
            self.aws.get_key_policy(region, arn),
            async {
                match of.tags {
                    true => Some(self.aws.list_key_tags(region, arn).await),
                    false => None,
                }
            },
            async {
                match of.aliases {
                    true => Some(self.aws.list_key_aliases(region, arn).await),
                    false => None,
                }
            }
        );
        let Some(mut key) = key? else {
            return Ok(KeyReads { key: None, policy });
        };
        if key.manager != KeyManager::Customer {
            return Ok(KeyReads {
                key: Some(key),
                policy,
            });
        }
        key.tags = tags.map(tolerate_denied).transpose()?.flatten();
        key.aliases = aliases
            .map(tolerate_denied)
            .transpose()?
            .flatten()
            .unwrap_or_default();
        if let Err(e) = &policy
            && key.is_enabled()
            && !e.is_access_denied()
        {
            return Err(e.clone());
        }
        Ok(KeyReads {
            key: Some(key),
            policy,
        })
    }
}

/// How new a source must be (by its `CreationDate`) for its copies' keys to be read before knowing whether
/// a copy exists.
const FRESH_SOURCE_SECS: i64 = 3600;

/// A read the function's role may be denied (the template scopes KMS reads to approved keys): `None`.
pub(super) fn tolerate_denied<T>(result: Result<T, AwsError>) -> Result<Option<T>, AwsError> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.is_access_denied() => Ok(None),
        Err(e) => Err(e),
    }
}
