//! pg-reaper-sample-api: a development stand-in for the platform's internal status API, for
//! tests and `make run`. It implements the two endpoints the relay calls over an in-memory set
//! of executions, answering as the platform's API does on everything the relay can observe
//! (docs/compatibility.md lists it): the `/internal/` mount, the bearer key and its 401
//! bodies, routes whose id may not hold a `.`, X-Organization-ID scoping, 404 `WorkflowExecution
//! not found`, 500 for a status update of an unknown execution, the `already_final` guard for
//! executions that carry a queue message, and file executions listed unless
//! `?file_execution=false`. It records every call and can inject faults. Production points the
//! relay at the platform's real API instead.
//!
//! `--tls-cert FILE --tls-key FILE` serves HTTPS instead (PEM chain, PKCS#8 key).
//! `--faults JSON` starts with these faults in force (as `POST /_admin/faults` would set them),
//! so that not one request is answered without them.
//!
//! Admin endpoints (same bearer key):
//!   PUT  /_admin/executions/{id}   {"organization_id": "...", "status": "EXECUTING"}
//!   POST /_admin/executions        {"id": {"organization_id": "...", "status": "..."}, ...}
//!   GET  /_admin/executions        every execution with its status and ERROR-mark count
//!   GET  /_admin/calls             every recorded /v1 call (method, path, headers, body)
//!   POST /_admin/faults            {"fail_status": 503, "fail_count": 5, "delay_ms": 5,
//!                                   "get_delay_ms": 0, "post_delay_ms": 0,
//!                                   "apply_delay_ms": 0, "fail_ids": [], "fail_ids_status": 500,
//!                                   "missing_status": false, "pad_bytes": 0,
//!                                   "retry_after": null}
//!     retry_after: a failure answered with fail_status carries `Retry-After: <seconds>`.
//!     fail_ids: requests about these executions answer fail_ids_status, every time;
//!     apply_delay_ms: an ERROR mark is applied this long after it arrived, whether or not the
//!     caller still waits for the answer (a slow database behind the API).
//!   POST /_admin/reset             forget calls and faults

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Serialize, Deserialize)]
struct Execution {
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

#[derive(Clone, Default, Serialize, Deserialize)]
struct Faults {
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
struct State {
    executions: BTreeMap<String, Execution>,
    calls: Vec<Call>,
    faults: Faults,
}

type Shared = Arc<Mutex<State>>;

fn reply(code: u16, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() =
        hyper::StatusCode::from_u16(code).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

async fn handle(req: Request<Incoming>, state: Shared, key: Arc<String>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let with_files = !query.as_deref().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv.eq_ignore_ascii_case("file_execution=false"))
    });
    let authorization = header(&req, "authorization");
    let organization = header(&req, "x-organization-id");
    let content_type = header(&req, "content-type");
    let idempotency_key = header(&req, "idempotency-key");
    let bytes = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if let Some(rest) = path.strip_prefix("/_admin/") {
        if authorization.as_deref() != Some(&format!("Bearer {key}")) {
            return reply(
                401,
                json!({"error": "the admin endpoints take the same bearer key"}),
            );
        }
        return admin(&method, rest, body, &state);
    }
    // The platform's API is mounted at /internal/, behind its service-key middleware.
    if !path.starts_with("/internal/") {
        return not_found_page();
    }
    if let Some(refused) = unauthorized(authorization.as_deref(), &key) {
        return refused;
    }
    // The router's id pattern is [^/.]+: an id with a dot matches no route.
    let Some(tail) = path.strip_prefix("/internal/v1/workflow-execution/") else {
        return not_found_page();
    };
    let (id, action) = match tail.split_once('/') {
        Some((id, action)) => (id.to_string(), action.trim_end_matches('/').to_string()),
        None => (tail.to_string(), String::new()),
    };
    if id.is_empty() || id.contains('.') || !matches!(action.as_str(), "" | "update_status") {
        return not_found_page();
    }
    let (delay, fail, apply_delay, retry_after) = {
        let Ok(mut s) = state.lock() else {
            return reply(500, json!({"error": "state poisoned"}));
        };
        let at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        s.calls.push(Call {
            at_ms,
            method: method.to_string(),
            path: path.clone(),
            query,
            authorization,
            organization: organization.clone(),
            content_type,
            idempotency_key,
            body: body.clone(),
        });
        let f = &mut s.faults;
        let delay = f.delay_ms
            + match method {
                Method::GET => f.get_delay_ms,
                Method::POST => f.post_delay_ms,
                _ => 0,
            };
        let fail = match f.fail_status {
            _ if f.fail_ids.contains(&id) => Some(f.fail_ids_status.unwrap_or(500)),
            Some(code) if f.fail_count > 0 => {
                f.fail_count -= 1;
                Some(code)
            }
            _ => None,
        };
        (delay, fail, f.apply_delay_ms, f.retry_after)
    };
    if method == Method::POST && action == "update_status" && fail.is_none() && apply_delay > 0 {
        // Applied later by a task of its own: a caller that gave up does not cancel it.
        let (state, id, organization, body) = (state.clone(), id.clone(), organization, body);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(apply_delay)).await;
            let _ = update_status(&state, &id, organization.as_deref(), &body);
        });
        tokio::time::sleep(Duration::from_millis(delay)).await;
        return reply(200, json!({"status": "accepted"}));
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Some(code) = fail {
        let mut r = reply(code, json!({"error": "injected fault"}));
        if let Some(after) = retry_after {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(after),
            );
        }
        return r;
    }
    match (&method, action.as_str()) {
        (&Method::GET, "") => read_status(&state, &id, organization.as_deref(), with_files),
        (&Method::POST, "update_status") => {
            let (code, body) = update_status(&state, &id, organization.as_deref(), &body);
            reply(code, body)
        }
        _ => reply(405, json!({"error": "method not allowed"})),
    }
}

/// Django's production 404 page for a path that matches no route.
fn not_found_page() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(
        b"<!doctype html>\n<html lang=\"en\">\n<head>\n  <title>Not Found</title>\n</head>\n\
          <body>\n  <h1>Not Found</h1><p>The requested resource was not found on this server.</p>\n\
          </body>\n</html>\n",
    )));
    *r.status_mut() = hyper::StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// The platform's internal-API middleware: its 401 answers, or None when the key is right.
fn unauthorized(authorization: Option<&str>, key: &str) -> Option<Response<Full<Bytes>>> {
    let refuse = |error: &str, detail: String| {
        Some(reply(
            401,
            json!({"error": error, "detail": detail, "debug_info": {}}),
        ))
    };
    match authorization {
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
        Some(h) if h["Bearer ".len()..] != *key => refuse(
            "Invalid internal service API key",
            "API key does not match configured value".to_string(),
        ),
        Some(_) => None,
    }
}

fn read_status(
    state: &Shared,
    id: &str,
    organization: Option<&str>,
    with_files: bool,
) -> Response<Full<Bytes>> {
    let Ok(s) = state.lock() else {
        return reply(500, json!({"error": "state poisoned"}));
    };
    let Some(execution) = s.executions.get(id) else {
        return reply(404, json!({"error": "WorkflowExecution not found"}));
    };
    if organization != Some(execution.organization_id.as_str()) {
        // Scoped out: the platform answers 500, not 404.
        return reply(
            500,
            json!({"error": "Failed to retrieve workflow execution"}),
        );
    }
    if s.faults.missing_status {
        return reply(200, json!({"execution": {"id": id}}));
    }
    let pad = "x".repeat(s.faults.pad_bytes);
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

/// Applies a status update; the answer's code and body.
fn update_status(
    state: &Shared,
    id: &str,
    organization: Option<&str>,
    body: &Value,
) -> (u16, Value) {
    let Ok(mut s) = state.lock() else {
        return (500, json!({"error": "state poisoned"}));
    };
    // An unknown or scoped-out execution ends in the platform's generic 500 here.
    let failed = || {
        (
            500,
            json!({"error": "Failed to update workflow execution status",
                   "detail": "WorkflowExecution matching query does not exist."}),
        )
    };
    let Some(execution) = s.executions.get_mut(id) else {
        return failed();
    };
    if organization != Some(execution.organization_id.as_str()) {
        return failed();
    }
    let Some(status) = body.get("status").and_then(Value::as_str) else {
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
        execution.error_message = body
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

fn admin(method: &Method, rest: &str, body: Value, state: &Shared) -> Response<Full<Bytes>> {
    let Ok(mut s) = state.lock() else {
        return reply(500, json!({"error": "state poisoned"}));
    };
    match (method, rest) {
        (&Method::GET, "executions") => reply(200, json!(s.executions)),
        (&Method::POST, "executions") => {
            match serde_json::from_value::<BTreeMap<String, Execution>>(body) {
                Ok(many) => {
                    let n = many.len();
                    s.executions.extend(many);
                    reply(200, json!({"created": n}))
                }
                Err(e) => reply(400, json!({"error": e.to_string()})),
            }
        }
        (&Method::GET, "calls") => reply(200, json!(s.calls)),
        (&Method::POST, "faults") => match serde_json::from_value::<Faults>(body) {
            Ok(f) => {
                s.faults = f;
                reply(200, json!(s.faults))
            }
            Err(e) => reply(400, json!({"error": e.to_string()})),
        },
        (&Method::POST, "reset") => {
            s.calls.clear();
            s.faults = Faults::default();
            reply(200, json!({}))
        }
        (&Method::PUT, path) if path.starts_with("executions/") => {
            let id = path["executions/".len()..]
                .trim_end_matches('/')
                .to_string();
            match serde_json::from_value::<Execution>(body) {
                Ok(e) => {
                    s.executions.insert(id, e);
                    reply(200, json!({}))
                }
                Err(e) => reply(400, json!({"error": e.to_string()})),
            }
        }
        _ => reply(404, json!({"error": "no such admin endpoint"})),
    }
}

/// The TLS acceptor for `--tls-cert` / `--tls-key` (PEM certificate chain, PKCS#8 key).
fn tls_acceptor(cert: &str, key: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .unwrap_or_else(|e| fail(&format!("--tls-cert: cannot read {cert}: {e}")));
    let key = PrivateKeyDer::from_pem_file(key)
        .unwrap_or_else(|e| fail(&format!("--tls-key: cannot read {key}: {e}")));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
    .unwrap_or_else(|e| fail(&format!("--tls-cert / --tls-key: {e}")));
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Serves one connection (plain or TLS) until the client closes it.
async fn serve<S>(io: S, state: Shared, key: Arc<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let (state, key) = (state.clone(), key.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(req, state, key).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

#[derive(clap::Parser)]
#[command(
    name = "pg-reaper-sample-api",
    version,
    about = "A development stand-in for the platform's internal status API"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: SocketAddr,
    /// File holding the bearer key; or set PG_REAPER_API_KEY.
    #[arg(long, env = "PG_REAPER_API_KEY_FILE")]
    api_key_file: Option<String>,
    /// PEM certificate chain: serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<String>,
    /// PEM PKCS#8 key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<String>,
    /// Faults in force from the start, as POST /_admin/faults sets them (JSON).
    #[arg(long, value_parser = parse_faults)]
    faults: Option<Faults>,
}

fn parse_faults(v: &str) -> Result<Faults, String> {
    serde_json::from_str(v).map_err(|e| format!("not a faults object: {e}"))
}

fn main() {
    let Args {
        listen,
        api_key_file: key_file,
        tls_cert,
        tls_key,
        faults,
    } = <Args as clap::Parser>::parse();
    let faults = faults.unwrap_or_default();
    let key = match key_file {
        Some(path) => std::fs::read_to_string(&path)
            .unwrap_or_else(|e| fail(&format!("--api-key-file: cannot read {path}: {e}"))),
        None => std::env::var("PG_REAPER_API_KEY")
            .unwrap_or_else(|_| fail("--api-key-file: required (or set PG_REAPER_API_KEY)")),
    };
    let key = Arc::new(key.trim_end_matches(['\n', '\r']).to_string());
    let tls = tls_cert
        .zip(tls_key)
        .map(|(cert, key)| tls_acceptor(&cert, &key));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| fail(&format!("--listen: cannot bind {listen}: {e}")));
        let scheme = if tls.is_some() { "https" } else { "http" };
        eprintln!(
            "sample status API listening on {scheme}://{}",
            listener
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default()
        );
        let state: Shared = Arc::new(Mutex::new(State {
            faults,
            ..State::default()
        }));
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (state, key, tls) = (state.clone(), key.clone(), tls.clone());
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(stream) = acceptor.accept(stream).await {
                            serve(stream, state, key).await;
                        }
                    }
                    None => serve(stream, state, key).await,
                }
            });
        }
    });
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}
