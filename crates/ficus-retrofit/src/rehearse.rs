//! `ficus db rehearse`: the whole retrofit, dress-rehearsed on a scratch copy
//! before production. The schema is copied with `pg_dump --schema-only`, then a
//! bounded sample of each table's rows (parents first, a row kept only when its
//! foreign keys still hold in the copy). On the copy run plan → apply → enforce
//! every table → probe → lint → revert while a workload derived from the
//! catalogs (see [`crate::workload`]) runs as the live app — every role that uses
//! the tables today, with no tenant context — and as each tenant role in tenant
//! zero's context. The report says which workload statement failed at which
//! step, what blocked a step and its fix, each step's time, any leak, and
//! whether revert gave back the schema `pg_dump` saw before.
//!
//! The workload acts as each role with `SET ROLE` on the rehearsing session's
//! own connections, so no role's password is needed; a role the rehearsing
//! role may not become is reported, not silently left out.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use tokio_postgres::Client;

use crate::apply::{self, Options as ApplyOptions};
use crate::ident::{Table, literal, quote};
use crate::inspect::Inventory;
use crate::lint::Severity;
use crate::plan::{IdType, Plan, key};
use crate::workload::Workload;
use crate::{Error, Result, connect, enforce, inspect, lint, probe, sql};

/// What the rehearsal may do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rows copied per table, at most.
    pub rows: i64,
    /// Rehearse in this empty database instead of a new one on the source's
    /// server.
    pub scratch_url: Option<String>,
    /// Leave the scratch database behind.
    pub keep: bool,
    /// Where `pg_dump` and `psql` are.
    pub bin_dir: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            rows: 10_000,
            scratch_url: None,
            keep: false,
            bin_dir: None,
        }
    }
}

/// What a rehearsal reports as it goes.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    Scratch {
        database: String,
        created: bool,
    },
    Copied {
        table: String,
        rows: u64,
        source_rows: i64,
    },
    Step {
        step: String,
        ok: bool,
        ms: u64,
        detail: Option<String>,
    },
    WorkloadFailure {
        step: String,
        failure: String,
    },
}

/// One step of the rehearsed flow.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: String,
    pub ms: u64,
    /// What stopped it, with its fix, when it did not complete.
    pub blocker: Option<String>,
}

/// What the rehearsal found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub scratch: String,
    pub kept: bool,
    pub copied: Vec<(String, u64)>,
    pub steps: Vec<StepReport>,
    /// Workload statements that failed, each with the step it ran during; the
    /// live app's first, then the tenant roles'.
    pub app_failures: Vec<String>,
    pub tenant_failures: Vec<String>,
    pub workload_rounds: u64,
    /// Tables the workload could not insert into, and why.
    pub workload_skipped: Vec<String>,
    /// Roles whose workload could not run, and why.
    pub roles_not_rehearsed: Vec<String>,
    pub leaks: usize,
    pub lint_errors: Vec<String>,
    /// Whether `pg_dump --schema-only` after revert matched the one before.
    pub revert_exact: Option<bool>,
    pub revert_difference: Vec<String>,
}

impl Report {
    /// Whether the live application would have seen an error.
    pub fn app_saw_errors(&self) -> bool {
        !self.app_failures.is_empty()
    }

    /// Everything went as it must in production.
    pub fn passed(&self) -> bool {
        !self.app_saw_errors()
            && self.roles_not_rehearsed.is_empty()
            && self.tenant_failures.is_empty()
            && self.steps.iter().all(|s| s.blocker.is_none())
            && self.leaks == 0
            && self.revert_exact == Some(true)
    }
}

/// The extensions the source uses that the scratch server cannot install.
pub fn missing_extensions(used: &[String], available: &[String]) -> Vec<String> {
    used.iter()
        .filter(|e| !available.contains(e))
        .cloned()
        .collect()
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, database: &str) -> Result<String> {
    let Some(rest) = url
        .strip_prefix("postgres://")
        .or_else(|| url.strip_prefix("postgresql://"))
    else {
        return Err(Error::BadUrl(
            "rehearse needs a postgres:// URL, to name the scratch database in it".into(),
        ));
    };
    let scheme = &url[..url.len() - rest.len()];
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // A parameter that names the database would win over the path, and the
    // rehearsal would run on the source.
    if let Some(q) = query
        && q.split('&').any(|kv| {
            let k = kv.split('=').next().unwrap_or("");
            k == "dbname" || k == "service"
        })
    {
        return Err(Error::BadUrl(
            "the URL names its database in a dbname or service parameter; put it in the path so that the scratch database can take its place".into(),
        ));
    }
    let authority = before_query
        .split_once('/')
        .map_or(before_query, |(a, _)| a);
    Ok(format!(
        "{scheme}{authority}/{database}{}",
        query.map(|q| format!("?{q}")).unwrap_or_default()
    ))
}

/// The directory holding `pg_dump` and `psql`: the given one, one on PATH, or
/// the newest under /usr/lib/postgresql.
fn bin_dir(given: Option<&std::path::Path>) -> Result<std::path::PathBuf> {
    if let Some(d) = given {
        return Ok(d.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if d.join("pg_dump").is_file() && d.join("psql").is_file() {
                return Ok(d);
            }
        }
    }
    let mut found: Vec<(u32, std::path::PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let d = e.path().join("bin");
            d.join("pg_dump").is_file().then_some((v, d))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d).ok_or_else(|| {
        Error::Refused(
            "pg_dump and psql were not found on PATH or under /usr/lib/postgresql; install PostgreSQL's client programs (Debian: postgresql-client)".into(),
        )
    })
}

/// Runs a PostgreSQL client program against `url`, feeding it `input`. The
/// connection goes in libpq's environment variables, taken from the parsed URL,
/// so that neither the password nor the URL ever appears in a process listing.
async fn client_program(
    bin: &std::path::Path,
    program: &str,
    url: &str,
    args: &[&str],
    input: Option<String>,
) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    use tokio_postgres::config::{Host, SslMode};
    let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        Error::BadUrl(crate::location(url) + ": " + &e.to_string())
    })?;
    let mut cmd = tokio::process::Command::new(bin.join(program));
    cmd.env_remove("PGSERVICE").env_remove("PGSERVICEFILE");
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.to_string_lossy().into_owned(),
        })
        .collect();
    if !hosts.is_empty() {
        cmd.env("PGHOST", hosts.join(","));
    }
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    if !ports.is_empty() {
        cmd.env("PGPORT", ports.join(","));
    }
    if let Some(u) = config.get_user() {
        cmd.env("PGUSER", u);
    }
    if let Some(d) = config.get_dbname() {
        cmd.env("PGDATABASE", d);
    }
    if let Some(p) = config.get_password() {
        cmd.env("PGPASSWORD", String::from_utf8_lossy(p).into_owned());
    }
    cmd.env(
        "PGSSLMODE",
        match config.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            _ => "prefer",
        },
    );
    let mut child = cmd
        .args(args)
        .stdin(if input.is_some() {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| Error::Refused(format!("cannot run {program}: {e}")))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write that fails means the program stopped reading: its own error
        // says why, below.
        let _ = stdin.write_all(text.as_bytes()).await;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| Error::Refused(format!("cannot run {program}: {e}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(Error::Refused(format!(
            "{program} failed: {}",
            stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(3)
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The schema as `pg_dump --schema-only` prints it, less its per-run
/// `\restrict` keys.
async fn dump_schema(bin: &std::path::Path, url: &str) -> Result<String> {
    Ok(
        client_program(bin, "pg_dump", url, &["--schema-only"], None)
            .await?
            .lines()
            .filter(|l| !l.starts_with("\\restrict ") && !l.starts_with("\\unrestrict "))
            .map(|l| format!("{l}\n"))
            .collect(),
    )
}

/// Where the rehearsal happens.
struct Scratch {
    url: String,
    database: String,
    /// Made by the rehearsal (and dropped by it, unless kept).
    created: bool,
}

async fn identity(client: &Client) -> Result<(String, String)> {
    let r = client
        .query_one(
            "SELECT current_database()::text, (SELECT system_identifier::text FROM pg_control_system())",
            &[],
        )
        .await
        .map_err(sql("reading the database's identity"))?;
    Ok((r.get(0), r.get::<_, Option<String>>(1).unwrap_or_default()))
}

async fn scratch(source: &Client, source_url: &str, opts: &Options) -> Result<Scratch> {
    let (db, system) = identity(source).await?;
    if let Some(url) = &opts.scratch_url {
        let c = connect(url).await?;
        if identity(&c).await? == (db.clone(), system) {
            return Err(Error::Refused(format!(
                "the scratch database is the source database {db:?}; the rehearsal writes to it, so nothing was written"
            )));
        }
        let tables: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.relkind IN ('r', 'p', 'v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
                   AND n.nspname NOT LIKE 'pg\\_%'",
                &[],
            )
            .await
            .map_err(sql("reading the scratch database"))?
            .get(0);
        if tables > 0 {
            return Err(Error::Refused(format!(
                "the scratch database is not empty ({tables} tables and views); give an empty one, nothing was written"
            )));
        }
        let (database, _) = identity(&c).await?;
        return Ok(Scratch {
            url: url.clone(),
            database,
            created: false,
        });
    }
    let (role, may): (String, bool) = {
        let r = source
            .query_one(
                "SELECT current_user::text, rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .map_err(sql("reading the role's privileges"))?;
        (r.get(0), r.get(1))
    };
    if !may {
        return Err(Error::Refused(format!(
            "role {role} may not create databases (CREATEDB), so it cannot make a scratch database: give --scratch-url with an empty database to rehearse in"
        )));
    }
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    let database = format!(
        "ficus_rehearsal_{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    );
    source
        .batch_execute(&format!("CREATE DATABASE {}", quote(&database)))
        .await
        .map_err(sql("creating the scratch database"))?;
    Ok(Scratch {
        url: with_database(source_url, &database)?,
        database,
        created: true,
    })
}

/// The tables in an order where every table comes after those it references
/// (cycles broken where they close).
fn parents_first(inv: &Inventory) -> Vec<Table> {
    let mut out: Vec<Table> = Vec::new();
    let mut visiting = std::collections::BTreeSet::new();
    fn visit(
        inv: &Inventory,
        t: &Table,
        out: &mut Vec<Table>,
        visiting: &mut std::collections::BTreeSet<Table>,
    ) {
        if out.contains(t) || !visiting.insert(t.clone()) {
            return;
        }
        if let Some(info) = inv.table(t) {
            for fk in &info.foreign_keys {
                visit(inv, &fk.references, out, visiting);
            }
        }
        if inv.table(t).is_some() {
            out.push(t.clone());
        }
    }
    for t in &inv.tables {
        visit(inv, &t.table, &mut out, &mut visiting);
    }
    out
}

/// Copies up to `rows` rows of each table, parents first; a row is kept only
/// when each of its foreign keys is NULL or finds its row in the copy.
async fn copy_rows(
    source: &Client,
    target: &Client,
    inv: &Inventory,
    rows: i64,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<Vec<(String, u64)>> {
    let mut copied = Vec::new();
    for t in parents_first(inv) {
        let cols: Vec<String> = source
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0
                   AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&t.sql()],
            )
            .await
            .map_err(sql(format!("reading the columns of {t}")))?
            .iter()
            .map(|r| quote(r.get::<_, &str>(0)))
            .collect();
        if cols.is_empty() {
            continue;
        }
        let list = cols.join(", ");
        let fks: Vec<(String, String)> = source
            .query(
                "SELECT pg_get_constraintdef(oid), confrelid::regclass::text FROM pg_constraint
                 WHERE conrelid = to_regclass($1) AND contype = 'f' AND conparentid = 0",
                &[&t.sql()],
            )
            .await
            .map_err(sql(format!("reading the foreign keys of {t}")))?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let source_rows = inv.table(&t).map_or(0, |i| i.row_estimate);
        target
            .batch_execute(&format!(
                "DROP TABLE IF EXISTS pg_temp.ficus_stage; CREATE TEMP TABLE ficus_stage AS SELECT {list} FROM {} LIMIT 0",
                t.sql()
            ))
            .await
            .map_err(sql(format!("staging {t}")))?;
        let stream = source
            .copy_out(&format!(
                "COPY (SELECT {list} FROM {} LIMIT {rows}) TO STDOUT",
                t.sql()
            ))
            .await
            .map_err(sql(format!("reading the rows of {t}")))?;
        let sink = target
            .copy_in(&format!("COPY pg_temp.ficus_stage ({list}) FROM STDIN"))
            .await
            .map_err(sql(format!("writing the rows of {t}")))?;
        let mut stream = std::pin::pin!(stream);
        let mut sink = std::pin::pin!(sink);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(sql(format!("reading the rows of {t}")))?;
            sink.send(chunk)
                .await
                .map_err(sql(format!("writing the rows of {t}")))?;
        }
        sink.as_mut()
            .finish()
            .await
            .map_err(sql(format!("writing the rows of {t}")))?;
        // Each foreign key, checked against what is in the copy: the row's own
        // constraint definition gives the columns on both sides.
        let mut keep = Vec::new();
        for (def, parent) in &fks {
            if let Some(pred) = fk_predicate(def, parent) {
                keep.push(pred);
            }
        }
        let filter = if keep.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", keep.join(" AND "))
        };
        // Rows that reference rows of their own table (an employee's manager)
        // find them only once those are in: the staged rows move over in rounds
        // until a round moves none.
        let mut n = 0;
        loop {
            let moved = target
                .execute(
                    &format!(
                        "WITH moved AS (DELETE FROM pg_temp.ficus_stage s {filter} RETURNING {list})
                         INSERT INTO {} ({list}) OVERRIDING SYSTEM VALUE SELECT {list} FROM moved",
                        t.sql()
                    ),
                    &[],
                )
                .await
                .map_err(sql(format!("copying the rows of {t}")))?;
            n += moved;
            if moved == 0 || keep.is_empty() {
                break;
            }
        }
        on_event(&Event::Copied {
            table: t.to_string(),
            rows: n,
            source_rows,
        });
        copied.push((t.to_string(), n));
    }
    target
        .batch_execute("DROP TABLE IF EXISTS pg_temp.ficus_stage")
        .await
        .map_err(sql("dropping the stage"))?;
    // Sequences go on from the copied rows, as they do in the source.
    for r in target
        .query(
            "SELECT c.oid::regclass::text, a.attname::text, pg_get_serial_sequence(c.oid::regclass::text, a.attname)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'
               AND pg_get_serial_sequence(c.oid::regclass::text, a.attname) IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql("reading sequences"))?
    {
        let (table, col, seq): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        target
            .batch_execute(&format!(
                "SELECT setval({}, m) FROM (SELECT max({})::bigint AS m FROM {table}) x WHERE m IS NOT NULL",
                literal(&seq),
                quote(&col)
            ))
            .await
            .map_err(sql(format!("moving {seq}")))?;
    }
    Ok(copied)
}

/// `(a, b) REFERENCES p(x, y)` as "every column NULL or the row is there".
fn fk_predicate(def: &str, parent: &str) -> Option<String> {
    let def = def.strip_prefix("FOREIGN KEY (")?;
    let (cols, rest) = def.split_once(')')?;
    let rest = rest.trim_start().strip_prefix("REFERENCES ")?;
    let (_, refs) = rest.split_once('(')?;
    let (refs, _) = refs.split_once(')')?;
    let cols: Vec<&str> = cols.split(", ").collect();
    let refs: Vec<&str> = refs.split(", ").collect();
    if cols.len() != refs.len() {
        return None;
    }
    let any_null: Vec<String> = cols.iter().map(|c| format!("s.{c} IS NULL")).collect();
    let matches: Vec<String> = cols
        .iter()
        .zip(&refs)
        .map(|(c, r)| format!("p.{r} = s.{c}"))
        .collect();
    Some(format!(
        "({} OR EXISTS (SELECT 1 FROM {parent} p WHERE {}))",
        any_null.join(" OR "),
        matches.join(" AND ")
    ))
}

/// Rehearses the retrofit of the database at `source_url`. `plan` is the
/// operator's plan (made for the source; it is pointed at the scratch copy), or
/// a draft is made.
pub async fn rehearse(
    source_url: &str,
    plan: Option<Plan>,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<Report> {
    let bin = bin_dir(opts.bin_dir.as_deref())?;
    let source = connect(source_url).await?;
    let source_inv = inspect(&source).await?;
    if let Some(p) = &plan {
        p.check_against(&source_inv, "(the plan)")?;
    }
    let scratch = scratch(&source, source_url, opts).await?;
    on_event(&Event::Scratch {
        database: scratch.database.clone(),
        created: scratch.created,
    });
    let result = rehearse_in(
        &bin,
        source_url,
        &source,
        &source_inv,
        plan,
        &scratch,
        opts,
        on_event,
    )
    .await;
    let mut dropped = false;
    if scratch.created && !opts.keep {
        dropped = source
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                quote(&scratch.database)
            ))
            .await
            .is_ok();
    }
    let mut report = result?;
    report.scratch = scratch.database;
    report.kept = !dropped;
    Ok(report)
}

#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each argument a distinct part of the rehearsal"
)]
async fn rehearse_in(
    bin: &std::path::Path,
    source_url: &str,
    source: &Client,
    source_inv: &Inventory,
    plan: Option<Plan>,
    scratch: &Scratch,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<Report> {
    let mut report = Report::default();
    // The schema: extensions first, named when the scratch server lacks one.
    let target = connect(&scratch.url).await?;
    let (connected, _) = identity(&target).await?;
    if connected != scratch.database {
        return Err(Error::Refused(format!(
            "the scratch URL reached database {connected:?}, not {:?}; nothing was written",
            scratch.database
        )));
    }
    let used: Vec<String> = source
        .query(
            "SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql'",
            &[],
        )
        .await
        .map_err(sql("reading extensions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let available: Vec<String> = target
        .query("SELECT name::text FROM pg_available_extensions", &[])
        .await
        .map_err(sql("reading available extensions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing = missing_extensions(&used, &available);
    if !missing.is_empty() {
        return Err(Error::Refused(format!(
            "the schema needs extension{} {} that the scratch server cannot install; install {} there first",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            if missing.len() == 1 { "it" } else { "them" }
        )));
    }
    let started = Instant::now();
    // The dump goes from pg_dump to psql through this process, never a file.
    let dump = client_program(
        bin,
        "pg_dump",
        source_url,
        &[
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            "--lock-wait-timeout=10s",
        ],
        None,
    )
    .await?;
    let restored = client_program(
        bin,
        "psql",
        &scratch.url,
        &["-X", "-q", "-v", "ON_ERROR_STOP=1"],
        Some(dump),
    )
    .await;
    restored.map_err(|e| {
        Error::Refused(format!("copying the schema into the scratch database: {e}"))
    })?;
    report.copied = copy_rows(source, &target, source_inv, opts.rows, on_event).await?;
    // A schema-only copy holds its materialized views unpopulated.
    let mut unpopulated = Vec::new();
    for v in source_inv.views.iter().filter(|v| v.materialized) {
        if let Err(e) = target
            .batch_execute(&format!("REFRESH MATERIALIZED VIEW {}", v.view.sql()))
            .await
        {
            report.workload_skipped.push(format!(
                "{}: could not be refreshed in the copy ({})",
                v.view,
                crate::describe(&e)
            ));
            unpopulated.push(v.view.clone());
        }
    }
    target
        .batch_execute("ANALYZE")
        .await
        .map_err(sql("analyzing the copy"))?;
    step_done(&mut report, on_event, "copy", started, None);

    let before = dump_schema(bin, &scratch.url).await?;
    let mut client = connect(&scratch.url).await?;
    let inv = inspect(&client).await?;
    let (database, system) = identity(&client).await?;
    let mut plan = match plan {
        Some(p) => p,
        None => Plan::draft(&inv, "Tenant Zero", IdType::Uuid)?,
    };
    plan.database = database;
    plan.system_identifier = system;
    plan.check_against(&inv, "(the plan)")?;

    // The workload: the live app as every role that uses the tables today or is
    // named an app role (but not the tenant roles, which the plan isolates on
    // purpose), with no tenant context; the tenant roles in tenant zero's context.
    let tables: Vec<Table> = inv.tables.iter().map(|t| t.table.clone()).collect();
    let views: Vec<Table> = inv.views.iter().map(|v| v.view.clone()).collect();
    let workload = Workload::derive(&client, &tables, &views).await?;
    report.workload_skipped.extend(workload.skipped());
    // The materialized views the plan takes from the tenant roles.
    let revoked: Vec<Table> = plan
        .views
        .iter()
        .filter(|v| v.action == crate::plan::ViewAction::Revoke)
        .map(|v| Table::new(&v.schema, &v.name))
        .collect();
    let mut live: Vec<String> = plan.app_roles.clone();
    for r in &inv.roles {
        // A role the plan isolates (a tenant role) was moved there deliberately.
        if r.can_login
            && !r.superuser
            && !r.access.is_empty()
            && !live.contains(&r.name)
            && !plan.tenant_roles.contains(&r.name)
        {
            live.push(r.name.clone());
        }
    }
    for v in &inv.views {
        for reader in &v.readers {
            if reader != "PUBLIC" && !live.contains(reader) && !plan.tenant_roles.contains(reader) {
                live.push(reader.clone());
            }
        }
    }
    let mut sessions = Vec::new();
    for (role, tenant) in live
        .iter()
        .map(|r| (r.clone(), false))
        .chain(plan.tenant_roles.iter().map(|r| (r.clone(), true)))
    {
        let c = connect(&scratch.url).await?;
        let context = if tenant {
            format!(
                "; SELECT set_config('ficus.tenant_id', {}, false)",
                literal(&plan.tenant_zero.id)
            )
        } else {
            String::new()
        };
        match c
            .batch_execute(&format!("SET ROLE {}{context}", quote(&role)))
            .await
        {
            Ok(()) => {
                // What the role may do today is what it must still do after every
                // step; a tenant role gives up the materialized views by design.
                let mut except = unpopulated.clone();
                if tenant {
                    except.extend(revoked.iter().cloned());
                }
                let own = workload.as_allowed(&client, &role, &except).await?;
                sessions.push((role, tenant, c, own));
            }
            Err(e) => report.roles_not_rehearsed.push(format!(
                "{role}: the rehearsing role cannot act as it ({})",
                crate::describe(&e)
            )),
        }
    }
    if sessions.is_empty() {
        report.roles_not_rehearsed.push(
            "no role of the live app or tenant role could be rehearsed, so no workload ran".into(),
        );
    }
    let stop = Arc::new(AtomicBool::new(false));
    // However the rehearsal ends, early errors included, the workload stops.
    let _stop = StopOnDrop(Arc::clone(&stop));
    let rounds = Arc::new(AtomicU64::new(0));
    let step = Arc::new(Mutex::new("before apply".to_string()));
    type Found = Arc<Mutex<Vec<(bool, String, String)>>>;
    let found: Found = Arc::default();
    let worker = {
        let (stop, rounds, step, found) = (
            Arc::clone(&stop),
            Arc::clone(&rounds),
            Arc::clone(&step),
            Arc::clone(&found),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for (role, tenant, c, own) in &sessions {
                    let when = step.lock().map(|s| s.clone()).unwrap_or_default();
                    let failures = own.round(c, role).await;
                    if let Ok(mut all) = found.lock() {
                        for f in failures
                            .into_iter()
                            .take(200usize.saturating_sub(all.len()))
                        {
                            all.push((*tenant, when.clone(), f.to_string()));
                        }
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
                // With no session the loop has nothing to wait on: it yields, so
                // the steps go on.
                tokio::task::yield_now().await;
            }
        })
    };
    let wait_rounds = |at_least: u64| {
        let rounds = Arc::clone(&rounds);
        async move {
            while rounds.load(Ordering::Relaxed) < at_least {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            rounds.load(Ordering::Relaxed)
        }
    };
    let set = |s: &str| {
        if let Ok(mut g) = step.lock() {
            *g = s.to_string();
        }
    };
    let at = wait_rounds(1).await;
    let opts_apply = ApplyOptions::default();

    // apply
    set("apply");
    let started = Instant::now();
    let applied = apply::apply(&mut client, &plan, &inv, &opts_apply, &mut |_| {}).await;
    let ok = applied.is_ok();
    step_done(
        &mut report,
        on_event,
        "apply",
        started,
        applied.err().map(|e| e.to_string()),
    );
    // enforce every table, phase by phase, with the catalogs apply left
    let mut enforced_all = false;
    if ok {
        if plan.tenant_roles.is_empty() {
            step_done(
                &mut report,
                on_event,
                "enforce",
                Instant::now(),
                Some("the plan names no tenant_roles, so there is nothing to enforce: name the roles the tenant-aware backend connects as and rehearse with --plan".into()),
            );
        } else {
            let inv_after = inspect(&client).await?;
            enforced_all = true;
            'tables: while let Some(t) = enforce::next_table(&client, &plan).await? {
                for _ in 0..2 {
                    let started = Instant::now();
                    let from = enforce::phase(&client, &t).await?;
                    set(&format!("enforce {} ({} → next)", key(&t), from.as_str()));
                    let r =
                        enforce::step(&mut client, &plan, &inv_after, &t, true, true, &opts_apply)
                            .await;
                    let name = format!("enforce {}", key(&t));
                    match r {
                        Ok(r) => {
                            set(&format!("{} {}", key(&t), r.to.as_str()));
                            step_done(
                                &mut report,
                                on_event,
                                &format!("{name} → {}", r.to.as_str()),
                                started,
                                None,
                            );
                        }
                        Err(e) => {
                            step_done(&mut report, on_event, &name, started, Some(e.to_string()));
                            enforced_all = false;
                            break 'tables;
                        }
                    }
                }
            }
        }
    }
    let at = wait_rounds(at + 1).await;
    if enforced_all {
        set("probe");
        let started = Instant::now();
        match probe::probe(&mut client, &plan).await {
            Ok(p) => {
                report.leaks = p.leaks();
                let detail = (p.leaks() > 0).then(|| {
                    p.findings
                        .iter()
                        .filter(|f| f.leak)
                        .map(|f| format!("{} as {}: {}: {}", f.table, f.role, f.attack, f.detail))
                        .collect::<Vec<_>>()
                        .join("; ")
                });
                step_done(&mut report, on_event, "probe", started, detail);
            }
            Err(e) => step_done(&mut report, on_event, "probe", started, Some(e.to_string())),
        }
    }
    set("lint");
    let started = Instant::now();
    match lint::lint(&client).await {
        Ok(l) => {
            report.lint_errors = l
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .map(|f| format!("{} {}: {} (fix: {})", f.check, f.object, f.message, f.fix))
                .collect();
            step_done(&mut report, on_event, "lint", started, None);
        }
        Err(e) => step_done(&mut report, on_event, "lint", started, Some(e.to_string())),
    }
    set("revert");
    let started = Instant::now();
    let all = ApplyOptions {
        allow_destructive: true,
        ..ApplyOptions::default()
    };
    let reverted = apply::revert(&mut client, &plan, &inv, None, &all, &mut |_| {}).await;
    step_done(
        &mut report,
        on_event,
        "revert",
        started,
        reverted.err().map(|e| e.to_string()),
    );
    set("after revert");
    wait_rounds(at + 1).await;
    stop.store(true, Ordering::Relaxed);
    let _ = worker.await;
    report.workload_rounds = rounds.load(Ordering::Relaxed);
    let found = found.lock().map(|f| f.clone()).unwrap_or_default();
    for (tenant, when, failure) in found {
        on_event(&Event::WorkloadFailure {
            step: when.clone(),
            failure: failure.clone(),
        });
        let line = format!("{when}: {failure}");
        if tenant {
            report.tenant_failures.push(line);
        } else {
            report.app_failures.push(line);
        }
    }
    let after = dump_schema(bin, &scratch.url).await?;
    report.revert_exact = Some(before == after);
    report.revert_difference = schema_difference(&before, &after);
    Ok(report)
}

/// The lines only one of two schema dumps has: `- ` before's, `+ ` after's.
pub fn schema_difference(before: &str, after: &str) -> Vec<String> {
    let only = |x: &str, y: &str, sign: char| {
        x.lines()
            .filter(|l| !y.lines().any(|m| m == *l))
            .map(|l| format!("{sign} {l}"))
            .collect::<Vec<_>>()
    };
    let mut out = only(before, after, '-');
    out.extend(only(after, before, '+'));
    out
}

/// Stops the workload when the rehearsal ends, however it ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn step_done(
    report: &mut Report,
    on_event: &mut (dyn FnMut(&Event) + Send),
    step: &str,
    started: Instant,
    blocker: Option<String>,
) {
    let ms = started.elapsed().as_millis() as u64;
    on_event(&Event::Step {
        step: step.to_string(),
        ok: blocker.is_none(),
        ms,
        detail: blocker.clone(),
    });
    report.steps.push(StepReport {
        step: step.to_string(),
        ms,
        blocker,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_scratch_database() {
        let check =
            |url: &str, expect: &str| assert_eq!(with_database(url, "scratch").unwrap(), expect);
        check("postgres://u:p@h:5432/app", "postgres://u:p@h:5432/scratch");
        check(
            "postgresql://h/app?sslmode=require",
            "postgresql://h/scratch?sslmode=require",
        );
        check("postgres://h:1", "postgres://h:1/scratch");
        assert!(with_database("host=h dbname=app", "scratch").is_err());
        assert!(with_database("postgres://h/x?dbname=app", "scratch").is_err());
    }

    #[test]
    fn a_missing_extension_is_named() {
        let used = vec!["pg_trgm".to_string(), "postgis".to_string()];
        let available = vec!["pg_trgm".to_string(), "citext".to_string()];
        assert_eq!(missing_extensions(&used, &available), ["postgis"]);
    }

    #[test]
    fn foreign_keys_become_predicates_on_the_copy() {
        assert_eq!(
            fk_predicate(
                "FOREIGN KEY (a, \"B\") REFERENCES s.p(x, y) ON DELETE CASCADE",
                "s.p"
            )
            .unwrap(),
            "(s.a IS NULL OR s.\"B\" IS NULL OR EXISTS (SELECT 1 FROM s.p p WHERE p.x = s.a AND p.y = s.\"B\"))"
        );
    }
}
