//! Rebalances: on assignment, restore each partition from the changelog (when replicated) and
//! seek to where its durable state ends; on revocation, apply and checkpoint what was consumed
//! and commit the revoked partitions' offsets before letting them go, so the next owner starts
//! exactly where this replica's durable state ends.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, TopicPartitionList};

use super::{changelog, SourceContext, REVOKE_CHECKPOINT_TIMEOUT};
use crate::kafka::position_name;
use crate::telemetry;

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                metrics::counter!(telemetry::KAFKA_REBALANCES, "kind" => "assign").increment(1);
                self.seek_positions(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(error) = result {
                    tracing::error!(%error, "cannot take the assigned partitions");
                }
                let blocked = self.blocked.lock();
                if !blocked.is_empty() {
                    let mut paused = TopicPartitionList::new();
                    for (topic, partition) in blocked.iter() {
                        paused.add_partition(topic, *partition);
                    }
                    if let Err(error) = consumer.pause(&paused) {
                        tracing::error!(%error, "cannot pause partitions whose restore failed");
                    }
                }
                drop(blocked);
                let mut owned = self.owned.lock();
                let mut expected = self.expected.lock();
                for element in tpl.elements() {
                    let key = (element.topic().to_string(), element.partition());
                    match element.offset() {
                        Offset::Offset(start) => expected.insert(key.clone(), start),
                        _ => expected.remove(&key),
                    };
                    owned.insert(key);
                }
                drop(expected);
                self.announce(&owned);
                drop(owned);
                tracing::info!(partitions = %describe(tpl), "partitions assigned");
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                metrics::counter!(telemetry::KAFKA_REBALANCES, "kind" => "revoke").increment(1);
                // A lost assignment (session timeout) already belongs to someone else: still
                // checkpoint what we counted, but the offset commit will be refused.
                self.release(consumer, tpl);
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "cannot release the revoked partitions");
                }
                tracing::info!(partitions = %describe(tpl), "partitions revoked");
            }
            other => {
                tracing::error!(error = ?other, "rebalance failed");
                let _ = consumer.unassign();
                let mut owned = self.owned.lock();
                owned.clear();
                self.announce(&owned);
            }
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}@{:?}", e.topic(), e.partition(), e.offset()))
        .collect::<Vec<_>>()
        .join(",")
}

impl SourceContext {
    fn announce(&self, owned: &BTreeSet<(String, i32)>) {
        if self.cluster.is_some() {
            // Cluster mode: only the owner of a partition emits and rates its tenants' windows.
            self.shared.store.tenant_sources.set_owned(Some(
                owned
                    .iter()
                    .map(|(topic, partition)| position_name(topic, *partition))
                    .collect(),
            ));
        }
        if let Some(cluster) = &self.cluster {
            cluster.set_owned(
                owned
                    .iter()
                    .map(|(topic, partition)| (topic.as_str(), *partition)),
            );
            // Where the owned partitions' tenants are, again: a pair published before and lost,
            // or learned by a store that predates publishing, reaches the other replicas now.
            let sources = owned
                .iter()
                .map(|(topic, partition)| position_name(topic, *partition))
                .collect();
            for (tenant, source) in self.shared.store.tenant_sources.pairs_in(&sources) {
                cluster.learned(&tenant, &source);
            }
        }
    }

    /// Sets each assigned partition's start offset: the checkpointed position, or the group's
    /// committed offset when another replica got further (it holds that usage).
    fn seek_positions(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(committed) => Some(committed),
            Err(error) => {
                tracing::warn!(%error, "cannot read committed offsets; using checkpointed positions");
                None
            }
        };
        let assigned: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, partition) in assigned {
            // Held back when this replica was deposed from it; assigned again now.
            self.blocked.lock().remove(&(topic.clone(), partition));
            if let Some(changelog_topic) = &self.config.changelog_topic {
                // The previous owner published this partition's state before committing it:
                // fence it for this replica, then catch the store up before deciding where to
                // resume.
                let source = position_name(&topic, partition);
                let shared = &self.shared;
                match changelog::restore_partition(
                    &self.config,
                    changelog_topic,
                    &shared.store,
                    &shared.catalog,
                    &source,
                    partition,
                    self.changelog.as_deref(),
                ) {
                    Ok((_, restore_from)) => {
                        if let Some(producer) = &self.changelog {
                            producer.set_restore_from(&source, restore_from);
                        }
                        shared.store.tenant_sources.reassigned(&source);
                    }
                    Err(error) => {
                        // Resuming without the restore could count twice: hold the partition back.
                        tracing::error!(%error, source, "cannot restore from the changelog; not consuming it");
                        shared.fault("kafka-restore", format!("{source}: {error}"));
                        self.blocked.lock().insert((topic.clone(), partition));
                        self.any_blocked.store(true, Ordering::Release);
                        continue;
                    }
                }
            }
            let local = match self.shared.store.position(&position_name(&topic, partition)) {
                Ok(local) => local.map(|next| next as i64),
                Err(error) => {
                    tracing::error!(%error, topic, partition, "cannot read the checkpointed position");
                    None
                }
            };
            let group = committed
                .as_ref()
                .and_then(|c| c.find_partition(&topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                });
            let start = match (local, group) {
                (Some(local), Some(group)) => Some(local.max(group)),
                (one, other) => one.or(other),
            };
            if let Some(start) = start {
                if let Err(error) = tpl.set_partition_offset(&topic, partition, Offset::Offset(start)) {
                    tracing::error!(%error, topic, partition, "cannot set the start offset");
                }
            }
        }
        // Quotas' `used` of tenants on partitions counted elsewhere meanwhile is in the store
        // now (restored), not in the gate: read again on next use.
        self.shared.limits.forget_quotas();
    }

    /// Stops reading the partitions a checkpoint found another replica fenced (this one was a
    /// zombie owner): they stay assigned until the group tells this consumer, but paused and
    /// neither counted nor committed here.
    pub(super) fn stop_deposed(&self, consumer: &BaseConsumer<Self>) {
        let deposed = self.shared.store.tenant_sources.take_deposed();
        if deposed.is_empty() {
            return;
        }
        let mut paused = TopicPartitionList::new();
        let mut owned = self.owned.lock();
        let mut blocked = self.blocked.lock();
        for source in &deposed {
            let Some((topic, partition)) = crate::kafka::parse_position_name(source) else {
                continue;
            };
            let key = (topic.to_string(), partition);
            if owned.remove(&key) {
                blocked.insert(key);
                paused.add_partition(topic, partition);
            }
        }
        self.any_blocked.store(!blocked.is_empty(), Ordering::Release);
        drop(blocked);
        if paused.count() > 0 {
            if let Err(error) = consumer.pause(&paused) {
                tracing::warn!(%error, "cannot pause partitions another replica took");
            }
        }
        self.announce(&owned);
    }

    /// Applies what was consumed, checkpoints it, and commits the revoked partitions' offsets.
    fn release(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        self.process_pending();
        if !self
            .shared
            .checkpoint_now(&self.checkpoints, REVOKE_CHECKPOINT_TIMEOUT)
        {
            tracing::error!("revoked partitions released without a fresh checkpoint; the next owner replays");
        }
        let mut commit = TopicPartitionList::new();
        let mut owned = self.owned.lock();
        for element in tpl.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            owned.remove(&(topic.to_string(), partition));
            let mut blocked = self.blocked.lock();
            blocked.remove(&(topic.to_string(), partition));
            self.any_blocked.store(!blocked.is_empty(), Ordering::Release);
            if blocked.is_empty() {
                self.shared.clear_fault("kafka-restore");
            }
            drop(blocked);
            metrics::gauge!(telemetry::KAFKA_LAG, "topic" => topic.to_string(), "partition" => partition.to_string())
                .set(0.0);
            let source = position_name(topic, partition);
            // A deposed replica's position may be past what the owner's changelog holds:
            // committing it would make the next owner skip usage nobody vouches for.
            if self.shared.store.tenant_sources.is_deposed(&source) {
                continue;
            }
            if let Ok(Some(next)) = self.shared.store.position(&source) {
                let _ = commit.add_partition_offset(topic, partition, Offset::Offset(next as i64));
            }
        }
        self.announce(&owned);
        drop(owned);
        if commit.count() > 0 {
            if let Err(error) = consumer.commit(&commit, CommitMode::Sync) {
                tracing::warn!(%error, "offset commit on revoke failed (advisory; positions are checkpointed)");
            }
        }
    }
}
