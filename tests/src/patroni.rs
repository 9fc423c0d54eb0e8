//! A high-availability cluster the way most deployments run one: one etcd member and two
//! PostgreSQL nodes managed by Patroni (Debian's `etcd-server` and `patroni`), all on loopback,
//! with the extra settings given (pg_reaper preloaded, say). Every process runs as the postgres
//! OS user when we are root and is killed, with its data, when the value is dropped.

use crate::{bindir, free_port, wait_for};
use postgres::{Client, NoTls};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Patroni {
    pub dir: PathBuf,
    etcd: Child,
    pub nodes: Vec<Node>,
}

pub struct Node {
    pub name: String,
    pub port: u16,
    config: PathBuf,
    data: PathBuf,
    patroni: Option<Child>,
}

/// The postgres OS user's uid and gid when we are root (Postgres refuses to run as root).
fn postgres_ids() -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().ok()?;
        String::from_utf8(out.stdout).ok()?.trim().parse().ok()
    };
    let me = Command::new("id").arg("-u").output().ok()?;
    if !me.stdout.starts_with(b"0\n") {
        return None;
    }
    Some((id("-u")?, id("-g")?))
}

/// Starts `program` with its output in `log`, as the postgres user when we are root.
fn spawn(program: &str, args: &[&str], log: &PathBuf) -> Child {
    let file = std::fs::File::create(log).expect("log file");
    let err = file.try_clone().expect("log file");
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err);
    if let Some((uid, gid)) = postgres_ids() {
        command.uid(uid).gid(gid);
    }
    command
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"))
}

impl Patroni {
    /// etcd, then two Patroni nodes; returns once one of them is a writable primary and the
    /// other streams from it. `parameters` are postgresql.conf settings (`name: value` lines of
    /// Patroni's YAML) for both nodes.
    pub fn start(name: &str, parameters: &[(&str, &str)]) -> Patroni {
        let dir = std::env::temp_dir().join(format!("pgr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // etcd and Patroni write into the directory as the postgres user.
        if postgres_ids().is_some() {
            Command::new("chown")
                .args(["postgres", dir.to_str().expect("utf-8")])
                .status()
                .expect("chown");
        }
        let (client, peer) = (free_port(), free_port());
        let etcd = spawn(
            "etcd",
            &[
                "--name",
                "e1",
                "--data-dir",
                dir.join("etcd").to_str().expect("utf-8"),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("e1=http://127.0.0.1:{peer}"),
            ],
            &dir.join("etcd.log"),
        );
        let extra: String = parameters
            .iter()
            .map(|(k, v)| format!("        {k}: \"{v}\"\n"))
            .collect();
        // One scope: the name of the cluster the two nodes belong to.
        let scope = format!("pgr-{name}-{}", std::process::id());
        let nodes = (1..=2)
            .map(|i| {
                let name = format!("node{i}");
                let (port, api) = (free_port(), free_port());
                let data = dir.join(format!("data{i}"));
                let config = dir.join(format!("{name}.yml"));
                std::fs::write(
                    &config,
                    format!(
                        "scope: {scope}
name: {name}
restapi:
  listen: 127.0.0.1:{api}
  connect_address: 127.0.0.1:{api}
etcd3:
  hosts: 127.0.0.1:{client}
bootstrap:
  dcs:
    ttl: 10
    loop_wait: 1
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: \"on\"
        wal_log_hints: \"on\"
        max_wal_senders: 5
        max_replication_slots: 5
{extra}  initdb:
    - encoding: UTF8
    - locale: C.UTF-8
  pg_hba:
    - local all all trust
    - host replication replicator 127.0.0.1/32 trust
    - host all all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {bin}
  pgpass: {dir}/pgpass{i}
  authentication:
    replication:
      username: replicator
      password: replicator
    superuser:
      username: postgres
      password: postgres
  parameters:
    unix_socket_directories: {dir}
    fsync: \"off\"
",
                        data = data.display(),
                        bin = bindir().display(),
                        dir = dir.display(),
                    ),
                )
                .expect("patroni config");
                Node {
                    name,
                    port,
                    config,
                    data,
                    patroni: None,
                }
            })
            .collect();
        let mut ha = Patroni { dir, etcd, nodes };
        // The first node bootstraps the cluster; the second joins it as a replica.
        ha.start_node(0);
        wait_for(180, "the first node to be a writable primary", || {
            ha.primary().ok_or_else(|| ha.roles())
        });
        ha.start_node(1);
        wait_for(180, "the second node to stream from the first", || {
            (ha.node_in_recovery(1) == Some(true))
                .then_some(())
                .ok_or_else(|| ha.roles())
        });
        ha
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let log = self.dir.join(format!("{}.log", node.name));
        node.patroni = Some(spawn(
            "patroni",
            &[node.config.to_str().expect("utf-8")],
            &log,
        ));
    }

    /// A client of node `i` (database `db`), if it accepts connections.
    pub fn client(&self, i: usize, db: &str) -> Option<Client> {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname={db} connect_timeout=5",
                self.nodes[i].port
            ),
            NoTls,
        )
        .ok()
    }

    fn node_in_recovery(&self, i: usize) -> Option<bool> {
        let mut c = self.client(i, "postgres")?;
        c.query_one("SELECT pg_is_in_recovery()", &[])
            .ok()
            .map(|r| r.get(0))
    }

    /// Each node's name and whether it is in recovery (None: not accepting connections).
    pub fn roles(&self) -> Vec<(String, Option<bool>)> {
        (0..self.nodes.len())
            .map(|i| (self.nodes[i].name.clone(), self.node_in_recovery(i)))
            .collect()
    }

    /// The node that is a writable primary now, if exactly one is.
    pub fn primary(&self) -> Option<usize> {
        let writable: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.node_in_recovery(i) == Some(false))
            .collect();
        (writable.len() == 1).then(|| writable[0])
    }

    /// A libpq URL naming both nodes that picks the writable one.
    pub fn url(&self, db: &str) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!(
            "postgresql://postgres@{}/{db}?target_session_attrs=read-write&connect_timeout=5",
            hosts.join(",")
        )
    }

    /// Waits until every other node has replayed what `primary` has written so far, so that
    /// Patroni finds a replica healthy enough to take over and nothing written is lost by it.
    pub fn wait_caught_up(&self, primary: usize) {
        let written: String = self
            .client(primary, "postgres")
            .expect("the primary")
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .expect("the primary's WAL position")
            .get(0);
        for i in (0..self.nodes.len()).filter(|&i| i != primary) {
            wait_for(180, "the replica to replay the primary's WAL", || {
                let replayed = self.client(i, "postgres").and_then(|mut c| {
                    c.query_one(
                        "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn,
                                coalesce(pg_last_wal_replay_lsn()::text, 'none')",
                        &[&written],
                    )
                    .ok()
                });
                match replayed {
                    Some(row) if row.get::<_, Option<bool>>(0) == Some(true) => Ok(()),
                    Some(row) => Err(format!(
                        "{} replayed {}, the primary wrote {written}",
                        self.nodes[i].name,
                        row.get::<_, String>(1)
                    )),
                    None => Err(format!("{} does not answer", self.nodes[i].name)),
                }
            });
        }
    }

    /// A planned switchover from the primary `from` to the replica `to` (`patronictl`).
    pub fn switchover(&self, from: usize, to: usize) {
        let out = Command::new("patronictl")
            .args([
                "-c",
                self.nodes[from].config.to_str().expect("utf-8"),
                "switchover",
                "--leader",
                &self.nodes[from].name,
                "--candidate",
                &self.nodes[to].name,
                "--force",
            ])
            .output()
            .expect("run patronictl");
        assert!(
            out.status.success(),
            "patronictl switchover: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// SIGKILL of node `i`'s postmaster alone; its Patroni, still holding the leader key,
    /// starts it again (crash recovery) in place. Returns the pid it killed.
    pub fn kill_postmaster(&self, i: usize) -> String {
        let pid = postmaster_pid(&self.nodes[i].data).expect("a running postmaster");
        let killed = Command::new("kill").args(["-KILL", &pid]).status();
        assert!(killed.is_ok_and(|s| s.success()), "kill -KILL {pid}");
        pid
    }

    /// The postmaster pid of node `i` now, if it runs.
    pub fn postmaster(&self, i: usize) -> Option<String> {
        postmaster_pid(&self.nodes[i].data)
    }

    /// The machine of node `i` lost: its Patroni and its postmaster SIGKILLed at once, so that
    /// nothing hands the leader key over and the other node takes over when the key expires.
    pub fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        if let Some(mut p) = node.patroni.take() {
            let _ = p.kill();
            let _ = p.wait();
        }
        if let Some(pid) = postmaster_pid(&node.data) {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

fn postmaster_pid(data: &std::path::Path) -> Option<String> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()
        .map(str::to_string)
}

impl Drop for Patroni {
    fn drop(&mut self) {
        // A failed test shows what etcd and Patroni said last.
        if std::thread::panicking() {
            for name in ["etcd", "node1", "node2"] {
                let text = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                // Patroni says "no action" every second; what happened is in the other lines.
                let lines: Vec<&str> = text.lines().filter(|l| !l.contains("no action.")).collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!("--- {name}.log, last lines:\n{}", tail.join("\n"));
            }
        }
        // SIGTERM: Patroni stops its PostgreSQL (fast shutdown) and exits; waiting for its exit
        // is waiting for the server to be down. etcd goes last: Patroni talks to it on the way.
        for node in &mut self.nodes {
            if let Some(mut patroni) = node.patroni.take() {
                let _ = Command::new("kill")
                    .args(["-TERM", &patroni.id().to_string()])
                    .status();
                let _ = patroni.wait();
            }
        }
        let _ = self.etcd.kill();
        let _ = self.etcd.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
