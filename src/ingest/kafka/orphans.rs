//! Partitions that nobody consumes. A member killed and restarted within its session timeout
//! rejoins the group while its dead incarnation is still a member, so the assignment gives the
//! dead one partitions too; when the dead member's session then expires, the coordinator must
//! start another rebalance to hand them out. The crash campaign found a broker (tansu 0.6) that
//! sometimes does not: those partitions stayed unconsumed for good, their usage never counted
//! (RELIABILITY.md, "Crash campaign"). So the source watches the partitions of its topics that
//! it was not assigned: one whose committed offset has not moved for `patience` while messages
//! wait behind it is owned by nobody alive, and the source rejoins the group (unsubscribe,
//! subscribe) so that a rebalance assigns it. A partition that a live but slow member holds
//! (paused, restoring) costs at worst one needless rebalance.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

/// A partition: topic and number.
type Partition = (String, i32);

pub(super) struct OrphanWatch {
    /// How often to look (each look is a metadata, a committed-offsets and a watermark request).
    every: Duration,
    /// How long a partition may sit with waiting messages and an unmoving committed offset.
    patience: Duration,
    last_look: Instant,
    /// Unassigned partitions with waiting messages: the committed offset and since when it has
    /// not moved.
    stuck: HashMap<Partition, (i64, Instant)>,
}

impl OrphanWatch {
    /// `session_timeout`: the group's (`session.timeout.ms`); a dead member is out after it.
    pub(super) fn new(session_timeout: Duration) -> OrphanWatch {
        OrphanWatch {
            every: session_timeout,
            patience: session_timeout * 3,
            last_look: Instant::now(),
            stuck: HashMap::new(),
        }
    }

    /// Looks (at most every `every`) and says whether to rejoin the group.
    pub(super) fn should_rejoin<C: ClientContext + rdkafka::consumer::ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        topics: &[String],
    ) -> bool {
        if self.last_look.elapsed() < self.every {
            return false;
        }
        self.last_look = Instant::now();
        let Some(observed) = observe(consumer, topics) else {
            return false; // the broker did not answer: look again next time
        };
        let orphans = self.update(observed, Instant::now());
        if orphans.is_empty() {
            return false;
        }
        tracing::warn!(
            partitions = ?orphans,
            "partitions with waiting messages have had no consumer for three session timeouts; rejoining the group"
        );
        metrics::counter!(crate::telemetry::KAFKA_ORPHAN_REJOINS).increment(1);
        self.stuck.clear();
        true
    }

    /// The decision, given each unassigned partition's (committed offset, high watermark):
    /// the partitions stuck for `patience`.
    fn update(&mut self, observed: Vec<(Partition, i64, i64)>, now: Instant) -> Vec<Partition> {
        let mut stuck = HashMap::new();
        let mut orphans = Vec::new();
        for (partition, committed, high) in observed {
            if high <= committed {
                continue; // nothing waiting
            }
            let since = match self.stuck.get(&partition) {
                Some((before, since)) if *before == committed => *since,
                _ => now,
            };
            if now.duration_since(since) >= self.patience {
                orphans.push(partition.clone());
            }
            stuck.insert(partition, (committed, since));
        }
        self.stuck = stuck;
        orphans.sort();
        orphans
    }
}

/// For each partition of `topics` not assigned to this consumer: (committed offset, high
/// watermark). None when the broker does not answer in time.
fn observe<C: ClientContext + rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topics: &[String],
) -> Option<Vec<(Partition, i64, i64)>> {
    let timeout = Duration::from_secs(5);
    let assigned = consumer.assignment().ok()?;
    let mut unassigned = TopicPartitionList::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout).ok()?;
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            if assigned.find_partition(topic, partition.id()).is_none() {
                unassigned.add_partition(topic, partition.id());
            }
        }
    }
    if unassigned.count() == 0 {
        return Some(Vec::new());
    }
    let committed = consumer.committed_offsets(unassigned, timeout).ok()?;
    let mut observed = Vec::new();
    for element in committed.elements() {
        let (low, high) = consumer
            .fetch_watermarks(element.topic(), element.partition(), timeout)
            .ok()?;
        let committed = match element.offset() {
            Offset::Offset(offset) => offset,
            _ => low, // never committed: everything from the start waits
        };
        observed.push((
            (element.topic().to_string(), element.partition()),
            committed,
            high,
        ));
    }
    Some(observed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: i32) -> Partition {
        ("usage".to_string(), n)
    }

    /// Only a partition whose committed offset stays put while messages wait, for the whole
    /// patience, is an orphan; one that moves, or has nothing waiting, is not.
    #[test]
    fn a_partition_is_an_orphan_only_after_its_offset_stood_still_for_the_patience() {
        let mut watch = OrphanWatch::new(Duration::from_secs(6));
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let look = |committed: [i64; 3]| {
            vec![
                (p(0), committed[0], 100),
                (p(1), committed[1], 100),
                (p(2), committed[2], 100),
            ]
        };
        assert!(watch.update(look([10, 10, 100]), at(0)).is_empty());
        assert!(watch.update(look([10, 20, 100]), at(10)).is_empty());
        // Partition 0 stood still 18 s (3 × 6 s) with 90 messages waiting; 1 moved at 10 s.
        assert_eq!(watch.update(look([10, 20, 100]), at(18)), vec![p(0)]);
        assert_eq!(watch.update(look([10, 20, 100]), at(28)), vec![p(0), p(1)]);
        // It moves again (someone consumes it): no longer stuck.
        assert_eq!(watch.update(look([50, 20, 100]), at(29)), vec![p(1)]);
        // Nothing waiting is never an orphan, however long.
        assert!(watch.update(vec![(p(3), 100, 100)], at(1000)).is_empty());
    }
}
