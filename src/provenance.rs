//! Provenance: whether an image is ami-share's copy of another, decided by what EC2 wrote.
//!
//! ami-share marks the copies it makes ([`markers::COPY_KIND`], [`markers::SOURCE_IMAGE`],
//! [`markers::SOURCE_REGION`]) and governs a copy by its source's rules: it is tagged, shared and its key
//! opened as its source is, and never copied again. But tags are written by anyone who may call
//! `ec2:CreateTags` or tag at `ec2:CreateImage`: marks alone would let a scratch AMI claim to be the golden
//! AMI's copy and be shared as the golden AMI is, whatever the rules' `match` says. So a mark is only a
//! claim, believed where EC2's own record agrees: DescribeImages' `SourceImageId` and `SourceImageRegion`,
//! which EC2 writes on every copy and nobody can set, must name the source the marks name (and the
//! reconciler then checks that the source is this account's image). Everything else about an image's
//! origin and age comes from EC2 too: a copy is as old as its source's `CreationDate`, read from the
//! source itself.
//!
//! An image whose marks EC2 does not back ([`Provenance::Disputed`]) is reconciled as an image of its
//! own: its own name and tags select its rules, it borrows none. If EC2 records it as a copy (of another
//! image), it is never copied, so a copy whose marks were changed cannot start a copy loop; if EC2 records
//! it as made by CreateImage or RegisterImage, it is no copy at all, and its rules may copy it (a golden
//! AMI tagged with forged marks is still distributed).
//!
//! Where `SourceImageId` is absent, EC2 did not record a source: the image was registered, or made before
//! EC2 recorded sources (2024, before ami-share's first release: every copy ami-share made has one). Such
//! an image is taken for one of its own. That is safe: marks gain it nothing, so forging them gains
//! nothing, and a copy of it is a copy EC2 vouches for, which is never copied again.
//!
//! A source must be an image of its own, too: ami-share never copies its copies, so a claimed copy of a
//! copy is no copy of ami-share's.

use crate::markers::{self, CopyKind};
use crate::observed::CreatedBy;
use crate::observed::ObservedImage;

/// A copy ami-share made, as its marks say and EC2 confirms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOf {
    pub kind: CopyKind,
    pub source_region: String,
    pub source_image: String,
}

/// Where an image comes from, as far as ami-share believes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// No ami-share marks: an image of its own.
    Own,
    /// ami-share's copy: its marks name the source EC2 records. (Whether that source is this account's
    /// image is for the reconciler to see.)
    Copy(CopyOf),
    /// Marks EC2 does not back: an image of its own.
    Disputed {
        /// What EC2 records instead.
        reason: String,
        /// Whether EC2 records it as a copy (of another image than its marks say): then it is never
        /// copied, so that a copy whose marks were changed cannot be copied in loops. An image EC2
        /// records as made by CreateImage or RegisterImage is no copy at all: its rules may copy it, so
        /// forged marks on a golden AMI stop nothing.
        maybe_copy: bool,
    },
}

impl Provenance {
    fn disputed(image: &ObservedImage, reason: String) -> Self {
        Self::Disputed {
            reason,
            maybe_copy: image.created_by == CreatedBy::CopyImage,
        }
    }
}

/// What the image's marks claim, and whether EC2's record of it agrees.
pub fn provenance(image: &ObservedImage) -> Provenance {
    let mark = |key: &str| image.tags.get(key).map(String::as_str);
    if markers::COPY_MARKS.iter().all(|key| mark(key).is_none()) {
        return Provenance::Own;
    }
    let id = &image.image_id;
    let (Some(kind), Some(source_image), Some(source_region)) = (
        mark(markers::COPY_KIND),
        mark(markers::SOURCE_IMAGE),
        mark(markers::SOURCE_REGION),
    ) else {
        return Provenance::disputed(
            image,
            format!(
                "{id} carries some of ami-share's copy marks ({}) but not all, so it is no copy ami-share made",
                markers::COPY_MARKS.join(", ")
            ),
        );
    };
    let Some(kind) = CopyKind::from_mark(kind) else {
        return Provenance::disputed(
            image,
            format!(
                "{id}'s {} is {kind:?}, not a kind of copy ami-share makes",
                markers::COPY_KIND
            ),
        );
    };
    let claim = format!("its marks say it is a {kind} copy of {source_image} in {source_region}");
    // ami-share makes its copies with CopyImage; EC2 records SourceInstanceId only for CreateImage, whose
    // SourceImageId names the instance's AMI (which may well be the marked source).
    if image.created_by == CreatedBy::CreateImage {
        return Provenance::disputed(
            image,
            format!("{claim}, but EC2 records {id} as made by CreateImage from an instance"),
        );
    }
    let Some(source) = &image.source else {
        return Provenance::disputed(
            image,
            format!(
                "{claim}, but EC2 records no source image for {id} (it was not made by CopyImage, or was made before EC2 recorded sources)"
            ),
        );
    };
    if source.image_id != source_image {
        return Provenance::disputed(
            image,
            format!(
                "{claim}, but EC2 records {id} as made from {}",
                source.image_id
            ),
        );
    }
    match source.region.as_deref() {
        None => {
            return Provenance::disputed(
                image,
                format!("{claim}, but EC2 records no source region for {id}"),
            );
        }
        Some(region) if region != source_region => {
            return Provenance::disputed(
                image,
                format!("{claim}, but EC2 records its source in {region}"),
            );
        }
        Some(_) => {}
    }
    let same_region = source_region == image.region;
    match kind {
        CopyKind::Reencrypted if !same_region => {
            return Provenance::disputed(
                image,
                format!(
                    "{claim}, but ami-share makes re-encrypted copies in their source's region, and {id} is in {}",
                    image.region
                ),
            );
        }
        CopyKind::Regional if same_region => {
            return Provenance::disputed(
                image,
                format!(
                    "{claim}, but ami-share makes regional copies in other regions than their source's"
                ),
            );
        }
        _ => {}
    }
    Provenance::Copy(CopyOf {
        kind,
        source_region: source_region.to_string(),
        source_image: source_image.to_string(),
    })
}

/// Whether `image` is ami-share's copy of `kind` of `source_image` in `source_region`, as EC2 confirms.
pub fn is_copy_of(
    image: &ObservedImage,
    kind: CopyKind,
    source_region: &str,
    source_image: &str,
) -> bool {
    provenance(image)
        == Provenance::Copy(CopyOf {
            kind,
            source_region: source_region.to_string(),
            source_image: source_image.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observed::{SourceImage, Tags};

    const GOLDEN: &str = "ami-0a1b2c3d4e5f67890";

    fn marked(kind: &str, source_region: &str) -> Tags {
        [
            (markers::COPY_KIND, kind),
            (markers::SOURCE_IMAGE, GOLDEN),
            (markers::SOURCE_REGION, source_region),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn image(region: &str, tags: Tags, source: Option<(&str, Option<&str>)>) -> ObservedImage {
        ObservedImage {
            image_id: "ami-0fedcba9876543210".into(),
            region: region.into(),
            tags,
            created_by: CreatedBy::CopyImage,
            source: source.map(|(id, region)| SourceImage {
                image_id: id.into(),
                region: region.map(str::to_string),
            }),
            ..ObservedImage::default()
        }
    }

    #[test]
    fn a_copy_ec2_vouches_for_is_ami_shares_copy() {
        let regional = image(
            "us-west-2",
            marked("regional", "us-east-1"),
            Some((GOLDEN, Some("us-east-1"))),
        );
        assert_eq!(
            provenance(&regional),
            Provenance::Copy(CopyOf {
                kind: CopyKind::Regional,
                source_region: "us-east-1".into(),
                source_image: GOLDEN.into(),
            })
        );
        assert!(is_copy_of(
            &regional,
            CopyKind::Regional,
            "us-east-1",
            GOLDEN
        ));
        assert!(!is_copy_of(
            &regional,
            CopyKind::Reencrypted,
            "us-east-1",
            GOLDEN
        ));
        let reencrypted = image(
            "us-east-1",
            marked("re-encrypted", "us-east-1"),
            Some((GOLDEN, Some("us-east-1"))),
        );
        assert!(is_copy_of(
            &reencrypted,
            CopyKind::Reencrypted,
            "us-east-1",
            GOLDEN
        ));
        assert_eq!(
            provenance(&image("us-east-1", Tags::new(), None)),
            Provenance::Own
        );
        let plain_copy = image("us-east-1", Tags::new(), Some((GOLDEN, Some("us-east-1"))));
        assert_eq!(
            provenance(&plain_copy),
            Provenance::Own,
            "unmarked: its own"
        );
    }

    fn disputed(image: &ObservedImage) -> String {
        match provenance(image) {
            Provenance::Disputed { reason, .. } => reason,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn marks_ec2_does_not_back_are_disputed_with_what_contradicts_them() {
        // Tagged at creation by someone who may call CreateImage and CreateTags: a scratch AMI.
        let forged = image("us-west-2", marked("regional", "us-east-1"), None);
        assert!(disputed(&forged).contains("EC2 records no source image"));
        // A real copy of another image, relabelled as the golden AMI's.
        let relabelled = image(
            "us-west-2",
            marked("regional", "us-east-1"),
            Some(("ami-0123456789abcdef0", Some("us-east-1"))),
        );
        assert!(
            disputed(&relabelled)
                .contains("EC2 records ami-0fedcba9876543210 as made from ami-0123456789abcdef0"),
            "{}",
            disputed(&relabelled)
        );
        let other_region = image(
            "us-west-2",
            marked("regional", "us-east-1"),
            Some((GOLDEN, Some("eu-west-1"))),
        );
        assert!(disputed(&other_region).contains("its source in eu-west-1"));
        let no_region = image(
            "us-west-2",
            marked("regional", "us-east-1"),
            Some((GOLDEN, None)),
        );
        assert!(disputed(&no_region).contains("no source region"));
        let made_by_create_image = image(
            "us-east-1",
            marked("re-encrypted", "us-east-1"),
            Some((GOLDEN, None)),
        );
        assert!(disputed(&made_by_create_image).contains("no source region"));
        let wrong_region_kind = image(
            "us-west-2",
            marked("re-encrypted", "us-east-1"),
            Some((GOLDEN, Some("us-east-1"))),
        );
        assert!(disputed(&wrong_region_kind).contains("in their source's region"));
        let same_region_regional = image(
            "us-east-1",
            marked("regional", "us-east-1"),
            Some((GOLDEN, Some("us-east-1"))),
        );
        assert!(disputed(&same_region_regional).contains("other regions"));
        let mut partial = marked("regional", "us-east-1");
        partial.remove(markers::SOURCE_REGION);
        assert!(disputed(&image("us-west-2", partial, None)).contains("not all"));
        // An instance of the golden AMI, imaged: EC2 names the golden AMI as its source, but made it by
        // CreateImage, which ami-share never uses for copies.
        let mut from_an_instance = image(
            "us-east-1",
            marked("re-encrypted", "us-east-1"),
            Some((GOLDEN, Some("us-east-1"))),
        );
        from_an_instance.created_by = CreatedBy::CreateImage;
        assert!(disputed(&from_an_instance).contains("made by CreateImage from an instance"));
        assert!(
            matches!(
                provenance(&from_an_instance),
                Provenance::Disputed {
                    maybe_copy: false,
                    ..
                }
            ),
            "no copy at all: its rules may copy it"
        );
        assert!(matches!(
            provenance(&forged),
            Provenance::Disputed {
                maybe_copy: true,
                ..
            }
        ));
        let unknown_kind = image(
            "us-west-2",
            marked("mirror", "us-east-1"),
            Some((GOLDEN, Some("us-east-1"))),
        );
        assert!(disputed(&unknown_kind).contains("\"mirror\""));
    }
}
