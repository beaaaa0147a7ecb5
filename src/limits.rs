//! AWS's limits that ami-share plans within: each value once, with where AWS documents it. A plan never
//! asks AWS for more than these allow; what does not fit is left out and named (the limit, what was left
//! out, what to change) instead of being refused by AWS when it is applied.

use crate::observed::Tags;

/// User tags per resource (AMI, snapshot); keys beginning `aws:` are AWS's and do not count. EC2 User
/// Guide, "Tag your Amazon EC2 resources", Tag restrictions:
/// <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/Using_Tags.html#tag-restrictions>
/// (more are refused with `TagLimitExceeded`).
pub const TAGS_PER_RESOURCE: usize = 50;
/// Characters of a tag key (same page).
pub const TAG_KEY_CHARS: usize = 128;
/// Characters of a tag value (same page).
pub const TAG_VALUE_CHARS: usize = 256;

/// Entities an AMI is shared with (accounts, organizations and OUs; an organization or an OU counts as
/// one). EC2 User Guide, "Amazon EC2 AMI quotas":
/// <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/ami-quotas.html>.
pub const SHARING_ENTITIES_PER_IMAGE: usize = 1000;
/// Public AMIs per region, AWS's default (an adjustable quota, "Public AMIs" in Service Quotas; same
/// page). A share past it is refused with `ResourceLimitExceeded`.
pub const PUBLIC_IMAGES_PER_REGION: usize = 5;

/// Characters of an AMI's name (CopyImage and CreateImage API references, `Name`: 3 to 128).
pub const IMAGE_NAME_CHARS: usize = 128;
/// Characters of an AMI's description (CopyImage API reference, `Description`: up to 255).
pub const IMAGE_DESCRIPTION_CHARS: usize = 255;
/// How far ahead an AMI may be deprecated: 10 years (EC2 User Guide, "Deprecate an Amazon EC2 AMI").
pub const DEPRECATE_AFTER_DAYS: u32 = 3650;

/// Bytes of a KMS key policy. AWS KMS Developer Guide, "Quotas", Resource quotas, Key policy document
/// size: <https://docs.aws.amazon.com/kms/latest/developerguide/resource-limits.html>.
pub const KEY_POLICY_BYTES: usize = 32 * 1024;

/// Values of one EC2 Describe* filter: a larger list is sent in several calls. EC2 API Reference,
/// "List and filter your resources" / `Filter`: up to 200 values per filter.
/// <https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_Filter.html>
pub const EC2_FILTER_VALUES: usize = 200;

/// Entries of one SQS SendMessageBatch (Amazon SQS API Reference, `SendMessageBatch`: up to 10).
/// <https://docs.aws.amazon.com/AWSSimpleQueueService/latest/APIReference/API_SendMessageBatch.html>
pub const SQS_BATCH_ENTRIES: usize = 10;
/// The longest SQS message delay, `DelaySeconds` (same API reference: 0 to 900 seconds).
pub const SQS_MAX_DELAY_SECONDS: u64 = 900;

/// Whether a tag key counts towards [`TAGS_PER_RESOURCE`].
pub fn counts_as_user_tag(key: &str) -> bool {
    !key.starts_with("aws:")
}

/// How wanted tags fit on a resource beside the tags it has and ami-share's own marks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagFit {
    /// The tags to have on the resource: the marks, and each wanted tag there is room for.
    pub tags: Tags,
    /// Wanted tag keys left out for want of room, in key order.
    pub left_out: Vec<String>,
}

/// Fits `marks` (ami-share's own tags, never left out) and then `wanted` (the rules' tags, in key order)
/// onto a resource that has `have`, within [`TAGS_PER_RESOURCE`]. A key the resource has already takes
/// no new room when its value changes; only new keys do.
pub fn fit_tags(have: &Tags, marks: &Tags, wanted: &Tags) -> TagFit {
    let mut used = have
        .keys()
        .chain(marks.keys().filter(|k| !have.contains_key(*k)))
        .filter(|k| counts_as_user_tag(k))
        .count();
    let mut fit = TagFit {
        tags: marks.clone(),
        left_out: Vec::new(),
    };
    for (key, value) in wanted {
        if marks.contains_key(key) {
            continue;
        }
        let new = !have.contains_key(key) && counts_as_user_tag(key);
        if new && used >= TAGS_PER_RESOURCE {
            fit.left_out.push(key.clone());
            continue;
        }
        used += usize::from(new);
        fit.tags.insert(key.clone(), value.clone());
    }
    fit
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tags(prefix: &str, n: usize) -> Tags {
        (0..n)
            .map(|i| (format!("{prefix}{i:02}"), "v".to_string()))
            .collect()
    }

    #[test]
    fn what_fits_is_kept_what_does_not_is_named_and_marks_always_fit() {
        // 45 tags there, 2 marks to add, 5 wanted: room for 3.
        let have = tags("have", 45);
        let marks = tags("ami-share:", 2);
        let wanted = tags("want", 5);
        let fit = fit_tags(&have, &marks, &wanted);
        assert_eq!(fit.left_out, ["want03", "want04"]);
        assert_eq!(fit.tags.len(), 5);
        assert!(marks.keys().all(|k| fit.tags.contains_key(k)));

        // A key the resource has takes no new room when its value changes; aws: keys never count.
        let mut full = tags("have", 50);
        full.insert("aws:cloudformation:stack-name".into(), "x".into());
        let mut wanted = Tags::new();
        wanted.insert("have07".into(), "new value".into());
        wanted.insert("zz".into(), "v".into());
        let fit = fit_tags(&full, &Tags::new(), &wanted);
        assert_eq!(fit.left_out, ["zz"]);
        assert_eq!(
            fit.tags.get("have07").map(String::as_str),
            Some("new value")
        );
    }

    proptest! {
        #[test]
        fn a_fit_never_exceeds_the_limit_unless_the_resource_or_its_marks_already_do(
            have in 0usize..60, marks in 0usize..6, wanted in 0usize..70, shared in 0usize..10,
        ) {
            let have_tags = tags("k", have);
            let marks_tags = tags("ami-share:", marks);
            // Some wanted keys are keys the resource has already.
            let mut wanted_tags = tags("w", wanted);
            wanted_tags.extend(tags("k", shared.min(have)));
            let fit = fit_tags(&have_tags, &marks_tags, &wanted_tags);
            let mut after = have_tags.clone();
            after.extend(fit.tags.clone());
            let floor = have + marks;
            prop_assert!(after.len() <= TAGS_PER_RESOURCE.max(floor));
            // Nothing is left out while there is room, and every wanted key is written or named.
            for key in wanted_tags.keys() {
                prop_assert!(fit.tags.contains_key(key) != fit.left_out.contains(key));
            }
            if !fit.left_out.is_empty() {
                prop_assert!(after.len() >= TAGS_PER_RESOURCE);
            }
            prop_assert!(marks_tags.keys().all(|k| fit.tags.contains_key(k)));
        }
    }
}
