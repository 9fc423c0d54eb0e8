//! Prometheus text metrics (`pg_reaper_relay_*`) and the `/metrics` + `/healthz` endpoint.

use crate::store::Outcome;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

const CAUSES: [&str; 11] = [
    "http_status",
    "bad_request",
    "unauthorized",
    "timeout",
    "connect",
    "transport",
    "bad_body",
    "unknown_status",
    "indeterminate",
    "refire_hook",
    "database",
];
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

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
}

#[derive(Default)]
pub struct Metrics {
    claimed: AtomicU64,
    outcomes: [AtomicU64; 5],
    failures: [AtomicU64; CAUSES.len()],
    retries: AtomicU64,
    dead: AtomicU64,
    lost: AtomicU64,
    in_flight: AtomicI64,
    /// 1 while the status API answers, 0 during a systemic episode.
    api_reachable: AtomicI64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    db: std::sync::Mutex<Option<DbGauges>>,
    /// Milliseconds since `started` of the last successful outbox claim.
    last_claim_ok_ms: AtomicU64,
    started: std::sync::OnceLock<Instant>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let m = Metrics::default();
        let _ = m.started.set(Instant::now());
        Arc::new(m)
    }

    fn since_start(&self) -> Duration {
        self.started.get().map(|s| s.elapsed()).unwrap_or_default()
    }

    pub fn claimed(&self, n: usize) {
        self.claimed.fetch_add(n as u64, Relaxed);
        self.last_claim_ok_ms
            .store(self.since_start().as_millis() as u64, Relaxed);
    }

    pub fn outcome(&self, o: Outcome) {
        let i = Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0);
        self.outcomes[i].fetch_add(1, Relaxed);
    }

    /// A failed attempt, by cause; `state` is what the outbox made of it.
    pub fn failure(&self, cause: &str, state: &str) {
        if let Some(i) = CAUSES.iter().position(|c| *c == cause) {
            self.failures[i].fetch_add(1, Relaxed);
        }
        match state {
            "dead" => self.dead.fetch_add(1, Relaxed),
            "pending" => self.retries.fetch_add(1, Relaxed),
            _ => self.lost.fetch_add(1, Relaxed),
        };
    }

    pub fn lost(&self) {
        self.lost.fetch_add(1, Relaxed);
    }

    pub fn database(&self, gauges: Option<DbGauges>) {
        if let Ok(mut db) = self.db.lock() {
            *db = gauges;
        }
    }

    pub fn api_reachable(&self, up: bool) {
        self.api_reachable.store(i64::from(up), Relaxed);
    }

    pub fn in_flight(&self, delta: i64) {
        self.in_flight.fetch_add(delta, Relaxed);
    }

    /// The duration of a request that got an answer (zero: none).
    pub fn http(&self, took: Duration) {
        if took.is_zero() {
            return;
        }
        let secs = took.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// Healthy while a claim succeeded within `window` (or the relay is younger than it).
    pub fn healthy(&self, window: Duration) -> bool {
        let now = self.since_start().as_millis() as u64;
        let last = self.last_claim_ok_ms.load(Relaxed);
        now < window.as_millis() as u64 || now - last <= window.as_millis() as u64
    }

    pub fn render(&self) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, lines: Vec<(String, u64)>| {
            let _ = writeln!(
                s,
                "# HELP pg_reaper_relay_{name} {help}\n# TYPE pg_reaper_relay_{name} counter"
            );
            for (labels, v) in lines {
                let _ = writeln!(s, "pg_reaper_relay_{name}{labels} {v}");
            }
        };
        counter(
            "intents_claimed_total",
            "Intents claimed from the outbox.",
            vec![(String::new(), self.claimed.load(Relaxed))],
        );
        counter(
            "outcomes_total",
            "Intents resolved, by outcome.",
            Outcome::ALL
                .iter()
                .zip(&self.outcomes)
                .map(|(o, v)| (format!("{{outcome=\"{}\"}}", o.as_str()), v.load(Relaxed)))
                .collect(),
        );
        counter(
            "failures_total",
            "Failed attempts, by cause.",
            CAUSES
                .iter()
                .zip(&self.failures)
                .map(|(c, v)| (format!("{{cause=\"{c}\"}}"), v.load(Relaxed)))
                .collect(),
        );
        counter(
            "retries_total",
            "Failed attempts scheduled again with backoff.",
            vec![(String::new(), self.retries.load(Relaxed))],
        );
        counter(
            "dead_total",
            "Intents that went dead after the last attempt.",
            vec![(String::new(), self.dead.load(Relaxed))],
        );
        counter(
            "lost_claims_total",
            "Claims found taken by another relay (lease expired).",
            vec![(String::new(), self.lost.load(Relaxed))],
        );
        let _ = writeln!(
            s,
            "# HELP pg_reaper_relay_in_flight Intents being worked on.\n# TYPE pg_reaper_relay_in_flight gauge\npg_reaper_relay_in_flight {}",
            self.in_flight.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP pg_reaper_relay_api_reachable Whether the status API answers (0 during a systemic outage).\n# TYPE pg_reaper_relay_api_reachable gauge\npg_reaper_relay_api_reachable {}",
            self.api_reachable.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP pg_reaper_relay_http_request_duration_seconds Status API request latency.\n# TYPE pg_reaper_relay_http_request_duration_seconds histogram"
        );
        for (bound, v) in BUCKETS.iter().zip(&self.latency_buckets) {
            let _ = writeln!(
                s,
                "pg_reaper_relay_http_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                v.load(Relaxed)
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            s,
            "pg_reaper_relay_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "pg_reaper_relay_http_request_duration_seconds_sum {}",
            self.latency_sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "pg_reaper_relay_http_request_duration_seconds_count {count}"
        );
        if let Some(db) = self.db.lock().ok().and_then(|g| g.clone()) {
            render_database(&mut s, &db);
        }
        s
    }
}

fn render_database(s: &mut String, db: &DbGauges) {
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, f64)]| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in lines {
            let _ = writeln!(s, "{name}{labels} {v}");
        }
    };
    let [pending, in_flight, dead, done] = db.intents.map(|n| n as f64);
    metric(
        "pg_reaper_outbox_intents",
        "gauge",
        "Recovery intents in the outbox, by state.",
        &[
            ("{state=\"pending\"}", pending),
            ("{state=\"in_flight\"}", in_flight),
            ("{state=\"dead\"}", dead),
            ("{state=\"done\"}", done),
        ],
    );
    metric(
        "pg_reaper_outbox_oldest_pending_age_seconds",
        "gauge",
        "Age of the oldest pending intent (0 when none is pending).",
        &[("", db.oldest_pending_age_seconds.unwrap_or(0.0))],
    );
    metric(
        "pg_reaper_barriers",
        "gauge",
        "Barriers by the stranded predicate.",
        &[
            ("{state=\"live\"}", db.barriers_live as f64),
            ("{state=\"stranded\"}", db.barriers_stranded as f64),
        ],
    );
    metric(
        "pg_reaper_worker_leader",
        "gauge",
        "Whether a pg_reaper worker leads in the relay's database.",
        &[("", f64::from(u8::from(db.worker_leader)))],
    );
    if let Some(age) = db.worker_last_tick_age_seconds {
        metric(
            "pg_reaper_worker_last_tick_age_seconds",
            "gauge",
            "Seconds since the worker's last tick.",
            &[("", age)],
        );
    }
    if let Some(n) = db.worker_failed_ticks {
        metric(
            "pg_reaper_worker_failed_ticks_total",
            "counter",
            "Worker ticks that failed since the server started.",
            &[("", n as f64)],
        );
    }
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
                                .header("content-type", "text/plain; version=0.0.4")
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
