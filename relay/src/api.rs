//! The platform's internal status API, as the reference reaper uses it: read an execution's
//! status, mark it ERROR. Every answer is classified here; nothing else looks at HTTP.

use crate::config::ApiKey;
use crate::protocol::Cause;
use crate::recovery::StatusApi;
use std::time::{Duration, Instant};

/// Bodies larger than this are a failure, never read whole.
const MAX_BODY: usize = 1 << 20;
const NOT_FOUND_MARKER: &str = "WorkflowExecution not found";
const TERMINAL: [&str; 3] = ["COMPLETED", "STOPPED", "ERROR"];
const NON_TERMINAL: [&str; 2] = ["PENDING", "EXECUTING"];

/// Why a request did not give a usable answer. The label is the metric's `cause`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Status(u16, String),
    /// 429: the API sheds load; retry no earlier than its `Retry-After`, if it gave one.
    Throttled(Option<Duration>),
    /// No answer in time: the request may have been applied.
    Timeout,
    /// No connection (refused, DNS, TLS handshake): the request never left.
    Connect(String),
    /// The connection broke after the request may have left.
    Transport(String),
    /// No request can be made for this execution (an id too long for a URL, say).
    Request(String),
    Body(String),
    UnknownStatus(String),
}

impl Failure {
    pub fn cause(&self) -> Cause {
        match self {
            Failure::Status(401 | 403, _) => Cause::Unauthorized,
            Failure::Status(_, _) => Cause::HttpStatus,
            Failure::Throttled(_) => Cause::Throttled,
            Failure::Timeout => Cause::Timeout,
            Failure::Connect(_) => Cause::Connect,
            Failure::Transport(_) => Cause::Transport,
            Failure::Request(_) => Cause::BadRequest,
            Failure::Body(_) => Cause::BadBody,
            Failure::UnknownStatus(_) => Cause::UnknownStatus,
        }
    }

    /// Says nothing about this execution: the API, or the path to it, is down, sheds load or
    /// refuses the relay as a whole. Such failures never count toward --max-attempts. (A 500
    /// is the execution's own until the circuit sees it for many: see `circuit::STORM`.)
    pub fn is_systemic(&self) -> bool {
        matches!(
            self,
            Failure::Timeout
                | Failure::Connect(_)
                | Failure::Transport(_)
                | Failure::Throttled(_)
                | Failure::Status(401 | 403 | 502 | 503 | 504, _)
        )
    }

    /// How long the API asked to be left alone.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Throttled(after) => *after,
            _ => None,
        }
    }

    /// For an ERROR mark: the request may have reached the API though no answer came back.
    pub fn may_have_applied(&self) -> bool {
        matches!(self, Failure::Timeout | Failure::Transport(_))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Status(code, body) => write!(f, "HTTP {code}: {body}"),
            Failure::Throttled(Some(after)) => {
                write!(f, "HTTP 429: retry after {}s", after.as_secs())
            }
            Failure::Throttled(None) => f.write_str("HTTP 429"),
            Failure::Timeout => f.write_str("timed out"),
            Failure::Connect(e) => write!(f, "connection failed: {e}"),
            Failure::Transport(e) => write!(f, "connection broken: {e}"),
            Failure::Request(e) => write!(f, "cannot make the request: {e}"),
            Failure::Body(e) => write!(f, "unusable response body: {e}"),
            Failure::UnknownStatus(s) => write!(f, "unknown execution status {s:?}"),
        }
    }
}

/// What a status read says about an execution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Execution {
    /// 404 `WorkflowExecution not found`.
    Gone,
    Terminal(String),
    NonTerminal(String),
    /// A 2xx without a status: nothing can be concluded.
    Indeterminate,
}

/// What an ERROR mark achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mark {
    Marked,
    /// `{"status": "skipped"}`: the execution turned terminal meanwhile.
    AlreadyFinal,
}

pub struct Api {
    client: reqwest::Client,
    base: reqwest::Url,
    key: ApiKey,
}

/// The message the ERROR mark carries, by the barrier's `remaining` read under the row lock.
pub fn stranded_message(remaining: Option<i32>) -> String {
    let reason = match remaining {
        Some(n) if n > 0 => format!(
            "{n} file batch(es) never completed before the barrier expired (worker crash / lost task)."
        ),
        Some(0) => "all file batches completed but the final aggregating callback never fired \
                    before the barrier expired."
            .to_string(),
        _ => "the barrier was already torn down (remaining < 0) yet the execution was left \
              non-terminal — inconsistent state."
            .to_string(),
    };
    format!("[reaper-recovery] Execution stranded: {reason}")
}

/// Reads `execution.status`, falling back to a top-level `status`.
pub fn classify_status(body: &[u8]) -> Result<Execution, Failure> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| Failure::Body(format!("not JSON: {e}")))?;
    let status = json
        .get("execution")
        .and_then(|e| e.get("status"))
        .filter(|s| !s.is_null())
        .or_else(|| json.get("status").filter(|s| !s.is_null()));
    let Some(status) = status else {
        return Ok(Execution::Indeterminate);
    };
    let Some(status) = status.as_str() else {
        return Err(Failure::Body(format!("status is not a string: {status}")));
    };
    if TERMINAL.contains(&status) {
        Ok(Execution::Terminal(status.to_string()))
    } else if NON_TERMINAL.contains(&status) {
        Ok(Execution::NonTerminal(status.to_string()))
    } else {
        Err(Failure::UnknownStatus(status.to_string()))
    }
}

impl Api {
    pub fn new(
        base: &str,
        key: ApiKey,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Api, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("pg-reaper-relay/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            let pem = std::fs::read(path)
                .map_err(|e| format!("--api-ca-file: cannot read {}: {e}", path.display()))?;
            // Parsed here: reqwest would take a file without any certificate in silence.
            let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| format!("--api-ca-file: {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "--api-ca-file: {} holds no PEM certificate",
                    path.display()
                ));
            }
            for cert in certs {
                let ca = reqwest::Certificate::from_der(&cert)
                    .map_err(|e| format!("--api-ca-file: {}: {e}", path.display()))?;
                builder = builder.add_root_certificate(ca);
            }
        }
        let client = builder
            .build()
            .map_err(|e| format!("--api-base-url: cannot build the HTTP client: {e}"))?;
        let base = reqwest::Url::parse(base)
            .map_err(|e| format!("--api-base-url: '{base}' is not a URL: {e}"))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!(
                "--api-base-url: '{base}' is not an http:// or https:// URL"
            ));
        }
        Ok(Api { client, base, key })
    }

    /// `{base}/v1/workflow-execution/{id}/{action}/`, the id one percent-encoded path segment.
    /// An id the URL cannot carry as itself gets no request at all: `.` and `..` (every URL
    /// parser resolves them, encoded or not) and ids with a tab, newline or carriage return
    /// (the URL standard drops those, so `"a\tb"` would ask about `ab`, another execution).
    /// The segment is decoded back and compared, so no other rule of the standard can slip by.
    fn url(&self, execution_id: &str, action: Option<&str>) -> Result<reqwest::Url, Failure> {
        let refuse = || {
            Failure::Request(format!(
                "execution id {execution_id:?} cannot be a URL path segment as itself"
            ))
        };
        if matches!(execution_id, "." | "..") {
            return Err(refuse());
        }
        let mut url = self.base.clone();
        let kept = url
            .path_segments()
            .map_or(0, |s| s.filter(|s| !s.is_empty()).count());
        url.path_segments_mut()
            .map_err(|()| Failure::Request("the API base URL cannot take a path".into()))?
            .pop_if_empty()
            .extend(["v1", "workflow-execution", execution_id])
            .extend(action)
            .push("");
        let sent = url.path_segments().and_then(|mut s| s.nth(kept + 2));
        let decoded = sent.map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy());
        if decoded.as_deref() != Some(execution_id) {
            return Err(refuse());
        }
        Ok(url)
    }

    /// Sends one request; its answer (code, headers' Retry-After, body) or its failure, and
    /// in both cases how long it took.
    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        org: &str,
    ) -> (Result<Answer, Failure>, Duration) {
        let started = Instant::now();
        let answer = async {
            let response = request
                .bearer_auth(self.key.expose())
                .header("X-Organization-ID", org)
                .send()
                .await
                .map_err(transport_failure)?;
            let code = response.status().as_u16();
            if code == 429 {
                return Err(Failure::Throttled(retry_after(response.headers())));
            }
            let body = read_limited(response).await?;
            Ok(Answer { code, body })
        }
        .await;
        (answer, started.elapsed())
    }
}

impl StatusApi for Api {
    /// `GET {base}/v1/workflow-execution/{id}/?file_execution=false`, and the request's
    /// duration. Without the parameter the platform's API adds every file execution of the
    /// run to the answer: megabytes for a large run, over the body limit.
    async fn status(
        &self,
        execution_id: &str,
        org: &str,
    ) -> (Result<Execution, Failure>, Duration) {
        let url = match self.url(execution_id, None) {
            Ok(url) => url,
            Err(f) => return (Err(f), Duration::ZERO),
        };
        let request = self.client.get(url).query(&[("file_execution", "false")]);
        let (answer, took) = self.send(request, org).await;
        let status = answer.and_then(|Answer { code, body }| {
            if (200..300).contains(&code) {
                classify_status(&body)
            } else if code == 404 && String::from_utf8_lossy(&body).contains(NOT_FOUND_MARKER) {
                Ok(Execution::Gone)
            } else {
                Err(Failure::Status(code, snippet(&body)))
            }
        });
        (status, took)
    }

    /// `POST {base}/v1/workflow-execution/{id}/update_status/` with status ERROR, carrying
    /// `idempotency_key` so that an API that honours the header applies a repeat once.
    async fn mark_error(
        &self,
        execution_id: &str,
        org: &str,
        message: &str,
        idempotency_key: &str,
    ) -> (Result<Mark, Failure>, Duration) {
        let body = serde_json::json!({
            "status": "ERROR",
            "error_message": message,
            "cascade_terminal_files": true,
        });
        let url = match self.url(execution_id, Some("update_status")) {
            Ok(url) => url,
            Err(f) => return (Err(f), Duration::ZERO),
        };
        let request = self
            .client
            .post(url)
            .header("Idempotency-Key", idempotency_key)
            .json(&body);
        let (answer, took) = self.send(request, org).await;
        let mark = answer.and_then(|Answer { code, body }| {
            if !(200..300).contains(&code) {
                return Err(Failure::Status(code, snippet(&body)));
            }
            let skipped = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .is_some_and(|v| v.get("status").and_then(|s| s.as_str()) == Some("skipped"));
            Ok(if skipped {
                Mark::AlreadyFinal
            } else {
                Mark::Marked
            })
        });
        (mark, took)
    }
}

/// A response that came back whole.
struct Answer {
    code: u16,
    body: Vec<u8>,
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3); anything else is ignored.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Bytes a header token carries as they are (RFC 3986's unreserved); the rest is encoded.
const TOKEN: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The `Idempotency-Key` of an intent's ERROR mark: the same on every attempt of that intent,
/// different for another intent (or another database's intent of the same execution).
pub fn idempotency_key(intent_id: i64, execution_id: &str) -> String {
    const SHOWN: usize = 128;
    let id = percent_encoding::utf8_percent_encode(execution_id, TOKEN).to_string();
    if id.len() <= SHOWN {
        format!("pg-reaper-{intent_id}-{id}")
    } else {
        // Header lines are bounded; the intent id alone is unique within a database.
        format!(
            "pg-reaper-{intent_id}-{}-{}",
            &id[..SHOWN],
            execution_id.len()
        )
    }
}

fn transport_failure(e: reqwest::Error) -> Failure {
    if e.is_timeout() {
        return Failure::Timeout;
    }
    let (connect, builder) = (e.is_connect(), e.is_builder());
    // The whole cause chain ("…: invalid peer certificate: UnknownIssuer"), without the URL:
    // it holds nothing secret, but keeps the line short.
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if builder {
        Failure::Request(message)
    } else if connect {
        Failure::Connect(message)
    } else {
        Failure::Transport(message)
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, Failure> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Failure::Body(format!("larger than {MAX_BODY} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The start of a body, for an error message.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_comes_from_execution_then_top_level() {
        assert_eq!(
            classify_status(br#"{"execution": {"status": "EXECUTING"}, "status": "COMPLETED"}"#),
            Ok(Execution::NonTerminal("EXECUTING".into()))
        );
        assert_eq!(
            classify_status(br#"{"status": "STOPPED"}"#),
            Ok(Execution::Terminal("STOPPED".into()))
        );
        assert_eq!(
            classify_status(br#"{"execution": {"status": null}}"#),
            Ok(Execution::Indeterminate)
        );
        assert_eq!(classify_status(br#"{}"#), Ok(Execution::Indeterminate));
        assert_eq!(
            classify_status(br#"{"status": "WEIRD"}"#),
            Err(Failure::UnknownStatus("WEIRD".into()))
        );
        assert!(matches!(classify_status(b"<html>"), Err(Failure::Body(_))));
        assert!(matches!(
            classify_status(br#"{"status": 3}"#),
            Err(Failure::Body(_))
        ));
    }

    #[test]
    fn messages_are_the_references() {
        assert_eq!(
            stranded_message(Some(3)),
            "[reaper-recovery] Execution stranded: 3 file batch(es) never completed before the barrier expired (worker crash / lost task)."
        );
        assert_eq!(
            stranded_message(Some(0)),
            "[reaper-recovery] Execution stranded: all file batches completed but the final aggregating callback never fired before the barrier expired."
        );
        assert_eq!(
            stranded_message(Some(-1)),
            "[reaper-recovery] Execution stranded: the barrier was already torn down (remaining < 0) yet the execution was left non-terminal — inconsistent state."
        );
    }

    fn api(base: &str) -> Api {
        Api::new(base, ApiKey("k".into()), Duration::from_secs(1), None).expect("api")
    }

    #[test]
    fn urls_hold_the_id_as_one_segment() {
        for base in ["http://h:8000/internal", "http://h:8000/internal/"] {
            let api = api(base);
            assert_eq!(
                api.url("a/b?c#d %", None).map(String::from),
                Ok("http://h:8000/internal/v1/workflow-execution/a%2Fb%3Fc%23d%20%25/".into())
            );
            assert_eq!(
                api.url("e1", Some("update_status")).map(String::from),
                Ok("http://h:8000/internal/v1/workflow-execution/e1/update_status/".into())
            );
        }
        for base in ["http://h/", "http://h/internal", "http://h/a/b/"] {
            for unsendable in [".", "..", "a\tb", "ctl\x01\n", "x\r", "\n"] {
                assert!(
                    matches!(api(base).url(unsendable, None), Err(Failure::Request(_))),
                    "{base} {unsendable:?}"
                );
            }
            // Other control characters and anything else are carried, encoded.
            for sendable in ["ctl\x01", "a b", "%2F", "é", "\x7f"] {
                assert!(
                    api(base).url(sendable, Some("update_status")).is_ok(),
                    "{sendable:?}"
                );
            }
        }
        assert!(Api::new("ftp://h/", ApiKey("k".into()), Duration::from_secs(1), None).is_err());
    }

    #[test]
    fn idempotency_keys_are_header_safe() {
        assert_eq!(idempotency_key(7, "e-1"), "pg-reaper-7-e-1");
        assert_eq!(idempotency_key(7, "a b/é"), "pg-reaper-7-a%20b%2F%C3%A9");
    }

    /// Random bodies never panic the classifier: each is a status or a failure.
    #[test]
    fn arbitrary_bodies_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let pieces: [&[u8]; 12] = [
            b"{",
            b"}",
            b"\"status\"",
            b":",
            b"\"EXECUTING\"",
            b"null",
            b"[",
            b"]",
            b",",
            b"\"execution\"",
            b"\xff",
            b"1e999",
        ];
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..(x % 12) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                body.extend_from_slice(pieces[(x % 12) as usize]);
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let _ = classify_status(&body);
        }
    }
}
