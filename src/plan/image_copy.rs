//! A new copy's name, description, tags and client token: stable across retries and redeployments, new
//! after a failed copy.

use super::*;

pub(super) use crate::limits::{
    IMAGE_DESCRIPTION_CHARS as MAX_DESCRIPTION_CHARS, IMAGE_NAME_CHARS as MAX_NAME_CHARS,
};

/// FNV-1a, 64 bits: the same in every build (std's hasher is not promised to be), for idempotency tokens
/// and names that must not change when the function is redeployed.
pub(super) fn stable_hash(parts: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.join("\n").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The source's own tags a copy takes: not AWS's reserved `aws:` ones (CreateTags refuses them), not
/// ami-share's bookkeeping.
pub(super) fn own_tags(source: &ObservedImage) -> Tags {
    source
        .tags
        .iter()
        .filter(|(k, _)| {
            !k.starts_with("aws:")
                && !markers::RESERVED.contains(&k.as_str())
                && k.as_str() != markers::REENCRYPTED_COPY
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A new copy's tags (CopyImage's tag specification), within EC2's [`TAGS_PER_RESOURCE`]: the copy's
/// marks always, then the rules' tags of `wanted`, then the source's `own` tags; what is left out is
/// named in `limits` (`copy` says which copy).
pub(super) fn copy_tags(own: Tags, wanted: Tags, copy: &str, limits: &mut Vec<String>) -> Tags {
    let (marks, rules): (Tags, Tags) = wanted.into_iter().partition(|(k, _)| markers::is_mark(k));
    let with_rules = fit_tags(&Tags::new(), &marks, &rules);
    let all = fit_tags(&Tags::new(), &with_rules.tags, &own);
    let mut left_out = with_rules.left_out;
    left_out.extend(all.left_out);
    if !left_out.is_empty() {
        limits.push(format!(
            "{} tag(s) left out of {copy}: EC2 allows {TAGS_PER_RESOURCE} tags per resource, and ami-share's copy marks take {}; give the selecting rules fewer tags, or set copy.source_tags = false. Left out: {}",
            left_out.len(),
            marks.len(),
            named(left_out.into_iter())
        ));
    }
    all.tags
}

/// A new copy's snapshot tags, within EC2's [`TAGS_PER_RESOURCE`] (several rules' tags may add up to more).
pub(super) fn copy_snapshot_tags(wanted: &Tags, copy: &str, limits: &mut Vec<String>) -> Tags {
    let fit = fit_tags(&Tags::new(), &Tags::new(), wanted);
    if !fit.left_out.is_empty() {
        limits.push(format!(
            "{} snapshot tag(s) left out of {copy}: EC2 allows {TAGS_PER_RESOURCE} tags per resource; give the selecting rules fewer tags. Left out: {}",
            fit.left_out.len(),
            named(fit.left_out.into_iter())
        ));
    }
    fit.tags
}

/// What a new copy is made of, before its token and final name are derived.
pub(super) struct CopyDraft<'a> {
    pub(super) kind: CopyKind,
    pub(super) source: &'a ObservedImage,
    pub(super) region: &'a str,
    pub(super) key: Option<&'a KeyArn>,
    pub(super) name: String,
    pub(super) description: String,
    pub(super) tags: Tags,
    pub(super) snapshot_tags: Tags,
    /// Earlier copies (failed or gone): a new attempt needs a new token and a name of its own.
    pub(super) previous: &'a [&'a str],
}

/// The CopyImage of a draft. The client token repeats for a retry of this copy (EC2 then returns the copy
/// already made), and changes once an earlier copy failed or was deregistered (EC2 would otherwise answer
/// with that unusable copy). AMI names are unique in an account and region: a copy after earlier ones
/// gets a name of its own.
pub(super) fn new_copy(draft: CopyDraft) -> ImageCopy {
    let source = draft.source;
    let key = draft.key.map(KeyArn::as_str).unwrap_or_default();
    let identity: Vec<&str> = match draft.kind {
        // The re-encrypted copy's token is as it was before regional copies existed.
        CopyKind::Reencrypted => vec![source.image_id.as_str(), key],
        kind => vec![
            kind.as_str(),
            source.region.as_str(),
            source.image_id.as_str(),
            draft.region,
            key,
        ],
    };
    let hash = stable_hash(
        &identity
            .into_iter()
            .chain(draft.previous.iter().copied())
            .collect::<Vec<_>>(),
    );
    let base = match draft.kind {
        CopyKind::Reencrypted => "-reencrypted",
        _ => "",
    };
    let suffix = match draft.previous {
        [] => base.to_string(),
        _ => format!("{base}-{:08x}", hash >> 32),
    };
    let name: String = draft
        .name
        .chars()
        .take(MAX_NAME_CHARS - suffix.len())
        .collect();
    ImageCopy {
        kind: draft.kind,
        region: draft.region.to_string(),
        source_region: source.region.clone(),
        source_image_id: source.image_id.clone(),
        name: format!("{name}{suffix}"),
        description: draft.description,
        kms_key_arn: draft.key.map(ToString::to_string),
        client_token: format!("ami-share-{}-{hash:016x}", source.image_id),
        tags: draft.tags,
        snapshot_tags: draft.snapshot_tags,
    }
}

impl ImageCopy {
    /// The same copy under a name of its own (and so a token of its own), suffixed from `salt`, for
    /// when its name is taken in its region by an image ami-share did not make.
    pub fn renamed(&self, salt: u64) -> ImageCopy {
        let salt = salt.to_string();
        let hash = stable_hash(&[self.client_token.as_str(), "renamed", salt.as_str()]);
        // A token of its own too: the same token under another name would be refused
        // (IdempotentParameterMismatch) if this copy were ever lost and renamed again.
        self.suffixed(hash, format!("{}-r{:08x}", self.client_token, hash >> 32))
    }

    /// The copy again after CopyImage answered with `dead`, an earlier copy under this token that is gone
    /// or failed: a client token of its own, derived from this one and the dead copy's id (so a later
    /// event that meets the same dead copy derives the same token, and finds the copy made here), and a
    /// name of its own (a failed copy keeps its name).
    pub fn after_lost(&self, dead: &str) -> ImageCopy {
        let hash = stable_hash(&[self.client_token.as_str(), "lost", dead]);
        self.suffixed(
            hash,
            format!("ami-share-{}-{hash:016x}", self.source_image_id),
        )
    }

    /// This copy with `client_token` and its name suffixed from `hash` (within EC2's name length).
    fn suffixed(&self, hash: u64, client_token: String) -> ImageCopy {
        let suffix = format!("-{:08x}", hash >> 32);
        let name: String = self
            .name
            .chars()
            .take(MAX_NAME_CHARS - suffix.len())
            .collect();
        ImageCopy {
            name: format!("{name}{suffix}"),
            client_token,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::plan::*;

    #[test]
    fn a_renamed_copy_is_the_same_copy_under_a_name_of_its_own() {
        let west = ObservedCopies {
            copies: vec![],
            key: Some(Some(key(WEST_KEY, KeyManager::Customer))),
            ..ObservedCopies::default()
        };
        let p = plan(
            &distributing(),
            &with_regions(image(ImageState::Available), Some(west)),
        );
        let copy = copies(&p)
            .into_iter()
            .find(|c| c.region == "us-west-2")
            .unwrap()
            .clone();
        let renamed = copy.renamed(7);
        assert_ne!(renamed.name, copy.name);
        assert!(renamed.name.starts_with("golden-us-west-2-"));
        assert_ne!(renamed.client_token, copy.client_token);
        assert!(renamed.client_token.len() <= 64);
        assert_eq!(renamed, copy.renamed(7), "the salt decides the suffix");
        assert_ne!(
            renamed.name,
            copy.renamed(8).name,
            "so nobody can take the name in advance"
        );
        assert_eq!(renamed.tags, copy.tags);
    }
}
