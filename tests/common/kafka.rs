//! Kafka helpers for black-box tests: a producer, a dead-letter reader and the `[kafka]` config
//! section, against either librdkafka's in-process mock cluster or a real broker (tansu).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;

pub fn kafka_section(brokers: &str, topic: &str, group: &str) -> String {
    format!(
        r#"
[kafka]
brokers = "{brokers}"
topics = ["{topic}"]
group_id = "{group}"
[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "500"
"topic.metadata.refresh.interval.ms" = "1000"
"#
    )
}

pub fn producer(brokers: &str) -> BaseProducer {
    producer_config(brokers).create().expect("producer")
}

/// `producer` with librdkafka's `partitioner` set (its default is `consistent_random`, CRC32).
pub fn producer_with_partitioner(brokers: &str, partitioner: &str) -> BaseProducer {
    producer_config(brokers)
        .set("partitioner", partitioner)
        .create()
        .expect("producer")
}

fn producer_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        // One record per batch: tansu 0.6 cannot fetch from an offset inside a record batch
        // (it skips to the next batch), which would make any resume point lose messages.
        .set("batch.num.messages", "1");
    config
}

/// One message: key (the tenant; empty with `null_key`), JSON payload, optional `ce_id` header.
pub struct Record {
    pub key: String,
    /// Produce with no key at all (librdkafka then picks a random partition).
    pub null_key: bool,
    pub payload: Vec<u8>,
    pub partition: Option<i32>,
    pub ce_id: Option<String>,
}

impl Record {
    pub fn json(key: &str, event: &Value) -> Record {
        Record {
            key: key.to_string(),
            null_key: false,
            payload: serde_json::to_vec(event).unwrap(),
            partition: None,
            ce_id: None,
        }
    }
}

/// Produces every record and waits until all are acknowledged.
pub fn produce_all(producer: &BaseProducer, topic: &str, records: &[Record]) {
    for record in records {
        let mut base: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).payload(record.payload.as_slice());
        if !record.null_key {
            base = base.key(record.key.as_str());
        }
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(id) = &record.ce_id {
            base = base.headers(OwnedHeaders::new().insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            }));
        }
        let mut base = base;
        loop {
            match producer.send(base) {
                Ok(()) => break,
                Err((_, back)) => {
                    base = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    // tansu takes minutes for two tests' 200 k records each on 2 busy cores (a 60 s wait
    // timed out twice in a row on 2026-12-01 with the broker at 100 % CPU and no daemon yet
    // running): waiting longer weakens nothing, the totals are asserted afterwards.
    producer
        .flush(Duration::from_secs(300))
        .expect("all records acknowledged");
}

/// A dead letter as the daemon wrote it: payload and `tallyd.*` headers.
#[derive(Debug)]
pub struct DeadLetter {
    pub key: Option<String>,
    pub payload: String,
    pub headers: Vec<(String, String)>,
}

impl DeadLetter {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads up to `expected` records of `topic` from the beginning, waiting at most `wait`.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    partitions: i32,
    expected: usize,
    wait: Duration,
) -> Vec<DeadLetter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "tallyd-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for partition in 0..partitions {
        tpl.add_partition_offset(topic, partition, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    while out.len() < expected && Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            let headers = message
                .headers()
                .map(|headers| {
                    headers
                        .iter()
                        .map(|h| {
                            (
                                h.key.to_string(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(DeadLetter {
                key: message.key().map(|key| String::from_utf8_lossy(key).into_owned()),
                payload: String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned(),
                headers,
            });
        }
    }
    out
}

/// `n` distinct `llm.prompt` events over `tenants` tenants (keyed by tenant), timestamps shuffled
/// over the last two minutes, plus `n / 5` producer-retry duplicates, in shuffled order; and the
/// exact tokens each tenant must end with.
pub fn usage_records(
    n: usize,
    tenants: usize,
    seed: u64,
) -> (Vec<Record>, std::collections::BTreeMap<String, i64>) {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut expected = std::collections::BTreeMap::new();
    let mut records = Vec::with_capacity(n + n / 5);
    for i in 0..n {
        let tenant = format!("tenant-{}", i % tenants);
        let tokens: i64 = rng.gen_range(1..1000);
        *expected.entry(tenant.clone()).or_insert(0) += tokens;
        let event = super::event(
            &format!("s{seed}-e{i}"),
            "llm.prompt",
            &tenant,
            &super::ago(rng.gen_range(0..120)),
            serde_json::json!({"tokens": tokens, "model": format!("m{}", i % 3)}),
        );
        records.push(Record::json(&tenant, &event));
    }
    let duplicates: Vec<Record> = records
        .choose_multiple(&mut rng, n / 5)
        .map(|r| Record {
            key: r.key.clone(),
            null_key: false,
            payload: r.payload.clone(),
            partition: None,
            ce_id: None,
        })
        .collect();
    records.extend(duplicates);
    records.shuffle(&mut rng);
    (records, expected)
}

/// The real broker for end-to-end tests (`scripts/test.sh` starts tansu and sets it). None:
/// the caller skips, unless `TALLYD_REQUIRE_BROKER=1` (the test script) makes that a failure.
pub fn real_broker() -> Option<String> {
    match std::env::var("TALLYD_TEST_BROKER") {
        Ok(brokers) if !brokers.is_empty() => Some(brokers),
        _ => {
            assert!(
                std::env::var("TALLYD_REQUIRE_BROKER").as_deref() != Ok("1"),
                "TALLYD_TEST_BROKER is not set but TALLYD_REQUIRE_BROKER=1"
            );
            eprintln!("SKIPPED: set TALLYD_TEST_BROKER=host:port (scripts/test.sh starts tansu)");
            None
        }
    }
}

/// Creates a topic (unique names per test: the broker outlives a test run).
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create topics request");
    for result in results {
        result.unwrap_or_else(|(topic, error)| panic!("create topic {topic}: {error}"));
    }
}

/// A topic name no earlier run used.
pub fn unique_topic(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// A broker of the test's own behind a switchable TCP proxy, for outages: tansu listens on one
/// port and advertises the proxy's, so every client (tallyd's consumer and producers, the
/// test's) reaches it only through the proxy. `cut` closes every proxied connection and
/// refuses new ones, as a broker that went away would; `restore` lets them through again,
/// with the broker's topics and offsets intact (tansu keeps them in memory meanwhile).
pub struct SwitchableBroker {
    tansu: std::process::Child,
    pub addr: String,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl SwitchableBroker {
    /// None (the test skips) when no tansu binary is installed and the test script did not
    /// require the broker tests (as `real_broker`).
    pub fn start() -> Option<SwitchableBroker> {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::Ordering;
        real_broker()?;
        let tansu = std::env::var("TALLYD_TANSU").unwrap_or_else(|_| {
            let home = std::env::var("CARGO_HOME")
                .unwrap_or_else(|_| format!("{}/.cargo", std::env::var("HOME").unwrap()));
            format!("{home}/bin/tansu")
        });
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = proxy.local_addr().unwrap().to_string();
        let backend = {
            let probe = TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        };
        let child = std::process::Command::new(&tansu)
            .args(["broker", "--listener-url", &format!("tcp://{backend}")])
            .args(["--advertised-listener-url", &format!("tcp://{addr}")])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {tansu}: {error}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(&backend).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        let broker = SwitchableBroker {
            tansu: child,
            addr,
            up: Default::default(),
            live: Default::default(),
        };
        broker.up.store(true, Ordering::SeqCst);
        let (up, live) = (broker.up.clone(), broker.live.clone());
        std::thread::spawn(move || {
            for client in proxy.incoming() {
                let Ok(client) = client else { continue };
                if !up.load(Ordering::SeqCst) {
                    continue; // dropped: refused while cut
                }
                let Ok(server) = TcpStream::connect(&backend) else {
                    continue;
                };
                let mut live = live.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Some(broker)
    }

    /// The broker goes away: open connections are cut, new ones refused.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for stream in self.live.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for SwitchableBroker {
    fn drop(&mut self) {
        self.cut();
        let _ = self.tansu.kill();
        let _ = self.tansu.wait();
    }
}
