//! Cross-region distribution, as a rule configures it: the regions its AMIs are copied to, the KMS key
//! of each copy, how copies are named, and the SSM parameter that tracks the latest AMI.
//!
//! Pure: parsing, validation and rendering. An AMI is regional (AWS reference 000): to be launched in
//! another region it must be copied there, and the copy shared again (launch permissions and tags do not
//! travel with a copy). KMS keys are regional too, so each region names its own key.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use crate::keys::KeyRef;

/// `[rule.copy]`: where a rule's AMIs are copied, and how the copies look.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopySettings {
    /// The regions to copy to, each with the key to encrypt its copy with. The AMI's own region is
    /// skipped, so one list can serve stacks in several regions.
    pub regions: Vec<CopyRegion>,
    /// The copy's name. AMI names are unique per account and region, so the source's name is free in
    /// another region: the default keeps it.
    #[serde(default = "default_name")]
    pub name: Template,
    /// The copy's description.
    #[serde(default = "default_description")]
    pub description: Template,
    /// Whether the copy also gets the source's own tags (besides the rule's tags and ami-share's marks),
    /// as Packer's `ami_regions` does. AWS copies no tags by itself.
    #[serde(default = "yes")]
    pub source_tags: bool,
}

fn yes() -> bool {
    true
}

fn default_name() -> Template {
    Template::parse("{name}", TemplateUse::Name).expect("the default name template is valid")
}

fn default_description() -> Template {
    Template::parse("{description}", TemplateUse::Description)
        .expect("the default description template is valid")
}

/// One target region of a rule's copies.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRegion {
    pub region: RegionName,
    /// The customer managed key to encrypt the copy with, in that region. Absent: EC2 keeps an
    /// unencrypted source unencrypted and encrypts a copy of an encrypted one with the region's default
    /// EBS key (usually the AWS managed `aws/ebs`, which cannot be shared).
    #[serde(default)]
    pub kms_key: Option<KeyRef>,
}

impl CopySettings {
    /// Problems serde cannot see field by field: no region, a region twice, a key ARN of another region.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.regions.is_empty() {
            problems.push(
                "copy.regions is empty; expected at least one { region = \"…\", kms_key = \"…\" }"
                    .to_string(),
            );
        }
        if let Err(e) = self.name.check_name() {
            problems.push(format!("copy.name: {e}"));
        }
        let mut seen = BTreeSet::new();
        for target in &self.regions {
            let region = target.region.as_str();
            if !seen.insert(region) {
                problems.push(format!("copy.regions lists {region} more than once"));
            }
            if let Some(key) = &target.kms_key
                && let Some(key_region) = key.arn_region()
                && key_region != region
            {
                problems.push(format!(
                    "copy.regions: the kms_key of {region} is {:?}, a key of {key_region}; KMS keys are regional: expected a key of {region}, or an alias created there",
                    key.as_str()
                ));
            }
        }
        problems
    }
}

/// An AWS region code such as `eu-west-1`, `us-gov-west-1` or `ap-southeast-4`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct RegionName(String);

impl RegionName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegionName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        let parts: Vec<&str> = value.split('-').collect();
        let valid = parts.len() >= 3
            && parts[0].len() == 2
            && parts[..parts.len() - 1]
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
            && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
            && !parts[parts.len() - 1].is_empty();
        if valid {
            Ok(Self(value))
        } else {
            Err(format!(
                "{value:?} is not an AWS region code; expected one such as \"eu-west-1\" or \"us-gov-west-1\""
            ))
        }
    }
}

impl fmt::Display for RegionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a template is for: names allow fewer characters than descriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateUse {
    Name,
    Description,
}

/// A value a template can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Name,
    Description,
    ImageId,
    SourceRegion,
    Region,
}

const FIELDS: [(&str, Field); 5] = [
    ("name", Field::Name),
    ("description", Field::Description),
    ("image_id", Field::ImageId),
    ("source_region", Field::SourceRegion),
    ("region", Field::Region),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A copy's name or description, with `{name}`, `{description}`, `{image_id}`, `{source_region}` and
/// `{region}` (the copy's) filled in from the source.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "TemplateText")]
pub struct Template {
    text: String,
    parts: Vec<Part>,
}

impl Serialize for Template {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

/// The source of a template before it is checked (serde needs one type per field; the use is known by
/// the field, so both fields share this check and names get the stricter one when rendered too).
#[derive(Deserialize)]
#[serde(transparent)]
struct TemplateText(String);

impl TryFrom<TemplateText> for Template {
    type Error = String;
    fn try_from(text: TemplateText) -> Result<Self, String> {
        // Which field this is is not known here: check the common rules; `CopySettings` checks names.
        Template::parse(&text.0, TemplateUse::Description)
    }
}

/// EC2 accepts these characters in an AMI name (besides letters and digits).
const NAME_PUNCTUATION: &str = "()[] ./-'@_";

/// The values a template is filled with.
#[derive(Debug, Clone, Copy)]
pub struct TemplateValues<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub image_id: &'a str,
    pub source_region: &'a str,
    pub region: &'a str,
}

impl Template {
    pub fn parse(text: &str, usage: TemplateUse) -> Result<Self, String> {
        let known = || {
            FIELDS
                .iter()
                .map(|(n, _)| format!("{{{n}}}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find(['{', '}']) {
            if rest[open..].starts_with('}') {
                return Err(format!(
                    "template {text:?} has a '}}' without '{{'; expected placeholders among {}",
                    known()
                ));
            }
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let Some(close) = after.find('}') else {
                return Err(format!(
                    "template {text:?} has a '{{' without '}}'; expected placeholders among {}",
                    known()
                ));
            };
            let field_name = &after[..close];
            let Some((_, field)) = FIELDS.iter().find(|(n, _)| *n == field_name) else {
                return Err(format!(
                    "template {text:?} names {{{field_name}}}, which ami-share does not know; expected placeholders among {}",
                    known()
                ));
            };
            parts.push(Part::Field(*field));
            rest = &after[close + 1..];
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_string()));
        }
        let template = Self {
            text: text.to_string(),
            parts,
        };
        if usage == TemplateUse::Name {
            template.check_name()?;
        }
        Ok(template)
    }

    /// A name template may hold only what EC2 accepts in a name, so its rendering is always valid.
    pub fn check_name(&self) -> Result<(), String> {
        let text = &self.text;
        if self.parts.contains(&Part::Field(Field::Description)) {
            return Err(format!(
                "name template {text:?} uses {{description}}, which may hold characters EC2 refuses in a name; expected {{name}}, {{image_id}}, {{source_region}}, {{region}} and literal text"
            ));
        }
        for part in &self.parts {
            if let Part::Literal(literal) = part
                && let Some(bad) = literal
                    .chars()
                    .find(|c| !c.is_ascii_alphanumeric() && !NAME_PUNCTUATION.contains(*c))
            {
                return Err(format!(
                    "name template {text:?} holds {bad:?}, which EC2 refuses in an AMI name; expected letters, digits and {NAME_PUNCTUATION:?}"
                ));
            }
        }
        if self.parts.is_empty() {
            return Err("name template is empty; expected e.g. \"{name}\"".into());
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The template filled in, cut to `max_chars` (EC2: 128 for a name, 255 for a description).
    pub fn render(&self, values: &TemplateValues, max_chars: usize) -> String {
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(text) => text,
                Part::Field(Field::Name) => values.name,
                Part::Field(Field::Description) => values.description,
                Part::Field(Field::ImageId) => values.image_id,
                Part::Field(Field::SourceRegion) => values.source_region,
                Part::Field(Field::Region) => values.region,
            });
        }
        out.chars().take(max_chars).collect()
    }
}

/// `ssm_parameter`: the name of the SSM parameter that holds the latest AMI id of the rule in each region
/// where the rule puts one (`{rule}` is the rule's name), so launch templates can follow it
/// (`resolve:ssm:/ami-share/golden/latest`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ParameterName(String);

impl ParameterName {
    /// The name for `rule`: `{rule}` replaced. Rule names are checked to fit (see [`Self::check_rule`]).
    pub fn for_rule(&self, rule: &str) -> String {
        self.0.replace("{rule}", rule)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `name` makes a valid parameter name of this template, for the config's checks.
    pub fn check_rule(&self, rule: &str) -> Result<(), String> {
        check_parameter_name(&self.for_rule(rule))
    }
}

fn check_parameter_name(name: &str) -> Result<(), String> {
    let problem = if !name.starts_with('/') {
        Some("it must start with '/' (a parameter hierarchy)".to_string())
    } else if name.len() > 1011 {
        Some(format!("it has {} characters; SSM allows 1011", name.len()))
    } else if let Some(bad) = name
        .chars()
        .find(|c| !c.is_ascii_alphanumeric() && !"_.-/".contains(*c))
    {
        Some(format!(
            "SSM refuses {bad:?} in a parameter name (letters, digits, '_', '.', '-', '/')"
        ))
    } else if ["/aws", "/ssm", "aws", "ssm"]
        .iter()
        .any(|p| name.to_ascii_lowercase().starts_with(p))
    {
        Some("names starting with aws or ssm are reserved by AWS".into())
    } else if name.matches('/').count() > 15 {
        Some("SSM allows at most 15 levels of hierarchy".into())
    } else {
        None
    };
    match problem {
        Some(problem) => Err(format!(
            "SSM parameter name {name:?} is not valid: {problem}; expected e.g. \"/ami-share/{{rule}}/latest\""
        )),
        None => Ok(()),
    }
}

impl TryFrom<String> for ParameterName {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        if let Some(other) = value
            .match_indices('{')
            .map(|(i, _)| &value[i..])
            .find(|rest| !rest.starts_with("{rule}"))
        {
            return Err(format!(
                "SSM parameter template {value:?} has {:?}; the only placeholder is {{rule}}",
                other.chars().take(12).collect::<String>()
            ));
        }
        // Checked with a placeholder rule name here; the config checks each rule's own name.
        check_parameter_name(&value.replace("{rule}", "rule"))?;
        Ok(Self(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> TemplateValues<'static> {
        TemplateValues {
            name: "golden-1",
            description: "Golden image, 2026-11",
            image_id: "ami-12345678",
            source_region: "eu-west-1",
            region: "us-east-1",
        }
    }

    #[test]
    fn templates_fill_every_placeholder() {
        let t = Template::parse(
            "{name} from {source_region} ({image_id}) in {region}",
            TemplateUse::Name,
        )
        .unwrap();
        assert_eq!(
            t.render(&values(), 128),
            "golden-1 from eu-west-1 (ami-12345678) in us-east-1"
        );
        let d = Template::parse("{description} [copy]", TemplateUse::Description).unwrap();
        assert_eq!(d.render(&values(), 255), "Golden image, 2026-11 [copy]");
        assert_eq!(d.render(&values(), 5), "Golde", "cut to EC2's limit");
    }

    #[test]
    fn bad_templates_are_refused_with_the_known_placeholders() {
        for (text, usage, expected) in [
            ("{nmae}-copy", TemplateUse::Name, "{nmae}"),
            ("{name", TemplateUse::Name, "without '}'"),
            ("name}", TemplateUse::Description, "without '{'"),
            ("{description}", TemplateUse::Name, "{description}"),
            ("golden:{name}", TemplateUse::Name, "':'"),
            ("", TemplateUse::Name, "empty"),
        ] {
            let e = Template::parse(text, usage).unwrap_err();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
        let e = Template::parse("{x}", TemplateUse::Description).unwrap_err();
        assert!(e.contains("{name}, {description}, {image_id}"), "{e}");
    }

    #[test]
    fn region_codes_are_checked() {
        for good in ["eu-west-1", "us-gov-west-1", "ap-southeast-4", "cn-north-1"] {
            assert!(RegionName::try_from(good.to_string()).is_ok(), "{good}");
        }
        for bad in [
            "eu-west",
            "EU-WEST-1",
            "euwest1",
            "us-east-1a",
            "",
            "e-west-1",
        ] {
            let e = RegionName::try_from(bad.to_string()).unwrap_err();
            assert!(e.contains("eu-west-1"), "{bad}: {e}");
        }
    }

    #[test]
    fn parameter_names_are_checked() {
        let p = ParameterName::try_from("/ami-share/{rule}/latest".to_string()).unwrap();
        assert_eq!(p.for_rule("golden"), "/ami-share/golden/latest");
        for (bad, expected) in [
            ("ami-share/{rule}", "start with '/'"),
            ("/aws/{rule}", "reserved"),
            ("/x/{name}", "only placeholder"),
            ("/x y/{rule}", "' '"),
        ] {
            let e = ParameterName::try_from(bad.to_string()).unwrap_err();
            assert!(e.contains(expected), "{bad}: {e}");
        }
        assert!(p.check_rule("golden images").is_err());
    }
}
