//! The tags ami-share writes on its own account: an AMI's sharing status, and the marks on the copies it
//! makes. One home for their keys and values, so the config can refuse them as rule tags and every part of
//! the flow reads and writes the same names.

use std::fmt;

use serde::Serialize;

use crate::observed::Tags;

/// Why an AMI is not shared as the config says, or that it is (written only once a status was needed).
pub const STATUS: &str = "ami-share:status";
/// A sentence an operator can act on, beside [`STATUS`].
pub const STATUS_REASON: &str = "ami-share:status-reason";
/// On an image shared as a re-encrypted copy: the copy's id.
pub const REENCRYPTED_COPY: &str = "ami-share:reencrypted-copy";
/// On a copy ami-share made: the image it copied.
pub const SOURCE_IMAGE: &str = "ami-share:source-image";
/// On a copy ami-share made: the region of the image it copied.
pub const SOURCE_REGION: &str = "ami-share:source-region";
/// Written on copies by earlier versions: the `CreationDate` of the image copied. Never read (a copy's age
/// is its source's `CreationDate` as EC2 reports it, see [`crate::provenance`]) and no longer written;
/// still reserved, so a rule cannot set it.
pub const SOURCE_CREATED: &str = "ami-share:source-created";
/// On a copy ami-share made: why it exists ([`CopyKind`]). A copy is never copied again: this mark is
/// what stops copy loops. Like every mark, it is only a claim: [`crate::provenance`] believes it only
/// where EC2's own record of the image agrees.
pub const COPY_KIND: &str = "ami-share:copy-kind";

/// On an image an exclusive rule selected (`true`): when no exclusive rule selects it any more, the grants
/// of the config's exclusive rules that no selecting rule makes are removed, and the mark becomes `false`.
/// (Forged, it can only make ami-share remove grants to the exclusive rules' own targets that no rule
/// selecting the image makes; the service control policy in `policies/` keeps it ami-share's.)
pub const EXCLUSIVE: &str = "ami-share:exclusive";

/// On an image whose deregistration protection ami-share turned on (value `true`, written once it did):
/// protection found off on such an image was turned off by someone on purpose (to deregister it), so it is
/// left off and reported, not turned on again. (Forged, it can only keep ami-share from protecting an
/// image, never make it act.)
pub const PROTECTED: &str = "ami-share:protected";

/// Why ami-share made a copy: the value of [`COPY_KIND`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum CopyKind {
    /// `re-encrypted`: a copy beside its source, re-encrypted with a customer managed key, shared in its
    /// source's place.
    #[serde(rename = "re-encrypted")]
    Reencrypted,
    /// `regional`: a copy in another region, distributed as a rule's `copy.regions` say.
    #[serde(rename = "regional")]
    Regional,
}

impl CopyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Reencrypted => "re-encrypted",
            Self::Regional => "regional",
        }
    }

    /// The kind a [`COPY_KIND`] value names, if any.
    pub fn from_mark(value: &str) -> Option<Self> {
        [Self::Reencrypted, Self::Regional]
            .into_iter()
            .find(|kind| kind.as_str() == value)
    }
}

impl fmt::Display for CopyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most marks ami-share writes on an AMI it shares: [`STATUS`], [`STATUS_REASON`], [`REENCRYPTED_COPY`]
/// (and [`PROTECTED`] under a rule with deregistration protection, [`EXCLUSIVE`] under an exclusive rule).
pub const MARKS_ON_A_SOURCE: usize = 3;
/// The most marks ami-share writes on a copy it makes: [`SOURCE_IMAGE`], [`SOURCE_REGION`],
/// [`COPY_KIND`], and the status ([`STATUS`], [`STATUS_REASON`]) (and [`PROTECTED`], as on a source).
pub const MARKS_ON_A_COPY: usize = 5;

/// Whether a tag key is one of ami-share's own ([`RESERVED`]): a mark, never left out for want of room.
pub fn is_mark(key: &str) -> bool {
    RESERVED.contains(&key)
}

/// Tag keys a rule may not set: ami-share's own bookkeeping would be overwritten.
pub const RESERVED: [&str; 9] = [
    STATUS,
    STATUS_REASON,
    REENCRYPTED_COPY,
    SOURCE_IMAGE,
    SOURCE_REGION,
    SOURCE_CREATED,
    COPY_KIND,
    PROTECTED,
    EXCLUSIVE,
];

use crate::limits::TAG_VALUE_CHARS as MAX_TAG_VALUE_CHARS;

/// [`STATUS`] values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The AMI's snapshots use a key ami-share cannot open to the share targets; it is not shared.
    NotShared,
    /// As [`Status::NotShared`], but a re-encrypted copy is shared instead.
    SharedAsCopy,
    /// Shared as configured (written only to replace an earlier status).
    Shared,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotShared => "not-shared",
            Self::SharedAsCopy => "shared-as-copy",
            Self::Shared => "shared",
        }
    }
}

/// The status tags, the reason cut to EC2's 256-character limit.
pub fn status_tags(status: Status, reason: &str) -> Tags {
    let reason: String = if reason.chars().count() > MAX_TAG_VALUE_CHARS {
        let mut cut: String = reason.chars().take(MAX_TAG_VALUE_CHARS - 1).collect();
        cut.push('…');
        cut
    } else {
        reason.to_string()
    };
    [
        (STATUS.to_string(), status.as_str().to_string()),
        (STATUS_REASON.to_string(), reason),
    ]
    .into()
}

/// The marks on a copy of `source_image` (in `source_region`) of the given kind.
pub fn copy_tags(kind: CopyKind, source_image: &str, source_region: &str) -> Tags {
    [
        (SOURCE_IMAGE.to_string(), source_image.to_string()),
        (SOURCE_REGION.to_string(), source_region.to_string()),
        (COPY_KIND.to_string(), kind.as_str().to_string()),
    ]
    .into()
}

/// The tag keys of a copy's marks: an image carrying any of them claims to be ami-share's copy.
pub const COPY_MARKS: [&str; 3] = [COPY_KIND, SOURCE_IMAGE, SOURCE_REGION];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_cut_to_the_tag_value_limit() {
        let tags = status_tags(Status::NotShared, &"x".repeat(300));
        assert_eq!(tags[STATUS], "not-shared");
        assert_eq!(tags[STATUS_REASON].chars().count(), 256);
        assert!(tags[STATUS_REASON].ends_with('…'));
        assert_eq!(status_tags(Status::Shared, "short")[STATUS_REASON], "short");
    }

    #[test]
    fn a_copy_kind_reads_back_from_its_mark() {
        for kind in [CopyKind::Reencrypted, CopyKind::Regional] {
            assert_eq!(CopyKind::from_mark(kind.as_str()), Some(kind));
            assert_eq!(
                copy_tags(kind, "ami-12345678", "eu-west-1")[COPY_KIND],
                kind.as_str()
            );
        }
        assert_eq!(CopyKind::from_mark("Regional"), None, "marks are exact");
        assert_eq!(
            serde_json::to_value(CopyKind::Reencrypted).unwrap(),
            "re-encrypted"
        );
    }
}
