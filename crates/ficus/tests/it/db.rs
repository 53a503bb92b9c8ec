//! `ficus db` as an operator runs it: real processes against a real PostgreSQL,
//! including `kill -9` in the middle of a backfill.

use std::process::{Command, Stdio};

const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

fn ficus(url: &str, dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(FICUS)
        .args(args)
        .env("FICUS_DB_URL", url)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn psql(url: &str, sql: &str) -> String {
    let db = url.rsplit('/').next().unwrap();
    ficus_testkit::shared().psql(db, sql).unwrap()
}

/// Reads `ficus db apply`'s JSON progress lines until a keyset batch reports
/// more than `past` rows done; `None` when the run's output ends first.
fn backfill_progress_past(stdout: std::process::ChildStdout, past: i64) -> Option<i64> {
    use std::io::BufRead;
    for line in std::io::BufReader::new(stdout).lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line.ok()?) else {
            continue;
        };
        let rows = event["rows"].as_i64().unwrap_or_default();
        if event["event"] == "backfill" && event["phase"] == "keyset" && rows > past {
            return Some(rows);
        }
    }
    None
}

#[test]
fn plan_apply_survive_kill_9_during_the_backfill_then_status_and_revert() {
    let url = ficus_testkit::shared().fresh_database("dbcli").unwrap();
    psql(
        &url,
        "CREATE TABLE readings (id bigint PRIMARY KEY, device text NOT NULL, value float8);
         INSERT INTO readings SELECT g, 'dev-' || (g % 97), g * 0.25 FROM generate_series(1, 300000) g;
         CREATE TABLE schema_migrations (version text PRIMARY KEY);
         ANALYZE;",
    );
    let checksum = || {
        psql(
            &url,
            "SELECT md5(string_agg(id || ':' || device || ':' || coalesce(value::text, ''), ',' ORDER BY id)) FROM readings",
        )
    };
    let before = checksum();
    let dir = tempfile::tempdir().unwrap();
    let out = ficus(
        &url,
        dir.path(),
        &[
            "db",
            "plan",
            "--tenant-zero",
            "Acme Homes",
            "--out",
            "plan.toml",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = std::fs::read_to_string(dir.path().join("plan.toml")).unwrap();
    assert!(
        plan.contains("name = \"schema_migrations\"\nclass = \"excluded\""),
        "{plan}"
    );
    let dry = ficus(&url, dir.path(), &["db", "apply", "--plan", "plan.toml"]);
    let dry_text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success()
            && dry_text
                .contains("CREATE INDEX CONCURRENTLY IF NOT EXISTS \"readings_tenant_id_idx\""),
        "{dry_text}"
    );
    assert_eq!(
        psql(
            &url,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'tenancy'"
        ),
        "0",
        "a dry run changed the database"
    );

    // Start the run and kill -9 it again and again while it backfills. Each kill
    // waits for the run to report backfill progress past the point the previous
    // one was killed at, so the ten kills land inside the backfill on any machine:
    // the rate cap keeps the backfill of 300,000 rows longer than ten rounds need
    // (one batch each), however fast or slow the machine is.
    let mut killed_at = 0i64;
    for kills in 0..10 {
        let mut child = Command::new(FICUS)
            .args([
                "db",
                "apply",
                "--plan",
                "plan.toml",
                "--execute",
                "--batch-time",
                "20ms",
                "--max-rows-per-sec",
                "10000",
            ])
            .env("FICUS_DB_URL", &url)
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let progressed = backfill_progress_past(child.stdout.take().unwrap(), killed_at);
        let Some(rows) = progressed else {
            let out = child.wait_with_output().unwrap();
            panic!(
                "after {kills} kills the run ended ({}) before its backfill passed {killed_at} rows: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        };
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(
            psql(
                &url,
                "SELECT keyset_done FROM tenancy_private.backfill WHERE table_name = 'public.readings'"
            ),
            "f",
            "kill {} landed after the backfill's keyset pass",
            kills + 1
        );
        killed_at = rows;
    }
    let done = ficus(
        &url,
        dir.path(),
        &["db", "apply", "--plan", "plan.toml", "--execute"],
    );
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(
        psql(
            &url,
            "SELECT count(*), count(*) FILTER (WHERE tenant_id IS NULL) FROM readings"
        ),
        "300000|0"
    );
    assert_eq!(checksum(), before, "the backfill changed another column");
    let status = ficus(
        &url,
        dir.path(),
        &["db", "status", "--plan", "plan.toml", "--json"],
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["tables"][0]["index"], "valid");
    assert_eq!(status["tables"][0]["tightened"], true);
    assert_eq!(status["tables"][0]["next_step"], serde_json::Value::Null);
    // Enforcement needs tenant roles in the plan; the refusal says so and names it.
    let enforce = ficus(
        &url,
        dir.path(),
        &["db", "enforce", "--plan", "plan.toml", "--next"],
    );
    assert_eq!(enforce.status.code(), Some(1));
    let enforce_err = String::from_utf8_lossy(&enforce.stderr).to_string();
    assert!(
        enforce_err.starts_with("error: readings cannot change phase, nothing was changed: the plan names no tenant_roles"),
        "{enforce_err}"
    );
    // Lint agrees that nothing isolates the tenants yet, and that this is the
    // plan's next step rather than a hole: a note, exit 0.
    let lint = ficus(&url, dir.path(), &["db", "lint", "--json"]);
    assert_eq!(lint.status.code(), Some(0));
    let report: serde_json::Value = serde_json::from_slice(&lint.stdout).unwrap();
    assert_eq!(
        report["findings"][0]["check"], "tenant-table-not-enforced",
        "{report:#}"
    );
    assert_eq!(report["findings"][0]["severity"], "info");
    assert_eq!(report["findings"][0]["object"], "readings");
    // What distributing it onto Citus would take: readings by tenant_id,
    // co-located with the organizations; the exit code says whether the
    // operator must decide something first.
    let dist = ficus(
        &url,
        dir.path(),
        &["db", "distribute", "plan", "--plan", "plan.toml", "--json"],
    );
    let d: serde_json::Value = serde_json::from_slice(&dist.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&dist.stderr)));
    let tables = d["tables"].as_array().unwrap();
    assert_eq!(
        tables[0]["table"]["name"], "organizations",
        "referenced first"
    );
    let readings = tables
        .iter()
        .find(|t| t["table"]["name"] == "readings")
        .unwrap();
    assert_eq!(
        (
            readings["placement"]["as"].as_str(),
            readings["placement"]["column"].as_str()
        ),
        (Some("distributed"), Some("tenant_id")),
        "{readings:#}"
    );
    let manual = tables
        .iter()
        .flat_map(|t| t["blockers"].as_array().unwrap())
        .filter(|b| b["automatic"] == false)
        .count();
    assert_eq!(dist.status.code(), Some(i32::from(manual > 0)));
    let text = ficus(
        &url,
        dir.path(),
        &["db", "distribute", "plan", "--plan", "plan.toml"],
    );
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.contains("readings")
            && text.contains("distributed")
            && text.contains("tenant context"),
        "{text}"
    );
    // Revert: refused past the column without --allow-destructive, then all of it.
    let partial = ficus(
        &url,
        dir.path(),
        &["db", "revert", "--plan", "plan.toml", "--execute"],
    );
    assert_eq!(partial.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&partial.stderr)
            .contains("undoing column:public.readings is destructive")
    );
    let all = ficus(
        &url,
        dir.path(),
        &[
            "db",
            "revert",
            "--plan",
            "plan.toml",
            "--execute",
            "--allow-destructive",
        ],
    );
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    assert_eq!(
        psql(
            &url,
            "SELECT count(*) FROM pg_attribute WHERE attrelid = 'readings'::regclass AND attname = 'tenant_id' AND NOT attisdropped"
        ),
        "0"
    );
    assert_eq!(checksum(), before);
    // A wrong URL is one clear line.
    let bad = ficus(
        "postgres://nobody:pw@127.0.0.1:1/x",
        dir.path(),
        &["db", "inspect"],
    );
    let bad = String::from_utf8_lossy(&bad.stderr).to_string();
    assert!(
        bad.starts_with("error: cannot connect to postgres://127.0.0.1:1/x:")
            && !bad.contains("pw@"),
        "{bad}"
    );
}

/// The rental shop of the real-schema report: an owner-run app, views run as
/// their owner, a materialized view, a partitioned table, triggers.
const RENTALS: &str = include_str!("../../../ficus-retrofit/tests/retrofit/schemas/rentals.sql");

/// A cluster of its own (the schema creates cluster-wide roles) holding the
/// rental shop, and a plan for it written by `ficus db plan` with nobody
/// connected, its tenant role moved to `tenant_roles`.
fn rental_shop(dir: &std::path::Path) -> (ficus_testkit::PgCluster, String) {
    let cluster = ficus_testkit::PgCluster::start_with(&[("fsync", "off")]).unwrap();
    let url = cluster.fresh_database("shop").unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    cluster.psql(&db, RENTALS).unwrap();
    let out = ficus(
        &url,
        dir,
        &["db", "plan", "--tenant-zero", "Acme", "--out", "plan.toml"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan = std::fs::read_to_string(dir.join("plan.toml")).unwrap();
    let plan = plan
        .replace("    \"rent_tenant\",\n", "")
        .replace("tenant_roles = []", "tenant_roles = [\"rent_tenant\"]");
    std::fs::write(dir.join("plan.toml"), plan).unwrap();
    (cluster, url)
}

fn scratch_databases(cluster: &ficus_testkit::PgCluster) -> String {
    cluster
        .psql(
            "postgres",
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'ficus_rehearsal_%'",
        )
        .unwrap()
}

#[test]
fn rehearse_runs_the_whole_flow_on_a_copy_and_reports_a_clean_run() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = rental_shop(dir.path());
    let before = cluster
        .dump_schema(url.rsplit('/').next().unwrap())
        .unwrap();
    let out = ficus(
        &url,
        dir.path(),
        &["db", "rehearse", "--plan", "plan.toml", "--json"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Progress events are one line each; the report, last, is one document.
    let start = stdout.rfind("\n{\n").map_or(0, |i| i + 1);
    let report: serde_json::Value = serde_json::from_str(&stdout[start..]).unwrap();
    assert_eq!(report["passed"], true, "{report:#}");
    let report = &report["report"];
    assert_eq!(report["app_failures"], serde_json::json!([]));
    assert_eq!(report["tenant_failures"], serde_json::json!([]));
    assert_eq!(report["leaks"], 0);
    assert_eq!(report["revert_exact"], true);
    assert!(
        report["workload_rounds"].as_u64().unwrap() >= 2,
        "{report:#}"
    );
    let steps: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps.first(), Some(&"copy"));
    assert!(
        steps.contains(&"enforce public.payment → enforced"),
        "{steps:?}"
    );
    assert_eq!(&steps[steps.len() - 3..], ["probe", "lint", "revert"]);
    // Every table's rows were copied (the shop is smaller than the bound).
    let copied: u64 = report["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c[1].as_u64().unwrap())
        .sum();
    let rows: u64 = cluster
        .psql(
            url.rsplit('/').next().unwrap(),
            "SELECT (SELECT count(*) FROM language) + (SELECT count(*) FROM country) + (SELECT count(*) FROM city)
                  + (SELECT count(*) FROM address) + (SELECT count(*) FROM customer) + (SELECT count(*) FROM film)
                  + (SELECT count(*) FROM actor) + (SELECT count(*) FROM film_actor) + (SELECT count(*) FROM inventory)
                  + (SELECT count(*) FROM rental) + (SELECT count(*) FROM payment)",
        )
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(copied, rows);
    // The source is untouched and the scratch database is gone.
    assert_eq!(
        cluster
            .dump_schema(url.rsplit('/').next().unwrap())
            .unwrap(),
        before
    );
    assert_eq!(scratch_databases(&cluster), "0");
}

/// Plans that leave a role of the live app out — the owner, as in the first
/// real-schema report, or the role reading only views — are stopped where
/// enforcement would stop them, the role and the fix named, exit 1.
#[test]
fn rehearse_names_what_would_block_enforcement_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = rental_shop(dir.path());
    let plan = std::fs::read_to_string(dir.path().join("plan.toml")).unwrap();
    std::fs::write(
        dir.path().join("no-owner.toml"),
        plan.replace("    \"rent_owner\",\n", ""),
    )
    .unwrap();
    let out = ficus(
        &url,
        dir.path(),
        &["db", "rehearse", "--plan", "no-owner.toml"],
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("BLOCKED: city cannot change phase, nothing was changed: role rent_owner owns city but is in neither app_roles nor tenant_roles: an owner bypasses row level security"),
        "{stdout}"
    );
    // Nothing the live app did failed on the way: the default step gave the
    // owner what its inserts need although the plan leaves it out.
    assert!(
        stdout.contains("workload: ") && stdout.contains(" 0 app errors, 0 tenant-role errors"),
        "{stdout}"
    );
    std::fs::write(
        dir.path().join("plan.toml"),
        plan.replace("    \"rent_report\",\n", ""),
    )
    .unwrap();
    let out = ficus(&url, dir.path(), &["db", "rehearse", "--plan", "plan.toml"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("BLOCKED: city cannot change phase, nothing was changed: role rent_report may SELECT city (granted) but is in neither app_roles nor tenant_roles"),
        "{stdout}"
    );
    assert!(
        stdout.contains("revert restored the schema exactly: yes"),
        "{stdout}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: the rehearsal did not pass: see the blocked steps, leaks, tenant-role errors or revert above\n"
    );
    assert_eq!(scratch_databases(&cluster), "0");
}

#[test]
fn rehearse_refuses_bad_input_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = rental_shop(dir.path());
    let db = url.rsplit('/').next().unwrap().to_string();
    let before = cluster.dump_schema(&db).unwrap();
    let err = |args: &[&str], user_url: &str| {
        let out = ficus(user_url, dir.path(), args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    // The scratch database is the source.
    let e = err(
        &[
            "db",
            "rehearse",
            "--plan",
            "plan.toml",
            "--scratch-url",
            &url,
        ],
        &url,
    );
    assert_eq!(
        e,
        format!(
            "error: the scratch database is the source database {db:?}; the rehearsal writes to it, so nothing was written\n"
        )
    );
    // A role that may not create databases, and no scratch database given.
    let owner_url = url.replace("postgres://postgres@", "postgres://rent_owner@");
    let e = err(&["db", "rehearse"], &owner_url);
    assert_eq!(
        e,
        "error: role rent_owner may not create databases (CREATEDB), so it cannot make a scratch database: give --scratch-url with an empty database to rehearse in\n"
    );
    // A scratch database that is not empty.
    let busy = cluster.fresh_database("busy").unwrap();
    cluster
        .psql(busy.rsplit('/').next().unwrap(), "CREATE TABLE t (id int)")
        .unwrap();
    let e = err(&["db", "rehearse", "--scratch-url", &busy], &url);
    assert!(
        e.contains("the scratch database is not empty (1 tables and views)"),
        "{e}"
    );
    // A plan naming a role that does not exist.
    let plan = std::fs::read_to_string(dir.path().join("plan.toml")).unwrap();
    std::fs::write(
        dir.path().join("ghost.toml"),
        plan.replace(
            "tenant_roles = [\"rent_tenant\"]",
            "tenant_roles = [\"ghost\"]",
        ),
    )
    .unwrap();
    let e = err(&["db", "rehearse", "--plan", "ghost.toml"], &url);
    assert_eq!(
        e,
        "error: the plan (the plan): tenant role \"ghost\" does not exist; nothing was changed\n"
    );
    // Nothing was written anywhere.
    assert_eq!(cluster.dump_schema(&db).unwrap(), before);
    assert_eq!(scratch_databases(&cluster), "0");
}

/// A sample smaller than the tables: each table keeps at most 50 rows, only
/// those whose foreign keys still hold in the copy, and the flow still passes.
#[test]
fn rehearse_with_a_small_sample_keeps_only_rows_whose_parents_came_along() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = rental_shop(dir.path());
    let out = ficus(
        &url,
        dir.path(),
        &[
            "db",
            "rehearse",
            "--plan",
            "plan.toml",
            "--rows",
            "50",
            "--json",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let start = stdout.rfind("\n{\n").map_or(0, |i| i + 1);
    let report: serde_json::Value = serde_json::from_str(&stdout[start..]).unwrap();
    let copied: std::collections::BTreeMap<String, u64> = report["report"]["copied"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c[0].as_str().unwrap().to_string(), c[1].as_u64().unwrap()))
        .collect();
    assert!(copied.values().all(|n| *n <= 50), "{copied:?}");
    // Parents first: every language, country and city the sample needs.
    assert_eq!(copied["language"], 3);
    assert!(
        copied["payment"] < 50,
        "payments of rentals not copied stayed: {copied:?}"
    );
    assert_eq!(scratch_databases(&cluster), "0");
    let bad = ficus(&url, dir.path(), &["db", "rehearse", "--rows", "0"]);
    assert_eq!(
        String::from_utf8_lossy(&bad.stderr),
        "error: --rows 0 must be at least 1\n"
    );
}
