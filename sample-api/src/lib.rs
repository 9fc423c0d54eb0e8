//! A development stand-in for the platform's internal status API, for tests and `make run`. It
//! serves the two endpoints the relay calls over an in-memory set of executions, answering as
//! the platform's API does on everything the relay can observe (docs/compatibility.md lists
//! it): the `/internal/` mount, the bearer key and its 401 bodies, routes whose id may not hold
//! a `.`, X-Organization-ID scoping, 404 `WorkflowExecution not found`, 500 for a status update
//! of an unknown execution, the `already_final` guard for executions that carry a queue
//! message, and file executions listed unless `?file_execution=false`. It records every call
//! and can inject faults. Production points the relay at the platform's real API instead.
//!
//! The tests start it in their own process ([`start`]); `make run` runs the binary.
//!
//! Admin endpoints (same bearer key):
//!
//! ```text
//! PUT  /_admin/executions/{id}   {"organization_id": "...", "status": "EXECUTING"}
//! POST /_admin/executions        {"id": {"organization_id": "...", "status": "..."}, ...}
//! GET  /_admin/executions        every execution with its status and ERROR-mark count
//! GET  /_admin/calls             every recorded /v1 call (method, path, headers, body)
//! POST /_admin/faults            {"fail_status": 503, "fail_count": 5, "retry_after": null,
//!                                 "delay_ms": 5, "get_delay_ms": 0, "post_delay_ms": 0,
//!                                 "apply_delay_ms": 0, "fail_ids": [], "fail_ids_status": 500,
//!                                 "missing_status": false, "pad_bytes": 0}
//! POST /_admin/reset             forget calls and faults
//! ```
//!
//! `fail_ids`: requests about these executions answer `fail_ids_status`, every time;
//! `retry_after`: a failure answered with `fail_status` carries `Retry-After: <seconds>`;
//! `apply_delay_ms`: an ERROR mark is applied this long after it arrived, whether or not the
//! caller still waits for the answer (a slow database behind the API).

use axum::body::Bytes;
use axum::extract::{OriginalUri, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Clone, Serialize, Deserialize)]
pub struct Execution {
    organization_id: String,
    status: String,
    #[serde(default)]
    error_marks: u32,
    #[serde(default)]
    error_message: Option<String>,
    /// Whether it runs on the Postgres queue transport (a queue message): only those get the
    /// `already_final` guard, as on the platform.
    #[serde(default = "yes")]
    queue_message: bool,
    /// How many file executions the run has: a status read lists them all (as the platform's
    /// API does) unless it asks `?file_execution=false`.
    #[serde(default)]
    file_executions: usize,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Serialize)]
struct Call {
    method: String,
    path: String,
    /// The query string, if any.
    query: Option<String>,
    authorization: Option<String>,
    organization: Option<String>,
    content_type: Option<String>,
    idempotency_key: Option<String>,
    body: Value,
    /// When the request arrived, in milliseconds since the Unix epoch.
    at_ms: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Faults {
    #[serde(default)]
    fail_status: Option<u16>,
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(default)]
    fail_count: u32,
    #[serde(default)]
    delay_ms: u64,
    #[serde(default)]
    get_delay_ms: u64,
    #[serde(default)]
    post_delay_ms: u64,
    #[serde(default)]
    apply_delay_ms: u64,
    #[serde(default)]
    fail_ids: Vec<String>,
    #[serde(default)]
    fail_ids_status: Option<u16>,
    #[serde(default)]
    missing_status: bool,
    /// Pads every status read with this many bytes (a body-size limit test).
    #[serde(default)]
    pad_bytes: usize,
}

#[derive(Default)]
struct World {
    executions: BTreeMap<String, Execution>,
    calls: Vec<Call>,
    faults: Faults,
}

#[derive(Clone)]
struct App {
    world: Arc<Mutex<World>>,
    key: Arc<String>,
}

impl App {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "pg-reaper-sample-api",
    version,
    about = "A development stand-in for the platform's internal status API"
)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// File holding the bearer key; or set PG_REAPER_API_KEY.
    #[arg(long, env = "PG_REAPER_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM PKCS#8 key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Faults in force from the start, as POST /_admin/faults sets them (JSON).
    #[arg(long, value_parser = parse_faults)]
    pub faults: Option<Faults>,
}

fn parse_faults(v: &str) -> Result<Faults, String> {
    serde_json::from_str(v).map_err(|e| format!("not a faults object: {e}"))
}

fn reply(code: u16, body: Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(body)).into_response()
}

/// Django's production 404 page for a path that matches no route.
async fn not_found_page() -> Response {
    (
        StatusCode::NOT_FOUND,
        Html(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n\
             <body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n\
             </body>\n</html>\n",
        ),
    )
        .into_response()
}

fn header_value(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn organization(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-organization-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The platform's internal-API middleware: its 401 answers before anything else.
async fn platform_key(State(app): State<App>, request: Request, next: Next) -> Response {
    let refuse = |error: &str, detail: String| {
        reply(
            401,
            json!({"error": error, "detail": detail, "debug_info": {}}),
        )
    };
    match header_value(request.headers(), header::AUTHORIZATION).as_deref() {
        None | Some("") => refuse(
            "Authorization header required for internal APIs",
            "Missing Authorization header".to_string(),
        ),
        Some(h) if !h.starts_with("Bearer ") => refuse(
            "Bearer token required for internal APIs",
            format!(
                "Invalid authorization format: {}...",
                h.chars().take(20).collect::<String>()
            ),
        ),
        Some(h) if h["Bearer ".len()..] != *app.key => refuse(
            "Invalid internal service API key",
            "API key does not match configured value".to_string(),
        ),
        Some(_) => next.run(request).await,
    }
}

/// The admin endpoints take the same bearer key.
async fn admin_key(State(app): State<App>, request: Request, next: Next) -> Response {
    let wanted = format!("Bearer {}", app.key);
    if header_value(request.headers(), header::AUTHORIZATION).as_deref() != Some(&wanted) {
        return reply(
            401,
            json!({"error": "the admin endpoints take the same bearer key"}),
        );
    }
    next.run(request).await
}

/// What a request about an execution asked for.
struct Asked {
    method: Method,
    id: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Value,
}

impl Asked {
    fn organization(&self) -> Option<String> {
        organization(&self.headers)
    }
}

/// What the faults in force do to one request: how long it waits before its answer, and the
/// answer a fault gives instead of the real one.
struct Faulted {
    delay: Duration,
    answer: Option<Response>,
}

impl Faulted {
    /// Waits out the delay; then the fault's answer, if any.
    async fn answer(self) -> Option<Response> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.answer
    }
}

/// Records the call and decides what the faults in force do to it.
fn faults(app: &App, asked: &Asked) -> Faulted {
    let mut w = app.world();
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    w.calls.push(Call {
        at_ms,
        method: asked.method.to_string(),
        path: asked.path.clone(),
        query: asked.query.clone(),
        authorization: header_value(&asked.headers, header::AUTHORIZATION),
        organization: asked.organization(),
        content_type: header_value(&asked.headers, header::CONTENT_TYPE),
        idempotency_key: asked
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        body: asked.body.clone(),
    });
    let f = &mut w.faults;
    let delay = f.delay_ms
        + match asked.method {
            Method::GET => f.get_delay_ms,
            Method::POST => f.post_delay_ms,
            _ => 0,
        };
    let fail = match f.fail_status {
        _ if f.fail_ids.contains(&asked.id) => Some(f.fail_ids_status.unwrap_or(500)),
        Some(code) if f.fail_count > 0 => {
            f.fail_count -= 1;
            Some(code)
        }
        _ => None,
    };
    let answer = fail.map(|code| {
        let mut r = reply(code, json!({"error": "injected fault"}));
        if let Some(after) = f.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(after));
        }
        r
    });
    Faulted {
        delay: Duration::from_millis(delay),
        answer,
    }
}

/// The router's id pattern is `[^/.]+`: an id with a dot matches no route.
fn asked(
    method: Method,
    id: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body: &Bytes,
) -> Option<Asked> {
    (!id.contains('.')).then(|| Asked {
        method,
        id,
        path,
        query,
        headers,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
    })
}

/// `GET …/workflow-execution/{id}/`
async fn read_status(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
) -> Response {
    let Some(asked) = asked(
        Method::GET,
        id,
        uri.path().to_string(),
        query,
        headers,
        &Bytes::new(),
    ) else {
        return not_found_page().await;
    };
    if let Some(fault) = faults(&app, &asked).answer().await {
        return fault;
    }
    let with_files = !asked.query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.eq_ignore_ascii_case("file_execution=false"))
    });
    let w = app.world();
    let Some(execution) = w.executions.get(&asked.id) else {
        return reply(404, json!({"error": "WorkflowExecution not found"}));
    };
    if asked.organization().as_deref() != Some(execution.organization_id.as_str()) {
        // Scoped out: the platform answers 500, not 404.
        return reply(
            500,
            json!({"error": "Failed to retrieve workflow execution"}),
        );
    }
    let id = &asked.id;
    if w.faults.missing_status {
        return reply(200, json!({"execution": {"id": id}}));
    }
    let pad = "x".repeat(w.faults.pad_bytes);
    let mut body = json!({"execution": {"id": id, "status": execution.status}, "pad": pad});
    if with_files {
        body["file_executions"] = (0..execution.file_executions)
            .map(|i| {
                json!({
                    "id": format!("{id}-file-{i:06}"),
                    "file_name": format!("document-{i:06}.pdf"),
                    "file_path": format!("/data/input/{id}/document-{i:06}.pdf"),
                    "status": "COMPLETED",
                    "execution_time": 1.5,
                    "error_message": null,
                })
            })
            .collect();
    }
    reply(200, body)
}

/// `POST …/workflow-execution/{id}/update_status/`
async fn mark(
    State(app): State<App>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    OriginalUri(uri): OriginalUri,
    body: Bytes,
) -> Response {
    let Some(asked) = asked(
        Method::POST,
        id,
        uri.path().to_string(),
        query,
        headers,
        &body,
    ) else {
        return not_found_page().await;
    };
    let apply_delay = app.world().faults.apply_delay_ms;
    let faulted = faults(&app, &asked);
    if apply_delay > 0 && faulted.answer.is_none() {
        // Applied later by a task of its own, counted from the request's arrival: a caller
        // that gave up does not cancel it, and a slow answer does not delay it.
        let (app, delay) = (app.clone(), faulted.delay);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(apply_delay)).await;
            let _ = update_status(&app, &asked);
        });
        tokio::time::sleep(delay).await;
        return reply(200, json!({"status": "accepted"}));
    }
    if let Some(fault) = faulted.answer().await {
        return fault;
    }
    let (code, body) = update_status(&app, &asked);
    reply(code, body)
}

async fn method_not_allowed() -> Response {
    reply(405, json!({"error": "method not allowed"}))
}

/// Applies a status update; the answer's code and body.
fn update_status(app: &App, asked: &Asked) -> (u16, Value) {
    let mut w = app.world();
    // An unknown or scoped-out execution ends in the platform's generic 500 here.
    let failed = || {
        (
            500,
            json!({"error": "Failed to update workflow execution status",
                   "detail": "WorkflowExecution matching query does not exist."}),
        )
    };
    let id = &asked.id;
    let organization = asked.organization();
    let Some(execution) = w.executions.get_mut(id) else {
        return failed();
    };
    if organization.as_deref() != Some(execution.organization_id.as_str()) {
        return failed();
    }
    let Some(status) = asked.body.get("status").and_then(Value::as_str) else {
        return (400, json!({"error": "status is required"}));
    };
    // The one-way guard, for executions on the queue transport only: a COMPLETED or STOPPED
    // one is never changed to another status.
    if execution.queue_message
        && ["COMPLETED", "STOPPED"].contains(&execution.status.as_str())
        && status != execution.status
    {
        return (
            200,
            json!({"status": "skipped", "reason": "already_final", "execution_id": id,
                   "new_status": execution.status}),
        );
    }
    if status == "ERROR" {
        execution.error_marks += 1;
        execution.error_message = asked
            .body
            .get("error_message")
            .and_then(Value::as_str)
            .map(str::to_string);
    }
    execution.status = status.to_string();
    (
        200,
        json!({"status": "updated", "execution_id": id, "new_status": status}),
    )
}

async fn list_executions(State(app): State<App>) -> Response {
    reply(200, json!(app.world().executions))
}

async fn add_executions(State(app): State<App>, body: Bytes) -> Response {
    match serde_json::from_slice::<BTreeMap<String, Execution>>(&body) {
        Ok(many) => {
            let n = many.len();
            app.world().executions.extend(many);
            reply(200, json!({"created": n}))
        }
        Err(e) => reply(400, json!({"error": e.to_string()})),
    }
}

async fn put_execution(State(app): State<App>, Path(id): Path<String>, body: Bytes) -> Response {
    match serde_json::from_slice::<Execution>(&body) {
        Ok(e) => {
            app.world().executions.insert(id, e);
            reply(200, json!({}))
        }
        Err(e) => reply(400, json!({"error": e.to_string()})),
    }
}

async fn calls(State(app): State<App>) -> Response {
    reply(200, json!(app.world().calls))
}

async fn set_faults(State(app): State<App>, body: Bytes) -> Response {
    match serde_json::from_slice::<Faults>(&body) {
        Ok(f) => {
            let mut w = app.world();
            w.faults = f;
            reply(200, json!(w.faults))
        }
        Err(e) => reply(400, json!({"error": e.to_string()})),
    }
}

async fn reset(State(app): State<App>) -> Response {
    let mut w = app.world();
    w.calls.clear();
    w.faults = Faults::default();
    reply(200, json!({}))
}

async fn no_admin_endpoint() -> Response {
    reply(404, json!({"error": "no such admin endpoint"}))
}

/// The whole API: the platform's two endpoints under `/internal/` behind its key middleware,
/// the admin endpoints, and Django's 404 page for everything else.
fn router(app: App) -> Router {
    let execution = "/v1/workflow-execution/{id}";
    let read = get(read_status).fallback(method_not_allowed);
    let update = post(mark).fallback(method_not_allowed);
    let internal = Router::new()
        .route(&format!("{execution}/"), read.clone())
        .route(execution, read)
        .route(&format!("{execution}/update_status/"), update.clone())
        .route(&format!("{execution}/update_status"), update)
        .fallback(not_found_page)
        .layer(middleware::from_fn_with_state(app.clone(), platform_key));
    let admin = Router::new()
        .route("/executions", get(list_executions).post(add_executions))
        .route("/executions/{id}", put(put_execution))
        .route("/calls", get(calls))
        .route("/faults", post(set_faults))
        .route("/reset", post(reset))
        .fallback(no_admin_endpoint)
        .layer(middleware::from_fn_with_state(app.clone(), admin_key))
        // A benchmark registers 100,000 executions in one call (axum's default: 2 MB).
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20));
    Router::new()
        .nest("/internal", internal)
        .nest("/_admin", admin)
        .fallback(not_found_page)
        .with_state(app)
}

/// The TLS acceptor for `--tls-cert` / `--tls-key` (PEM certificate chain, PKCS#8 key).
fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("--tls-cert: cannot read {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--tls-key: cannot read {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .map_err(|e| format!("--tls-cert / --tls-key: {e}"))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The key from `--api-key-file`, else `PG_REAPER_API_KEY`.
fn api_key(args: &Args) -> Result<String, String> {
    let key = match &args.api_key_file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("--api-key-file: cannot read {}: {e}", path.display()))?,
        None => std::env::var("PG_REAPER_API_KEY")
            .map_err(|_| "--api-key-file: required (or set PG_REAPER_API_KEY)".to_string())?,
    };
    Ok(key.trim_end_matches(['\n', '\r']).to_string())
}

/// A sample API serving on a runtime of its own. Dropping it (or [`Running::stop`]) ends it
/// as a killed process ends: the port closed, every connection cut, its state gone.
pub struct Running {
    pub addr: SocketAddr,
    pub scheme: &'static str,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Running {
    pub fn stop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves one connection (plain or TLS) until the client closes it.
async fn serve_connection<S>(io: S, service: Router)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(
            hyper_util::rt::TokioIo::new(io),
            hyper_util::service::TowerToHyperService::new(service),
        )
        .await;
}

/// Starts the API of `args`; an error names the flag at fault.
pub fn start(args: Args) -> Result<Running, String> {
    let key = Arc::new(api_key(&args)?);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let app = App {
        world: Arc::new(Mutex::new(World {
            faults: args.faults.clone().unwrap_or_default(),
            ..World::default()
        })),
        key,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(args.listen))
        .map_err(|e| format!("--listen: cannot bind {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("--listen: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let service = router(app);
    runtime.spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (service, tls) = (service.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve_connection(stream, service).await;
                        }
                    }
                    None => serve_connection(stream, service).await,
                }
            });
        }
    });
    Ok(Running {
        addr,
        scheme,
        runtime: Some(runtime),
    })
}
