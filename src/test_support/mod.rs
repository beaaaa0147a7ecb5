//! Test support shared by the library's unit tests: an in-memory AWS and the builders of configs, images,
//! keys and events.

pub mod fake_aws;
pub mod plan;
