//! `ficus-bench corpus [--rows N] [--schemas DIR]`: `ficus db rehearse` on every
//! schema of the corpus — the public sample databases in `shared/schemas`
//! (chinook, northwind), the rental shop shaped like the real-schema report, and
//! the demo portal — each in a cluster of its own, with the plan `ficus db plan`
//! drafts (nobody connected) and its tenant role moved to `tenant_roles`. Prints
//! the time of each step per schema, the workload's rounds and errors, leaks and
//! whether revert restored the schema exactly. The reference in each row is the
//! copy step: the time to copy the schema and its rows into the scratch
//! database with `pg_dump` and `COPY`, which every other step is put against.

use ficus_retrofit::plan::{IdType, Plan};
use ficus_retrofit::rehearse::{self, Report};
use ficus_retrofit::{connect, inspect};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// One schema: its name, how it is loaded (as the superuser), its owner and
/// tenant role.
struct Case {
    name: &'static str,
    load: Load,
    tenant: &'static str,
}

enum Load {
    Sql(String),
    Portal,
}

fn sample(dir: &std::path::Path, file: &str) -> Result<String, Error> {
    let path = dir.join(file);
    let sql = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(format!(
        "CREATE ROLE corpus_owner LOGIN; CREATE ROLE corpus_tenant LOGIN;
         GRANT CREATE ON SCHEMA public TO corpus_owner;
         SET ROLE corpus_owner;
         {sql};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO corpus_tenant;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO corpus_tenant;
         RESET ROLE; RESET ALL;"
    ))
}

pub fn run(argv: &[String]) -> Result<(), Error> {
    let mut rows = 10_000i64;
    let mut dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../ficus-retrofit/tests/retrofit/schemas");
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--rows" => {
                rows = value
                    .parse()
                    .map_err(|_| format!("--rows {value:?} is not a number"))?
            }
            "--schemas" => dir = value.into(),
            _ => {
                return Err(
                    format!("unknown flag {flag} (expected --rows N, --schemas DIR)").into(),
                );
            }
        }
    }
    let cases = vec![
        Case {
            name: "chinook",
            load: Load::Sql(sample(&dir, "chinook.sql")?),
            tenant: "corpus_tenant",
        },
        Case {
            name: "northwind",
            load: Load::Sql(sample(&dir, "northwind.sql")?),
            tenant: "corpus_tenant",
        },
        Case {
            name: "rentals",
            load: Load::Sql(
                include_str!("../../ficus-retrofit/tests/retrofit/schemas/rentals.sql").to_string(),
            ),
            tenant: "rent_tenant",
        },
        Case {
            name: "portal",
            load: Load::Portal,
            tenant: "portal_tenant",
        },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "ficus db rehearse per schema, --rows {rows}; times in ms; each step's share of the copy step in ()\n"
    );
    println!(
        "{:<10} {:>7} {:>8} {:>14} {:>14} {:>12} {:>10} {:>12} {:>7} {:>9} {:>6} {:>8}",
        "schema",
        "rows",
        "copy",
        "apply",
        "enforce all",
        "probe",
        "lint",
        "revert",
        "rounds",
        "app errs",
        "leaks",
        "exact"
    );
    let mut failed = Vec::new();
    for case in &cases {
        let cluster = ficus_testkit::PgCluster::start()?;
        let url = cluster.fresh_database(case.name)?;
        let report = rt.block_on(rehearse_case(case, &url, rows, cluster.bin_dir()))?;
        let ms = |name: &str| -> u64 {
            report
                .steps
                .iter()
                .filter(|s| s.step == name || (name == "enforce" && s.step.starts_with("enforce ")))
                .map(|s| s.ms)
                .sum()
        };
        let copy = ms("copy").max(1);
        let share = |n: u64| format!("{n} ({:.2}x)", n as f64 / copy as f64);
        let copied: u64 = report.copied.iter().map(|(_, n)| n).sum();
        println!(
            "{:<10} {:>7} {:>8} {:>14} {:>14} {:>12} {:>10} {:>12} {:>7} {:>9} {:>6} {:>8}",
            case.name,
            copied,
            copy,
            share(ms("apply")),
            share(ms("enforce")),
            share(ms("probe")),
            share(ms("lint")),
            share(ms("revert")),
            report.workload_rounds,
            report.app_failures.len() + report.tenant_failures.len(),
            report.leaks,
            report
                .revert_exact
                .map_or("-", |e| if e { "yes" } else { "NO" }),
        );
        if !report.passed() {
            failed.push(format!("{}: {:?}", case.name, report));
        }
        drop(cluster);
    }
    if !failed.is_empty() {
        return Err(format!("rehearsals that did not pass:\n{}", failed.join("\n")).into());
    }
    Ok(())
}

async fn rehearse_case(
    case: &Case,
    url: &str,
    rows: i64,
    bin: &std::path::Path,
) -> Result<Report, Error> {
    let client = connect(url).await?;
    match &case.load {
        Load::Sql(sql) => client.batch_execute(sql).await?,
        Load::Portal => {
            client
                .batch_execute(
                    "CREATE ROLE portal_legacy LOGIN; CREATE ROLE portal_tenant LOGIN;
                     GRANT CREATE, USAGE ON SCHEMA public TO portal_legacy; SET ROLE portal_legacy;",
                )
                .await?;
            ficus_demo::schema::load(&client, 20_000).await?;
            client
                .batch_execute(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO portal_tenant;
                     GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO portal_tenant; RESET ROLE;",
                )
                .await?;
        }
    }
    let inv = inspect(&client).await?;
    let mut plan = Plan::draft(&inv, "Acme", IdType::Uuid)?;
    plan.app_roles.retain(|r| r != case.tenant);
    plan.tenant_roles = vec![case.tenant.to_string()];
    let opts = rehearse::Options {
        rows,
        scratch_url: None,
        keep: false,
        bin_dir: Some(bin.to_path_buf()),
    };
    Ok(rehearse::rehearse(url, Some(plan), &opts, &mut |_| {}).await?)
}
