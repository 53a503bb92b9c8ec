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
