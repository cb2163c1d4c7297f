//! The generated usage: Zipf-skewed tenants and dimension values, repeats (duplicates) and
//! late events, as CloudEvents batches written as text.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::*;

/// Samples ranks 0..n with probability ∝ 1/(rank+1)^s.
pub(crate) struct Zipf {
    pub(crate) cdf: Vec<f64>,
}

impl Zipf {
    pub(crate) fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(s);
            cdf.push(total);
        }
        for value in &mut cdf {
            *value /= total;
        }
        Zipf { cdf }
    }

    pub(crate) fn sample(&self, rng: &mut SmallRng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|p| *p < u).min(self.cdf.len() - 1)
    }
}

pub(crate) struct Generator {
    pub(crate) args: Args,
    pub(crate) tenants: Zipf,
    pub(crate) dims: Zipf,
    pub(crate) rng: SmallRng,
    pub(crate) next_id: u64,
    pub(crate) worker: usize,
    /// OTLP point times count up from here (1 µs apart), so every point is its own.
    pub(crate) started_ns: u64,
    pub(crate) otlp: OtlpGenerator,
}

impl Generator {
    /// The next item's id (`--dup-pct` of the time an earlier one's) and the RNG everything
    /// else about it derives from: a duplicate repeats the whole item.
    pub(crate) fn next_item(&mut self) -> (u64, SmallRng) {
        let duplicate = self.next_id > 0 && self.rng.gen_bool((self.args.dup_pct / 100.0).clamp(0.0, 1.0));
        let id = if duplicate {
            self.rng.gen_range(0..self.next_id)
        } else {
            self.next_id += 1;
            self.next_id - 1
        };
        (
            id,
            SmallRng::seed_from_u64(self.args.seed ^ (id << 8) ^ self.worker as u64),
        )
    }

    /// One OTLP export request of `batch_size` delta points (a duplicate repeats an earlier
    /// point exactly: same stream, start and time), encoded. The points are the generated
    /// `NumberDataPoint` type, one reused template per route; only the envelope is written
    /// field by field (`DeltaRequestEncoder`), so the generator spends its CPU on the load's
    /// bytes instead of on building and freeing a message tree per request (the daemon under
    /// test shares these two cores with it).
    pub(crate) fn otlp_request(&mut self) -> Vec<u8> {
        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64;
        for _ in 0..self.args.batch_size {
            let (id, mut point_rng) = self.next_item();
            let tenant = self.tenants.sample(&mut point_rng);
            let route = self.dims.sample(&mut point_rng);
            // Distinct (start, time) per point of a stream; a duplicate repeats its original's.
            let time = self.started_ns + id * 1000 + self.worker as u64;
            let point = &mut self.otlp.route_points[route];
            point.start_time_unix_nano = time - 1;
            point.time_unix_nano = time.min(now_ns);
            point.value = Some(
                opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(
                    point_rng.gen_range(1..100),
                ),
            );
            self.otlp.encoder.push_point(tenant, point);
        }
        self.otlp.encoder.finish(|tenant| format!("tenant-{tenant}"))
    }

    /// A JSON array of `batch_size` CloudEvents.
    pub(crate) fn batch(&mut self) -> (Vec<u8>, usize) {
        let now = chrono::Utc::now();
        let now_text = event_time(now);
        let mut body = Vec::with_capacity(self.args.batch_size * 224);
        body.push(b'[');
        for n in 0..self.args.batch_size {
            if n > 0 {
                body.push(b',');
            }
            self.write_event(now, &now_text, &mut body);
        }
        body.push(b']');
        (body, self.args.batch_size)
    }

    /// Appends one CloudEvent as JSON and returns its tenant. Written as text, not through a
    /// `serde_json::Value` per event: every string here is plain ASCII that needs no escaping,
    /// and the generator's CPU is taken from the daemon it measures (same two cores).
    pub(crate) fn write_event(
        &mut self,
        now: chrono::DateTime<chrono::Utc>,
        now_text: &str,
        out: &mut Vec<u8>,
    ) -> usize {
        use std::io::Write;
        let (id, mut event_rng) = self.next_item();
        let tenant = self.tenants.sample(&mut event_rng);
        let dim = self.dims.sample(&mut event_rng);
        let late = event_rng.gen_bool((self.args.late_pct / 100.0).clamp(0.0, 1.0));
        let late_text;
        let time = if late {
            late_text = event_time(now - chrono::Duration::seconds(event_rng.gen_range(120..240)));
            late_text.as_str()
        } else {
            now_text
        };
        let kind = event_rng.gen_range(0..10);
        let event_type = match kind {
            0..=5 => "llm.prompt",
            6..=8 => "api.request",
            _ => "user.active",
        };
        let (seed, worker) = (self.args.seed, self.worker);
        write!(
            out,
            r#"{{"specversion":"1.0","id":"lg-{seed}-{worker}-{id}","source":"tallyd-loadgen","type":"{event_type}","subject":"tenant-{tenant}","time":"{time}","data":"#
        )
        .expect("invariant: writing to a Vec cannot fail");
        match kind {
            0..=5 => write!(
                out,
                r#"{{"tokens":{},"model":"model-{dim}"}}}}"#,
                event_rng.gen_range(1..4000)
            ),
            6..=8 => write!(out, r#"{{"route":"/v1/r{dim}","method":"GET"}}}}"#),
            _ => write!(
                out,
                r#"{{"user_id":"user-{}"}}}}"#,
                event_rng.gen_range(0..100_000)
            ),
        }
        .expect("invariant: writing to a Vec cannot fail");
        tenant
    }
}

/// A CloudEvent `time`: RFC 3339 UTC with milliseconds.
pub(crate) fn event_time(time: chrono::DateTime<chrono::Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

pub(crate) fn generator(args: &Args, worker: usize) -> Generator {
    Generator {
        args: args.clone(),
        tenants: Zipf::new(args.tenants.max(1), args.zipf_s),
        dims: Zipf::new(args.dim_cardinality.max(1), args.zipf_s),
        rng: SmallRng::seed_from_u64(args.seed.wrapping_add(worker as u64)),
        next_id: 0,
        worker,
        // Behind now, so that points never look like they come from the future.
        started_ns: (chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() as u64)
            .saturating_sub(args.duration_secs * 2_000_000_000),
        otlp: OtlpGenerator::new(args.dim_cardinality.max(1)),
    }
}
