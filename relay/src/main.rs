//! pg-reaper-relay: drains pg_reaper's outbox of recovery intents into the platform's internal
//! status API. Postgres never makes the HTTP call; this process does, and reports back to
//! Postgres through the extension's functions.

mod api;
mod circuit;
mod config;
mod db;
mod metrics;
mod protocol;
mod relay;
mod store;

use clap::Parser;
use std::time::Duration;

fn main() {
    let args = match config::Args::try_parse() {
        Ok(args) => args,
        Err(e) => config::exit_on_bad_flags(e),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    std::process::exit(match start(args) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            2
        }
    });
}

fn start(args: config::Args) -> Result<i32, String> {
    let key = config::api_key(&args)?;
    let api = api::Api::new(
        &args.api_base_url,
        key,
        args.http_timeout,
        args.api_ca_file.as_deref(),
    )?;
    if args.backoff_max < args.backoff_base {
        return Err("--backoff-max: must not be shorter than --backoff-base".to_string());
    }
    if args.settle_delay.is_some_and(|d| d < args.http_timeout) {
        return Err("--settle-delay: must not be shorter than --http-timeout".to_string());
    }
    let settings = relay::Settings {
        database: db::Target::parse(&args.database_url)?,
        concurrency: args.concurrency as usize,
        lease: args.lease,
        backoff_base: args.backoff_base,
        backoff_max: args.backoff_max,
        max_attempts: args.max_attempts,
        poll_interval: args.poll_interval,
        http_timeout: args.http_timeout,
        settle_delay: args.settle_delay.unwrap_or(args.http_timeout * 2),
        once: args.once,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let metrics = metrics::Metrics::new();
        if let Some(addr) = args.listen {
            let window = (settings.poll_interval * 3).max(Duration::from_secs(30));
            metrics::serve(addr, metrics.clone(), window).await?;
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The handlers are installed here, before any work starts: a SIGTERM that arrives while
        // the relay is still connecting must stop it cleanly, not kill it.
        use tokio::signal::unix::{SignalKind, signal};
        let (mut term, mut int) = (
            signal(SignalKind::terminate()).map_err(|e| format!("installing SIGTERM: {e}"))?,
            signal(SignalKind::interrupt()).map_err(|e| format!("installing SIGINT: {e}"))?,
        );
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received: stopping");
            let _ = stop_tx.send(true);
        });
        Ok(relay::run(settings, api, metrics, args.listen.is_some(), stop_rx).await)
    })
}
