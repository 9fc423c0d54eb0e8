//! Flags and their environment twins. The API key is read from a file or the
//! environment only, never from the command line, and never printed.

use clap::Parser;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A duration longer than zero, in humantime's words (`250ms`, `5s`, `2m`, `1h 30m`) or as
/// bare seconds (`120`), the way the platform writes its own settings.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let d = match text.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => humantime::parse_duration(text).map_err(|e| {
            format!("'{s}' is not a duration ({e}; use e.g. 250ms, 5s, 2m, or 120 for seconds)")
        })?,
    };
    if d.is_zero() {
        return Err(format!("'{s}' must be longer than zero"));
    }
    Ok(d)
}

#[derive(Parser)]
#[command(
    name = "pg-reaper-relay",
    version,
    about = "Drains pg_reaper's outbox of recovery intents into the platform's internal status API"
)]
pub struct Args {
    /// Postgres connection string (libpq URL or key=value) of the database with pg_reaper (else
    /// built from the platform's DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME).
    #[arg(long, env = "PG_REAPER_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Base URL of the internal API, e.g. http://backend:8000/internal (else the platform's
    /// INTERNAL_API_BASE_URL).
    #[arg(long, env = "PG_REAPER_API_BASE_URL")]
    pub api_base_url: Option<String>,
    /// File holding the API key (a trailing newline is ignored); or set PG_REAPER_API_KEY
    /// (else the platform's INTERNAL_SERVICE_API_KEY).
    #[arg(long, env = "PG_REAPER_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// PEM file of the CA that signs the API's certificate (for https:// with a private CA).
    #[arg(long, env = "PG_REAPER_API_CA_FILE")]
    pub api_ca_file: Option<PathBuf>,
    /// Intents worked on at once.
    #[arg(long, env = "PG_REAPER_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// Timeout of one HTTP request.
    #[arg(long, env = "PG_REAPER_HTTP_TIMEOUT", default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub http_timeout: Duration,
    /// How long a claimed intent is ours before other relays may take it.
    #[arg(long, env = "PG_REAPER_LEASE", default_value = "60s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub lease: Duration,
    /// First retry delay; doubled per attempt, with jitter.
    #[arg(long, env = "PG_REAPER_BACKOFF_BASE", default_value = "1s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub backoff_base: Duration,
    /// Longest retry delay.
    #[arg(long, env = "PG_REAPER_BACKOFF_MAX", default_value = "300s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub backoff_max: Duration,
    /// After an ERROR mark that got no answer (timeout, broken connection), how long to wait
    /// before reading the status again: the API may still apply it. Default: 2 × --http-timeout.
    #[arg(long, env = "PG_REAPER_SETTLE_DELAY", value_parser = parse_duration, allow_hyphen_values = true)]
    pub settle_delay: Option<Duration>,
    /// Failures about an execution before its intent goes dead (kept, replayable with
    /// outbox_replay()). Systemic failures (the API unreachable) never count.
    #[arg(long, env = "PG_REAPER_MAX_ATTEMPTS", default_value_t = 20, value_parser = clap::value_parser!(i32).range(1..))]
    pub max_attempts: i32,
    /// Time between outbox polls when no NOTIFY arrives.
    #[arg(long, env = "PG_REAPER_POLL_INTERVAL", default_value = "5s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub poll_interval: Duration,
    /// host:port to serve /metrics and /healthz on (off when unset).
    #[arg(long, env = "PG_REAPER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Drive the extension-free edition: run one tick of its reaping (pg_reaper_tick()) this
    /// often; with --once, one tick before the pass. Any number of relays may: one ticks at a
    /// time, the others skip. Not for the native extension, whose background worker reaps.
    #[arg(long, env = "PG_REAPER_REAP_INTERVAL", value_parser = parse_duration, allow_hyphen_values = true)]
    pub reap_interval: Option<Duration>,
    /// Drain every intent that is due, then exit.
    #[arg(long)]
    pub once: bool,
}

/// Reports a command-line error on one first line that names the flag, then exits 2 (help and
/// version go to stdout with exit 0, as usual).
pub fn exit_on_bad_flags(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ErrorKind};
    if e.kind() == ErrorKind::MissingRequiredArgument {
        let missing: Vec<String> = match e.get(ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::Strings(v)) => v.clone(),
            _ => Vec::new(),
        };
        let names: Vec<&str> = missing
            .iter()
            .filter_map(|m| m.split_whitespace().next())
            .collect();
        eprintln!(
            "error: {} is required (a flag or its environment variable, see --help)",
            names.join(", ")
        );
        std::process::exit(2);
    }
    e.exit()
}

/// The API key. Its Debug and Display never show it.
#[derive(Clone)]
pub struct ApiKey(pub(crate) String);

impl ApiKey {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The platform's own variables, read when pg_reaper's are unset (pg_reaper's win), so that the
/// relay can share the platform's env files.
const PLATFORM_BASE_URL: &str = "INTERNAL_API_BASE_URL";
const PLATFORM_KEY: &str = "INTERNAL_SERVICE_API_KEY";

/// `--database-url` (or `PG_REAPER_DATABASE_URL`), else a key=value string from the platform's
/// `DB_HOST` (required then), `DB_PORT`, `DB_USER`, `DB_PASSWORD` and `DB_NAME`.
pub fn database_url(args: &Args) -> Result<String, String> {
    match &args.database_url {
        Some(url) => Ok(url.clone()),
        None => database_url_from(env),
    }
}

/// The key=value connection string from the platform's DB_* variables, as `var` reads them.
fn database_url_from(var: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let Some(host) = var("DB_HOST") else {
        return Err(
            "--database-url is required (a flag, PG_REAPER_DATABASE_URL, or the platform's \
             DB_HOST with DB_PORT, DB_USER, DB_PASSWORD and DB_NAME)"
                .to_string(),
        );
    };
    // key=value syntax: a value in single quotes, with \ and ' escaped.
    let quoted = |v: String| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut parts = vec![format!("host={}", quoted(host))];
    for (key, name) in [
        ("port", "DB_PORT"),
        ("user", "DB_USER"),
        ("password", "DB_PASSWORD"),
        ("dbname", "DB_NAME"),
    ] {
        if let Some(v) = var(name) {
            parts.push(format!("{key}={}", quoted(v)));
        }
    }
    Ok(parts.join(" "))
}

/// A variable that is set and not empty.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `--api-base-url` (or `PG_REAPER_API_BASE_URL`), else the platform's `INTERNAL_API_BASE_URL`.
pub fn api_base_url(args: &Args) -> Result<String, String> {
    args.api_base_url
        .clone()
        .or_else(|| env(PLATFORM_BASE_URL))
        .ok_or_else(|| {
            format!(
                "--api-base-url is required (a flag, PG_REAPER_API_BASE_URL or the platform's \
                 {PLATFORM_BASE_URL})"
            )
        })
}

/// The key from `--api-key-file`, else from `PG_REAPER_API_KEY`, else from the platform's
/// `INTERNAL_SERVICE_API_KEY`.
pub fn api_key(args: &Args) -> Result<ApiKey, String> {
    let key = match &args.api_key_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("--api-key-file: cannot read {}: {e}", path.display()))?,
        None => env("PG_REAPER_API_KEY")
            .or_else(|| env(PLATFORM_KEY))
            .ok_or_else(|| {
                format!(
                    "--api-key-file: required (or set PG_REAPER_API_KEY, or the platform's \
                     {PLATFORM_KEY}, to the key itself)"
                )
            })?,
    };
    let key = key.strip_suffix('\n').unwrap_or(&key);
    let key = key.strip_suffix('\r').unwrap_or(key);
    if key.is_empty() {
        return Err("--api-key-file: the API key is empty".to_string());
    }
    Ok(ApiKey(key.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        // The platform's INTERNAL_API_TIMEOUT=120 is seconds.
        assert_eq!(parse_duration("120"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration(" 5 "), Ok(Duration::from_secs(5)));
        for bad in ["s", "-1s", "-1", "5 parsecs", "", "0s", "0", "1.5"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_platforms_db_variables_make_a_quoted_connection_string() {
        let vars = |name: &str| {
            match name {
                "DB_HOST" => Some("unstract-db"),
                "DB_PORT" => Some("5432"),
                "DB_USER" => Some("unstract_dev"),
                "DB_PASSWORD" => Some(r"it's a \ secret"),
                _ => None,
            }
            .map(str::to_string)
        };
        assert_eq!(
            database_url_from(vars),
            Ok(
                r"host='unstract-db' port='5432' user='unstract_dev' password='it\'s a \\ secret'"
                    .to_string()
            )
        );
        assert!(database_url_from(|_| None).is_err());
        // What tokio-postgres reads back is the password as written.
        let config: tokio_postgres::Config = database_url_from(vars)
            .expect("a string")
            .parse()
            .expect("key=value");
        assert_eq!(config.get_password(), Some(r"it's a \ secret".as_bytes()));
    }

    #[test]
    fn the_key_never_prints() {
        let key = ApiKey("sekrit".to_string());
        assert!(!format!("{key:?}").contains("sekrit"));
    }
}
