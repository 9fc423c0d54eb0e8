//! The relay's connection to Postgres as production has it: a server that accepts only TLS
//! (with certificates made by the test), client certificates, a primary/standby pair named
//! together in one URL with `target_session_attrs=read-write` across a failover, and PgBouncer
//! in session pooling mode in between.

mod common;

use common::{Env, intent};
use pg_reaper_tests::{PgBouncer, equal, wait_for};
use postgres::{Client, NoTls};
use serde_json::json;
use std::path::Path;
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for the name `db.internal` only (so that verify-ca and
/// verify-full differ on 127.0.0.1), a client certificate for the role `postgres`, and a
/// second CA that signed none of them.
fn make_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).expect("cert dir");
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
                "-subj",
                &format!("/CN=pg-reaper test {ca}"),
            ],
        );
    }
    // Extensions make X.509 v3 certificates (rustls refuses v1).
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:db.internal\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for (name, cn, ext) in [
        ("server", "db.internal", Some("server.ext")),
        ("client", "postgres", Some("client.ext")),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        let mut args = vec![
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
        if let Some(ext) = ext {
            args.extend(["-extfile".to_string(), ext.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl(dir, &args);
    }
}

/// The cluster's own unix socket: local connections stay trusted after TCP goes TLS-only.
fn local(env: &Env) -> Client {
    let url = format!(
        "host={} port={} user=postgres dbname=q",
        env.cluster.dir.display(),
        env.cluster.port
    );
    Client::connect(&url, NoTls).expect("connect over the unix socket")
}

/// Runs `relay --once` against `url`: (exit code, stderr).
fn relay_once(env: &Env, url: &str) -> (Option<i32>, String) {
    let out = env
        .relay_command(&["--once"])
        .env("PG_REAPER_DATABASE_URL", url)
        .output()
        .expect("relay");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_tls_only_server_with_verify_full_client_certificates_and_clear_refusals() {
    let env = Env::new("dbtls", false);
    let certs = env.cluster.dir.join("certs");
    make_certificates(&certs);
    // The server reads its key as the postgres OS user, and wants it private.
    let key = certs.join("server.key");
    Command::new("chown")
        .args(["postgres"])
        .arg(&key)
        .status()
        .expect("chown");
    Command::new("chmod")
        .args(["600"])
        .arg(&key)
        .status()
        .expect("chmod");
    std::fs::write(
        env.cluster.dir.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 cert\n",
    )
    .expect("pg_hba.conf");
    let d = certs.display();
    let mut admin = env.db();
    for setting in [
        "ssl = on".to_string(),
        format!("ssl_cert_file = '{d}/server.pem'"),
        format!("ssl_key_file = '{d}/server.key'"),
        format!("ssl_ca_file = '{d}/ca.pem'"),
    ] {
        admin
            .batch_execute(&format!("ALTER SYSTEM SET {setting}"))
            .expect("ssl settings");
    }
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .expect("reload");
    drop(admin);
    let mut c = local(&env);
    wait_for(60, "the server to take TLS", || {
        c.query_one(
            "SELECT setting = 'on' FROM pg_settings WHERE name = 'ssl'",
            &[],
        )
        .ok()
        .and_then(|r| r.get::<_, bool>(0).then_some(()))
    });
    env.stranded_executing(&mut c, "tls");

    let port = env.cluster.port;
    let base = format!("hostaddr=127.0.0.1 port={port} user=postgres dbname=q");
    let client = format!("sslcert={d}/client.pem sslkey={d}/client.key");
    // Plaintext is refused by the server; the relay says so and gives up (--once).
    let (code, log) = relay_once(&env, &format!("host=127.0.0.1 {base} sslmode=disable"));
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("no encryption"), "{log}");
    // A CA that did not sign the server's certificate.
    let (code, log) = relay_once(
        &env,
        &format!(
            "host=db.internal {base} sslmode=verify-full sslrootcert={d}/other-ca.pem {client}"
        ),
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("UnknownIssuer"), "{log}");
    // verify-full checks the name: the certificate is for db.internal, not 127.0.0.1 ...
    let (code, log) = relay_once(
        &env,
        &format!("host=127.0.0.1 {base} sslmode=verify-full sslrootcert={d}/ca.pem {client}"),
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("certificate not valid for name \"127.0.0.1\""),
        "{log}"
    );
    // ... verify-ca does not; without a client certificate the server refuses.
    let (code, log) = relay_once(
        &env,
        &format!("host=127.0.0.1 {base} sslmode=verify-ca sslrootcert={d}/ca.pem"),
    );
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("certificate"), "{log}");
    assert_eq!(intent(&mut c, "tls")["state"], json!("pending"));

    // verify-full with the right name, CA and client certificate: the intent is recovered,
    // over connections the server sees as TLS.
    let (code, log) = relay_once(
        &env,
        &format!("host=db.internal {base} sslmode=verify-full sslrootcert={d}/ca.pem {client}"),
    );
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(intent(&mut c, "tls")["outcome"], json!("marked_error"));
    let (code, log) = relay_once(
        &env,
        &format!("host=127.0.0.1 {base} sslmode=verify-ca sslrootcert={d}/ca.pem {client}"),
    );
    assert_eq!(code, Some(0), "verify-ca accepts the other name: {log}");
}

#[test]
fn a_relay_naming_primary_and_standby_follows_a_failover_by_itself() {
    let env = Env::new("dbfailover", false);
    let mut c = env.db();
    let standby = env.cluster.start_replica("dbfailover-standby", &[]);
    env.stranded_executing(&mut c, "before");
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user=postgres dbname=q \
         target_session_attrs=read-write connect_timeout=5",
        env.cluster.port, standby.port
    );
    let mut cmd = env.relay_command(&[]);
    cmd.env("PG_REAPER_DATABASE_URL", &url);
    let mut relay = common::Relay::spawn(cmd, env.cluster.dir.join("relay-failover.log"));
    wait_for(60, "the intent recovered through the primary", || {
        equal(intent(&mut c, "before")["state"].clone(), json!("done"))
    });
    // The primary goes away; the standby is promoted. The relay finds it by itself.
    drop(c);
    env.cluster.pg_ctl_stop("fast");
    standby.promote();
    let mut p = standby.client("q");
    wait_for(60, "the promoted standby to accept writes", || {
        p.query_one("SELECT NOT pg_is_in_recovery()", &[])
            .ok()
            .and_then(|r| r.get::<_, bool>(0).then_some(()))
    });
    env.api.execution("after", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut p, "after", "org", 1);
    // Queued here, or already by the relay's own tick in the extension-free edition.
    env.reap(&mut p);
    wait_for(
        120,
        "the intent queued on the new primary recovered",
        || equal(intent(&mut p, "after")["state"].clone(), json!("done")),
    );
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    let api = env.api.executions();
    for id in ["before", "after"] {
        assert_eq!(api[id]["error_marks"], json!(1), "{id}");
    }
}

/// PgBouncer (Debian's package) in session pooling mode between the relay and Postgres: the
/// LISTEN connection, the recovery transactions held across the status update and the
/// statements the relay prepares once per connection all keep their server session.
#[test]
fn the_relay_works_through_pgbouncer_in_session_pooling_mode() {
    let env = Env::new("dbbouncer", false);
    // One server connection per relay connection: 16 workers, the claimer and the listener.
    let bouncer = PgBouncer::start(&env.cluster, "q", "session", 20);
    let mut c = env.db();
    for i in 0..40 {
        env.stranded_executing(&mut c, &format!("pooled-{i}"));
    }
    let mut cmd = env.relay_command(&[]);
    cmd.env("PG_REAPER_DATABASE_URL", bouncer.url("q"));
    let mut relay = common::Relay::spawn(cmd, env.cluster.dir.join("relay-bouncer.log"));
    wait_for(120, "every intent recovered through PgBouncer", || {
        (0..40)
            .all(|i| intent(&mut c, &format!("pooled-{i}"))["state"] == json!("done"))
            .then_some(())
    });
    // And one stranded after the relay drained everything, while it waits on its listener.
    env.stranded_executing(&mut c, "pooled-late");
    wait_for(60, "the late intent recovered", || {
        equal(
            intent(&mut c, "pooled-late")["state"].clone(),
            json!("done"),
        )
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{log}");
    let api = env.api.executions();
    for i in (0..40)
        .map(|i| format!("pooled-{i}"))
        .chain(["pooled-late".to_string()])
    {
        assert_eq!(api[&i]["error_marks"], json!(1), "{i}");
    }
    // The relay's connections went through PgBouncer (the test's own are direct, but for
    // the harness's readiness probe).
    assert!(
        bouncer.log().matches("login attempt: db=q").count() >= 4,
        "listener, claimer and workers log in through PgBouncer:\n{}",
        bouncer.log()
    );
}

/// A server that accepts connections and never answers (a hung primary, a black-holed
/// failover address): the relay's connection attempt waits, and SIGTERM still ends the relay
/// at once. The connect timeout is set far beyond the test's patience, so only the signal can.
#[test]
fn sigterm_is_honoured_while_postgres_does_not_answer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream); // kept open, never read or written
            let _ = accepted_tx.send(());
        }
    });
    let dir = std::env::temp_dir().join(format!("pgr-hung-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("api.key");
    std::fs::write(&key, "k\n").expect("key");
    let log = dir.join("relay.log");
    let mut relay = Command::new(env!("CARGO_BIN_EXE_pg-reaper-relay"))
        .env(
            "PG_REAPER_DATABASE_URL",
            format!("host=127.0.0.1 port={port} user=postgres dbname=q connect_timeout=600"),
        )
        .env("PG_REAPER_API_BASE_URL", "http://127.0.0.1:9/internal")
        .env("PG_REAPER_API_KEY_FILE", &key)
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("start the relay");
    accepted
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the relay connecting to the silent server");
    let pid = relay.id().to_string();
    Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    let status = wait_for(60, "the relay to exit after SIGTERM", || {
        relay.try_wait().expect("try_wait")
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(status.success(), "{status:?}: {text}");
    assert!(text.contains("relay stopped"), "{text}");
}
