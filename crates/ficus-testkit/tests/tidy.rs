//! Tidy: repository rules that reviewers would otherwise have to remember, checked
//! on every `cargo test`.
//!
//! - every Rust module starts with a `//!` doc saying what it is for;
//! - every `allow` attribute carries a `reason = "..."`;
//! - every crate inherits `publish = false` and the workspace lints;
//! - every crate has a heading in docs/ARCHITECTURE.md's code map.

use std::fs;
use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn crates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(workspace_root().join("crates"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_module_has_a_doc_comment() {
    let mut missing = Vec::new();
    for krate in crates() {
        let mut files = Vec::new();
        rust_files(&krate, &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            if !first.starts_with("//!") {
                missing.push(
                    file.strip_prefix(workspace_root())
                        .unwrap()
                        .display()
                        .to_string(),
                );
            }
        }
    }
    assert!(
        missing.is_empty(),
        "these files do not start with a `//!` module doc:\n{}",
        missing.join("\n")
    );
}

#[test]
fn every_allow_has_a_reason() {
    let mut bare = Vec::new();
    for krate in crates() {
        let mut files = Vec::new();
        rust_files(&krate, &mut files);
        for file in files {
            let text = fs::read_to_string(&file).unwrap();
            // An attribute may span lines after rustfmt; look at the text up to its
            // closing bracket.
            // Spelled in two parts so that this file does not match itself.
            let needle = concat!("#[", "allow(");
            for (at, _) in text.match_indices(needle) {
                let end = text[at..].find(")]").map_or(text.len(), |e| at + e);
                if !text[at..end].contains("reason") {
                    let line = text[..at].lines().count() + 1;
                    bare.push(format!("{}:{line}", file.display()));
                }
            }
        }
    }
    assert!(
        bare.is_empty(),
        "`#[allow]` without `reason = \"...\"`:\n{}",
        bare.join("\n")
    );
}

#[test]
fn every_crate_is_internal_lints_on_and_on_the_code_map() {
    let architecture = fs::read_to_string(workspace_root().join("docs/ARCHITECTURE.md")).unwrap();
    let mut problems = Vec::new();
    for krate in crates() {
        let name = krate.file_name().unwrap().to_str().unwrap().to_string();
        let manifest = fs::read_to_string(krate.join("Cargo.toml")).unwrap();
        if !manifest.contains(&format!("name = \"{name}\"")) {
            problems.push(format!("{name}: the folder name is not the crate name"));
        }
        if !manifest.contains("publish.workspace = true") {
            problems.push(format!("{name}: does not inherit publish = false"));
        }
        if !manifest.contains("[lints]\nworkspace = true") {
            problems.push(format!("{name}: does not inherit the workspace lints"));
        }
        if !architecture.contains(&format!("### `{name}`")) {
            problems.push(format!(
                "{name}: no `### `{name}`` heading in docs/ARCHITECTURE.md's code map"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
