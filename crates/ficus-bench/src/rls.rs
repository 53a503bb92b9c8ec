//! `ficus-bench rls [--rows N] [--secs S]`: what enforced row level security
//! costs a tenant role's queries.
//!
//! One table of N rows (default 10 million) owned by 100 tenants in contiguous
//! blocks of ids, retrofitted and enforced with Ficus's own spine, helpers and
//! isolation policy. pgbench, connected as the tenant role with one tenant's
//! context set for the session, runs four scripts against it in three states of
//! the same table: row level security off, enforced with Ficus's policy
//! (`tenant_id = (SELECT tenancy_private.current_tenant_id())`), and enforced
//! with the same policy without the `SELECT` wrapper. The SQL text is the same in
//! every state; only the table's policy differs. Each state runs twice,
//! interleaved, and the better run is kept, so that a noisy moment does not
//! decide the ratio.

use std::process::Command;

use ficus_retrofit::apply::{self, Event, Options};
use ficus_retrofit::enforce;
use ficus_retrofit::ident::Table;
use ficus_retrofit::inspect::Class;
use ficus_retrofit::plan::{IdType, Plan, StepKind};
use ficus_retrofit::{connect, inspect};

type Error = Box<dyn std::error::Error + Send + Sync>;

const TENANTS: i64 = 100;

/// The pgbench scripts: (name, what it does, script, the script with row
/// level security off when it must say itself which tenant it means).
const SCRIPTS: &[(&str, &str, &str, Option<&str>)] = &[
    (
        "point",
        "point lookup by key",
        "\\set id random(:lo, :hi)\nSELECT * FROM items WHERE id = :id;\n",
        None,
    ),
    (
        "range",
        "100-row range scan",
        "\\set id random(:lo, :hi - 200)\nSELECT * FROM items WHERE id >= :id ORDER BY id LIMIT 100;\n",
        None,
    ),
    (
        "insert",
        "insert",
        "\\set a random(1, 100000)\nINSERT INTO items (account, payload, amount) VALUES (:a, 'bench', 1);\n",
        None,
    ),
    (
        "count",
        "count of the tenant's rows",
        "SELECT count(*) FROM items;\n",
        // Without row level security the application filters by itself.
        Some("SELECT count(*) FROM items WHERE tenant_id = :tenant;\n"),
    ),
];

/// The table's three states.
const STATES: &[&str] = &["off", "enforced", "unwrapped"];

pub fn run(argv: &[String]) -> Result<(), Error> {
    let (rows, secs) = crate::backfill::rows_and_secs(argv, 10)?;
    let cluster = ficus_testkit::PgCluster::start_with(&[
        ("shared_buffers", "2GB"),
        ("max_wal_size", "8GB"),
        ("checkpoint_timeout", "30min"),
    ])?;
    let url = cluster.fresh_database("rls")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let tenant = rt.block_on(setup(&url, rows))?;
    let dir = tempfile::tempdir()?;
    for (name, _, script, off) in SCRIPTS {
        std::fs::write(dir.path().join(format!("{name}.sql")), script)?;
        std::fs::write(
            dir.path().join(format!("{name}-off.sql")),
            off.unwrap_or(script),
        )?;
    }
    // The tenant's block of ids, so that point and range queries find its rows.
    let per = rows / TENANTS;
    let (lo, hi) = ((tenant - 1) * per + 1, tenant * per);
    let pgbench = cluster.bin_dir().join("pgbench");
    println!(
        "{rows} rows, {TENANTS} tenants of {per} rows each; pgbench -M prepared -c 2 -j 2 -T {secs} as the tenant role, tenant {tenant}\n"
    );
    let mut best: std::collections::BTreeMap<(&str, &str), (f64, f64)> = Default::default();
    for round in 0..2 {
        for state in STATES {
            rt.block_on(set_state(&url, state))?;
            for (name, _, _, _) in SCRIPTS {
                let file = if *state == "off" {
                    format!("{name}-off.sql")
                } else {
                    format!("{name}.sql")
                };
                let out = Command::new(&pgbench)
                    .env("PGOPTIONS", format!("-c ficus.tenant_id={tenant}"))
                    .args(["-h", "127.0.0.1", "-p", &cluster.port().to_string()])
                    .args([
                        "-U",
                        "bench_tenant",
                        "-n",
                        "-M",
                        "prepared",
                        "-c",
                        "2",
                        "-j",
                        "2",
                    ])
                    .args(["-T", &secs.to_string()])
                    .args(["-D", &format!("lo={lo}"), "-D", &format!("hi={hi}")])
                    .args(["-D", &format!("tenant={tenant}")])
                    .arg("-f")
                    .arg(dir.path().join(&file))
                    .arg(url.rsplit('/').next().unwrap_or("rls"))
                    .output()?;
                let text = String::from_utf8_lossy(&out.stdout);
                if !out.status.success() || text.contains("aborted") {
                    return Err(format!(
                        "pgbench {name} in state {state} failed: {}{}",
                        text,
                        String::from_utf8_lossy(&out.stderr)
                    )
                    .into());
                }
                let tps = field(&text, "tps = ")?;
                let latency = field(&text, "latency average = ")?;
                eprintln!("round {round} {state:9} {name:6} {tps:10.0} tps {latency:8.3} ms");
                let entry = best.entry((*state, *name)).or_insert((0.0, f64::MAX));
                if tps > entry.0 {
                    *entry = (tps, latency);
                }
            }
        }
    }
    println!(
        "| query | RLS off | enforced (Ficus's policy) | ratio | without the `SELECT` wrapper | ratio |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, what, _, _) in SCRIPTS {
        let off = best[&("off", *name)];
        let on = best[&("enforced", *name)];
        let raw = best[&("unwrapped", *name)];
        println!(
            "| {what} | {:.0} tps, {:.3} ms | {:.0} tps, {:.3} ms | **{:.2}×** | {:.0} tps, {:.3} ms | {:.2}× |",
            off.0,
            off.1,
            on.0,
            on.1,
            off.0 / on.0,
            raw.0,
            raw.1,
            off.0 / raw.0
        );
    }
    println!(
        "\nratio: RLS-off throughput over the state's throughput (1.00× = no overhead; the target is at most 1.10×). The count's RLS-off query filters by tenant_id itself, as an application without row level security must."
    );
    Ok(())
}

/// The number after `label` in pgbench's report.
pub(crate) fn field(text: &str, label: &str) -> Result<f64, Error> {
    let rest = text
        .split(label)
        .nth(1)
        .ok_or_else(|| format!("pgbench printed no {label:?}: {text}"))?;
    Ok(rest
        .split_whitespace()
        .next()
        .unwrap_or("")
        .parse::<f64>()?)
}

/// Builds the table and retrofits it with Ficus (spine, index, NOT NULL and
/// foreign key, isolation policy), then enforces it. Returns the tenant the
/// benchmark queries as.
async fn setup(url: &str, rows: i64) -> Result<i64, Error> {
    let c = connect(url).await?;
    let per = rows / TENANTS;
    c.batch_execute(
        "DO $$ BEGIN CREATE ROLE bench_tenant LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
    )
    .await?;
    // tenant_id is there from the start (as if the backfill had run), in
    // contiguous blocks: tenant k owns ids (k-1)*per+1 ..= k*per.
    c.batch_execute(&format!(
        "CREATE TABLE items (id bigserial PRIMARY KEY, account int NOT NULL, payload text NOT NULL, amount numeric(12,2), tenant_id bigint);
         INSERT INTO items SELECT g, g % 100000, md5(g::text), g % 1000, 1 + (g - 1) / {per} FROM generate_series(1, {rows}) g;
         SELECT setval('items_id_seq', {rows});
         GRANT SELECT, INSERT, UPDATE, DELETE ON items TO bench_tenant;
         GRANT USAGE ON SEQUENCE items_id_seq TO bench_tenant;"
    ))
    .await?;
    c.batch_execute("VACUUM ANALYZE items").await?;
    let inv = inspect(&c).await?;
    let mut plan = Plan::draft(&inv, "Tenant One", IdType::Bigint)?;
    plan.app_roles = Vec::new();
    plan.tenant_roles = vec!["bench_tenant".into()];
    for t in &mut plan.tables {
        t.class = Class::TenantOwned;
    }
    let mut c = c;
    let mut quiet = |_: &Event| {};
    apply::apply(
        &mut c,
        &plan,
        &inv,
        &Options {
            only: Some(StepKind::Spine),
            ..Options::default()
        },
        &mut quiet,
    )
    .await?;
    c.batch_execute(&format!(
        "INSERT INTO tenancy.organizations (id, slug, name)
         SELECT g, 'tenant-' || g, 'Tenant ' || g FROM generate_series(2, {TENANTS}) g"
    ))
    .await?;
    for kind in [StepKind::Default, StepKind::Index, StepKind::Tighten] {
        apply::apply(
            &mut c,
            &plan,
            &inv,
            &Options {
                only: Some(kind),
                ..Options::default()
            },
            &mut quiet,
        )
        .await?;
    }
    let items = Table::new("public", "items");
    for _ in 0..2 {
        let r = enforce::step(&mut c, &plan, &inv, &items, true, true, &Options::default()).await?;
        for line in &r.verified {
            eprintln!("enforce {}: {line}", r.to.as_str());
        }
    }
    c.batch_execute("VACUUM ANALYZE items").await?;
    Ok(TENANTS / 2)
}

/// Puts the table in one of the three states.
async fn set_state(url: &str, state: &str) -> Result<(), Error> {
    let c = connect(url).await?;
    let wrapped = "tenant_id = (SELECT tenancy_private.current_tenant_id())";
    let unwrapped = "tenant_id = tenancy_private.current_tenant_id()";
    let (rls, rule) = match state {
        "off" => ("DISABLE", wrapped),
        "enforced" => ("ENABLE", wrapped),
        _ => ("ENABLE", unwrapped),
    };
    c.batch_execute(&format!(
        "BEGIN;
         ALTER TABLE items {rls} ROW LEVEL SECURITY;
         DROP POLICY ficus_tenant_isolation ON items;
         CREATE POLICY ficus_tenant_isolation ON items FOR ALL TO bench_tenant USING ({rule}) WITH CHECK ({rule});
         COMMIT;
         DELETE FROM items WHERE payload = 'bench';"
    ))
    .await?;
    c.batch_execute("VACUUM ANALYZE items").await?;
    Ok(())
}
