//! A cluster with pg_reaper, the sample status API and relay processes, for the relay's tests.

#![allow(dead_code)] // each test file uses its own part of this harness

use pg_reaper_tests::{Cluster, json, strand, wait_for};
use postgres::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

pub const KEY: &str = "test-key-0f3a9c";

/// The sample status API, served in this test process (the `pg-reaper-sample-api` crate).
pub struct SampleApi {
    pub port: u16,
    /// `https` when started with TLS.
    pub scheme: &'static str,
    running: pg_reaper_sample_api::Running,
}

/// The test CA's directory: `ca.pem` signs `server.pem` (for 127.0.0.1 and localhost).
pub const TLS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tls");

impl SampleApi {
    pub fn start(key_file: &Path, port: u16) -> SampleApi {
        SampleApi::start_with(key_file, port, &[])
    }

    /// Serving HTTPS with the test CA's server certificate.
    pub fn start_tls(key_file: &Path, port: u16) -> SampleApi {
        let (cert, key) = (
            format!("{TLS_DIR}/server.pem"),
            format!("{TLS_DIR}/server.key"),
        );
        SampleApi::start_with(key_file, port, &["--tls-cert", &cert, "--tls-key", &key])
    }

    /// Started with more of the binary's flags (`--faults JSON`: in force from its first
    /// request).
    pub fn start_with(key_file: &Path, port: u16, flags: &[&str]) -> SampleApi {
        use clap::Parser;
        let listen = format!("127.0.0.1:{port}");
        let key = key_file.to_string_lossy();
        let args = pg_reaper_sample_api::Args::try_parse_from(
            [
                "pg-reaper-sample-api",
                "--listen",
                &listen,
                "--api-key-file",
                &key,
            ]
            .into_iter()
            .chain(flags.iter().copied()),
        )
        .expect("the sample API's flags");
        let running = pg_reaper_sample_api::start(args).expect("start the sample API");
        SampleApi {
            port,
            scheme: running.scheme,
            running,
        }
    }

    /// The base URL the relay is given.
    pub fn base_url(&self) -> String {
        format!("{}://127.0.0.1:{}/internal", self.scheme, self.port)
    }

    /// Ends it as a killed process ends: the port closed, connections cut, state gone.
    pub fn stop(&mut self) {
        self.running.stop();
    }

    /// One request to the API with bearer `key` (None: no Authorization header) and the
    /// organization `org`; (status code, JSON body or Null).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: &str,
    ) -> (u16, Value) {
        let (code, text) = self.call(method, path, body, Some(key));
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// One request to the API; (status code, body as text).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> (u16, String) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("an HTTP method");
        let url = format!("{}://127.0.0.1:{}{path}", self.scheme, self.port);
        let mut request = http()
            .request(method, url)
            .header("X-Organization-ID", "org");
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().expect("a request to the sample API");
        let code = response.status().as_u16();
        (code, response.text().expect("its body"))
    }

    pub fn admin(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let (code, body) = self.request(method, &format!("/_admin/{path}"), body, KEY);
        assert_eq!(code, 200, "admin {method} {path}: {body}");
        body
    }

    pub fn execution(&self, id: &str, org: &str, status: &str) {
        self.admin(
            "PUT",
            &format!("executions/{id}"),
            Some(&serde_json::json!({"organization_id": org, "status": status})),
        );
    }

    pub fn executions(&self) -> Value {
        self.admin("GET", "executions", None)
    }

    pub fn calls(&self) -> Vec<Value> {
        self.admin("GET", "calls", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn faults(&self, faults: Value) {
        self.admin("POST", "faults", Some(&faults));
    }
}

/// The tests' HTTP client: trusts the test CA, no proxy from the environment, a timeout far
/// above any answer on loopback.
fn http() -> reqwest::blocking::Client {
    static CLIENT: std::sync::OnceLock<reqwest::blocking::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let ca = std::fs::read(format!("{TLS_DIR}/ca.pem")).expect("the test CA");
            reqwest::blocking::Client::builder()
                .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("a PEM CA"))
                .no_proxy()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("an HTTP client")
        })
        .clone()
}

pub use pg_reaper_tests::free_port;

/// A database with the extension (`q` in a cluster of its own, or a database of its own in the
/// test binary's shared cluster), the sample API, and a key file.
pub struct Env {
    pub cluster: Held,
    /// The database's name.
    pub db: String,
    pub api: SampleApi,
    pub key_file: PathBuf,
}

/// The cluster an [`Env`] works in: its own, or the test binary's shared one.
pub enum Held {
    Own(Cluster),
    Shared(&'static Cluster),
}

impl std::ops::Deref for Held {
    type Target = Cluster;

    fn deref(&self) -> &Cluster {
        match self {
            Held::Own(cluster) => cluster,
            Held::Shared(cluster) => cluster,
        }
    }
}

impl Env {
    /// A cluster of its own (with the worker preloaded when `worker`), database `q`: for a
    /// test that needs the worker, restarts or signals the server, or changes its settings.
    pub fn new(name: &str, worker: bool) -> Env {
        Env::with_database(name, worker, |cluster| {
            cluster.create_db("q", None);
        })
    }

    /// A database of its own in the test binary's shared cluster (no worker): for a test that
    /// drives the extension and the relay without touching anything cluster-wide.
    pub fn shared(name: &str) -> Env {
        let cluster = pg_reaper_tests::shared();
        let db = Cluster::unique_name(name);
        cluster.create_db(&db, None);
        Env::around(Held::Shared(cluster), db)
    }

    /// A database of its own in the test binary's shared cluster with the extension-free edition
    /// (`make portable`) installed into schema `queue` by its owner, an ordinary role; the
    /// relay finds the schema by itself.
    pub fn portable(name: &str) -> Env {
        let cluster = pg_reaper_tests::shared();
        let db = Cluster::unique_name(name);
        let owner = format!("{db}_owner");
        let mut admin = cluster.client("postgres");
        admin
            .batch_execute(&format!("CREATE ROLE {owner} LOGIN"))
            .expect("owner");
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("database");
        cluster
            .client(&db)
            .batch_execute(&format!(
                "CREATE SCHEMA queue AUTHORIZATION {owner};
                 ALTER DATABASE {db} SET search_path = queue"
            ))
            .expect("schema");
        cluster
            .client_as(&db, &owner)
            .batch_execute(&pg_reaper_tests::portable_sql())
            .expect("the extension-free edition");
        Env::around(Held::Shared(cluster), db)
    }

    /// The worker preloaded, pg_reaper in schema `schema` of `q` (a name that may need quoting).
    pub fn in_schema(name: &str, schema: &str) -> Env {
        Env::with_database(name, true, |cluster| {
            cluster.create_db("q", Some(schema));
        })
    }

    /// The worker preloaded, and `q` the reference platform's queue database: its own schema
    /// `unstract` with the barrier tables, adopted by `CREATE EXTENSION pg_reaper SCHEMA
    /// unstract`, and `unstract` first on the database's search_path.
    pub fn adopting(name: &str) -> Env {
        Env::with_database(name, true, |cluster| {
            cluster
                .client("postgres")
                .batch_execute("CREATE DATABASE q")
                .expect("create database");
            cluster
                .client("q")
                .batch_execute(pg_reaper_tests::UNSTRACT_SCHEMA)
                .expect("the platform's schema");
            let mut q = cluster.client("q");
            pg_reaper_tests::install(&mut q, "unstract");
            q.batch_execute("ALTER DATABASE q SET search_path = unstract, public")
                .expect("search_path");
        })
    }

    fn with_database(name: &str, worker: bool, create: impl FnOnce(&Cluster)) -> Env {
        let conf: Vec<&str> = if worker {
            vec![
                "shared_preload_libraries = 'pg_reaper'",
                "pg_reaper.database = 'q'",
                "pg_reaper.naptime = 0.2",
            ]
        } else {
            vec![]
        };
        let cluster = Cluster::start(name, &conf);
        create(&cluster);
        Env::around(Held::Own(cluster), "q".to_string())
    }

    /// The sample API and its key file, next to database `db` of `cluster`.
    fn around(cluster: Held, db: String) -> Env {
        let key_file = cluster.dir.join(format!("{db}-api.key"));
        std::fs::write(&key_file, format!("{KEY}\n")).expect("key file");
        let api = SampleApi::start(&key_file, free_port());
        Env {
            cluster,
            db,
            api,
            key_file,
        }
    }

    pub fn db(&self) -> Client {
        self.cluster.client(&self.db)
    }

    /// `ALTER DATABASE <this database> SET <setting>`: in force for the sessions opened after.
    pub fn alter_database(&self, setting: &str) {
        self.db()
            .batch_execute(&format!("ALTER DATABASE \"{}\" SET {setting}", self.db))
            .unwrap_or_else(|e| panic!("ALTER DATABASE … SET {setting}: {e}"));
    }

    pub fn relay_command(&self, args: &[&str]) -> Command {
        let mut c = relay_command(&self.cluster.url(&self.db), &self.api, &self.key_file);
        c.args(args);
        c
    }

    /// `--once`: drains what is due and exits; its output.
    pub fn relay_once(&self, args: &[&str]) -> Output {
        run_ok(&mut self.relay_command(&[&["--once"], args].concat()))
    }

    /// An execution EXECUTING in the API whose barrier is stranded (one batch of three done),
    /// reaped into an intent.
    pub fn stranded_executing(&self, c: &mut Client, id: &str) {
        self.api.execution(id, "org", "EXECUTING");
        strand(c, id, "org", 1);
        self.reap(c);
    }

    pub fn spawn_relay(&self, args: &[&str]) -> Relay {
        self.spawn_command(self.relay_command(args))
    }

    /// A relay from a command of [`Env::relay_command`], its log in the cluster's directory.
    pub fn spawn_command(&self, command: Command) -> Relay {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self.cluster.dir.join(format!("relay-{n}.log"));
        Relay::spawn(command, log)
    }

    pub fn reap(&self, c: &mut Client) -> i32 {
        c.query_one("SELECT queued FROM reap_expired()", &[])
            .expect("reap")
            .get(0)
    }
}

/// The relay against `database_url` and `api`, with the tests' timings.
pub fn relay_command(database_url: &str, api: &SampleApi, key_file: &PathBuf) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_pg-reaper-relay"));
    // The extension-free edition has no worker: the relays tick it, as its users run them
    // (the environment twin, so that a test's own --reap-interval wins).
    if pg_reaper_tests::edition() == pg_reaper_tests::Edition::Portable {
        c.env("PG_REAPER_REAP_INTERVAL", "200ms");
    }
    c.env("PG_REAPER_DATABASE_URL", database_url)
        .env("PG_REAPER_API_BASE_URL", api.base_url())
        .env("PG_REAPER_API_KEY_FILE", key_file)
        // Short enough that a killed relay's held claim comes back within a test's wait.
        .env("PG_REAPER_HTTP_TIMEOUT", "5s")
        .env("PG_REAPER_SETTLE_DELAY", "10s")
        // Long enough that load never lets a working relay's claim expire; the tests that
        // want a lease to run out ask for --lease 3s.
        .env("PG_REAPER_LEASE", "30s")
        .env("RUST_LOG", "info")
        .env_remove("PG_REAPER_API_KEY")
        .env_remove("INTERNAL_API_BASE_URL")
        .env_remove("INTERNAL_SERVICE_API_KEY")
        .args([
            "--poll-interval",
            "200ms",
            "--backoff-base",
            "50ms",
            "--backoff-max",
            "200ms",
        ]);
    c
}

/// state/outcome/attempts of the intent of `id`, and whether its barrier still exists.
pub fn intent(c: &mut Client, id: &str) -> Value {
    json(
        c,
        &format!(
            "SELECT jsonb_build_object('state', o.state, 'outcome', o.outcome, 'attempts', o.attempts,
                    'last_error', o.last_error,
                    'barrier', EXISTS (SELECT 1 FROM pg_barrier_state b WHERE b.execution_id = o.execution_id),
                    'markers', (SELECT count(*) FROM pg_batch_dedup d WHERE d.execution_id = o.execution_id))
               FROM pg_reaper_outbox o WHERE o.execution_id = '{id}' ORDER BY o.id DESC LIMIT 1"
        ),
    )
}

/// A running relay process; killed and reaped when dropped, so a failing test leaves none.
pub struct Relay {
    pub child: Child,
    log: PathBuf,
}

impl Relay {
    /// Starts `command` with its stderr in the file `log`.
    pub fn spawn(mut command: Command, log: PathBuf) -> Relay {
        let file = std::fs::File::create(&log).expect("relay log file");
        let child = command.stderr(file).spawn().expect("start the relay");
        Relay { child, log }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`STOP`, `CONT`, `KILL`, …).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{name}");
    }

    /// SIGTERM, then waits: the exit status and everything it logged.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("relay exits");
        (
            status,
            std::fs::read_to_string(&self.log).unwrap_or_default(),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to its end and requires success; its output.
pub fn run_ok(command: &mut Command) -> Output {
    let out = command.output().expect("run the relay");
    assert!(
        out.status.success(),
        "relay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits until the intent of `id` is due again (its backoff is over), as the database sees it.
pub fn wait_due(c: &mut Client, id: &str) {
    wait_for(60, &format!("the intent of {id} due again"), || {
        c.query_one(
            "SELECT coalesce(bool_and(next_attempt_at <= now()), true) FROM pg_reaper_outbox
              WHERE execution_id = $1 AND state = 'pending'",
            &[&id],
        )
        .expect("due")
        .get::<_, bool>(0)
        .then_some(())
    });
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A plain HTTP GET of the relay's endpoint at `addr`: (status code, body); (0, "") while
/// nothing answers.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    match http().get(format!("http://{addr}{path}")).send() {
        Ok(response) => {
            let code = response.status().as_u16();
            (code, response.text().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}
