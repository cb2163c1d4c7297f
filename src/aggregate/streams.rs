//! Streams whose usage depends on their previous point: OTLP `CUMULATIVE` sums and histogram
//! counts/sums (→ deltas), and gauges integrated over time (TIME_WEIGHTED).
//!
//! A cumulative point says "this stream has counted `value` since `start`"; usage is the
//! difference to the stream's previous point. The conversion runs on the commit thread, in
//! ingest-log order, both when a request is committed and when the log is replayed after a
//! crash: the log holds the raw cumulative points, the checkpoint holds the stream states
//! (`S` keys, in the same WriteBatch as the log position), so replay re-derives exactly the
//! same deltas. A request that never reached the log never moved a stream.
//!
//! Rules, per stream (resource + scope + metric + point attributes + meter):
//! - first point: its whole value counts (usage since its start time);
//! - a point not newer than the last one, by `(start, time)`, is a retry or a stale reorder:
//!   nothing counts (a newer cumulative value already includes it);
//! - a newer start time is a reset (new process, counter restarted): the whole value counts;
//! - same start, later time: `value − previous`; on a monotonic stream a decrease is a reset
//!   (the whole value counts), on a non-monotonic one the negative delta counts.
//!
//!
//! TIME_WEIGHTED (e.g. GB-hours of storage, seat-hours): step interpolation — a point's value
//! holds from its time until the stream's next point, so the interval `[previous, this)` adds
//! `previous value × its length in ms`, split exactly at the meter's window boundaries; an
//! interval is counted when the point closing it arrives (a window can be amended later). A gap
//! longer than the meter's `max_gap_secs` adds nothing (the stream stopped reporting). A point
//! not newer than the stream's last one adds nothing (a retry, or an out-of-order point: it
//! cannot be inserted into an interval already integrated).
//!
//! Forgetting (bounded memory): a stream silent for longer than the horizon (`dedup_horizon_secs`)
//! is treated as unknown: its next point follows the first-point rule, whether its state is
//! still held or not. A first point whose start lies more than the horizon before its time is a
//! baseline (nothing counts; later points count their deltas): usage that old is refused for
//! events too, and it is what a forgotten stream resuming looks like. `expire` may then drop
//! any state older than two horizons (every acceptable point lies more than one horizon after
//! it, see `expire`), and dropping it changes no count: not when it happens, and not on replay
//! after a crash, whichever checkpoint the drop reached. A start time of 0 (unknown) is older
//! than any horizon: such a stream's first point is a baseline (as the OpenTelemetry data model
//! asks for cumulative streams without a known start).
//!
//! Must not: do I/O or depend on arrival order beyond the log order it is given.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::{AggState, Aggregation, MergeError, Observation, PreAggregated};
use crate::model::SeriesKey;

/// The last point seen of one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub start_ns: u64,
    pub time_ns: u64,
    /// Fixed point at the target meter's scale.
    pub value: i128,
}

impl StreamState {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: stream states serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<StreamState, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// How a stream's points become usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// A cumulative sum or count: usage is the difference to the previous point.
    Cumulative { monotonic: bool },
    /// One bucket of a cumulative histogram feeding a DISTRIBUTION: the count's delta is
    /// recorded at `at` (the bucket's value at the meter's scale).
    CumulativeBucket { at: u64 },
    /// A gauge integrated over time, into windows of `window_secs`.
    TimeWeighted { window_secs: i64, max_gap_ms: i64 },
}

/// One point of a stream for one meter series, as the edge mapped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CumulativePoint {
    /// Identity of the stream (hash of resource, scope, metric, attributes and meter).
    pub stream: u128,
    /// 0 for TIME_WEIGHTED streams (only time orders their points).
    pub start_ns: u64,
    pub time_ns: u64,
    pub value: i128,
    pub kind: StreamKind,
    /// Where the usage goes: the series of the point's window (TIME_WEIGHTED: of the windows
    /// its interval covers, same meter, tenant and dims).
    pub key: SeriesKey,
    /// SUM or COUNT (add the delta) or TIME_WEIGHTED (adds the integral).
    pub aggregation: Aggregation,
}

/// Streams moved (or forgotten: `None`) since the last take, newest per stream.
pub type StreamChanges = FxHashMap<u128, Option<StreamState>>;

/// Every live stream's last point (one entry per time series an exporter sent within two
/// horizons; older ones are forgotten by `expire`).
#[derive(Debug)]
pub struct Streams {
    states: FxHashMap<u128, StreamState>,
    /// How long a stream may stay silent and still continue from its state (ns).
    horizon_ns: u64,
}

impl Default for Streams {
    fn default() -> Streams {
        Streams::new([], DEFAULT_HORIZON_SECS)
    }
}

/// The default `dedup_horizon_secs` (35 days), for tests and tools.
pub const DEFAULT_HORIZON_SECS: i64 = 3_024_000;

impl Streams {
    pub fn new(states: impl IntoIterator<Item = (u128, StreamState)>, horizon_secs: i64) -> Streams {
        Streams {
            states: states.into_iter().collect(),
            horizon_ns: u64::try_from(horizon_secs)
                .unwrap_or(0)
                .saturating_mul(1_000_000_000),
        }
    }

    /// Forgets every stream whose last point is older than `now − 2 × horizon` and records
    /// each as `None` in `changed` (so the checkpoint deletes it). `now_secs` is the expiry
    /// clock (`store::clock`): admission refuses points older than `high water − horizon`, and
    /// the high water is at least that clock, so every point still acceptable lies more than a
    /// horizon after a dropped state, where the state no longer counts (module rules).
    pub fn expire(&mut self, now_secs: i64, changed: &mut StreamChanges) -> usize {
        let horizon_secs = (self.horizon_ns / 1_000_000_000) as i64;
        let cutoff_secs = now_secs.saturating_sub(horizon_secs.saturating_mul(2));
        if cutoff_secs <= 0 {
            return 0;
        }
        let cutoff_ns = (cutoff_secs as u64).saturating_mul(1_000_000_000);
        let before = self.states.len();
        self.states.retain(|stream, state| {
            let keep = state.time_ns >= cutoff_ns;
            if !keep {
                changed.insert(*stream, None);
            }
            keep
        });
        before - self.states.len()
    }

    pub fn len(&self) -> usize {
        self.states.len()
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }

    pub fn get(&self, stream: u128) -> Option<StreamState> {
        self.states.get(&stream).copied()
    }

    /// The stream's state as `point` sees it: none when the point comes more than a horizon
    /// after it (the stream is treated as unknown, exactly as once `expire` dropped it).
    fn previous(&self, point: &CumulativePoint) -> Option<StreamState> {
        self.states
            .get(&point.stream)
            .copied()
            .filter(|state| point.time_ns.saturating_sub(state.time_ns) <= self.horizon_ns)
    }

    /// The usage a point adds, given the stream's previous point (pure: see the module rules).
    pub fn delta(previous: Option<StreamState>, point: &CumulativePoint, horizon_ns: u64) -> Option<i128> {
        let Some(previous) = previous else {
            // A first point counts its usage since its start, unless that start is older than
            // the horizon: then it is a baseline.
            return (point.time_ns.saturating_sub(point.start_ns) <= horizon_ns).then_some(point.value);
        };
        if (point.start_ns, point.time_ns) <= (previous.start_ns, previous.time_ns) {
            return None;
        }
        if point.start_ns > previous.start_ns {
            return Some(point.value);
        }
        let monotonic = matches!(
            point.kind,
            StreamKind::Cumulative { monotonic: true } | StreamKind::CumulativeBucket { .. }
        );
        if monotonic && point.value < previous.value {
            return Some(point.value);
        }
        point.value.checked_sub(previous.value)
    }

    /// The integral of the step from `previous` to `point`, per window: `(window_start secs,
    /// value × ms)`. Empty for a first point or a gap longer than `max_gap_ms`.
    pub fn integral(
        previous: Option<StreamState>,
        point: &CumulativePoint,
        window_secs: i64,
        max_gap_ms: i64,
    ) -> Vec<(i64, i128)> {
        let Some(previous) = previous else {
            return Vec::new();
        };
        let (from_ms, to_ms) = (
            (previous.time_ns / 1_000_000) as i64,
            (point.time_ns / 1_000_000) as i64,
        );
        if to_ms <= from_ms || to_ms - from_ms > max_gap_ms || previous.value == 0 {
            return Vec::new();
        }
        let window_ms = window_secs * 1000;
        let mut out = Vec::new();
        let mut at = from_ms;
        while at < to_ms {
            let window_start = at.div_euclid(window_ms) * window_ms;
            let until = (window_start + window_ms).min(to_ms);
            out.push((
                window_start / 1000,
                previous.value.saturating_mul(i128::from(until - at)),
            ));
            at = until;
        }
        out
    }

    /// Converts `points` (in log order) into deltas folded into `batch`, and records each
    /// stream's new state in `changed` (the newest wins). Points that add nothing still move
    /// their stream when they are newer.
    pub fn fold(
        &mut self,
        points: &[CumulativePoint],
        batch: &mut PreAggregated,
        changed: &mut StreamChanges,
    ) -> Result<(), MergeError> {
        for point in points {
            let previous = self.previous(point);
            let newer = previous.is_none_or(|previous| {
                (point.start_ns, point.time_ns) > (previous.start_ns, previous.time_ns)
            });
            if !newer {
                continue;
            }
            let ts_ms = (point.time_ns / 1_000_000) as i64;
            match point.kind {
                StreamKind::TimeWeighted {
                    window_secs,
                    max_gap_ms,
                } => {
                    for (window_start, area) in Self::integral(previous, point, window_secs, max_gap_ms) {
                        let key = SeriesKey {
                            window_start,
                            ..point.key
                        };
                        batch.observe(key, Aggregation::TimeWeighted, Observation::Value(area), ts_ms, 0)?;
                    }
                }
                StreamKind::CumulativeBucket { at } => match Self::delta(previous, point, self.horizon_ns) {
                    Some(delta) if delta > 0 => {
                        let mut distribution = super::distribution::Distribution::default();
                        distribution.record(at, u64::try_from(delta).unwrap_or(0));
                        batch.merge_state(point.key, &AggState::Distribution(Box::new(distribution)))?
                    }
                    _ => {}
                },
                StreamKind::Cumulative { .. } => {
                    match (Self::delta(previous, point, self.horizon_ns), point.aggregation) {
                        (None | Some(0), _) => {}
                        // A COUNT meter fed by a histogram's cumulative count adds the count's delta
                        // (counts are monotonic, so the reset rule never yields a negative one).
                        (Some(delta), Aggregation::Count) => batch
                            .merge_state(point.key, &AggState::Count(u64::try_from(delta).unwrap_or(0)))?,
                        (Some(delta), aggregation) => {
                            batch.observe(point.key, aggregation, Observation::Value(delta), ts_ms, 0)?
                        }
                    }
                }
            }
            let state = StreamState {
                start_ns: point.start_ns,
                time_ns: point.time_ns,
                value: point.value,
            };
            self.states.insert(point.stream, state);
            changed.insert(point.stream, Some(state));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SeriesKey {
        SeriesKey {
            meter: 1,
            tenant: 1,
            dims: 0,
            window_start: 0,
        }
    }

    fn point(start: u64, time: u64, value: i128) -> CumulativePoint {
        CumulativePoint {
            stream: 7,
            start_ns: start,
            time_ns: time,
            value,
            kind: StreamKind::Cumulative { monotonic: true },
            key: key(),
            aggregation: Aggregation::Sum,
        }
    }

    fn total(streams: &mut Streams, points: &[CumulativePoint]) -> i128 {
        let mut batch = PreAggregated::default();
        streams
            .fold(points, &mut batch, &mut FxHashMap::default())
            .unwrap();
        match batch.series.get(&key()) {
            Some(super::super::AggState::Sum(sum)) => sum.get(),
            None => 0,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn cumulative_points_become_deltas_with_resets_and_retries() {
        let mut streams = Streams::default();
        let points = [
            point(1, 10, 5),
            point(1, 20, 8),
            point(1, 20, 8),  // retry of the same point
            point(1, 15, 6),  // stale reorder
            point(1, 30, 2),  // decrease on a monotonic stream: reset
            point(40, 50, 4), // new start time: reset
        ];
        assert_eq!(total(&mut streams, &points), 5 + 3 + 2 + 4);
        assert_eq!(
            streams.get(7),
            Some(StreamState {
                start_ns: 40,
                time_ns: 50,
                value: 4
            })
        );
    }

    #[test]
    fn non_monotonic_streams_count_decreases() {
        let mut streams = Streams::default();
        let mut points = vec![point(1, 10, 5), point(1, 20, 3)];
        for point in &mut points {
            point.kind = StreamKind::Cumulative { monotonic: false };
        }
        assert_eq!(total(&mut streams, &points), 3);
    }

    fn gauge(time_ms: u64, value: i128) -> CumulativePoint {
        CumulativePoint {
            stream: 9,
            start_ns: 0,
            time_ns: time_ms * 1_000_000,
            value,
            kind: StreamKind::TimeWeighted {
                window_secs: 60,
                max_gap_ms: 120_000,
            },
            key: key(),
            aggregation: Aggregation::TimeWeighted,
        }
    }

    #[test]
    fn cumulative_buckets_record_their_count_deltas_at_their_value() {
        let bucket = |time: u64, count: i128| CumulativePoint {
            kind: StreamKind::CumulativeBucket { at: 300 },
            aggregation: Aggregation::Distribution,
            ..point(1, time, count)
        };
        let mut streams = Streams::default();
        let mut batch = PreAggregated::default();
        let points = [bucket(10, 2), bucket(20, 5), bucket(20, 5), bucket(30, 1)];
        streams
            .fold(&points, &mut batch, &mut FxHashMap::default())
            .unwrap();
        // 2, then +3, then a decrease: a reset counting 1.
        let mut expected = super::super::distribution::Distribution::default();
        expected.record(300, 6);
        assert_eq!(
            batch.series.get(&key()),
            Some(&AggState::Distribution(Box::new(expected)))
        );
    }

    #[test]
    fn gauges_integrate_as_steps_split_at_window_boundaries() {
        let mut streams = Streams::default();
        let mut batch = PreAggregated::default();
        let points = [
            gauge(30_000, 10), // starts the step
            gauge(90_000, 20), // 10 × 60 s: 30 s in window 0, 30 s in window 60
            gauge(90_000, 20), // retry: nothing
            gauge(60_000, 99), // out of order: nothing
            gauge(100_000, 5), // 20 × 10 s in window 60
            gauge(400_000, 7), // a 300 s gap > max_gap: nothing
            gauge(401_000, 0), // 7 × 1 s in window 360
        ];
        streams
            .fold(&points, &mut batch, &mut FxHashMap::default())
            .unwrap();
        let mut windows: Vec<(i64, i128)> = batch
            .series
            .iter()
            .map(|(key, state)| match state {
                AggState::Sum(sum) => (key.window_start, sum.get()),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        windows.sort();
        assert_eq!(windows, vec![(0, 300_000), (60, 300_000 + 200_000), (360, 7_000)]);
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_stream_silent_past_the_horizon_continues_from_a_baseline() {
        let mut streams = Streams::new([], 100);
        assert_eq!(
            total(&mut streams, &[point(SEC, 10 * SEC, 5), point(SEC, 20 * SEC, 8)]),
            8
        );
        // 101 s of silence: unknown again; started 120 s before its time, so a baseline.
        assert_eq!(total(&mut streams, &[point(SEC, 121 * SEC, 50)]), 0);
        assert_eq!(total(&mut streams, &[point(SEC, 130 * SEC, 60)]), 10);
        // A restart after the silence counts whole: its start is recent.
        assert_eq!(total(&mut streams, &[point(300 * SEC, 310 * SEC, 7)]), 7);
    }

    #[test]
    fn a_first_point_with_an_old_or_unknown_start_is_a_baseline() {
        let mut streams = Streams::new([], 100);
        assert_eq!(
            total(&mut streams, &[point(0, 500 * SEC, 40)]),
            0,
            "start unknown (0)"
        );
        assert_eq!(total(&mut streams, &[point(0, 510 * SEC, 45)]), 5);
        let mut streams = Streams::new([], 100);
        assert_eq!(
            total(&mut streams, &[point(400 * SEC, 500 * SEC, 40)]),
            40,
            "start within the horizon"
        );
    }

    #[test]
    fn expiry_forgets_only_states_older_than_two_horizons_and_records_the_deletion() {
        let mut streams = Streams::new([], 100);
        let mut old = point(SEC, 10 * SEC, 5);
        old.stream = 1;
        let mut recent = point(SEC, 150 * SEC, 5);
        recent.stream = 2;
        total(&mut streams, &[old, recent]);
        let mut changed = StreamChanges::default();
        assert_eq!(
            streams.expire(210, &mut changed),
            0,
            "10 s is not older than 210 − 200"
        );
        assert_eq!(streams.expire(211, &mut changed), 1);
        assert_eq!(changed.get(&1), Some(&None));
        assert!(streams.get(1).is_none() && streams.get(2).is_some());
    }

    proptest! {
        /// Forgetting a stream never changes a count: with points admitted as the edge admits
        /// them (none older than the expiry clock's now minus a horizon), folding with expiry
        /// runs at any moments gives the totals of folding with every state kept.
        #[test]
        fn forgetting_silent_streams_changes_no_count(
            steps in proptest::collection::vec((0u128..3, 0u64..260, 0i128..50, 0u8..10), 1..60),
            expiries in proptest::collection::vec(0usize..60, 0..6),
        ) {
            const HORIZON: u64 = 100;
            let mut time = 1_000u64;
            let mut points = Vec::new();
            let mut values = [0i128; 3];
            let mut starts = [1u64; 3];
            for (stream, gap, increment, shape) in steps {
                time += gap;
                let i = stream as usize;
                match shape {
                    0 => { starts[i] = time - 1; values[i] = 0 } // a restart
                    1 => starts[i] = 0,                          // start unknown
                    _ => {}
                }
                values[i] += increment;
                let mut p = point(starts[i] * SEC, time * SEC, values[i]);
                p.stream = stream;
                points.push(p);
            }
            let mut kept = Streams::new([], HORIZON as i64);
            let mut forgetting = Streams::new([], HORIZON as i64);
            let (mut a, mut b) = (0, 0);
            for (index, p) in points.iter().enumerate() {
                if expiries.contains(&index) {
                    // The latest "now" at which every later point is still admitted.
                    let earliest_later = points[index..].iter().map(|p| p.time_ns / SEC).min().unwrap();
                    forgetting.expire((earliest_later + HORIZON) as i64, &mut StreamChanges::default());
                }
                a += total(&mut kept, std::slice::from_ref(p));
                b += total(&mut forgetting, std::slice::from_ref(p));
            }
            prop_assert_eq!(a, b);
        }
    }

    proptest! {
        /// However a collector retries and reorders exports of one cumulative stream, the
        /// usage counted is the stream's final value (no reset in between).
        #[test]
        fn retries_and_reorders_count_the_final_value(
            increments in proptest::collection::vec(0i128..1000, 1..30),
            deliveries in proptest::collection::vec((0usize..30, 0usize..3), 1..80),
            split in 0usize..80,
        ) {
            let mut cumulative = Vec::new();
            let mut value = 0;
            for (i, increment) in increments.iter().enumerate() {
                value += increment;
                cumulative.push(point(1, 10 * (i as u64 + 1), value));
            }
            // Some points arrive late, some twice; the newest always arrives eventually.
            let mut arrivals: Vec<CumulativePoint> = deliveries
                .iter()
                .flat_map(|(index, copies)| {
                    std::iter::repeat_n(cumulative[index % cumulative.len()].clone(), *copies)
                })
                .collect();
            arrivals.push(cumulative.last().unwrap().clone());
            // Split the arrivals across two folds (two requests, or a replay after a restart).
            let split = split.min(arrivals.len());
            let mut streams = Streams::default();
            let first = total(&mut streams, &arrivals[..split]);
            let mut restored = Streams::new(streams.states.clone(), DEFAULT_HORIZON_SECS);
            let second = total(&mut restored, &arrivals[split..]);
            prop_assert_eq!(first + second, value);
        }
    }
}
