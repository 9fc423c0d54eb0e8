//! One scrape target for the whole system: the relay's /metrics carries the database's gauges
//! too, passes `promtool check metrics`, and a real Prometheus scraping it during a small
//! recovery run answers every query of the shipped Grafana dashboard and loads the shipped
//! alerting rules. (The rules' own unit tests run with `promtool test rules` in `make test`.)

mod common;

use common::Env;
use pg_reaper_tests::{equal, wait_for};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// A Prometheus server (Debian's package) on a free loopback port, killed when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    http: reqwest::blocking::Client,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let rules = repo().join("deploy/prometheus/pg_reaper.rules.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: ['{}']\n\
                 scrape_configs:\n  - job_name: pg-reaper-relay\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("prometheus.yml");
        let port = common::free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
            .spawn()
            .expect("start prometheus (Debian package prometheus, installed by make test)");
        Prometheus {
            child,
            port,
            http: reqwest::blocking::Client::new(),
        }
    }

    fn api(&self, path: &str, query: &[(&str, &str)]) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}/api/v1/{path}", self.port);
        let response = self.http.get(url).query(query).send().ok()?;
        let body: Value = response.json().ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// The result vector of an instant query (empty while there is no data).
    fn query(&self, expr: &str) -> Vec<Value> {
        self.api("query", &[("query", expr)])
            .and_then(|d| d["result"].as_array().cloned())
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn one_scrape_target_passes_promtool_and_feeds_every_dashboard_panel() {
    let env = Env::new("obs", true);
    let mut c = env.db();
    for id in ["obs-1", "obs-2", "obs-3"] {
        env.stranded_executing(&mut c, id);
    }
    env.api.execution("obs-done", "org", "COMPLETED");
    pg_reaper_tests::strand(&mut c, "obs-done", "org", 1);
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut relay = env.spawn_relay(&["--listen", &listen]);

    // The database side arrives in the relay's own /metrics; the tick age once the leading
    // worker has finished a tick (it leads from the start of its first one).
    let metrics = wait_for(60, "the database gauges in /metrics", || {
        let (_, body) = common::http_get(&listen, "/metrics");
        (body.contains("pg_reaper_worker_leader 1")
            && body.contains("pg_reaper_worker_last_tick_age_seconds"))
        .then_some(body)
    });
    for name in [
        "pg_reaper_outbox_intents{state=\"pending\"}",
        "pg_reaper_outbox_oldest_pending_age_seconds",
        "pg_reaper_barriers{state=\"stranded\"}",
        "pg_reaper_worker_last_tick_age_seconds",
        "pg_reaper_worker_failed_ticks_total",
        "pg_reaper_relay_api_reachable 1",
    ] {
        assert!(metrics.contains(name), "{name} in:\n{metrics}");
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().expect("stdin");
        stdin.write_all(metrics.as_bytes()).expect("write");
    }
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let prometheus = Prometheus::start(&env.cluster.dir, &listen);
    wait_for(60, "every execution recovered", || {
        let done: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_reaper_outbox WHERE state = 'done'",
                &[],
            )
            .expect("count")
            .get(0);
        equal(done, 4)
    });
    wait_for(120, "Prometheus scraping the relay", || {
        (!prometheus
            .query("up{job=\"pg-reaper-relay\"} == 1")
            .is_empty())
        .then_some(())
    });
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/pg_reaper.json"))
            .expect("the dashboard"),
    )
    .expect("dashboard JSON");
    let panels = dashboard["panels"].as_array().cloned().unwrap_or_default();
    assert!(panels.len() >= 8, "a panel per concern");
    for panel in &panels {
        for target in panel["targets"].as_array().cloned().unwrap_or_default() {
            let expr = target["expr"].as_str().unwrap_or_default().to_string();
            wait_for(
                120,
                &format!("data for panel {}: {expr}", panel["title"]),
                || (!prometheus.query(&expr).is_empty()).then_some(()),
            );
        }
    }
    // The shipped alerting rules load into a real Prometheus.
    let rules = prometheus.api("rules", &[]).expect("rules");
    let loaded: usize = rules["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .map(|g| g["rules"].as_array().map_or(0, Vec::len))
                .sum()
        })
        .unwrap_or(0);
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy/prometheus/pg_reaper.rules.yml"),
    )
    .expect("the rules file")
    .lines()
    .filter(|l| l.trim_start().starts_with("- alert:"))
    .count();
    assert!(shipped >= 10, "the rules file has {shipped} alerts");
    assert_eq!(loaded, shipped, "{rules}");
    relay.terminate();
}
