//! What the CLI prints: JSON documents (stable, documented in docs/cli-json.md) and
//! aligned human tables. Domain types stay free of serde; the JSON shapes are
//! defined here, at the edge, so a change to the domain cannot change the wire
//! format by accident.

use std::io::{self, Write};

use ficus_core::{AuditEvent, Blocker, Progress, Stage, Tenant};
use ficus_store::format_time;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct TenantJson {
    pub id: String,
    pub name: String,
    pub stage: &'static str,
    pub version: u64,
    pub domains: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&Tenant> for TenantJson {
    fn from(t: &Tenant) -> TenantJson {
        TenantJson {
            id: t.id.to_string(),
            name: t.name.clone(),
            stage: t.stage.as_str(),
            version: t.version,
            domains: t.domains.iter().map(ToString::to_string).collect(),
            created_at: format_time(t.created_at),
            updated_at: format_time(t.updated_at),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct EventJson {
    pub seq: u64,
    pub at: String,
    pub tenant: String,
    pub from: Option<&'static str>,
    pub to: &'static str,
    pub version: u64,
    pub actor: &'static str,
    pub reason: String,
}

impl From<&AuditEvent> for EventJson {
    fn from(e: &AuditEvent) -> EventJson {
        EventJson {
            seq: e.seq,
            at: format_time(e.at),
            tenant: e.tenant.to_string(),
            from: e.from.map(Stage::as_str),
            to: e.to.as_str(),
            version: e.version,
            actor: e.actor.as_str(),
            reason: e.reason.clone(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct StatusJson {
    pub store: String,
    pub tenants: u64,
    pub stages: StagesJson,
    pub percent_migrated: f64,
    pub legacy_retired: bool,
    pub legacy_traffic: LegacyTrafficJson,
    pub finish_line: FinishLineJson,
}

/// Requests routed to legacy, served or shadow, as proxies reported them.
#[derive(Debug, Serialize)]
pub struct LegacyTrafficJson {
    pub last_hour: u64,
    pub last_day: u64,
    /// Per tenant, most requests in the last day first; `tenant` is null for
    /// requests whose tenant was unknown.
    pub tenants: Vec<TenantTrafficJson>,
}

#[derive(Debug, Serialize)]
pub struct TenantTrafficJson {
    pub tenant: Option<String>,
    pub last_hour: u64,
    pub last_day: u64,
    pub last_at: String,
}

#[derive(Debug, Serialize)]
pub struct StagesJson {
    pub legacy: u64,
    pub shadow: u64,
    pub migrated: u64,
}

#[derive(Debug, Serialize)]
pub struct FinishLineJson {
    pub reached: bool,
    pub blockers: Vec<String>,
}

impl StatusJson {
    pub fn new(
        store: &str,
        p: &Progress,
        blockers: &[Blocker],
        legacy_retired: bool,
        legacy_traffic: LegacyTrafficJson,
    ) -> StatusJson {
        StatusJson {
            store: store.to_string(),
            tenants: p.total(),
            stages: StagesJson {
                legacy: p.legacy,
                shadow: p.shadow,
                migrated: p.migrated,
            },
            percent_migrated: (p.percent_migrated() * 10.0).round() / 10.0,
            legacy_retired,
            legacy_traffic,
            finish_line: FinishLineJson {
                reached: blockers.is_empty(),
                blockers: blockers.iter().map(ToString::to_string).collect(),
            },
        }
    }
}

impl LegacyTrafficJson {
    /// Joins the last day's and the last hour's per-tenant counts.
    pub fn new(
        day: &[ficus_store::TrafficCount],
        hour: &[ficus_store::TrafficCount],
    ) -> LegacyTrafficJson {
        let mut tenants: Vec<TenantTrafficJson> = day
            .iter()
            .map(|d| TenantTrafficJson {
                tenant: d.tenant.as_ref().map(ToString::to_string),
                last_day: d.requests,
                last_hour: hour
                    .iter()
                    .find(|h| h.tenant == d.tenant)
                    .map_or(0, |h| h.requests),
                last_at: format_time(d.last_at),
            })
            .collect();
        tenants.sort_by(|a, b| {
            b.last_day
                .cmp(&a.last_day)
                .then_with(|| a.tenant.cmp(&b.tenant))
        });
        LegacyTrafficJson {
            last_hour: hour.iter().map(|h| h.requests).sum(),
            last_day: day.iter().map(|d| d.requests).sum(),
            tenants,
        }
    }
}

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

pub fn tenant_rows(tenants: &[Tenant]) -> Vec<Vec<String>> {
    tenants
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.stage.to_string(),
                t.version.to_string(),
                t.name.clone(),
                t.domains
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect()
}

pub const TENANT_HEADER: [&str; 5] = ["ID", "STAGE", "VERSION", "NAME", "DOMAINS"];

pub fn event_rows(events: &[AuditEvent]) -> Vec<Vec<String>> {
    events
        .iter()
        .map(|e| {
            vec![
                format_time(e.at),
                e.tenant.to_string(),
                format!("{} → {}", e.from.map_or("(new)", Stage::as_str), e.to),
                e.version.to_string(),
                e.actor.to_string(),
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
