//! The bundled sample API answers like the platform's internal API on everything the relay can
//! observe (docs/compatibility.md): checked here request by request, with no database.

mod common;

use common::{KEY, SampleApi};
use serde_json::json;

/// A sample API with a key file in a directory of its own (tests run in parallel).
fn api(name: &str) -> (SampleApi, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("pgr-sample-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let key = dir.join("api.key");
    std::fs::write(&key, format!("{KEY}\n")).expect("key");
    (SampleApi::start(&key, common::free_port()), dir)
}

#[test]
fn routes_keys_scoping_and_bodies_are_the_platforms() {
    let (api, dir) = api("routes");
    api.execution("e1", "org", "EXECUTING");
    let read = "/internal/v1/workflow-execution/e1/";
    let mark = "/internal/v1/workflow-execution/e1/update_status/";
    let error = json!({"status": "ERROR", "error_message": "x", "cascade_terminal_files": true});

    // The service key, and the middleware's 401 bodies.
    let (code, body) = api.request("GET", read, None, "wrong");
    assert_eq!(code, 401, "{body}");
    assert_eq!(
        body,
        json!({"error": "Invalid internal service API key",
               "detail": "API key does not match configured value", "debug_info": {}})
    );
    // Without any Authorization header.
    let (code, raw) = api.call("GET", read, None, None);
    assert_eq!(code, 401, "{raw}");
    assert!(
        raw.contains("Authorization header required for internal APIs"),
        "{raw}"
    );
    // Mounted at /internal/; ids with a dot match no route (Django's HTML 404, not the API's).
    for path in [
        "/v1/workflow-execution/e1/",
        "/internal/v1/workflow-execution/e.1/",
        "/internal/v1/workflow-execution/e1/unknown_action/",
    ] {
        let (code, body) = api.request("GET", path, None, KEY);
        assert_eq!((code, body), (404, serde_json::Value::Null), "{path}");
    }
    // Unknown: 404 with the API's marker. Scoped out (another organization): 500.
    let (code, body) = api.request("GET", "/internal/v1/workflow-execution/nope/", None, KEY);
    assert_eq!(
        (code, body),
        (404, json!({"error": "WorkflowExecution not found"}))
    );
    api.execution("other", "org-2", "EXECUTING");
    let (code, body) = api.request("GET", "/internal/v1/workflow-execution/other/", None, KEY);
    assert_eq!(
        (code, body),
        (
            500,
            json!({"error": "Failed to retrieve workflow execution"})
        )
    );
    // A status update of an unknown execution is the generic 500.
    let (code, body) = api.request(
        "POST",
        "/internal/v1/workflow-execution/nope/update_status/",
        Some(&error),
        KEY,
    );
    assert_eq!(code, 500);
    assert_eq!(
        body["error"],
        json!("Failed to update workflow execution status")
    );
    // The success body.
    let (code, body) = api.request("POST", mark, Some(&error), KEY);
    assert_eq!(
        (code, body),
        (
            200,
            json!({"status": "updated", "execution_id": "e1", "new_status": "ERROR"})
        )
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_already_final_guard_holds_for_queue_executions_only() {
    let (api, dir) = api("guard");
    let error = json!({"status": "ERROR", "error_message": "x", "cascade_terminal_files": true});
    api.admin(
        "POST",
        "executions",
        Some(&json!({
            "queued": {"organization_id": "org", "status": "COMPLETED"},
            "celery": {"organization_id": "org", "status": "COMPLETED", "queue_message": false},
        })),
    );
    let (code, body) = api.request(
        "POST",
        "/internal/v1/workflow-execution/queued/update_status/",
        Some(&error),
        KEY,
    );
    assert_eq!(
        (code, body),
        (
            200,
            json!({"status": "skipped", "reason": "already_final", "execution_id": "queued",
                   "new_status": "COMPLETED"})
        )
    );
    let (code, body) = api.request(
        "POST",
        "/internal/v1/workflow-execution/celery/update_status/",
        Some(&error),
        KEY,
    );
    assert_eq!(
        (code, body["status"].clone()),
        (200, json!("updated")),
        "no guard without a queue message"
    );
    assert_eq!(api.executions()["celery"]["status"], json!("ERROR"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn status_reads_list_file_executions_unless_asked_not_to() {
    let (api, dir) = api("files");
    api.admin(
        "PUT",
        "executions/run",
        Some(&json!({"organization_id": "org", "status": "EXECUTING", "file_executions": 3})),
    );
    let (_, with) = api.request("GET", "/internal/v1/workflow-execution/run/", None, KEY);
    assert_eq!(with["file_executions"].as_array().map(Vec::len), Some(3));
    assert_eq!(with["execution"]["status"], json!("EXECUTING"));
    let (_, without) = api.request(
        "GET",
        "/internal/v1/workflow-execution/run/?file_execution=false",
        None,
        KEY,
    );
    assert!(without.get("file_executions").is_none(), "{without}");
    assert_eq!(without["execution"]["status"], json!("EXECUTING"));
    let _ = std::fs::remove_dir_all(dir);
}
