//! The tags ami-share writes on its own account: an AMI's sharing status, and the marks on the copies it
//! makes. One home for their keys and values, so the config can refuse them as rule tags and every part of
//! the flow reads and writes the same names.

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
/// On a copy ami-share made: the `CreationDate` of the image it copied, so a copy is as old as its source
/// where ages are compared (the SSM parameter follows the newest source, whenever its copy was made).
pub const SOURCE_CREATED: &str = "ami-share:source-created";
/// On a copy ami-share made: why it exists ([`COPY_REENCRYPTED`] or [`COPY_REGIONAL`]). A copy is never
/// copied again: this mark is what stops copy loops.
pub const COPY_KIND: &str = "ami-share:copy-kind";

/// [`COPY_KIND`] of a copy re-encrypted with a customer managed key, shared in place of its source.
pub const COPY_REENCRYPTED: &str = "re-encrypted";
/// [`COPY_KIND`] of a copy in another region, distributed as a rule's `copy.regions` say.
pub const COPY_REGIONAL: &str = "regional";

/// Tag keys a rule may not set: ami-share's own bookkeeping would be overwritten.
pub const RESERVED: [&str; 7] = [
    STATUS,
    STATUS_REASON,
    REENCRYPTED_COPY,
    SOURCE_IMAGE,
    SOURCE_REGION,
    SOURCE_CREATED,
    COPY_KIND,
];

/// EC2's limit on a tag value.
const MAX_TAG_VALUE_CHARS: usize = 256;

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
pub fn copy_tags(kind: &str, source_image: &str, source_region: &str) -> Tags {
    [
        (SOURCE_IMAGE.to_string(), source_image.to_string()),
        (SOURCE_REGION.to_string(), source_region.to_string()),
        (COPY_KIND.to_string(), kind.to_string()),
    ]
    .into()
}

/// When the image's family began: for ami-share's copy, its source's creation (its mark); for any other
/// image, its own.
pub fn family_created<'a>(tags: &'a Tags, creation_date: Option<&'a str>) -> Option<&'a str> {
    match tags.get(SOURCE_CREATED) {
        Some(source) if tags.contains_key(COPY_KIND) => Some(source),
        _ => creation_date,
    }
}

/// A copy made by ami-share, as its marks tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyMarks<'a> {
    pub kind: &'a str,
    pub source_region: &'a str,
    pub source_image: &'a str,
}

/// The marks of a copy made by ami-share, if `tags` carry all of them.
pub fn copy_marks(tags: &Tags) -> Option<CopyMarks<'_>> {
    Some(CopyMarks {
        kind: tags.get(COPY_KIND)?,
        source_region: tags.get(SOURCE_REGION)?,
        source_image: tags.get(SOURCE_IMAGE)?,
    })
}

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
    fn a_copy_is_known_by_its_marks() {
        let marks = copy_tags(COPY_REGIONAL, "ami-12345678", "eu-west-1");
        assert_eq!(
            copy_marks(&marks),
            Some(CopyMarks {
                kind: COPY_REGIONAL,
                source_region: "eu-west-1",
                source_image: "ami-12345678"
            })
        );
        let mut partial = marks.clone();
        partial.remove(COPY_KIND);
        assert_eq!(copy_marks(&partial), None, "all marks are needed");
    }
}
