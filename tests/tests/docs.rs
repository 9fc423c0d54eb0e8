//! The documentation against the tree: every relative link of every Markdown file resolves (the
//! file, and the heading when it names one), and ARCHITECTURE.md lists every source file there
//! is and no file that is not.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// Files under `dir` (relative to the root) whose name ends with `suffix`, skipping build output
/// and hidden directories.
fn files(dir: &Path, suffix: &str, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let path = dir.join(&name);
        if entry.path().is_dir() {
            if !name.starts_with('.') && name != "target" {
                files(&path, suffix, out);
            }
        } else if name.ends_with(suffix) {
            out.push(path);
        }
    }
}

/// GitHub's anchor for a heading: lower case, punctuation other than `-` and `_` dropped,
/// spaces as `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code fences).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

/// The targets of the inline links `[text](target)` of a Markdown text, outside code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    out
}

#[test]
fn every_relative_link_resolves() {
    let mut docs = Vec::new();
    files(Path::new(""), ".md", &mut docs);
    assert!(docs.len() >= 10, "the Markdown files: {docs:?}");
    let mut broken = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(root().join(doc)).expect("a Markdown file");
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                root().join(doc)
            } else {
                root()
                    .join(doc.parent().unwrap_or(Path::new("")))
                    .join(path)
            };
            if !file.exists() {
                broken.push(format!("{}: {target}: no such file", doc.display()));
                continue;
            }
            if let Some(fragment) = fragment
                && file.extension().is_some_and(|e| e == "md")
            {
                let text = std::fs::read_to_string(&file).expect("the linked file");
                if !anchors(&text).contains(fragment) {
                    broken.push(format!("{}: {target}: no such heading", doc.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_architecture_lists_every_source_file() {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let mut sources = Vec::new();
    for dir in [
        "src",
        "protocol/src",
        "relay/src",
        "sample-api/src",
        "tests/src",
        "tests/tests",
    ] {
        files(Path::new(dir), ".rs", &mut sources);
    }
    let mut sql = Vec::new();
    files(Path::new("sql"), ".sql", &mut sql);
    // The upgrade scripts pgrx installs are built from sql/upgrade/ (see the next test).
    sources.extend(sql.into_iter().filter(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("pg_reaper--"))
    }));
    let missing: Vec<String> = sources
        .iter()
        .map(|p| p.display().to_string())
        .filter(|p| !text.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "source files ARCHITECTURE.md does not list: {missing:?}"
    );
    let mut relay_tests = Vec::new();
    files(Path::new("relay/tests"), ".rs", &mut relay_tests);
    let unnamed: Vec<String> = relay_tests
        .iter()
        .filter(|p| p.parent() == Some(Path::new("relay/tests")))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
        .filter(|n| !text.contains(&format!("`{n}`")))
        .collect();
    assert!(
        unnamed.is_empty(),
        "relay test files ARCHITECTURE.md does not name: {unnamed:?}"
    );
    // And no file it lists is gone.
    let mut gone = Vec::new();
    for span in text.split('`').skip(1).step_by(2) {
        if (span.ends_with(".rs") || span.ends_with(".sql"))
            && span.contains('/')
            && !span.contains('*')
            && !root().join(span).exists()
        {
            gone.push(span.to_string());
        }
    }
    assert!(
        gone.is_empty(),
        "ARCHITECTURE.md lists files that do not exist: {gone:?}"
    );
}

#[test]
fn the_upgrade_scripts_are_built_from_the_sql_files() {
    let out = std::process::Command::new("python3")
        .arg(root().join("scripts/sql.py"))
        .arg("check")
        .output()
        .expect("run scripts/sql.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
