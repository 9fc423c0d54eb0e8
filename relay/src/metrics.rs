//! The relay's metrics (`pg_reaper_relay_*`) and the database's gauges (`pg_reaper_*`), in the
//! Prometheus text format, and the `/metrics` + `/healthz` endpoint.

use crate::circuit::Event;
use crate::protocol::{Cause, HandedBack, Outcome};
use crate::recovery::Observer;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeMetric, prometheus_text,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One label and its value.
type Label = [(&'static str, &'static str); 1];

/// The database side, read from `pg_reaper_status` (at most once per poll interval), so that
/// one scrape target covers the whole system.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DbGauges {
    /// Outbox rows by state: pending, in_flight, dead, done.
    pub intents: [i64; 4],
    pub oldest_pending_age_seconds: Option<f64>,
    pub barriers_live: i64,
    pub barriers_stranded: i64,
    pub worker_leader: bool,
    /// None without a worker serving this database.
    pub worker_last_tick_age_seconds: Option<f64>,
    pub worker_failed_ticks: Option<i64>,
    /// What changed in the barrier tables under pg_reaper; None while they are usable.
    pub tables_drift: Option<String>,
}

pub struct Metrics {
    registry: Registry,
    claimed: Counter,
    outcomes: Family<Label, Counter>,
    failures: Family<Label, Counter>,
    retries: Counter,
    dead: Counter,
    lost: Counter,
    in_flight: Gauge,
    /// 1 while the status API answers, 0 during a systemic episode.
    api_reachable: Gauge,
    /// By `result`: `answered`, or the failure's cause (a timeout takes the whole timeout).
    latency: Family<Label, Histogram, fn() -> Histogram>,
    db: Arc<Mutex<Option<DbGauges>>>,
    /// Milliseconds since `started` of the last successful outbox claim.
    last_claim_ok_ms: AtomicU64,
    started: Instant,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let m = Metrics {
            registry: Registry::default(),
            claimed: Counter::default(),
            outcomes: Family::default(),
            failures: Family::default(),
            retries: Counter::default(),
            dead: Counter::default(),
            lost: Counter::default(),
            in_flight: Gauge::default(),
            api_reachable: Gauge::default(),
            latency: Family::new_with_constructor(|| Histogram::new(LATENCY_BUCKETS)),
            db: Arc::default(),
            last_claim_ok_ms: AtomicU64::new(0),
            started: Instant::now(),
        };
        // Every label value is shown from the start, at 0, so that rate() sees the first one.
        for o in Outcome::ALL {
            drop(m.outcomes.get_or_create(&[("outcome", o.as_str())]));
        }
        for c in Cause::ALL {
            drop(m.failures.get_or_create(&[("cause", c.as_str())]));
        }
        let mut m = m;
        let r = &mut m.registry;
        let counters = [
            (
                "intents_claimed",
                "Intents claimed from the outbox",
                &m.claimed,
            ),
            (
                "retries",
                "Failed attempts scheduled again with backoff",
                &m.retries,
            ),
            (
                "dead",
                "Intents that went dead after the last attempt",
                &m.dead,
            ),
            (
                "lost_claims",
                "Claims found taken by another relay (lease expired)",
                &m.lost,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(format!("pg_reaper_relay_{name}"), help, counter.clone());
        }
        let families = [
            ("outcomes", "Intents resolved, by outcome", &m.outcomes),
            ("failures", "Failed attempts, by cause", &m.failures),
        ];
        for (name, help, family) in families {
            r.register(format!("pg_reaper_relay_{name}"), help, family.clone());
        }
        let gauges = [
            ("in_flight", "Intents being worked on", &m.in_flight),
            (
                "api_reachable",
                "Whether the status API answers (0 during a systemic outage)",
                &m.api_reachable,
            ),
        ];
        for (name, help, gauge) in gauges {
            r.register(format!("pg_reaper_relay_{name}"), help, gauge.clone());
        }
        r.register(
            "pg_reaper_relay_http_request_duration_seconds",
            "Status API request latency",
            m.latency.clone(),
        );
        r.register_collector(Box::new(Database(m.db.clone())));
        Arc::new(m)
    }

    pub fn claimed(&self, n: usize) {
        self.claimed.inc_by(n as u64);
        self.last_claim_ok_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    pub fn outcome(&self, o: Outcome) {
        self.outcomes
            .get_or_create(&[("outcome", o.as_str())])
            .inc();
    }

    /// A failed attempt, by cause, and what the outbox made of it.
    pub fn failure(&self, cause: Cause, handed_back: HandedBack) {
        self.failures
            .get_or_create(&[("cause", cause.as_str())])
            .inc();
        match handed_back {
            HandedBack::Dead => self.dead.inc(),
            HandedBack::Pending => self.retries.inc(),
            HandedBack::Lost => self.lost.inc(),
        };
    }

    pub fn lost(&self) {
        self.lost.inc();
    }

    pub fn database(&self, gauges: Option<DbGauges>) {
        if let Ok(mut db) = self.db.lock() {
            *db = gauges;
        }
    }

    pub fn api_reachable(&self, up: bool) {
        self.api_reachable.set(i64::from(up));
    }

    pub fn in_flight(&self, delta: i64) {
        self.in_flight.inc_by(delta);
    }

    /// One HTTP attempt, answered or not.
    pub fn http(&self, took: Duration, result: &'static str) {
        self.latency
            .get_or_create(&[("result", result)])
            .observe(took.as_secs_f64());
    }

    /// Healthy while a claim succeeded within `window` (or the relay is younger than it).
    pub fn healthy(&self, window: Duration) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.last_claim_ok_ms.load(Relaxed);
        now < window.as_millis() as u64 || now - last <= window.as_millis() as u64
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail; a collector's error would leave the text cut short.
        if let Err(e) = prometheus_text::encode(&mut s, &self.registry) {
            tracing::warn!(error = %e, "encoding the metrics");
        }
        s
    }
}

impl Observer for Metrics {
    fn http(&self, took: Duration, result: &'static str) {
        Metrics::http(self, took, result);
    }

    /// One line when an episode starts, one when it ends; never one per intent.
    fn circuit(&self, event: &Event) {
        match event {
            Event::Opened { failure } => {
                let hint = if failure.cause() == Cause::Unauthorized {
                    " (the API refused the key: a configuration problem, check the API key)"
                } else {
                    ""
                };
                tracing::error!(
                    cause = failure.cause().as_str(), error = %failure,
                    "status API unreachable{hint}: likely systemic, not one execution; intents wait \
                     uncounted, one probe per backoff step until it answers"
                );
                self.api_reachable(false);
            }
            Event::Closed { after, probes } => {
                tracing::info!(
                    after_s = after.as_secs_f64(),
                    probes,
                    "status API reachable again; resuming every waiting intent"
                );
                self.api_reachable(true);
            }
        }
    }
}

/// The database's gauges, encoded at scrape time from the last `pg_reaper_status` read.
#[derive(Debug)]
struct Database(Arc<Mutex<Option<DbGauges>>>);

impl Collector for Database {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(db) = self.0.lock().ok().and_then(|g| g.clone()) else {
            return Ok(());
        };
        let state = |s: &'static str| [("state", s)];
        let [pending, in_flight, dead, done] = db.intents;
        by_state(
            &mut encoder,
            "pg_reaper_outbox_intents",
            "Recovery intents in the outbox, by state.",
            &[
                (state("pending"), pending),
                (state("in_flight"), in_flight),
                (state("dead"), dead),
                (state("done"), done),
            ],
        )?;
        gauge(
            &mut encoder,
            "pg_reaper_outbox_oldest_pending_age_seconds",
            "Age of the oldest pending intent (0 when none is pending).",
            db.oldest_pending_age_seconds.unwrap_or(0.0),
        )?;
        by_state(
            &mut encoder,
            "pg_reaper_barriers",
            "Barriers by the stranded predicate.",
            &[
                (state("live"), db.barriers_live),
                (state("stranded"), db.barriers_stranded),
            ],
        )?;
        gauge(
            &mut encoder,
            "pg_reaper_worker_leader",
            "Whether a pg_reaper worker leads in the relay's database.",
            i64::from(db.worker_leader),
        )?;
        if let Some(age) = db.worker_last_tick_age_seconds {
            gauge(
                &mut encoder,
                "pg_reaper_worker_last_tick_age_seconds",
                "Seconds since the worker's last tick.",
                age,
            )?;
        }
        gauge(
            &mut encoder,
            "pg_reaper_tables_drift",
            "Whether the barrier tables changed so that pg_reaper's functions cannot work on them \
             (pg_reaper_status.tables_drift says how).",
            i64::from(db.tables_drift.is_some()),
        )?;
        if let Some(n) = db.worker_failed_ticks {
            let metric = encoder.encode_descriptor(
                "pg_reaper_worker_failed_ticks",
                "Worker ticks that failed since the server started.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(n.max(0) as u64).encode(metric)?;
        }
        Ok(())
    }
}

fn gauge<N: EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: N,
) -> std::fmt::Result {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn by_state(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(Label, i64)],
) -> std::fmt::Result {
    let mut metric = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (label, v) in values {
        ConstGauge::new(*v).encode(metric.encode_family(label)?)?;
    }
    Ok(())
}

/// Serves `/metrics` and `/healthz` on `addr` until the process ends.
pub async fn serve(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
    health_window: Duration,
) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--listen: cannot bind {addr}: {e}"))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        async move {
                            let (code, body) = match req.uri().path() {
                                "/metrics" => (200, metrics.render()),
                                "/healthz" if metrics.healthy(health_window) => {
                                    (200, "ok\n".to_string())
                                }
                                "/healthz" => {
                                    (503, "no successful outbox claim recently\n".to_string())
                                }
                                _ => (404, "not found\n".to_string()),
                            };
                            Response::builder()
                                .status(code)
                                .header("content-type", prometheus_text::CONTENT_TYPE)
                                .body(Full::new(Bytes::from(body)))
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_value_is_shown_and_counted_under_its_own_name() {
        let m = Metrics::new();
        m.outcome(Outcome::Refired);
        m.failure(Cause::Timeout, HandedBack::Pending);
        m.failure(Cause::Indeterminate, HandedBack::Dead);
        m.http(Duration::from_millis(30), "answered");
        m.http(Duration::from_secs(1), "timeout");
        m.database(Some(DbGauges {
            intents: [3, 1, 0, 7],
            worker_failed_ticks: Some(2),
            ..DbGauges::default()
        }));
        let text = m.render();
        for line in [
            "pg_reaper_relay_outcomes_total{outcome=\"refired\"} 1",
            "pg_reaper_relay_outcomes_total{outcome=\"marked_error\"} 0",
            "pg_reaper_relay_failures_total{cause=\"timeout\"} 1",
            "pg_reaper_relay_failures_total{cause=\"indeterminate\"} 1",
            "pg_reaper_relay_failures_total{cause=\"database\"} 0",
            "pg_reaper_relay_retries_total 1",
            "pg_reaper_relay_dead_total 1",
            "pg_reaper_relay_http_request_duration_seconds_bucket{result=\"answered\",le=\"0.05\"} 1",
            "pg_reaper_relay_http_request_duration_seconds_bucket{result=\"answered\",le=\"0.025\"} 0",
            "pg_reaper_relay_http_request_duration_seconds_count{result=\"answered\"} 1",
            "pg_reaper_relay_http_request_duration_seconds_count{result=\"timeout\"} 1",
            "pg_reaper_outbox_intents{state=\"pending\"} 3",
            "pg_reaper_outbox_intents{state=\"done\"} 7",
            "pg_reaper_worker_failed_ticks_total 2",
            "# TYPE pg_reaper_relay_in_flight gauge",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} in:\n{text}");
        }
        assert!(
            !text.contains("last_tick_age"),
            "no worker, no tick age:\n{text}"
        );
    }
}
