//! What the CLI prints: JSON documents (the shapes of `ficus_admin::api`, stable
//! and documented in docs/cli-json.md) and aligned human tables built from them.

use std::io::{self, Write};

use ficus_admin::api::{EventJson, TenantJson};
use serde::Serialize;

/// Writes one JSON document and a newline.
pub fn json(out: &mut impl Write, value: &impl Serialize) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)
}

/// An aligned text table: columns padded to their widest cell, two spaces apart,
/// with no trailing spaces.
pub fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let mut s = String::new();
        for (cell, w) in cells.zip(&widths) {
            s.push_str(&format!("{cell:<w$}  "));
        }
        s.trim_end().to_string()
    };
    writeln!(out, "{}", line(&mut header.iter().copied()))?;
    for row in rows {
        writeln!(out, "{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

pub fn tenant_rows(tenants: &[TenantJson]) -> Vec<Vec<String>> {
    tenants
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.stage.clone(),
                t.version.to_string(),
                t.name.clone(),
                t.domains.join(" "),
            ]
        })
        .collect()
}

pub const TENANT_HEADER: [&str; 5] = ["ID", "STAGE", "VERSION", "NAME", "DOMAINS"];

pub fn event_rows(events: &[EventJson]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                e.tenant.clone(),
                format!("{} → {}", e.from.as_deref().unwrap_or("(new)"), e.to),
                e.version.to_string(),
                e.actor.clone(),
                e.reason.clone(),
            ]
        })
        .collect()
}

pub const EVENT_HEADER: [&str; 6] = ["AT", "TENANT", "CHANGE", "VERSION", "ACTOR", "REASON"];

/// A text progress bar such as `[########------------]`.
pub fn bar(fraction: f64, width: usize) -> String {
    let filled = ((fraction.clamp(0.0, 1.0) * width as f64).round() as usize).min(width);
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_bars_fill() {
        let mut out = Vec::new();
        let rows = vec![
            vec!["acme".to_string(), "migrated".to_string(), "x".to_string()],
            vec![
                "a-very-long-id".to_string(),
                "legacy".to_string(),
                "".to_string(),
            ],
        ];
        table(&mut out, &["ID", "STAGE", "NOTE"], &rows).unwrap();
        expect_test::expect![[r#"
            ID              STAGE     NOTE
            acme            migrated  x
            a-very-long-id  legacy
        "#]]
        .assert_eq(&String::from_utf8(out).unwrap());
        assert_eq!(bar(0.0, 4), "[----]");
        assert_eq!(bar(0.5, 4), "[##--]");
        assert_eq!(bar(1.0, 4), "[####]");
    }
}
