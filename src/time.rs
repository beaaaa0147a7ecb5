//! Time as EC2 writes it: an instant read once, at the edge, from ISO 8601 text (`CreationDate`,
//! `DeprecationTime`), compared and computed on as a value everywhere else.
//!
//! Pure: parsing and formatting only (`aws_smithy_types::DateTime` does the calendar arithmetic of the
//! ISO 8601 forms EC2 uses; it does no I/O).

use std::fmt;

use aws_smithy_types::DateTime;
use aws_smithy_types::date_time::Format;
use serde::{Serialize, Serializer};

/// An instant, to the nanosecond, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    secs: i64,
    nanos: u32,
}

const DAY: i64 = 86_400;
const MINUTE: i64 = 60;

impl Timestamp {
    /// An ISO 8601 instant with an offset (`2026-11-25T10:00:00.000Z`); `None` when it is not one.
    pub fn parse(text: &str) -> Option<Self> {
        DateTime::from_str(text, Format::DateTimeWithOffset)
            .ok()
            .map(|d| Self {
                secs: d.secs(),
                nanos: d.subsec_nanos(),
            })
    }

    pub fn from_secs(secs: i64) -> Self {
        Self { secs, nanos: 0 }
    }

    pub fn now() -> Self {
        let d = DateTime::from(std::time::SystemTime::now());
        Self {
            secs: d.secs(),
            nanos: d.subsec_nanos(),
        }
    }

    pub fn secs(self) -> i64 {
        self.secs
    }

    /// This instant `days` later, at the nearest whole minute (EC2 keeps deprecation times to the
    /// minute).
    pub fn days_later_to_the_minute(self, days: u32) -> Self {
        let at = self.secs + i64::from(days) * DAY;
        Self::from_secs((at + MINUTE / 2).div_euclid(MINUTE) * MINUTE)
    }

    /// The first whole minute after this instant.
    pub fn next_minute(self) -> Self {
        Self::from_secs((self.secs.div_euclid(MINUTE) + 1) * MINUTE)
    }

    /// Whether both instants fall in one minute (EC2 reports `2027-01-01T10:00:00.000Z` for what was set
    /// as `2027-01-01T10:00:00Z`).
    pub fn same_minute(self, other: Self) -> bool {
        self.secs.div_euclid(MINUTE) == other.secs.div_euclid(MINUTE)
    }
}

impl fmt::Display for Timestamp {
    /// ISO 8601 in UTC, as EC2 takes it (`2026-12-25T10:00:00Z`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DateTime::from_secs_and_nanos(self.secs, self.nanos).fmt(Format::DateTime) {
            Ok(text) => f.write_str(&text),
            Err(_) => write!(f, "{}s after the epoch", self.secs),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse(text).unwrap()
    }

    #[test]
    fn ec2_times_read_compare_and_print() {
        assert!(at("2026-11-25T10:00:00.000Z") < at("2026-11-25T10:00:00.001Z"));
        assert_eq!(
            at("2026-11-25T10:00:00.000Z"),
            at("2026-11-25T11:00:00+01:00")
        );
        assert_eq!(
            at("2026-11-25T10:00:00.000Z").to_string(),
            "2026-11-25T10:00:00Z"
        );
        assert_eq!(Timestamp::parse("yesterday"), None);
        assert_eq!(
            Timestamp::parse("2026-11-25"),
            None,
            "a date is not an instant"
        );
        assert_eq!(
            serde_json::to_value(at("2026-11-25T10:00:00Z")).unwrap(),
            "2026-11-25T10:00:00Z"
        );
    }

    #[test]
    fn deprecation_is_days_after_creation_rounded_to_the_minute() {
        assert_eq!(
            at("2026-11-25T20:17:31.000Z")
                .days_later_to_the_minute(365)
                .to_string(),
            "2027-11-25T20:18:00Z"
        );
        assert_eq!(
            at("2024-02-28T00:00:00Z")
                .days_later_to_the_minute(1)
                .to_string(),
            "2024-02-29T00:00:00Z"
        );
        assert_eq!(Timestamp::parse("yesterday"), None);
        assert!(at("2027-11-25T20:18:00.000Z").same_minute(at("2027-11-25T20:18:00Z")));
        assert!(!at("2027-11-25T20:19:00.000Z").same_minute(at("2027-11-25T20:18:00Z")));
        assert_eq!(Timestamp::parse(""), None, "an empty time is no time");
    }

    #[test]
    fn minutes_for_deprecation() {
        let created = at("2026-11-25T10:00:29.999Z");
        assert_eq!(
            created.days_later_to_the_minute(30).to_string(),
            "2026-12-25T10:00:00Z"
        );
        assert_eq!(
            at("2026-11-25T10:00:30Z")
                .days_later_to_the_minute(1)
                .to_string(),
            "2026-11-26T10:01:00Z"
        );
        assert_eq!(
            at("2026-11-25T10:00:05Z").next_minute().to_string(),
            "2026-11-25T10:01:00Z"
        );
        assert!(at("2027-01-01T10:00:00.000Z").same_minute(at("2027-01-01T10:00:59Z")));
        assert!(!at("2027-01-01T10:00:00Z").same_minute(at("2027-01-01T10:01:00Z")));
    }
}
