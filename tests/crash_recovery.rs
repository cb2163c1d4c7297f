//! Crash safety: SIGKILL at an arbitrary moment mid-ingest, restart, and the totals are exactly
//! what they would have been without the crash once clients retry what was not acknowledged.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const WRITERS: usize = 4;
const BATCHES_PER_WRITER: usize = 300;
const EVENTS_PER_BATCH: usize = 50;

fn batch(writer: usize, index: usize, time: &str) -> (Vec<Value>, i64) {
    let mut total = 0;
    let events = (0..EVENTS_PER_BATCH)
        .map(|i| {
            let tokens = ((writer * 7 + index * 13 + i) % 97 + 1) as i64;
            total += tokens;
            event(
                &format!("w{writer}-b{index}-e{i}"),
                "llm.prompt",
                &format!("tenant-{}", i % 3),
                time,
                json!({"tokens": tokens, "model": format!("m{}", i % 4)}),
            )
        })
        .collect();
    (events, total)
}

async fn total_tokens(client: &reqwest::Client, daemon: &Daemon) -> i64 {
    sum_rows(&query(client, daemon, "tokens", "").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_ingest_then_restart_and_retry_gives_exact_totals() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let daemon = Daemon::start(&path);
    let client = client();
    let time = ago(30);
    let batches: Vec<Vec<(Vec<Value>, i64)>> = (0..WRITERS)
        .map(|w| (0..BATCHES_PER_WRITER).map(|b| batch(w, b, &time)).collect())
        .collect();
    let expected_total: i64 = batches.iter().flatten().map(|(_, total)| total).sum();

    // Writers send until the daemon dies; each remembers which batches were acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for (w, writer_batches) in batches.iter().enumerate() {
        let client = client.clone();
        let url = daemon.url("/api/v1/events");
        let bodies: Vec<Vec<u8>> = writer_batches
            .iter()
            .map(|(events, _)| serde_json::to_vec(events).unwrap())
            .collect();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for (b, body) in bodies.into_iter().enumerate() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let sent = client
                    .post(&url)
                    .header("content-type", "application/cloudevents-batch+json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(response) if response.status() == 202 => acked.push((w, b)),
                    _ => break,
                }
            }
            acked
        }));
    }
    // Kill once a fair share has been acknowledged, mid-stream.
    eventually("some ingest", async || {
        (total_tokens(&client, &daemon).await > expected_total / 4).then_some(())
    })
    .await;
    daemon.kill();
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for writer in writers {
        acked.extend(writer.await.unwrap());
    }
    let acked_total: i64 = acked.iter().map(|(w, b)| batches[*w][*b].1).sum();
    assert!(
        acked.len() < WRITERS * BATCHES_PER_WRITER,
        "the kill must land mid-ingest"
    );

    // Nothing acknowledged is lost...
    let daemon = Daemon::start(&path);
    let recovered = total_tokens(&client, &daemon).await;
    assert!(
        recovered >= acked_total,
        "lost acknowledged usage: recovered {recovered} < acknowledged {acked_total}\n{}",
        daemon.logs()
    );
    eprintln!(
        "killed after {} of {} batches acknowledged; acknowledged {acked_total}, recovered {recovered}, full {expected_total}",
        acked.len(),
        WRITERS * BATCHES_PER_WRITER
    );
    assert!(
        recovered <= expected_total,
        "counted more than was ever sent: {recovered}"
    );
    // ...and clients retrying everything not acknowledged (and, to be sure, everything else too)
    // lands exactly on the total: nothing counted twice.
    for writer_batches in &batches {
        for (events, _) in writer_batches {
            let (status, body) = post_batch(&client, &daemon, events).await;
            assert_eq!(status, 202, "{body}");
        }
    }
    assert_eq!(total_tokens(&client, &daemon).await, expected_total);

    // And again after a clean restart (read from the checkpoint only).
    daemon.stop();
    let daemon = Daemon::start(&path);
    assert_eq!(total_tokens(&client, &daemon).await, expected_total);
    let per_tenant = query(&client, &daemon, "tokens", "groupBy=model").await;
    assert_eq!(
        per_tenant["data"].as_array().unwrap().len(),
        12,
        "3 tenants x 4 models"
    );
    daemon.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_restart_keeps_totals_and_window_records_are_not_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let client = client();
    let old = ago(600);
    let daemon = Daemon::start(&path);
    let (events, total) = batch(0, 0, &old);
    let (status, _) = post_batch(&client, &daemon, &events).await;
    assert_eq!(status, 202);
    daemon.stop();
    for _ in 0..2 {
        let daemon = Daemon::start(&path);
        assert_eq!(total_tokens(&client, &daemon).await, total);
        tokio::time::sleep(Duration::from_millis(300)).await;
        daemon.stop();
    }
    // Each (tenant, model) window was emitted exactly once, with revision 1.
    let records: Vec<Value> = read_jsonl(&dir.path().join("data/usage.jsonl"))
        .into_iter()
        .filter(|r| r["meter"] == "tokens")
        .collect();
    assert_eq!(records.len(), 12, "{records:?}");
    assert!(records.iter().all(|r| r["revision"] == 1));
    let emitted: i64 = records
        .iter()
        .map(|r| r["quantity"].as_str().unwrap().parse::<i64>().unwrap())
        .sum();
    assert_eq!(emitted, total);
}

/// The reproduction: 1,000 events acknowledged with checkpoints far apart, SIGKILL,
/// one byte flipped at 40 % of the last ingest-log segment. Not a torn tail (acknowledged
/// records follow the damage): tallyd refuses to start and names the way out, instead of
/// cutting off the 600 acknowledged events behind the byte; with `--salvage-ingest-log` it
/// replays every intact record and loses only the damaged one's usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_ingest_log_refuses_to_start_and_a_salvage_loses_only_the_damaged_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    edit_config(&path, "flush_interval_ms = 100", "flush_interval_ms = 600000");
    let daemon = Daemon::start(&path);
    let client = client();
    let time = ago(30);
    for i in 0..100 {
        let events: Vec<Value> = (0..10)
            .map(|e| {
                event(
                    &format!("c{i}-{e}"),
                    "llm.prompt",
                    "corrupt-co",
                    &time,
                    json!({"tokens": 1, "model": "m"}),
                )
            })
            .collect();
        let (status, body) = post_batch(&client, &daemon, &events).await;
        assert_eq!(status, 202, "{body}");
    }
    daemon.kill();
    let log_dir = dir.path().join("data/ingest-log");
    let segment = std::fs::read_dir(&log_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| std::fs::metadata(path).unwrap().len() > 0)
        .max()
        .unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.len() * 2 / 5;
    bytes[at] ^= 0x01;
    std::fs::write(&segment, &bytes).unwrap();

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("ingest log corrupt") && said.contains("--salvage-ingest-log"),
        "{said}"
    );

    let daemon = Daemon::start_with(&path, &["--salvage-ingest-log"]);
    // One record (one request of 10 events) is damaged; the other 990 events are replayed.
    let total = tenant_tokens(&client, &daemon, "corrupt-co").await;
    assert_eq!(total, 990, "{}", daemon.logs());
    assert!(daemon.logs().contains("salvaging the ingest log"));
    daemon.stop();
}

/// A full disk is an ordinary event: while the data directory's filesystem is full, ingest
/// answers 503 (nothing acknowledged) and `/readyz` says why; once space is back, ingest resumes
/// by itself, without a restart, and every acknowledged event counts once. (Reproduced before:
/// the commit stage latched its first write failure and answered 503 until restarted.)
/// Needs root, to mount a 64 MB tmpfs as the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_pushes_back_and_ingest_resumes_by_itself_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64m", "tmpfs"])
        .arg(&data)
        .status()
        .unwrap();
    assert!(mounted.success(), "this test mounts a tmpfs: run it as root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(data.clone());
    let path = write_config(dir.path(), "");
    let daemon = Daemon::start(&path);
    let client = client();
    let time = ago(30);
    let batch = |i: usize| -> Vec<Value> {
        (0..20)
            .map(|e| {
                event(
                    &format!("full-{i}-{e}"),
                    "llm.prompt",
                    "full-co",
                    &time,
                    json!({"tokens": 1, "model": "m"}),
                )
            })
            .collect()
    };
    let (status, _) = post_batch(&client, &daemon, &batch(0)).await;
    assert_eq!(status, 202);
    // Fill the filesystem.
    let filler = data.join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let mut acknowledged = 20;
    let mut refused = 0;
    for i in 1..=20 {
        let (status, body) = post_batch(&client, &daemon, &batch(i)).await;
        match status {
            202 => acknowledged += 20,
            503 => refused += 1,
            other => panic!("{other}: {body}"),
        }
    }
    assert!(refused > 0, "a full disk refuses ingest");
    let ready = client.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let faults: Value = ready.json().await.unwrap();
    assert!(faults["faults"]["ingest-log"].is_string(), "{faults}");
    // Space returns: ingest resumes on its own.
    std::fs::remove_file(&filler).unwrap();
    eventually("ingest to resume", async || {
        let (status, _) = post_batch(&client, &daemon, &batch(100)).await;
        (status == 202).then_some(())
    })
    .await;
    acknowledged += 20;
    let ready = client.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // Refused batches were never counted; retried now, they count once.
    for i in 1..=20 {
        let (status, _) = post_batch(&client, &daemon, &batch(i)).await;
        assert_eq!(status, 202);
    }
    let expected = 20 * 22;
    assert!(acknowledged <= expected);
    let total = eventually("exact totals", async || {
        let total = tenant_tokens(&client, &daemon, "full-co").await;
        (total == expected as i64).then_some(total)
    })
    .await;
    assert_eq!(total, expected as i64);
    daemon.stop();
}

/// EIO, which no filesystem makes on demand: failpoints (`TALLYD_FAILPOINTS_FILE`) break the
/// store's writes and the ingest log's under a running daemon. A store that cannot write fails
/// checkpoints (retried; `/readyz` 503 names it) and ingest is refused until it heals (the log
/// past the last checkpoint stays bounded); a log that cannot write refuses ingest too; both
/// resume by themselves. A SIGKILL while the store is broken loses nothing acknowledged and
/// counts nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_errors_in_the_store_and_the_log_lose_nothing_and_heal_by_themselves() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let failpoints = dir.path().join("failpoints");
    let env = [("TALLYD_FAILPOINTS_FILE", failpoints.to_str().unwrap())];
    let arm = |points: &[&str]| std::fs::write(&failpoints, points.join("\n")).unwrap();
    let client = client();
    let time = ago(30);
    let batch = |i: usize| -> Vec<Value> {
        (0..10)
            .map(|e| {
                event(
                    &format!("eio-{i}-{e}"),
                    "llm.prompt",
                    "eio-co",
                    &time,
                    json!({"tokens": 1, "model": "m"}),
                )
            })
            .collect()
    };
    let ready = async |daemon: &Daemon| -> (u16, Value) {
        let answer = client.get(daemon.url("/readyz")).send().await.unwrap();
        (answer.status().as_u16(), answer.json().await.unwrap())
    };
    let daemon = Daemon::start_env(&path, &[], &env);
    assert_eq!(post_batch(&client, &daemon, &batch(0)).await.0, 202);

    // The store fails every write: checkpoints fail, readiness drops, ingest is refused.
    arm(&["store-write"]);
    let faults = eventually("the checkpoint fault on /readyz", async || {
        let (status, body) = ready(&daemon).await;
        (status == 503 && body["faults"]["checkpoint"].is_string()).then_some(body)
    })
    .await;
    assert!(faults.to_string().contains("os error 5"), "{faults}");
    let (status, body) = post_batch(&client, &daemon, &batch(1)).await;
    assert_eq!(status, 503, "{body}");
    // The store heals: the pending checkpoint goes through, readiness and ingest return.
    arm(&[]);
    eventually("ready again", async || {
        (ready(&daemon).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(post_batch(&client, &daemon, &batch(1)).await.0, 202);
    // The log fails: refused; it heals: ingest resumes by itself.
    arm(&["ingest-log-write"]);
    let (status, body) = post_batch(&client, &daemon, &batch(2)).await;
    assert_eq!(status, 503, "{body}");
    let (_, faults) = ready(&daemon).await;
    assert!(faults["faults"]["ingest-log"].is_string(), "{faults}");
    arm(&[]);
    eventually("ingest to resume", async || {
        (post_batch(&client, &daemon, &batch(2)).await.0 == 202).then_some(())
    })
    .await;
    assert_eq!(tenant_tokens(&client, &daemon, "eio-co").await, 30);

    // The store breaks again, and the process is killed mid-fault, with what was acknowledged
    // since the last good checkpoint only in the log.
    let mut acknowledged = 3;
    arm(&["store-write"]);
    for i in 3..6 {
        if post_batch(&client, &daemon, &batch(i)).await.0 == 202 {
            acknowledged += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    daemon.kill();
    arm(&[]);
    let daemon = Daemon::start_env(&path, &[], &env);
    // Every batch retried: only those never acknowledged count now.
    let mut accepted = 0;
    for i in 0..6 {
        let (status, body) = post_batch(&client, &daemon, &batch(i)).await;
        assert_eq!(status, 202, "{body}");
        accepted += body["accepted"].as_i64().unwrap();
    }
    assert_eq!(
        accepted,
        (6 - acknowledged) * 10,
        "acknowledged before the kill: {acknowledged}"
    );
    assert_eq!(tenant_tokens(&client, &daemon, "eio-co").await, 60);
    daemon.stop();
}

/// The wall clock is stepped 40 days forward (past the 35-day dedup horizon) for a few
/// restarts and then corrected. By the wall clock, the first event's dedup key expired while
/// the clock was ahead and compaction dropped it; after the correction that event is within
/// `max_lateness_secs` again, and its retry was counted a second time. Expiry now runs on its
/// own clock (`store::clock`: the wall clock, but never faster than twice real time), so the
/// key is still there and the retry is a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_stepped_forward_and_back_counts_no_retry_twice() {
    const FORTY_DAYS_MS: i64 = 40 * 86_400_000;
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), "");
    let client = client();
    let first = event(
        "clock-1",
        "llm.prompt",
        "clock",
        &ago(30),
        json!({"tokens": 5, "model": "m"}),
    );

    // 200 events a round: their keys span the key space, so each round's dedup file
    // overlaps the others and lands in L0, where compaction picks it up (a file of one key
    // would be ingested straight into the last level and never compacted here).
    let round_of = |round: usize, time: &str| -> Vec<Value> {
        (0..200)
            .map(|i| {
                event(
                    &format!("r{round}-{i}"),
                    "llm.prompt",
                    "clock-later",
                    time,
                    json!({"tokens": 1, "model": "m"}),
                )
            })
            .collect()
    };
    let daemon = Daemon::start(&path);
    let mut batch = round_of(99, &ago(30));
    batch.push(first.clone());
    let (status, body) = post_batch(&client, &daemon, &batch).await;
    assert_eq!((status, body["accepted"].clone()), (202, json!(201)), "{body}");
    daemon.stop();

    // Ahead by 40 days, over several restarts: each start ingests the previous run's dedup
    // keys as a new file, so compaction runs (and drops keys expired by that clock).
    let shifted = FORTY_DAYS_MS.to_string();
    for round in 0..6 {
        let daemon = Daemon::start_env(&path, &[], &[("TALLYD_CLOCK_OFFSET_MS", &shifted)]);
        let time = (chrono::Utc::now() + chrono::Duration::milliseconds(FORTY_DAYS_MS - 30_000))
            .format("%Y-%m-%dT%H:%M:%S%.3fZ")
            .to_string();
        let (status, body) = post_batch(&client, &daemon, &round_of(round, &time)).await;
        assert_eq!((status, body["accepted"].clone()), (202, json!(200)), "{body}");
        // The retry now is 40 days old: refused by max_lateness_secs (10 days).
        let (_, body) = post_batch(&client, &daemon, std::slice::from_ref(&first)).await;
        assert_eq!(body["refused"][0]["reason"], "too_late", "{body}");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        daemon.stop();
    }

    // Corrected: the first event is 30 s old again. Its retry is a duplicate.
    let daemon = Daemon::start(&path);
    let (status, body) = post_batch(&client, &daemon, std::slice::from_ref(&first)).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 0, "the retry was counted a second time: {body}");
    assert_eq!(body["duplicates"], 1, "{body}");
    assert_eq!(tenant_tokens(&client, &daemon, "clock").await, 5);
    // Events of today are accepted as ever.
    let fresh = event(
        "clock-2",
        "llm.prompt",
        "clock",
        &ago(5),
        json!({"tokens": 2, "model": "m"}),
    );
    let (_, body) = post_batch(&client, &daemon, &[fresh]).await;
    assert_eq!(body["accepted"], 1, "{body}");
    assert_eq!(tenant_tokens(&client, &daemon, "clock").await, 7);
    daemon.stop();
}
