//! Charts drawn on the server as inline SVG: no script, no styles, nothing the
//! page's Content-Security-Policy would refuse. Every text is escaped here,
//! because the result is inserted into the page unescaped.

use std::fmt::Write;

use crate::api::{EventJson, StagesJson};

/// How many audit events the burndown replays at most.
pub const BURNDOWN_EVENTS: u64 = 100_000;

const LEGACY: &str = "#b0413e";
const SHADOW: &str = "#d9a441";
const MIGRATED: &str = "#3f7f5f";

/// Escapes text for SVG (XML) content and attributes.
pub fn escape(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for ch in raw.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One horizontal bar: tenants per stage now.
pub fn stage_bar(s: &StagesJson) -> String {
    let total = (s.legacy + s.shadow + s.migrated).max(1) as f64;
    let (w, h) = (600.0, 28.0);
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="tenants per stage: {} legacy, {} shadow, {} migrated">"#,
        s.legacy, s.shadow, s.migrated
    );
    let mut x = 0.0;
    for (n, colour, name) in [
        (s.legacy, LEGACY, "legacy"),
        (s.shadow, SHADOW, "shadow"),
        (s.migrated, MIGRATED, "migrated"),
    ] {
        let width = w * n as f64 / total;
        if n > 0 {
            let _ = write!(
                out,
                r#"<rect x="{x:.1}" y="0" width="{width:.1}" height="{h}" fill="{colour}"><title>{n} {name}</title></rect>"#
            );
        }
        x += width;
    }
    out.push_str("</svg>");
    out
}

/// Tenants per stage over time, replayed from the audit log: a creation adds
/// a tenant to its stage, a change moves it. Drawn as three lines.
pub fn burndown(events: &[EventJson]) -> String {
    let (w, h, pad) = (600.0_f64, 180.0_f64, 24.0_f64);
    if events.is_empty() {
        return r#"<p class="muted">no stage changes recorded yet</p>"#.to_string();
    }
    let index = |stage: &str| match stage {
        "legacy" => Some(0),
        "shadow" => Some(1),
        "migrated" => Some(2),
        _ => None,
    };
    let mut counts = [0i64; 3];
    let mut points: Vec<(usize, [i64; 3])> = Vec::with_capacity(events.len() + 1);
    points.push((0, counts));
    for (i, e) in events.iter().enumerate() {
        if let Some(from) = e.from.as_deref().and_then(index) {
            counts[from] -= 1;
        }
        if let Some(to) = index(&e.to) {
            counts[to] += 1;
        }
        points.push((i + 1, counts));
    }
    // A tenant created before the replayed window shows as a negative count at
    // first; shift each series so the chart starts where the log starts.
    let mut floor = [0i64; 3];
    for (_, c) in &points {
        for k in 0..3 {
            floor[k] = floor[k].min(c[k]);
        }
    }
    let max = points
        .iter()
        .flat_map(|(_, c)| (0..3).map(move |k| c[k] - floor[k]))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let n = (points.len() - 1).max(1) as f64;
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="tenants per stage over the last {} changes">"#,
        events.len()
    );
    let _ = write!(
        out,
        r##"<line x1="{pad}" y1="{y}" x2="{x2}" y2="{y}" stroke="#999"/>"##,
        y = h - pad,
        x2 = w - pad
    );
    for (k, colour, name) in [
        (0, LEGACY, "legacy"),
        (1, SHADOW, "shadow"),
        (2, MIGRATED, "migrated"),
    ] {
        let mut path = String::new();
        for (i, c) in &points {
            let x = pad + (w - 2.0 * pad) * (*i as f64) / n;
            let y = h - pad - (h - 2.0 * pad) * ((c[k] - floor[k]) as f64) / max;
            let _ = write!(
                path,
                "{}{x:.1},{y:.1} ",
                if path.is_empty() { "M" } else { "L" }
            );
        }
        let last = points.last().map_or(0, |(_, c)| c[k] - floor[k]);
        let _ = write!(
            out,
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"><title>{name}: {last} now</title></path>"#,
            path.trim_end()
        );
    }
    let first = events.first().map_or("", |e| e.at.as_str());
    let last = events.last().map_or("", |e| e.at.as_str());
    let _ = write!(
        out,
        r##"<text x="{pad}" y="{h}" font-size="10" fill="#555">{}</text><text x="{x}" y="{h}" font-size="10" fill="#555" text-anchor="end">{}</text><text x="{pad}" y="12" font-size="10" fill="#555">{} tenants</text>"##,
        escape(first),
        escape(last),
        max as i64,
        x = w - pad,
    );
    out.push_str("</svg>");
    out
}

/// A preview of a tenant's branded header, web and mobile side by side.
/// `primary` and `accent` are checked colours (`#rgb`, `#rrggbb`).
pub fn branded_header(display_name: &str, app_name: &str, primary: &str, accent: &str) -> String {
    let (name, app) = (escape(display_name), escape(app_name));
    format!(
        r##"<svg class="chart" viewBox="0 0 520 120" width="520" height="120" role="img" aria-label="branded header preview">
<rect x="0" y="0" width="360" height="56" rx="4" fill="{primary}"/>
<rect x="12" y="14" width="28" height="28" rx="6" fill="{accent}"/>
<text x="52" y="34" font-size="16" fill="#fff">{name}</text>
<text x="0" y="76" font-size="10" fill="#555">web</text>
<rect x="400" y="0" width="110" height="110" rx="12" fill="#eee"/>
<rect x="400" y="0" width="110" height="30" rx="12" fill="{primary}"/>
<rect x="408" y="7" width="16" height="16" rx="4" fill="{accent}"/>
<text x="430" y="20" font-size="10" fill="#fff">{app}</text>
<text x="400" y="120" font-size="10" fill="#555">mobile</text>
</svg>"##
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_a_chart_are_escaped() {
        let svg = branded_header("<script>alert(1)</script>", "a&b", "#fff", "#000");
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(svg.contains("a&amp;b"));
    }

    #[test]
    fn the_burndown_replays_creations_and_moves() {
        let e = |from: Option<&str>, to: &str| EventJson {
            seq: 0,
            at: "2026-12-02 10:00:00".to_string(),
            tenant: "t".to_string(),
            from: from.map(str::to_string),
            to: to.to_string(),
            version: 1,
            actor: "cli".to_string(),
            reason: "r".to_string(),
        };
        let svg = burndown(&[
            e(None, "legacy"),
            e(None, "legacy"),
            e(Some("legacy"), "shadow"),
            e(Some("shadow"), "migrated"),
        ]);
        assert!(svg.contains("<title>legacy: 1 now</title>"), "{svg}");
        assert!(svg.contains("<title>shadow: 0 now</title>"), "{svg}");
        assert!(svg.contains("<title>migrated: 1 now</title>"), "{svg}");
    }
}
