//! Where each tenant's usage is: the replicated sources (Kafka partitions, cluster mode) that
//! have fed it, learned from the data rather than computed from a hash of the tenant.
//!
//! Every checkpoint records the (tenant, source) pairs of its source cuts that the store did
//! not know (`N` keys, in the checkpoint's WriteBatch), and a changelog restore records the
//! pairs of the series it copies, so a replica that takes a partition over inherits them. A
//! tenant on a second source is a *partition conflict*: its usage lives with two owners (a
//! producer with another partitioner, null keys, a key other than the subject), so no single
//! owner holds its whole total. The conflict is counted
//! (`tallyd_cluster_tenant_partition_conflicts_total`) and logged once per new pair, naming the
//! tenant and its sources.
//!
//! Ownership: with replicated sources (`set_owned`), only the replica that owns one of a
//! tenant's sources closes, emits and rates the tenant's windows and settles its periods
//! (`emits_here`); another replica still holding the tenant's older series (it owned the
//! partition before) keeps them for queries but emits nothing for them, so no record is ever
//! emitted twice with different contents. The owner carries that emission and rating state in
//! the partition's changelog (`store::changelog`, `StateEntry`).
//!
//! Must not: forget a pair (sources are never un-learned; a tenant that moved keeps its history
//! on the old partition too).

use std::sync::Arc;

use parking_lot::Mutex;
use rocksdb::{IteratorMode, WriteBatch, DB};
use rustc_hash::{FxHashMap, FxHashSet};

use super::{keys, StoreError};
use crate::telemetry;

/// Told each (tenant, source) pair once it is known (cluster mode publishes it).
pub type PairListener = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Whether the cluster knows `tenant` on more than one partition (pairs other replicas
/// learned, from the members topic).
pub type SplitCheck = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Every known (tenant, source) pair, by tenant (sources in the order learned).
#[derive(Default)]
pub struct TenantSources {
    known: Mutex<FxHashMap<Arc<str>, Vec<Arc<str>>>>,
    /// The replicated sources this replica owns now; None: no replicated sources (every
    /// tenant's windows are emitted here).
    owned: parking_lot::RwLock<Option<FxHashSet<String>>>,
    listener: parking_lot::RwLock<Option<PairListener>>,
    /// Sources another replica fenced while this one still held them (a zombie owner): never
    /// owned here again until assigned here again (`reassigned`).
    deposed: Mutex<FxHashSet<String>>,
    /// `deposed` sources the consumer has not yet stopped reading (`take_deposed`).
    deposed_news: Mutex<Vec<String>>,
    split_check: parking_lot::RwLock<Option<SplitCheck>>,
}

impl std::fmt::Debug for TenantSources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantSources")
            .field("known", &self.known.lock().len())
            .finish_non_exhaustive()
    }
}

/// Pairs a batch writes, applied to memory once it committed.
#[derive(Debug, Default)]
pub struct NewPairs(Vec<(Arc<str>, Arc<str>)>);

impl NewPairs {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TenantSources {
    /// Every `N` key of the store.
    pub(super) fn load(db: &DB) -> Result<TenantSources, StoreError> {
        let mut known: FxHashMap<Arc<str>, Vec<Arc<str>>> = FxHashMap::default();
        let prefix = [keys::TENANT_SOURCE];
        let iter = db.iterator(IteratorMode::From(&prefix, rocksdb::Direction::Forward));
        for item in iter {
            let (key, _) = item?;
            if key.first() != Some(&keys::TENANT_SOURCE) {
                break;
            }
            let (tenant, source) =
                keys::decode_tenant_source_key(&key).ok_or_else(|| StoreError::Corrupt {
                    what: "tenant source key",
                    detail: format!("{key:?}"),
                })?;
            known.entry(tenant.into()).or_default().push(source.into());
        }
        Ok(TenantSources {
            known: Mutex::new(known),
            ..TenantSources::default()
        })
    }

    /// Adds to `batch` the pairs of `pairs` not known yet (each once), with `now_secs` as
    /// first seen; `apply` makes them known once the batch committed.
    pub fn learn<'a>(
        &self,
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
        batch: &mut WriteBatch,
        now_secs: i64,
    ) -> NewPairs {
        let known = self.known.lock();
        let mut seen: FxHashSet<(&str, &str)> = FxHashSet::default();
        let mut new = Vec::new();
        for (tenant, source) in pairs {
            let is_known = known
                .get(tenant)
                .is_some_and(|sources| sources.iter().any(|known| &**known == source));
            if is_known || !seen.insert((tenant, source)) {
                continue;
            }
            batch.put(
                keys::tenant_source_key(tenant, source),
                (now_secs as u64).to_be_bytes(),
            );
            new.push((Arc::from(tenant), Arc::from(source)));
        }
        NewPairs(new)
    }

    /// Tells `listener` every pair known from now on (and none known before: see `pairs_in`).
    pub fn set_listener(&self, listener: PairListener) {
        *self.listener.write() = Some(listener);
    }

    /// Every known pair whose source is one of `sources`.
    pub fn pairs_in(&self, sources: &FxHashSet<String>) -> Vec<(String, String)> {
        let known = self.known.lock();
        let mut out: Vec<(String, String)> = known
            .iter()
            .flat_map(|(tenant, known_sources)| {
                known_sources
                    .iter()
                    .filter(|source| sources.contains(&***source))
                    .map(move |source| (tenant.to_string(), source.to_string()))
            })
            .collect();
        out.sort();
        out
    }

    /// Makes committed pairs known; a tenant's second source is a conflict (counted, logged).
    pub fn apply(&self, new: NewPairs) {
        let mut fresh: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        let mut known = self.known.lock();
        for (tenant, source) in new.0 {
            let sources = known.entry(tenant.clone()).or_default();
            if sources.contains(&source) {
                continue;
            }
            sources.push(source.clone());
            fresh.push((tenant.clone(), source));
            if sources.len() > 1 {
                metrics::counter!(telemetry::CLUSTER_TENANT_PARTITION_CONFLICTS).increment(1);
                tracing::warn!(
                    tenant = %tenant,
                    sources = %sources.iter().map(|s| &**s).collect::<Vec<_>>().join(","),
                    "a tenant's usage arrives on more than one partition: no single owner holds its \
                     whole total (produce keyed by subject with the murmur2 partitioner; README, \
                     cluster mode)"
                );
            }
        }
        drop(known);
        if let Some(listener) = self.listener.read().as_ref() {
            for (tenant, source) in fresh {
                listener(&tenant, &source);
            }
        }
    }

    /// Which replicated sources this replica owns (the consumer's assignment); None: sources
    /// are not replicated.
    pub fn set_owned(&self, owned: Option<FxHashSet<String>>) {
        let deposed = self.deposed.lock();
        *self.owned.write() = owned.map(|owned| {
            owned
                .into_iter()
                .filter(|source| !deposed.contains(source))
                .collect()
        });
    }

    /// Another replica took `source` (its fence is in the changelog) while the consumer here
    /// still has it assigned: from now on nothing is emitted, rated or published for it here.
    pub fn depose(&self, source: &str) {
        let mut deposed = self.deposed.lock();
        if deposed.insert(source.to_string()) {
            if let Some(owned) = self.owned.write().as_mut() {
                owned.remove(source);
            }
            self.deposed_news.lock().push(source.to_string());
        }
    }

    pub fn is_deposed(&self, source: &str) -> bool {
        self.deposed.lock().contains(source)
    }

    /// Sources deposed since the last call (the consumer stops reading them).
    pub fn take_deposed(&self) -> Vec<String> {
        std::mem::take(&mut *self.deposed_news.lock())
    }

    /// `source` is assigned here again (and fenced for this replica): it may be owned again.
    pub fn reassigned(&self, source: &str) {
        self.deposed.lock().remove(source);
    }

    /// Whether this replica closes, emits and rates `tenant`'s windows: always without
    /// replicated sources; else when it owns one of the tenant's sources, or none is known (the
    /// tenant's usage is local, or first seen in the checkpoint being written, from a source
    /// owned here); never for a split tenant (`is_split`).
    pub fn emits_here(&self, tenant: &str) -> bool {
        // `is_split` takes the lock again: not while a writer may be queued behind this read.
        self.owns(tenant) && !self.is_split(tenant)
    }

    /// `emits_here` without the split check (for a caller that made it already).
    pub fn owns(&self, tenant: &str) -> bool {
        let owned = self.owned.read();
        let Some(owned) = owned.as_ref() else {
            return true;
        };
        match self.known.lock().get(tenant) {
            None => true,
            Some(sources) => sources.iter().any(|source| owned.contains(&**source)),
        }
    }

    /// Cluster mode: whether `tenant`'s usage was counted on more than one partition, here or
    /// (`set_split_check`) by other replicas. No replica holds its whole total, so none emits
    /// its window and rated records: each would send its part under the same record id.
    pub fn is_split(&self, tenant: &str) -> bool {
        if self.owned.read().is_none() {
            return false;
        }
        if self
            .known
            .lock()
            .get(tenant)
            .is_some_and(|sources| sources.len() > 1)
        {
            return true;
        }
        self.split_check
            .read()
            .as_ref()
            .is_some_and(|check| check(tenant))
    }

    /// How `is_split` learns what other replicas counted (cluster mode).
    pub fn set_split_check(&self, check: SplitCheck) {
        *self.split_check.write() = Some(check);
    }

    /// The owned sources whose changelog carries `tenant`'s emission and rating state: its
    /// known sources and `new` (learned by the checkpoint being written), owned here. Empty
    /// without replicated sources.
    pub fn carriers(&self, tenant: &str, new: &NewPairs) -> Vec<String> {
        let owned = self.owned.read();
        let Some(owned) = owned.as_ref() else {
            return Vec::new();
        };
        let known = self.known.lock();
        let mut out: Vec<String> = known
            .get(tenant)
            .into_iter()
            .flatten()
            .map(|source| source.to_string())
            .chain(
                new.0
                    .iter()
                    .filter(|(t, _)| &**t == tenant)
                    .map(|(_, source)| source.to_string()),
            )
            .filter(|source| owned.contains(source))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Whether sources are replicated (ownership tracked).
    pub fn tracks_ownership(&self) -> bool {
        self.owned.read().is_some()
    }

    /// The sources that have fed `tenant`, in the order learned.
    pub fn sources_of(&self, tenant: &str) -> Vec<String> {
        self.known
            .lock()
            .get(tenant)
            .map(|sources| sources.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    /// Tenants fed by more than one source, with their sources (sorted by tenant).
    pub fn conflicts(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<_> = self
            .known
            .lock()
            .iter()
            .filter(|(_, sources)| sources.len() > 1)
            .map(|(tenant, sources)| {
                (
                    tenant.to_string(),
                    sources.iter().map(|s| s.to_string()).collect(),
                )
            })
            .collect();
        out.sort();
        out
    }
}
