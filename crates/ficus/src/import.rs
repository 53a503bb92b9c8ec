//! Reading `ficus tenant import` files: CSV with a header row.
//!
//! Columns: `id` (required), `name`, `stage` (default `legacy`), `domains`
//! (space-separated host names). Every bad line is reported with its line number
//! before anything is written, so an operator fixes a file in one pass.

use std::collections::HashMap;
use std::path::Path;

use ficus_core::{Domain, Stage, TenantId, tenant::parse_name};
use ficus_store::NewTenant;

/// The parsed tenants, each with the line it came from.
pub struct ImportFile {
    pub tenants: Vec<NewTenant>,
    pub lines: Vec<u64>,
}

/// Every problem found in a file, one `line N: why` string each.
#[derive(Debug)]
pub struct BadLines(pub Vec<String>);

const COLUMNS: [&str; 4] = ["id", "name", "stage", "domains"];

pub fn read(path: &Path) -> Result<ImportFile, BadLines> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(false)
        .comment(Some(b'#'))
        .from_path(path)
        .map_err(|e| BadLines(vec![format!("cannot read {}: {e}", path.display())]))?;
    let header = reader
        .headers()
        .map_err(|e| BadLines(vec![format!("line 1: {e}")]))?
        .clone();
    let mut col: HashMap<&str, usize> = HashMap::new();
    let mut problems = Vec::new();
    for (i, name) in header.iter().enumerate() {
        match COLUMNS.iter().find(|c| c.eq_ignore_ascii_case(name)) {
            Some(c) if col.insert(c, i).is_some() => {
                problems.push(format!("line 1: column {c:?} appears twice"))
            }
            Some(_) => {}
            None => problems.push(format!(
                "line 1: unknown column {name:?}; the columns are {}",
                COLUMNS.join(", ")
            )),
        }
    }
    if !col.contains_key("id") {
        problems.push("line 1: the header has no \"id\" column".to_string());
    }
    if !problems.is_empty() {
        return Err(BadLines(problems));
    }

    let mut file = ImportFile {
        tenants: Vec::new(),
        lines: Vec::new(),
    };
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                let line = e.position().map_or(0, csv::Position::line);
                problems.push(format!("line {line}: {}", csv_problem(&e)));
                continue;
            }
        };
        let line = record.position().map_or(0, csv::Position::line);
        let field = |name: &str| col.get(name).and_then(|&i| record.get(i)).unwrap_or("");
        match parse_record(field("id"), field("name"), field("stage"), field("domains")) {
            Ok(t) => {
                file.tenants.push(t);
                file.lines.push(line);
            }
            Err(why) => problems.push(format!("line {line}: {why}")),
        }
    }
    if problems.is_empty() {
        Ok(file)
    } else {
        Err(BadLines(problems))
    }
}

fn csv_problem(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            let fields = if *len == 1 { "field" } else { "fields" };
            format!("it has {len} {fields}; the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "it is not valid UTF-8".to_string(),
        _ => e.to_string(),
    }
}

fn parse_record(id: &str, name: &str, stage: &str, domains: &str) -> Result<NewTenant, String> {
    let id = TenantId::parse(id).map_err(|e| e.to_string())?;
    let name = if name.is_empty() {
        id.to_string()
    } else {
        parse_name(name).map_err(|e| e.to_string())?
    };
    let stage = if stage.is_empty() {
        Stage::Legacy
    } else {
        Stage::parse(stage).map_err(|e| e.to_string())?
    };
    let domains = domains
        .split_whitespace()
        .map(Domain::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(NewTenant {
        id,
        name,
        stage,
        domains,
    })
}
