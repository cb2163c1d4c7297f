//! The outbox: window and rated records queued by checkpoints (`O` keys, in the checkpoint's
//! WriteBatch), and each emitter's cursor (`M emit/<name>`). A line is deleted once every
//! registered emitter has delivered it.

use std::sync::atomic::Ordering;

use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::{keys, read_u64, RocksStore, StoreError};

impl RocksStore {
    /// Every outbox line still stored, in order.
    pub fn pending_outbox(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.outbox_from(0, usize::MAX)
    }

    /// Outbox lines with a sequence of at least `from`, in order, at most `limit`.
    pub fn outbox_from(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&keys::outbox_key(from), Direction::Forward))
        {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item?;
            if key.first() != Some(&keys::OUTBOX) {
                break;
            }
            let seq = u64::from_be_bytes(key[1..9].try_into().map_err(|_| StoreError::Corrupt {
                what: "outbox key",
                detail: format!("{key:?}"),
            })?);
            out.push((seq, value.to_vec()));
        }
        Ok(out)
    }

    /// The sequence the next outbox line will get.
    pub fn outbox_next(&self) -> u64 {
        self.outbox_next.load(Ordering::Acquire)
    }

    /// Registers an emitter and returns its cursor (the next outbox sequence it must deliver).
    /// A new emitter starts at the oldest line still stored; lines are trimmed only once every
    /// registered emitter has delivered them.
    pub fn register_emitter(&self, name: &str) -> Result<u64, StoreError> {
        let stored = read_u64(&self.db, &keys::meta_key(&format!("emit/{name}")))?;
        let cursor = match stored {
            Some(cursor) => cursor,
            None => match self.outbox_from(0, 1)?.first() {
                Some((seq, _)) => *seq,
                None => self.outbox_next(),
            },
        };
        self.emitters.lock().insert(name.to_string(), cursor);
        Ok(cursor)
    }

    /// Records that `name` delivered everything below `next`, and forgets the lines every
    /// registered emitter has delivered.
    pub fn advance_emitter(&self, name: &str, next: u64) -> Result<(), StoreError> {
        let low = {
            let mut emitters = self.emitters.lock();
            emitters.insert(name.to_string(), next);
            emitters.values().copied().min().unwrap_or(next)
        };
        let mut batch = WriteBatch::default();
        batch.put(keys::meta_key(&format!("emit/{name}")), next.to_be_bytes());
        batch.delete_range(keys::outbox_key(0), keys::outbox_key(low));
        self.write(batch, false)
    }

    /// Lines not yet delivered by `name` (for the backlog gauge).
    pub fn emitter_backlog(&self, name: &str) -> u64 {
        let cursor = self.emitters.lock().get(name).copied().unwrap_or(0);
        self.outbox_next().saturating_sub(cursor)
    }

    /// Forgets outbox lines up to and including `last_seq` (tests).
    pub fn clear_outbox(&self, last_seq: u64) -> Result<(), StoreError> {
        let mut batch = WriteBatch::default();
        batch.delete_range(keys::outbox_key(0), keys::outbox_key(last_seq + 1));
        self.write(batch, false)
    }
}
