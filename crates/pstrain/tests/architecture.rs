//! ARCHITECTURE.md cannot go stale silently: every path it names exists, and every type,
//! function, constant or module it names (in backticks) is defined somewhere in the tree.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every file and folder below `dir`, relative to the repository root, without build output.
fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let build_output = name == "target" || name == "__pycache__";
        // `./data/` holds a downloaded data set, not source.
        let dataset = name == "data" && dir == root;
        if name.starts_with('.') || build_output || dataset {
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            out.push(format!("{rel}/"));
            walk(&path, root, out);
        } else {
            out.push(rel);
        }
    }
}

/// The names the tree defines: Rust items and enum variants, Python classes and functions,
/// module files, crate names and dependencies.
struct Tree {
    paths: Vec<String>,
    defined: BTreeSet<String>,
}

impl Tree {
    fn load() -> Tree {
        let root = root();
        let mut paths = Vec::new();
        walk(&root, &root, &mut paths);
        let mut defined = BTreeSet::new();
        let item = regex_lite(&[
            "struct ", "enum ", "trait ", "type ", "fn ", "mod ", "const ", "static ", "class ",
            "def ",
        ]);
        for rel in &paths {
            let file = Path::new(rel);
            if let Some(stem) = file.file_stem().and_then(|s| s.to_str()) {
                defined.insert(stem.to_string());
            }
            let ext = file.extension().and_then(|e| e.to_str()).unwrap_or("");
            if !matches!(ext, "rs" | "py" | "toml") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(root.join(rel)) else {
                continue;
            };
            for line in text.lines() {
                let code = line.trim_start();
                for keyword in &item {
                    if let Some(at) = code.find(keyword.as_str()) {
                        let before = &code[..at];
                        let starts_item = before.is_empty()
                            || before.ends_with(' ')
                                && before.split_whitespace().all(|w| {
                                    matches!(w, "pub" | "async" | "unsafe" | "const")
                                        || w.starts_with("pub(")
                                });
                        if starts_item {
                            defined.insert(ident(&code[at + keyword.len()..]));
                        }
                    }
                }
                // Enum variants and fields: `Name,` `Name {` `Name(` at the start of a line.
                let first = ident(code);
                if !first.is_empty() && code[first.len()..].starts_with([',', ' ', '(', '{']) {
                    defined.insert(first);
                }
                // Cargo names: `name = ...` and `name = "pstrain-core"`.
                if ext == "toml" {
                    if let Some((key, value)) = code.split_once('=') {
                        defined.insert(key.trim().to_string());
                        defined.insert(value.trim().trim_matches('"').to_string());
                    }
                }
            }
        }
        Tree { paths, defined }
    }

    fn has_path(&self, named: &str) -> bool {
        let want = named.trim_end_matches('/');
        self.paths.iter().any(|p| {
            let p = p.trim_end_matches('/');
            p == want || p.ends_with(&format!("/{want}"))
        })
    }
}

fn regex_lite(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every `code span` of the document.
fn spans(doc: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut parts = line.split('`');
        parts.next();
        while let (Some(span), Some(_)) = (parts.next(), parts.next()) {
            out.push(span.to_string());
        }
        // An odd count leaves an unclosed span; the last piece is prose.
    }
    out
}

/// What a span names, if it names something the tree must hold.
enum Named<'a> {
    Path(&'a str),
    Item(Vec<&'a str>),
}

fn classify(span: &str) -> Option<Named<'_>> {
    if span.contains(' ') || span.starts_with('-') || span.is_empty() {
        return None; // a command line or a flag
    }
    if span.starts_with('/') {
        return None; // an HTTP route
    }
    let is_file = [".rs", ".py", ".md", ".html", ".sh", ".json", ".toml"]
        .iter()
        .any(|e| span.ends_with(e));
    if span.contains('/') || is_file {
        return Some(Named::Path(span));
    }
    let item = span.trim_end_matches("()");
    let segments: Vec<&str> = item.split("::").collect();
    let identifier = |s: &&str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '-')
            && !s.starts_with(|c: char| c.is_ascii_digit())
    };
    segments
        .iter()
        .all(identifier)
        .then_some(Named::Item(segments))
}

#[test]
fn every_name_in_architecture_md_exists() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let tree = Tree::load();
    // Words in backticks that are not names of ours.
    let outside = [
        "f32",
        "u64",
        "unsafe",
        "unwrap",
        "expect",
        "try_join_all",
        "now",
        "hello",
    ];
    let mut missing = Vec::new();
    let mut checked = 0;
    for span in spans(&doc) {
        match classify(&span) {
            Some(Named::Path(p)) => {
                checked += 1;
                if !tree.has_path(p) {
                    missing.push(format!("path `{p}`"));
                }
            }
            Some(Named::Item(segments)) => {
                checked += 1;
                for s in segments {
                    if !outside.contains(&s) && !tree.defined.contains(s) {
                        missing.push(format!("`{s}` (in `{span}`)"));
                    }
                }
            }
            None => {}
        }
    }
    assert!(
        checked > 100,
        "only {checked} names found: is the parser broken?"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names what the tree does not hold:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_check_catches_a_stale_name() {
    let tree = Tree::load();
    assert!(tree.has_path("crates/core/src/admission.rs"));
    assert!(tree.has_path("consistency/"));
    assert!(!tree.has_path("crates/core/src/follower_of_steps.rs"));
    assert!(tree.defined.contains("ShardEngine"));
    assert!(tree.defined.contains("for_mode"));
    assert!(!tree.defined.contains("StepFollower"));
    assert!(
        matches!(classify("core::follower::StepFollower"), Some(Named::Item(s)) if s.len() == 3)
    );
    assert!(classify("--rank auto").is_none());
}
