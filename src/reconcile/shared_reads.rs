//! What a sweep reads once and every image's reconciliation then takes from: the account's snapshots
//! (one listing per region, in pages) and each KMS key's metadata, tags and policy (once per key). The
//! event path reads per image and shares nothing.
//!
//! These are planning reads only. A key policy write still merges into a policy read just before it
//! (see `apply::patch_key_policy`), so a cached policy never overwrites what anyone wrote meanwhile; a
//! stale one can only plan a patch that the fresh read then finds unneeded. The reconciler's own writes
//! are kept in here (tags on snapshots, a confirmed key policy), so later images do not plan them again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::OnceCell;

use crate::aws::AwsError;
use crate::observed::{ObservedKey, SnapshotFacts, Tags};

/// A key's reads as KMS answered them: DescribeKey (with the tags and aliases, as far as they were read
/// and readable), and GetKeyPolicy, whose answer matters only for a key ami-share may change (and may be
/// denied by the template's IAM for any other).
#[derive(Debug, Clone)]
pub(super) struct KeyReads {
    pub key: Option<ObservedKey>,
    pub policy: Result<String, AwsError>,
}

/// A key's reads are told apart by what was read: its tags unless the config names it by ARN, its aliases
/// when the config names keys by alias.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct KeyReadsOf {
    pub region: String,
    pub arn: String,
    pub tags: bool,
    pub aliases: bool,
}

/// Held while one image of the run writes a key's policy.
type KeyWriter = Arc<tokio::sync::Mutex<()>>;

#[derive(Default)]
pub(super) struct SharedReads {
    /// The account's snapshots by region, when a sweep listed them.
    snapshots: Mutex<BTreeMap<String, BTreeMap<String, SnapshotFacts>>>,
    /// Whether keys are read once per run (a sweep) rather than per image (an event).
    keys_once: AtomicBool,
    /// One cell per key: the first image to need a key reads it, the others on it wait for that read.
    keys: Mutex<BTreeMap<KeyReadsOf, Arc<OnceCell<KeyReads>>>>,
    /// One writer per key at a time within the run: images on one key planned together (against the
    /// same read) would otherwise each merge and write the same grantees.
    key_writers: Mutex<BTreeMap<(String, String), KeyWriter>>,
}

impl SharedReads {
    pub fn know_snapshots(&self, region: &str, snapshots: BTreeMap<String, SnapshotFacts>) {
        self.snapshots
            .lock()
            .unwrap()
            .entry(region.to_string())
            .or_default()
            .extend(snapshots);
    }

    /// The facts of every one of `snapshot_ids`, if the listing of `region` holds them all.
    pub fn snapshots(
        &self,
        region: &str,
        snapshot_ids: &[String],
    ) -> Option<BTreeMap<String, SnapshotFacts>> {
        let listing = self.snapshots.lock().unwrap();
        let snapshots = listing.get(region)?;
        snapshot_ids
            .iter()
            .map(|id| Some((id.clone(), snapshots.get(id)?.clone())))
            .collect()
    }

    pub fn note_tags_written(&self, region: &str, resources: &[String], tags: &Tags) {
        let mut listing = self.snapshots.lock().unwrap();
        if let Some(snapshots) = listing.get_mut(region) {
            for id in resources {
                if let Some(facts) = snapshots.get_mut(id) {
                    facts.tags.extend(tags.clone());
                }
            }
        }
    }

    pub fn read_keys_once(&self) {
        self.keys_once.store(true, Ordering::Relaxed);
    }

    pub fn reads_keys_once(&self) -> bool {
        self.keys_once.load(Ordering::Relaxed)
    }

    /// The cell `of` is kept in, when keys are read once per run.
    pub fn key_cell(&self, of: &KeyReadsOf) -> Option<Arc<OnceCell<KeyReads>>> {
        if !self.reads_keys_once() {
            return None;
        }
        Some(
            self.keys
                .lock()
                .unwrap()
                .entry(of.clone())
                .or_default()
                .clone(),
        )
    }

    /// The lock of one key's writes in this run.
    pub fn key_writer(&self, region: &str, arn: &str) -> KeyWriter {
        self.key_writers
            .lock()
            .unwrap()
            .entry((region.to_string(), arn.to_string()))
            .or_default()
            .clone()
    }

    /// A key policy this run wrote and read back: what the later images on the key plan against.
    pub fn note_policy_written(&self, region: &str, arn: &str, policy: &str) {
        let mut keys = self.keys.lock().unwrap();
        for (of, cell) in keys.iter_mut() {
            if of.region != region || of.arn != arn {
                continue;
            }
            if let Some(reads) = cell.get() {
                let mut reads = reads.clone();
                reads.policy = Ok(policy.to_string());
                *cell = Arc::new(OnceCell::new_with(Some(reads)));
            }
        }
    }
}
