//! Throwaway PostgreSQL clusters (of the installation `PG_CONFIG` names; Debian's 15 by
//! default) for the integration tests, on free loopback ports in fresh directories (as the
//! `postgres` OS user when run as root, since Postgres refuses root). A test that needs no
//! worker and changes nothing cluster-wide (settings, restarts, signals, `pg_hba.conf`) takes a
//! database of its own in the test binary's [`shared`] cluster; the others start their own
//! cluster, stopped and removed when the value is dropped.
//! The extension must be installed (`cargo pgrx install`) before these tests run; a test that
//! needs other versions of its files runs its cluster from an [`Installation`] of its own.

pub mod patroni;

use postgres::{Client, NoTls};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The reference platform's queue schema (schema `unstract`), as its own migration creates it.
pub const UNSTRACT_SCHEMA: &str = include_str!("../fixtures/unstract_queue_schema.sql");

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
}

fn pg_config_path() -> PathBuf {
    PathBuf::from(
        std::env::var("PG_CONFIG")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".to_string()),
    )
}

/// One `pg_config` answer (`--bindir`, `--pkglibdir`, …) of the given installation.
fn pg_config(program: &Path, what: &str) -> PathBuf {
    let out = Command::new(program)
        .arg(what)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

fn bindir() -> PathBuf {
    pg_config(&pg_config_path(), "--bindir")
}

/// A private copy of the PostgreSQL installation (binaries, libraries, share directory), laid
/// out like the original so that its binaries find their own files. A test puts the extension
/// files of any version in it without touching the installation other tests use. Removed
/// when dropped.
pub struct Installation {
    root: PathBuf,
    pg_config: PathBuf,
}

impl Installation {
    /// A copy of the installation `PG_CONFIG` names, without any pg_reaper file in it.
    pub fn copy(name: &str) -> Installation {
        let root = std::env::temp_dir().join(format!("pgr-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let system = pg_config_path();
        // bindir's parent holds bin/ and lib/ (Debian: /usr/lib/postgresql/15); the share
        // directory is elsewhere. Both are copied to the same paths under `root`.
        let home = pg_config(&system, "--bindir")
            .parent()
            .expect("bindir has a parent")
            .to_path_buf();
        for dir in [home.clone(), pg_config(&system, "--sharedir")] {
            let target = root.join(dir.strip_prefix("/").expect("absolute path"));
            std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
            let out = Command::new("cp")
                .arg("-a")
                .arg(&dir)
                .arg(&target)
                .output()
                .expect("run cp");
            check("copy the installation", out);
        }
        let pg_config = root
            .join(home.strip_prefix("/").expect("absolute"))
            .join("bin/pg_config");
        let install = Installation { root, pg_config };
        for dir in [install.pkglibdir(), install.extension_dir()] {
            for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
                if entry.file_name().to_string_lossy().starts_with("pg_reaper") {
                    std::fs::remove_file(entry.path()).expect("remove a pg_reaper file");
                }
            }
        }
        // The postgres OS user reads it (the temporary directory may be private to root).
        let _ = Command::new("chmod")
            .arg("-R")
            .arg("a+rX")
            .arg(&install.root)
            .output();
        install
    }

    pub fn bindir(&self) -> PathBuf {
        pg_config(&self.pg_config, "--bindir")
    }

    pub fn pkglibdir(&self) -> PathBuf {
        pg_config(&self.pg_config, "--pkglibdir")
    }

    pub fn extension_dir(&self) -> PathBuf {
        pg_config(&self.pg_config, "--sharedir").join("extension")
    }

    /// Puts a version's library and SQL files in place, as a package upgrade does: each file
    /// is written beside its target and renamed over it, so a running server that has the
    /// old library mapped keeps its copy intact.
    pub fn put(&self, library: &Path, extension_files: &[PathBuf]) {
        let mut files = vec![(library.to_path_buf(), self.pkglibdir().join("pg_reaper.so"))];
        for f in extension_files {
            let name = f.file_name().expect("a file name");
            files.push((f.clone(), self.extension_dir().join(name)));
        }
        for (from, to) in files {
            let tmp = to.with_extension("new");
            std::fs::copy(&from, &tmp)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), tmp.display()));
            std::fs::rename(&tmp, &to).expect("rename into place");
        }
    }

    /// The library and SQL files `cargo pgrx install` put into the system installation.
    pub fn current_files() -> (PathBuf, Vec<PathBuf>) {
        let system = pg_config_path();
        let library = pg_config(&system, "--pkglibdir").join("pg_reaper.so");
        let dir = pg_config(&system, "--sharedir").join("extension");
        let version = env!("CARGO_PKG_VERSION");
        let files = std::fs::read_dir(&dir)
            .expect("read the extension directory")
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                name == "pg_reaper.control"
                    || name == format!("pg_reaper--{version}.sql")
                    || (name.starts_with("pg_reaper--")
                        && name.ends_with(&format!("--{version}.sql")))
            })
            .collect();
        (library, files)
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

/// `program args…`, as the postgres OS user when we are root.
fn as_pg_user(program: &Path, args: &[&str]) -> Output {
    if is_root() {
        Command::new("runuser")
            .arg("-u")
            .arg("postgres")
            .arg("--")
            .arg(program)
            .args(args)
            .output()
    } else {
        Command::new(program).args(args).output()
    }
    .unwrap_or_else(|e| panic!("run {}: {e}", program.display()))
}

fn check(what: &str, out: Output) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A loopback port nothing listens on, never the same twice in this test process. Tests run
/// in parallel threads, and the kernel readily gives a just-released port to the next
/// `bind(:0)`: without the register, two tests could pick one port, and one of them would talk
/// to the other's server.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

impl Cluster {
    /// initdb + start, with `conf` lines appended to postgresql.conf.
    pub fn start(name: &str, conf: &[&str]) -> Cluster {
        Cluster::start_with(bindir(), name, conf)
    }

    /// Like [`Cluster::start`], running the binaries of a private installation.
    pub fn start_in(install: &Installation, name: &str, conf: &[&str]) -> Cluster {
        Cluster::start_with(install.bindir(), name, conf)
    }

    fn start_with(bindir: PathBuf, name: &str, conf: &[&str]) -> Cluster {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pgr-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cluster = Cluster {
            dir,
            port: free_port(),
            bindir,
        };
        let d = cluster.dir.to_str().expect("utf-8 path");
        check(
            "initdb",
            as_pg_user(
                &cluster.bindir.join("initdb"),
                &[
                    "-D",
                    d,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--locale=C.UTF-8",
                    "-N",
                ],
            ),
        );
        let mut lines = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".to_string(),
            format!("unix_socket_directories = '{d}'"),
            "fsync = off".to_string(),
            "log_min_messages = info".to_string(),
        ];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let path = cluster.dir.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.conf");
        text.push_str(&lines.join("\n"));
        text.push('\n');
        std::fs::write(&path, text).expect("write postgresql.conf");
        cluster.pg_ctl_start();
        cluster
    }

    pub fn pg_ctl_start(&self) {
        let d = self.dir.to_str().expect("utf-8 path");
        let log = self.dir.join("server.log");
        check(
            "pg_ctl start",
            as_pg_user(
                &self.bindir.join("pg_ctl"),
                &[
                    "-D",
                    d,
                    "-l",
                    log.to_str().expect("utf-8"),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ),
        );
    }

    /// `pg_ctl stop` in the given mode (`fast`, `immediate`).
    pub fn pg_ctl_stop(&self, mode: &str) {
        let d = self.dir.to_str().expect("utf-8 path");
        check(
            "pg_ctl stop",
            as_pg_user(
                &self.bindir.join("pg_ctl"),
                &["-D", d, "-m", mode, "-w", "stop"],
            ),
        );
    }

    /// A streaming replica of this cluster (pg_basebackup), started, with `conf` appended.
    pub fn start_replica(&self, name: &str, conf: &[&str]) -> Cluster {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("pgr-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let replica = Cluster {
            dir,
            port: free_port(),
            bindir: self.bindir.clone(),
        };
        let d = replica.dir.to_str().expect("utf-8 path");
        let port = self.port.to_string();
        check(
            "pg_basebackup",
            as_pg_user(
                &self.bindir.join("pg_basebackup"),
                &[
                    "-D",
                    d,
                    "-R",
                    "-X",
                    "stream",
                    "--checkpoint=fast",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                ],
            ),
        );
        let mut lines = vec![
            format!("port = {}", replica.port),
            format!("unix_socket_directories = '{d}'"),
        ];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let path = replica.dir.join("postgresql.auto.conf");
        let mut text = std::fs::read_to_string(&path).expect("read postgresql.auto.conf");
        text.push_str(&lines.join("\n"));
        text.push('\n');
        std::fs::write(&path, text).expect("write postgresql.auto.conf");
        replica.pg_ctl_start();
        replica
    }

    pub fn promote(&self) {
        let d = self.dir.to_str().expect("utf-8 path");
        check(
            "pg_ctl promote",
            as_pg_user(&self.bindir.join("pg_ctl"), &["-D", d, "-w", "promote"]),
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    pub fn client(&self, db: &str) -> Client {
        Client::connect(&self.url(db), NoTls).unwrap_or_else(|e| panic!("connect {db}: {e}"))
    }

    /// A client connected as `role` (created LOGIN if missing).
    pub fn client_as(&self, db: &str, role: &str) -> Client {
        let url = format!("host=127.0.0.1 port={} user={role} dbname={db}", self.port);
        Client::connect(&url, NoTls).unwrap_or_else(|e| panic!("connect {db} as {role}: {e}"))
    }

    /// A new database with pg_reaper installed (in `schema` when given) in the [`edition`]
    /// under test.
    pub fn create_db(&self, db: &str, schema: Option<&str>) -> Client {
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .expect("create db");
        let mut c = self.client(db);
        if let Some(s) = schema {
            c.batch_execute(&format!("CREATE SCHEMA \"{s}\""))
                .expect("create schema");
        }
        install(&mut c, schema.unwrap_or("public"));
        c
    }

    /// Runs a client program of this installation (pg_dump, pg_restore, …).
    pub fn tool(&self, program: &str, args: &[&str]) -> Output {
        let out = Command::new(self.bindir.join(program))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        check(program, out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_log_tail();
        }
        self.remove();
    }
}

impl Cluster {
    fn print_log_tail(&self) {
        let log = self.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!(
            "--- server log of {} (last lines) ---\n{}",
            self.dir.display(),
            tail.join("\n")
        );
    }

    /// Stops the server at once and deletes its directory.
    fn remove(&self) {
        let d = self.dir.to_str().unwrap_or_default().to_string();
        let _ = as_pg_user(
            &self.bindir.join("pg_ctl"),
            &["-D", &d, "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    /// A name for a new database, never the same twice in this test process.
    pub fn unique_name(prefix: &str) -> String {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        format!("{prefix}_{}", SEQ.fetch_add(1, Ordering::Relaxed))
    }
}

static SHARED: OnceLock<Cluster> = OnceLock::new();

/// The test binary's shared cluster (no worker, default settings), started by the first test
/// that asks for it and removed when the test process exits. Its tests each work in a database
/// of their own ([`Cluster::unique_name`], [`Cluster::create_db`]), so they run side by side
/// without an `initdb` each; roles are cluster-wide, so a test creating one picks a name no
/// other test of its binary uses.
pub fn shared() -> &'static Cluster {
    SHARED.get_or_init(|| {
        let cluster = Cluster::start("shared", &[]);
        // SAFETY: registers a plain function without arguments, run once at process exit
        // (libtest ends with `exit`, whether tests passed or failed).
        unsafe { libc::atexit(remove_shared) };
        cluster
    })
}

extern "C" fn remove_shared() {
    if let Some(cluster) = SHARED.get() {
        cluster.remove();
    }
}

/// PgBouncer (Debian's package) in front of one database of a cluster, on a free loopback
/// port, in the given pool mode (`transaction`, `session`). Stopped when dropped.
pub struct PgBouncer {
    pub port: u16,
    dir: PathBuf,
    child: std::process::Child,
}

impl PgBouncer {
    pub fn start(cluster: &Cluster, db: &str, pool_mode: &str, pool_size: u32) -> PgBouncer {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let dir = cluster.dir.join(format!("pgbouncer-{n}"));
        std::fs::create_dir_all(&dir).expect("pgbouncer directory");
        let port = free_port();
        let d = dir.display();
        std::fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("userlist");
        let ini = format!(
            "[databases]\n{db} = host=127.0.0.1 port={} dbname={db}\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = trust\nauth_file = {d}/userlist.txt\npool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\nmax_client_conn = 200\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {d}/pgbouncer.log\npidfile = {d}/pgbouncer.pid\n",
            cluster.port
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).expect("pgbouncer.ini");
        // PgBouncer refuses to run as root.
        let ini_path = dir.join("pgbouncer.ini");
        let mut command = if is_root() {
            let _ = Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(&dir)
                .output();
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", "/usr/sbin/pgbouncer"]);
            c
        } else {
            Command::new("/usr/sbin/pgbouncer")
        };
        let child = command
            .arg(&ini_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start pgbouncer (apt-get install pgbouncer)");
        let bouncer = PgBouncer { port, dir, child };
        wait_for(60, "PgBouncer to accept connections", || {
            Client::connect(&bouncer.url(db), NoTls).ok().map(|_| ())
        });
        bouncer
    }

    pub fn url(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser does not pass a kill on to its child: signal PgBouncer itself, with SIGTERM
        // (immediate shutdown; SIGINT would wait for its clients), and wait until it is gone so
        // that its port is free when the next test picks one.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").arg("-TERM").arg(&pid).output();
            wait_for(30, "PgBouncer to exit", || {
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            });
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one look of [`wait_for`] saw: the value it waits for, or what it saw instead (kept for
/// the timeout's message). `None` says only "not yet"; `Err(seen)` says what was there.
pub trait Probe<T> {
    fn look(self) -> Result<T, String>;
}

impl<T> Probe<T> for Option<T> {
    fn look(self) -> Result<T, String> {
        self.ok_or_else(|| "not yet".to_string())
    }
}

impl<T, E: std::fmt::Debug> Probe<T> for Result<T, E> {
    fn look(self) -> Result<T, String> {
        self.map_err(|seen| format!("{seen:?}"))
    }
}

/// `Ok(seen)` when `seen` is what is wanted, else `Err(seen)`: a probe for [`wait_for`] whose
/// timeout message shows the last value seen.
pub fn equal<T: PartialEq>(seen: T, wanted: T) -> Result<T, T> {
    if seen == wanted { Ok(seen) } else { Err(seen) }
}

/// Looks with `probe` every 100 ms until it sees what it waits for, for at most `seconds`; on
/// timeout, fails with what it saw last.
pub fn wait_for<T, P: Probe<T>>(seconds: u64, what: &str, mut probe: impl FnMut() -> P) -> T {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        let seen = match probe().look() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {seconds} s waiting for {what}; last seen: {seen}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Moves a barrier's deadline into the past (created two hours ago), as time would: it is
/// stranded from now on. `pattern` is a LIKE pattern of execution ids.
pub fn expire(c: &mut Client, pattern: &str) {
    c.execute(
        "UPDATE pg_barrier_state SET created_at = now() - interval '2 hours',
                expires_at = now() - interval '1 second' WHERE execution_id LIKE $1",
        &[&pattern],
    )
    .expect("expire the barrier");
}

/// Arms barrier `id` for 3 batches in `org` with a callback, counts `done` of them down, and
/// strands it (its deadline passed).
pub fn strand(c: &mut Client, id: &str, org: &str, done: i32) {
    c.execute(
        "SELECT barrier_enqueue($1, $2, 3, '1 hour', '{\"task_name\": \"aggregate\"}')",
        &[&id, &org],
    )
    .expect("enqueue");
    for b in 0..done {
        c.execute("SELECT barrier_claim($1, $2)", &[&id, &b])
            .expect("claim");
        c.execute(
            "SELECT barrier_decrement($1, to_jsonb($2::int))",
            &[&id, &b],
        )
        .expect("decrement");
    }
    expire(c, id);
}

/// Arms `n` barriers `prefix0`, `prefix1`, … for 3 batches in `org` and strands them all.
pub fn strand_many(c: &mut Client, prefix: &str, org: &str, n: usize) {
    c.execute(
        "SELECT barrier_enqueue($1 || i, $2, 3) FROM generate_series(0, $3 - 1) i",
        &[&prefix, &org, &(n as i32)],
    )
    .expect("enqueue");
    expire(c, &format!("{prefix}%"));
}

/// One JSON value from a query returning a single row and column of type jsonb.
pub fn json(c: &mut Client, sql: &str) -> serde_json::Value {
    let row = c
        .query_one(sql, &[])
        // The server's message and SQLSTATE, not only "db error".
        .unwrap_or_else(|e| match e.as_db_error() {
            Some(db) => panic!("{sql}: {} (SQLSTATE {})", db.message(), db.code().code()),
            None => panic!("{sql}: {e}"),
        });
    row.get::<_, Option<serde_json::Value>>(0)
        .unwrap_or(serde_json::Value::Null)
}

/// Which edition the suites run against: `PG_REAPER_EDITION=portable` (make test's second
/// pass on PostgreSQL 15) installs the extension-free edition where they would create the
/// extension, and the relays tick it in place of the worker; unset or `native`, the extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edition {
    Native,
    Portable,
}

pub fn edition() -> Edition {
    match std::env::var("PG_REAPER_EDITION").as_deref() {
        Err(_) | Ok("") | Ok("native") => Edition::Native,
        Ok("portable") => Edition::Portable,
        Ok(other) => panic!("PG_REAPER_EDITION must be native or portable, not {other:?}"),
    }
}

/// Installs pg_reaper into existing schema `schema` through `c` (a superuser's session), in the
/// edition under test.
pub fn install(c: &mut Client, schema: &str) {
    try_install(c, schema)
        .unwrap_or_else(|e| panic!("installing pg_reaper ({:?}): {e:?}", edition()));
}

/// [`install`], or the server's error (a table that cannot be adopted, say).
pub fn try_install(c: &mut Client, schema: &str) -> Result<(), postgres::Error> {
    match edition() {
        Edition::Native => {
            c.batch_execute(&format!("CREATE EXTENSION pg_reaper SCHEMA \"{schema}\""))
        }
        Edition::Portable => {
            let sql = portable_sql();
            c.batch_execute(&format!("SET search_path = \"{schema}\""))?;
            let installed = c.batch_execute(&sql);
            c.batch_execute("RESET search_path")?;
            installed
        }
    }
}

/// The extension-free edition's SQL file, as `make portable` writes it (`scripts/sql.py`).
/// Printed, not read from target/portable: tests in several processes ask for it at once, and
/// one must never read the file while another writes it.
pub fn portable_sql() -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("python3")
        .arg(root.join("scripts/sql.py"))
        .args(["portable", "-"])
        .output()
        .expect("run scripts/sql.py");
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "scripts/sql.py portable -: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the edition's file is UTF-8")
}
