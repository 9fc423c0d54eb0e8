//! pg-reaper-relay: the binary. Parses the flags, sets up logging, signals and the runtime,
//! and runs the library's drain loop.

use clap::Parser;
use pg_reaper_relay::recovery::Policy;
use pg_reaper_relay::{Error, api, config, db, drain, metrics};
use std::time::Duration;

fn main() {
    let args = match config::Args::try_parse() {
        Ok(args) => args,
        Err(e) => config::exit_on_bad_flags(e),
    };
    // Colours only on a terminal: journald, `docker logs` and log files get plain lines.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    std::process::exit(match start(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            2
        }
    });
}

fn start(args: config::Args) -> Result<i32, Error> {
    let key = config::api_key(&args).map_err(Error::Config)?;
    let api_base_url = config::api_base_url(&args).map_err(Error::Config)?;
    let api = api::Api::new(
        &api_base_url,
        key,
        args.http_timeout,
        args.api_ca_file.as_deref(),
    )
    .map_err(Error::Config)?;
    if args.backoff_max < args.backoff_base {
        return Err(Error::Config(
            "--backoff-max: must not be shorter than --backoff-base".into(),
        ));
    }
    if args.settle_delay.is_some_and(|d| d < args.http_timeout) {
        return Err(Error::Config(
            "--settle-delay: must not be shorter than --http-timeout".into(),
        ));
    }
    let settings = drain::Settings {
        database: db::Target::parse(&config::database_url(&args).map_err(Error::Config)?)
            .map_err(Error::Config)?,
        concurrency: args.concurrency as usize,
        policy: Policy {
            lease: args.lease,
            settle_delay: args.settle_delay.unwrap_or(args.http_timeout * 2),
            http_timeout: args.http_timeout,
            backoff_base: args.backoff_base,
            backoff_max: args.backoff_max,
            max_attempts: args.max_attempts,
        },
        poll_interval: args.poll_interval,
        http_timeout: args.http_timeout,
        reap_interval: args.reap_interval,
        once: args.once,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("starting the runtime: {e}")))?;
    runtime.block_on(async move {
        let metrics = metrics::Metrics::new();
        if let Some(addr) = args.listen {
            let window = (settings.poll_interval * 3).max(Duration::from_secs(30));
            metrics::serve(addr, metrics.clone(), window)
                .await
                .map_err(Error::Config)?;
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The handlers are installed here, before any work starts: a SIGTERM that arrives while
        // the relay is still connecting must stop it cleanly, not kill it.
        use tokio::signal::unix::{SignalKind, signal};
        let installing =
            |kind, name| signal(kind).map_err(|e| Error::Config(format!("installing {name}: {e}")));
        let (mut term, mut int) = (
            installing(SignalKind::terminate(), "SIGTERM")?,
            installing(SignalKind::interrupt(), "SIGINT")?,
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received: stopping");
            let _ = stop_tx.send(true);
        });
        Ok(drain::run(settings, api, metrics, args.listen.is_some(), stop_rx).await)
    })
}
