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
/// a tenant to its stage, a change moves it. Drawn as three step lines on a
/// time axis, with a legend.
pub fn burndown(events: &[EventJson]) -> String {
    let (w, h, pad) = (600.0_f64, 190.0_f64, 28.0_f64);
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
    let mut points: Vec<(i64, [i64; 3])> = Vec::with_capacity(events.len());
    for e in events {
        let Some(t) = crate::api::parse_time(&e.at).map(|t| t.unix_millis()) else {
            continue;
        };
        if let Some(from) = e.from.as_deref().and_then(index) {
            counts[from] -= 1;
        }
        if let Some(to) = index(&e.to) {
            counts[to] += 1;
        }
        points.push((t, counts));
    }
    if points.is_empty() {
        return r#"<p class="muted">no stage changes recorded yet</p>"#.to_string();
    }
    // Tenants created before the replayed window show as negative counts at
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
    let (t0, t1) = (points[0].0, points[points.len() - 1].0);
    let span = (t1 - t0).max(1) as f64;
    let x = |t: i64| pad + (w - 2.0 * pad) * ((t - t0) as f64) / span;
    let y = |n: i64| h - pad - (h - 2.0 * pad - 14.0) * (n as f64) / max;
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="tenants per stage over time, from the last {} changes">"#,
        events.len()
    );
    let _ = write!(
        out,
        r##"<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/>"##,
        b = h - pad,
        r = w - pad
    );
    for (k, colour, name) in [
        (0, LEGACY, "legacy"),
        (1, SHADOW, "shadow"),
        (2, MIGRATED, "migrated"),
    ] {
        let mut path = String::new();
        let mut level = 0i64;
        for (t, c) in &points {
            let now = c[k] - floor[k];
            if path.is_empty() {
                let _ = write!(path, "M{:.1},{:.1}", x(*t), y(now));
            } else {
                let _ = write!(path, " H{:.1} V{:.1}", x(*t), y(now));
            }
            level = now;
        }
        let _ = write!(
            out,
            r#"<path d="{path}" fill="none" stroke="{colour}" stroke-width="2"><title>{name}: {level} now</title></path>"#
        );
        let lx = pad + 90.0 * k as f64;
        let _ = write!(
            out,
            r##"<rect x="{lx}" y="4" width="10" height="10" fill="{colour}"/><text x="{tx}" y="13" font-size="11" fill="#333">{name} {level}</text>"##,
            tx = lx + 14.0
        );
    }
    let first = events.first().map_or("", |e| e.at.as_str());
    let last = events.last().map_or("", |e| e.at.as_str());
    let _ = write!(
        out,
        r##"<text x="{pad}" y="{yb}" font-size="10" fill="#555">{}</text><text x="{r}" y="{yb}" font-size="10" fill="#555" text-anchor="end">{}</text><text x="{r}" y="13" font-size="10" fill="#555" text-anchor="end">at most {} tenants in a stage</text>"##,
        escape(first),
        escape(last),
        max as i64,
        yb = h - 8.0,
        r = w - pad,
    );
    out.push_str("</svg>");
    out
}

/// Requests legacy served in each of the last `span` hours up to `now`, as bars;
/// an hour with none is an empty slot, so the chart falls to zero as the
/// migration finishes.
pub fn legacy_traffic(hours: &[(ficus_core::Timestamp, u64)], now_ms: i64, span: i64) -> String {
    let (w, h, pad) = (600.0_f64, 150.0_f64, 28.0_f64);
    let hour_ms = 3_600_000_i64;
    let last = now_ms - now_ms.rem_euclid(hour_ms);
    let first = last - (span - 1) * hour_ms;
    let mut slots = vec![0u64; span.max(1) as usize];
    for (at, n) in hours {
        let k = (at.unix_millis() - first).div_euclid(hour_ms);
        if (0..span).contains(&k) {
            slots[k as usize] += n;
        }
    }
    let max = slots.iter().copied().max().unwrap_or(0).max(1) as f64;
    let slot_w = (w - 2.0 * pad) / slots.len() as f64;
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="requests legacy served per hour, the last {span} hours">"#
    );
    for (k, n) in slots.iter().enumerate() {
        let bar = (h - 2.0 * pad - 14.0) * (*n as f64) / max;
        let at = ficus_store::format_time(ficus_core::Timestamp::from_unix_millis(
            first + k as i64 * hour_ms,
        ));
        let _ = write!(
            out,
            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{bar:.1}" fill="{LEGACY}"><title>{n} in the hour from {}</title></rect>"#,
            pad + slot_w * k as f64 + 1.0,
            h - pad - bar,
            (slot_w - 2.0).max(1.0),
            escape(&at)
        );
    }
    let total: u64 = slots.iter().sum();
    let _ = write!(
        out,
        r##"<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/><text x="{pad}" y="13" font-size="11" fill="#333">{total} requests to legacy in {span} hours; the busiest hour {} </text><text x="{pad}" y="{yb}" font-size="10" fill="#555">{span} hours ago</text><text x="{r}" y="{yb}" font-size="10" fill="#555" text-anchor="end">now</text>"##,
        max as u64,
        b = h - pad,
        r = w - pad,
        yb = h - 8.0,
    );
    out.push_str("</svg>");
    out
}

/// One hour's p99 of legacy, of new, and what the gate allows new.
type Hour = (Option<u64>, Option<u64>, Option<u64>);
/// A line of the latency chart: its name, colour, dash attribute and value.
type Line = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Hour) -> Option<u64>,
);

/// A tenant's p99 latency per hour on each backend, with the line the gate
/// allows new (legacy's p99 times `ratio`, or plus `slack_ms`, whichever is
/// more). Hours where a backend measured nothing leave a gap in its line.
pub fn latency_chart(
    hours: &[(
        ficus_core::Timestamp,
        ficus_core::readiness::LatencyEvidence,
    )],
    ratio: f64,
    slack_ms: u64,
) -> String {
    let (w, h, pad) = (600.0_f64, 190.0_f64, 28.0_f64);
    if hours.is_empty() {
        return r#"<p class="muted">no latency measured in the window</p>"#.to_string();
    }
    let p99 = |hist: &ficus_core::latency::Histogram| hist.quantile_micros(0.99);
    let series: Vec<Hour> = hours
        .iter()
        .map(|(_, l)| {
            let legacy = p99(&l.legacy);
            let allowed = legacy.map(|p| ((p as f64 * ratio) as u64).max(p + slack_ms * 1_000));
            (legacy, p99(&l.new), allowed)
        })
        .collect();
    let max = series
        .iter()
        .flat_map(|(a, b, c)| [*a, *b, *c])
        .flatten()
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let n = (hours.len() - 1).max(1) as f64;
    let x = |i: usize| pad + (w - 2.0 * pad) * (i as f64) / n;
    let y = |us: u64| h - pad - (h - 2.0 * pad - 14.0) * (us as f64) / max;
    let mut out = format!(
        r#"<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="p99 latency per hour, legacy and new, with the gate's allowance">"#
    );
    let _ = write!(
        out,
        r##"<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/>"##,
        b = h - pad,
        r = w - pad
    );
    let lines: [Line; 3] = [
        ("legacy p99", LEGACY, "", |s| s.0),
        ("new p99", MIGRATED, "", |s| s.1),
        (
            "allowed for new",
            "#555",
            r#" stroke-dasharray="4 3""#,
            |s| s.2,
        ),
    ];
    for (k, (name, colour, dash, pick)) in lines.iter().enumerate() {
        let mut path = String::new();
        let mut pen_up = true;
        let mut last = None;
        for (i, s) in series.iter().enumerate() {
            match pick(s) {
                Some(us) => {
                    let _ = write!(
                        path,
                        "{}{:.1},{:.1} ",
                        if pen_up { "M" } else { "L" },
                        x(i),
                        y(us)
                    );
                    pen_up = false;
                    last = Some(us);
                }
                None => pen_up = true,
            }
        }
        let now = last.map_or_else(|| "none".to_string(), ficus_core::latency::format_micros);
        let _ = write!(
            out,
            r#"<path d="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}><title>{name}: {now} in the last hour measured</title></path>"#,
            path.trim_end()
        );
        let lx = pad + 150.0 * k as f64;
        let _ = write!(
            out,
            r##"<rect x="{lx}" y="4" width="10" height="10" fill="{colour}"/><text x="{tx}" y="13" font-size="11" fill="#333">{name} {now}</text>"##,
            tx = lx + 14.0
        );
    }
    let label = |t: &ficus_core::Timestamp| escape(&ficus_store::format_time(*t));
    let _ = write!(
        out,
        r##"<text x="{pad}" y="{yb}" font-size="10" fill="#555">{}</text><text x="{r}" y="{yb}" font-size="10" fill="#555" text-anchor="end">{}</text>"##,
        label(&hours[0].0),
        label(&hours[hours.len() - 1].0),
        yb = h - 8.0,
        r = w - pad,
    );
    out.push_str("</svg>");
    out
}

/// A preview of a tenant's branded header, web and mobile side by side.
/// `primary` and `accent` are checked colours (`#rgb`, `#rrggbb`).
pub fn branded_header(
    display_name: &str,
    app_name: &str,
    primary: &str,
    accent: &str,
    logo: Option<&str>,
) -> String {
    let (name, app) = (escape(display_name), escape(app_name));
    // The logo is drawn from its https:// address by the person's browser (the
    // CSP allows https images and nothing else from other hosts), over the
    // accent square, which shows through when the logo cannot load (a machine
    // with no internet).
    let mark = |x: u32, y: u32, size: u32, rx: u32| {
        let square = format!(
            r#"<rect x="{x}" y="{y}" width="{size}" height="{size}" rx="{rx}" fill="{accent}"/>"#
        );
        match logo.filter(|l| drawable_logo(l)) {
            Some(l) => format!(
                r#"{square}<image x="{x}" y="{y}" width="{size}" height="{size}" href="{}" preserveAspectRatio="xMidYMid meet"/>"#,
                escape(l)
            ),
            None => square,
        }
    };
    let (web, mobile) = (mark(12, 14, 28, 6), mark(408, 7, 16, 4));
    format!(
        r##"<svg class="chart" viewBox="0 0 520 120" width="520" height="120" role="img" aria-label="branded header preview">
<rect x="0" y="0" width="360" height="56" rx="4" fill="{primary}"/>
{web}
<text x="52" y="34" font-size="16" fill="#fff">{name}</text>
<text x="0" y="76" font-size="10" fill="#555">web</text>
<rect x="400" y="0" width="110" height="110" rx="12" fill="#eee"/>
<rect x="400" y="0" width="110" height="30" rx="12" fill="{primary}"/>
{mobile}
<text x="430" y="20" font-size="10" fill="#fff">{app}</text>
<text x="400" y="120" font-size="10" fill="#555">mobile</text>
</svg>"##
    )
}

/// An https:// address the preview may draw (a tenant's configuration is
/// validated to hold only those), with nothing that could leave its attribute.
pub fn drawable_logo(url: &str) -> bool {
    url.strip_prefix("https://")
        .is_some_and(|rest| !rest.is_empty())
        && !url
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'<>`\\".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_in_a_chart_are_escaped() {
        let svg = branded_header("<script>alert(1)</script>", "a&b", "#fff", "#000", None);
        assert!(!svg.contains("<script>"));
        assert!(svg.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(svg.contains("a&amp;b"));
    }

    #[test]
    fn a_logo_is_drawn_from_its_https_address_over_the_accent_square() {
        let svg = branded_header(
            "Acme",
            "Acme",
            "#fff",
            "#000",
            Some("https://cdn.acme.test/logo.png?v=1&s=2"),
        );
        assert_eq!(svg.matches("<image").count(), 2, "{svg}");
        assert!(
            svg.contains(r#"href="https://cdn.acme.test/logo.png?v=1&amp;s=2""#),
            "{svg}"
        );
        for elsewhere in [
            "http://cdn.acme.test/logo.png",
            "javascript:alert(1)",
            "data:image/png;base64,iVBO",
            "https://x.test/\"onload=\"alert(1)",
            "https://",
        ] {
            let svg = branded_header("Acme", "Acme", "#fff", "#000", Some(elsewhere));
            assert!(!svg.contains("<image"), "{elsewhere}: {svg}");
        }
    }

    #[test]
    fn legacy_traffic_falls_into_its_hours_and_older_hours_drop_out() {
        let hour = 3_600_000;
        let now = 100 * hour + 5;
        let at = |h: i64| ficus_core::Timestamp::from_unix_millis(h * hour);
        let svg = legacy_traffic(&[(at(100), 7), (at(98), 3), (at(50), 1_000)], now, 3);
        assert_eq!(svg.matches("<rect").count(), 3, "{svg}");
        assert!(svg.contains("10 requests to legacy in 3 hours"), "{svg}");
        assert!(svg.contains("<title>7 in the hour from"), "{svg}");
        assert!(svg.contains("<title>0 in the hour from"), "{svg}");
    }

    #[test]
    fn the_burndown_replays_creations_and_moves() {
        let e = |from: Option<&str>, to: &str| EventJson {
            seq: 0,
            at: "2026-12-02T10:00:00.000Z".to_string(),
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
