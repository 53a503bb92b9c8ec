//! The control-plane commands as an operator uses them: real processes, real SQLite files and
//! a real PostgreSQL server. Output is checked through `check`, which runs one
//! command and compares exit code, stdout and stderr (timestamps masked) with a
//! snapshot.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use expect_test::{Expect, expect};

const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

/// A store and a working directory for one test.
struct Ficus {
    store: String,
    dir: tempfile::TempDir,
}

impl Ficus {
    fn sqlite() -> Ficus {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("sqlite:{}", dir.path().join("ficus.db").display());
        let f = Ficus { store, dir };
        f.ok(&["init"]);
        f
    }

    fn postgres() -> Ficus {
        let store = ficus_testkit::shared().fresh_database("cli").unwrap();
        let f = Ficus {
            store,
            dir: tempfile::tempdir().unwrap(),
        };
        f.ok(&["init"]);
        f
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(FICUS);
        cmd.args(args)
            .env("FICUS_STORE", &self.store)
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command that must succeed and returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ficus {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn audit_len(&self) -> usize {
        self.json(&["audit"])["events"].as_array().unwrap().len()
    }
}

/// Replaces RFC 3339 timestamps (`2026-11-21T16:42:40.868Z`) with `TIME`.
fn mask_times(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < s.len() {
        let is_time = b.len() >= i + 24
            && b[i..i + 4].iter().all(u8::is_ascii_digit)
            && b[i + 4] == b'-'
            && b[i + 10] == b'T'
            && b[i + 23] == b'Z';
        if is_time {
            out.push_str("TIME");
            i += 24;
        } else {
            let c = s[i..].chars().next().unwrap();
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn check(f: &Ficus, args: &[&str], expect: Expect) {
    expect.assert_eq(&render(f, &f.run(args)));
}

/// A command's exit code, stdout and stderr as snapshots show them: times,
/// the store and the working directory masked.
fn render(f: &Ficus, out: &Output) -> String {
    let code = out
        .status
        .code()
        .map_or("killed".to_string(), |c| c.to_string());
    let mut actual = format!("exit {code}\n{}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !stderr.is_empty() {
        actual.push_str("--- stderr\n");
        actual.push_str(&stderr);
    }
    mask_times(&actual)
        .replace(&f.store, "STORE")
        .replace(&f.dir.path().display().to_string(), "TMP")
}

#[test]
fn an_operator_session() {
    let f = Ficus::sqlite();
    check(
        &f,
        &["init"],
        expect![[r#"
        exit 0
        store STORE: already initialized; nothing to do
    "#]],
    );
    check(
        &f,
        &[
            "tenant",
            "add",
            "acme",
            "--name",
            "Acme Homes",
            "--domain",
            "homes.acme.test",
        ],
        expect![[r#"
        exit 0
        added tenant acme in stage legacy (version 1)
    "#]],
    );
    f.ok(&[
        "tenant",
        "add",
        "globex",
        "--stage",
        "migrated",
        "--reason",
        "born on the new backend",
    ]);
    check(
        &f,
        &[
            "tenant",
            "stage",
            "acme",
            "shadow",
            "--reason",
            "first canary",
        ],
        expect![[r#"
        exit 0
        tenant acme is now in stage shadow (version 2)
    "#]],
    );
    check(
        &f,
        &["tenant", "list"],
        expect![[r#"
        exit 0
        ID      STAGE     VERSION  NAME        DOMAINS
        acme    shadow    2        Acme Homes  homes.acme.test
        globex  migrated  1        globex
    "#]],
    );
    check(
        &f,
        &["tenant", "list", "--stage", "migrated"],
        expect![[r#"
        exit 0
        ID      STAGE     VERSION  NAME    DOMAINS
        globex  migrated  1        globex
    "#]],
    );
    check(
        &f,
        &[
            "tenant",
            "rollback",
            "acme",
            "--reason",
            "mismatch on /homes",
        ],
        expect![[r#"
        exit 0
        tenant acme is now in stage legacy (version 3)
    "#]],
    );
    check(
        &f,
        &["tenant", "show", "acme"],
        expect![[r#"
            exit 0
            tenant   acme
            name     Acme Homes
            stage    legacy
            version  3
            domains  homes.acme.test
            created  TIME
            updated  TIME
            compared 0 reads in the last 24 h on 0 endpoints: 0 matched, 0 mismatched, 0 noise only, 0 shadow errors, 0 not shadowed, 0 raced by the tenant's own writes (not judged)

            latest audit events:
            AT                        TENANT  CHANGE           VERSION  ACTOR  REASON
            TIME  acme    (new) → legacy   1        cli    added with ficus tenant add
            TIME  acme    legacy → shadow  2        cli    first canary
            TIME  acme    shadow → legacy  3        cli    mismatch on /homes
        "#]],
    );
    check(
        &f,
        &["status"],
        expect![[r#"
            exit 0
            store     STORE
            tenants   2
              legacy           1  [###############---------------]
              shadow           0  [------------------------------]
              migrated         1  [###############---------------]
            migrated  50.0%  [###############---------------]
            legacy    0 requests in the last hour, 0 in the last day
            finish line: not reached (quiet window 1day)
              - 1 tenant not migrated (1 on legacy, 0 in shadow)
              - no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle
        "#]],
    );
    check(
        &f,
        &["status", "--json"],
        expect![[r#"
            exit 0
            {
              "store": "STORE",
              "version": "legacy:active",
              "tenants": 2,
              "stages": {
                "legacy": 1,
                "shadow": 0,
                "migrated": 1
              },
              "percent_migrated": 50.0,
              "legacy_retired": false,
              "legacy_traffic": {
                "last_hour": 0,
                "last_day": 0,
                "tenants": []
              },
              "finish_line": {
                "reached": false,
                "quiet_window": "1day",
                "blockers": [
                  "1 tenant not migrated (1 on legacy, 0 in shadow)",
                  "no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle"
                ]
              },
              "held_routes": []
            }
        "#]],
    );
    check(
        &f,
        &["audit", "globex", "--json"],
        expect![[r#"
        exit 0
        {
          "events": [
            {
              "seq": 2,
              "at": "TIME",
              "tenant": "globex",
              "from": null,
              "to": "migrated",
              "version": 1,
              "actor": "cli",
              "reason": "born on the new backend"
            }
          ]
        }
    "#]],
    );
    let shown = f.json(&["tenant", "show", "acme"]);
    assert_eq!(shown["tenant"]["version"], 3);
    assert_eq!(shown["audit"].as_array().unwrap().len(), 3);
    assert_eq!(
        f.json(&["audit", "--since", "1h"])["events"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        f.json(&["audit", "--since", "2999-01-01T00:00:00Z"])["events"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        f.json(&["audit", "--limit", "1"])["events"][0]["reason"],
        "mismatch on /homes"
    );
}

#[test]
fn bad_input_is_refused_with_one_line_and_exit_1_and_changes_nothing() {
    let f = Ficus::sqlite();
    f.ok(&["tenant", "add", "acme", "--domain", "acme.test"]);
    let before = (f.ok(&["tenant", "list", "--json"]), f.audit_len());
    let long = "a".repeat(64);
    let cases: &[(&[&str], &str)] = &[
        (
            &["tenant", "add", ""],
            r#"invalid tenant id "": it is empty"#,
        ),
        (
            &["tenant", "add", "Acme"],
            r#"invalid tenant id "Acme": it starts with 'A'; the first character must be a lowercase letter or a digit"#,
        ),
        (
            &["tenant", "add", "my shop"],
            r#"invalid tenant id "my shop": character ' ' at position 3 is not allowed; use a-z, 0-9 and '-'"#,
        ),
        (
            &["tenant", "add", "../x"],
            r#"invalid tenant id "../x": it starts with '.'; the first character must be a lowercase letter or a digit"#,
        ),
        (
            &["tenant", "add", &long],
            "invalid tenant id \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\": it is 64 characters long; the limit is 63",
        ),
        (
            &["tenant", "add", "x'; DROP TABLE tenants;--"],
            r#"invalid tenant id "x'; DROP TABLE tenants;--": character '\'' at position 2 is not allowed; use a-z, 0-9 and '-'"#,
        ),
        (
            &["tenant", "add", "new", "--stage", "done"],
            r#"unknown stage "done": expected one of legacy, shadow, migrated"#,
        ),
        (&["tenant", "add", "acme"], "tenant acme already exists"),
        (
            &["tenant", "add", "new", "--domain", "acme.test"],
            "domain acme.test already belongs to tenant acme",
        ),
        (
            &["tenant", "add", "new", "--domain", "http://x.test/"],
            r#"invalid domain "http://x.test/": give a bare host name, without scheme, port or path"#,
        ),
        (
            &["tenant", "stage", "acme", "migrated", "--reason", "hurry"],
            "cannot move tenant acme from legacy to migrated: legacy → migrated skips shadow, where the evidence for a move is gathered; promote to shadow first",
        ),
        (
            &["tenant", "stage", "acme", "legacy", "--reason", "again"],
            "cannot move tenant acme from legacy to legacy: the tenant is already in stage legacy",
        ),
        (
            &["tenant", "stage", "acme", "Shadow", "--reason", "x"],
            r#"unknown stage "Shadow": expected one of legacy, shadow, migrated"#,
        ),
        (
            &["tenant", "stage", "acme", "shadow", "--reason", " "],
            "a reason is required and must not be empty",
        ),
        (
            &["tenant", "stage", "ghost", "shadow", "--reason", "x"],
            "no tenant ghost",
        ),
        (
            &[
                "tenant",
                "stage",
                "acme",
                "shadow",
                "--reason",
                "x",
                "--if-version",
                "7",
            ],
            "tenant acme changed since version 7: it is at version 1, last changed by cli at TIME (\"added with ficus tenant add\"); nothing was written",
        ),
        (
            &["tenant", "rollback", "acme", "--reason", "x"],
            "tenant acme is on legacy already; there is nothing to roll back",
        ),
        (
            &[
                "tenant", "rollback", "acme", "--reason", "x", "--to", "shadow",
            ],
            "a rollback only moves backward; legacy → shadow for tenant acme is a promotion",
        ),
        (&["tenant", "show", "ghost"], "no tenant ghost"),
        (&["audit", "ghost"], "no tenant ghost"),
    ];
    for (args, message) in cases {
        let out = f.run(args);
        let stderr = mask_times(&String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "ficus {args:?}: {stderr}");
        assert_eq!(stderr, format!("error: {message}\n"), "ficus {args:?}");
        assert!(
            out.stdout.is_empty(),
            "ficus {args:?} printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(
        (f.ok(&["tenant", "list", "--json"]), f.audit_len()),
        before,
        "the store changed"
    );
}

#[test]
fn usage_errors_exit_2() {
    let f = Ficus::sqlite();
    for args in [
        &["tenant", "stage", "acme"][..],
        &["frobnicate"],
        &["audit", "--since", "yesterday"],
        &["tenant", "list", "--bogus"],
    ] {
        let out = f.run(args);
        assert_eq!(out.status.code(), Some(2), "ficus {args:?}");
    }
    assert!(f.run(&["--help"]).status.success());
    assert!(f.run(&["tenant", "rollback", "--help"]).status.success());
}

#[test]
fn store_problems_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are not the droids\n").unwrap();
    let f = Ficus {
        store: format!("sqlite:{}", path.display()),
        dir,
    };
    check(
        &f,
        &["tenant", "list"],
        expect![[r#"
        exit 1
        --- stderr
        error: STORE is not a ficus store (not an SQLite database); it was not modified
    "#]],
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        "these are not the droids\n"
    );
    let f = Ficus {
        store: "mysql://db/x".into(),
        dir: tempfile::tempdir().unwrap(),
    };
    check(
        &f,
        &["status"],
        expect![[r#"
        exit 1
        --- stderr
        error: invalid store url "STORE": expected sqlite:PATH or postgres://USER@HOST:PORT/DATABASE
    "#]],
    );
}

#[test]
fn import_reports_every_bad_line_and_adds_nothing() {
    let f = Ficus::sqlite();
    f.ok(&["tenant", "add", "taken", "--domain", "taken.test"]);
    f.file(
        "tenants.csv",
        "id,name,stage,domains\n\
         good,Good Co,legacy,good.test\n\
         Bad,,,\n\
         worse,,finished,\n\
         fine,\"Fine, Inc\",shadow,fine.test www.fine.test\n\
         short\n\
         nodomain,,,not_a_host\n",
    );
    check(
        &f,
        &["tenant", "import", "tenants.csv"],
        expect![[r#"
        exit 1
        --- stderr
        error: import refused, nothing was added: 4 problems in tenants.csv:
          line 3: invalid tenant id "Bad": it starts with 'B'; the first character must be a lowercase letter or a digit
          line 4: unknown stage "finished": expected one of legacy, shadow, migrated
          line 6: it has 1 field; the header has 4
          line 7: invalid domain "not_a_host": a custom domain needs at least two labels
    "#]],
    );
    f.file(
        "conflicts.csv",
        "id,domains\n\
         ok-1,ok.test\n\
         taken,\n\
         ok-2,taken.test\n\
         ok-1,\n",
    );
    check(
        &f,
        &["tenant", "import", "conflicts.csv"],
        expect![[r#"
        exit 1
        --- stderr
        error: import refused, nothing was added: 3 conflicts with STORE:
          line 3: tenant taken already exists
          line 4: domain taken.test already belongs to tenant taken
          line 5: tenant ok-1 is also at line 2
    "#]],
    );
    check(
        &f,
        &["tenant", "import", "missing.csv"],
        expect![[r#"
        exit 1
        --- stderr
        error: import refused, nothing was added: 1 problem in missing.csv:
          cannot read missing.csv: No such file or directory (os error 2)
    "#]],
    );
    f.file("header.csv", "tenant,name\nacme,Acme\n");
    check(
        &f,
        &["tenant", "import", "header.csv"],
        expect![[r#"
        exit 1
        --- stderr
        error: import refused, nothing was added: 2 problems in header.csv:
          line 1: unknown column "tenant"; the columns are id, name, stage, domains
          line 1: the header has no "id" column
    "#]],
    );
    assert_eq!(
        f.json(&["tenant", "list"])["tenants"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(f.audit_len(), 1);

    f.file("good.csv", "# exported from billing\nid,name,stage,domains\nacme,Acme Homes,,homes.acme.test acme.test\nglobex,,migrated,\n");
    check(
        &f,
        &["tenant", "import", "good.csv"],
        expect![[r#"
        exit 0
        imported 2 tenants from good.csv
    "#]],
    );
    let acme = f.json(&["tenant", "show", "acme"]);
    assert_eq!(
        acme["tenant"]["domains"],
        serde_json::json!(["acme.test", "homes.acme.test"])
    );
    assert_eq!(acme["tenant"]["stage"], "legacy");
}

/// Several operators moving one tenant at once: exactly one wins, every other one
/// is told why, and the audit log holds exactly one event for the move.
fn concurrent_processes_have_one_winner(f: &Ficus) {
    f.ok(&["tenant", "add", "acme"]);
    let children: Vec<_> = (0..6)
        .map(|i| {
            f.command(&[
                "tenant",
                "stage",
                "acme",
                "shadow",
                "--reason",
                &format!("operator {i}"),
                "--if-version",
                "1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let winners = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(winners, 1, "{outputs:?}");
    for loser in outputs.iter().filter(|o| !o.status.success()) {
        assert_eq!(loser.status.code(), Some(1));
        let msg = String::from_utf8_lossy(&loser.stderr);
        assert!(msg.starts_with("error: tenant acme changed since version 1: it is at version 2, last changed by cli at "), "{msg}");
    }
    let events = f.json(&["audit", "acme"])["events"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(events.len(), 2, "creation and exactly one move: {events:?}");
}

#[test]
fn concurrent_processes_have_one_winner_sqlite() {
    concurrent_processes_have_one_winner(&Ficus::sqlite());
}

#[test]
fn concurrent_processes_have_one_winner_postgres() {
    concurrent_processes_have_one_winner(&Ficus::postgres());
}

/// `kill -9` at several points of a 10,000-tenant import: afterwards the store holds
/// all of them or none, and still opens. The kill points are fractions of how long
/// an uninterrupted import takes on a scratch store, so they land in every phase:
/// start-up, parsing, and the writing transaction.
fn killed_import_is_all_or_nothing(make: fn() -> Ficus) {
    let mut csv = String::from("id,domains\n");
    for i in 0..10_000 {
        csv.push_str(&format!("t{i:05},t{i}.example.test\n"));
    }
    let scratch = make();
    scratch.file("big.csv", &csv);
    let started = std::time::Instant::now();
    scratch.ok(&["tenant", "import", "big.csv"]);
    let full = started.elapsed();

    let f = make();
    f.file("big.csv", &csv);
    let mut outcomes = Vec::new();
    for percent in [5u32, 20, 35, 50, 65, 75, 85, 90, 95, 98] {
        let mut child = f
            .command(&["tenant", "import", "big.csv"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        #[allow(
            clippy::disallowed_methods,
            reason = "a synchronous test pacing a child process"
        )]
        std::thread::sleep(full * percent / 100);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let count = f.json(&["tenant", "list"])["tenants"]
            .as_array()
            .unwrap()
            .len();
        assert!(
            count == 0 || count == 10_000,
            "after kill at {percent}% of {full:?}: {count} tenants"
        );
        outcomes.push((percent, status.success(), count));
        if count == 10_000 {
            break;
        }
    }
    eprintln!(
        "kill -9 outcomes for a {full:?} import (percent, finished, tenants after): {outcomes:?}"
    );
    // Finish with an import that is not interrupted, so the run proves both ends.
    if outcomes.last().is_some_and(|o| o.2 == 0) {
        f.ok(&["tenant", "import", "big.csv"]);
    }
    assert_eq!(f.json(&["status"])["tenants"], 10_000, "{outcomes:?}");
    assert_eq!(f.audit_len(), 10_000);
}

#[test]
fn killed_import_is_all_or_nothing_sqlite() {
    killed_import_is_all_or_nothing(Ficus::sqlite);
}

#[test]
fn killed_import_is_all_or_nothing_postgres() {
    killed_import_is_all_or_nothing(Ficus::postgres);
}

#[test]
fn the_postgres_store_behaves_like_the_embedded_one() {
    let f = Ficus::postgres();
    f.ok(&["tenant", "add", "acme", "--domain", "acme.test"]);
    f.ok(&["tenant", "stage", "acme", "shadow", "--reason", "canary"]);
    check(
        &f,
        &["tenant", "list"],
        expect![[r#"
        exit 0
        ID    STAGE   VERSION  NAME  DOMAINS
        acme  shadow  2        acme  acme.test
    "#]],
    );
    let out = f.run(&["tenant", "add", "other", "--domain", "acme.test"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: domain acme.test already belongs to tenant acme\n"
    );
}

#[test]
fn an_unreachable_postgres_store_is_named_and_exits_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = Ficus {
        store: format!("postgres://ficus:hunter2@127.0.0.1:{port}/control"),
        dir: tempfile::tempdir().unwrap(),
    };
    let out = f.run(&["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach the PostgreSQL store at postgres://127.0.0.1:{port}/control: "
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"));
    assert_eq!(stderr.lines().count(), 1);
}

/// `ficus watch` in one process sees a change committed by another.
fn watch_sees_changes_from_another_process(f: &Ficus) {
    f.ok(&["tenant", "add", "acme"]);
    let watcher = f
        .command(&["watch", "--json", "--count", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The watcher subscribes from the position it reads at start; a change made
    // before that is not part of its feed, so keep changing until it reports,
    // for as long as only a stuck run would need.
    let mut stage = "shadow";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut pid_done = false;
    while !pid_done && std::time::Instant::now() < deadline {
        f.ok(&["tenant", "stage", "acme", stage, "--reason", "watch test"]);
        stage = if stage == "shadow" {
            "legacy"
        } else {
            "shadow"
        };
        #[allow(
            clippy::disallowed_methods,
            reason = "a synchronous test pacing a child process"
        )]
        std::thread::sleep(Duration::from_millis(200));
        pid_done = std::fs::metadata(format!("/proc/{}", watcher.id())).is_err()
            || std::fs::read_to_string(format!("/proc/{}/stat", watcher.id()))
                .is_ok_and(|s| s.contains(") Z "));
    }
    let out = watcher.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(line["event"], "changed");
    assert_eq!(line["tenants"][0]["id"], "acme");
}

#[test]
fn watch_sees_changes_from_another_process_sqlite() {
    watch_sees_changes_from_another_process(&Ficus::sqlite());
}

#[test]
fn watch_sees_changes_from_another_process_postgres() {
    watch_sees_changes_from_another_process(&Ficus::postgres());
}

/// Records comparison evidence for a tenant the way a proxy would.
fn record_evidence(
    store: &str,
    tenant: &str,
    per_endpoint: &[(&str, u64, u64)],
    traffic_age_ms: Option<i64>,
) {
    use ficus_core::{TenantId, Timestamp};
    use ficus_store::{ClassCount, ComparisonCount, Evidence, OpenMode, StoreUrl, TrafficCount};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let counts: Vec<ComparisonCount> = per_endpoint
        .iter()
        .map(|(endpoint, compared, mismatched)| ComparisonCount {
            tenant: TenantId::parse(tenant).unwrap(),
            endpoint: endpoint.to_string(),
            version: String::new(),
            last_at: Timestamp::from_unix_millis(now),
            requests: *compared,
            compared: *compared,
            matched: compared - mismatched,
            mismatched: *mismatched,
            noise_only: 0,
            errors: 0,
            shed: 0,
            raced: 0,
        })
        .collect();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = ficus_store::open(&StoreUrl::parse(store).unwrap(), OpenMode::Existing)
            .await
            .unwrap();
        // Each endpoint's mismatches are one class of their own, as a proxy
        // reports them.
        let classes: Vec<ClassCount> = per_endpoint
            .iter()
            .filter(|(_, _, mismatched)| *mismatched > 0)
            .map(|(endpoint, _, mismatched)| {
                let key = ficus_diff::class::ClassKey {
                    endpoint: endpoint.to_string(),
                    path: "$.price".into(),
                    kind: ficus_diff::Kind::Value,
                };
                ClassCount {
                    tenant: TenantId::parse(tenant).unwrap(),
                    id: key.id(),
                    endpoint: key.endpoint.clone(),
                    path: key.path.clone(),
                    kind: "value".into(),
                    additive: false,
                    version: String::new(),
                    count: *mismatched,
                    first_at: Timestamp::from_unix_millis(now),
                    last_at: Timestamp::from_unix_millis(now),
                    example: None,
                }
            })
            .collect();
        s.record_comparisons(&Evidence {
            counts: counts.clone(),
            classes,
            ..Evidence::default()
        })
        .await
        .unwrap();
        // Both backends answered the compared reads in about 4 ms.
        let mut latency = ficus_core::latency::Histogram::default();
        for _ in 0..counts.len() * 50 {
            latency.record(4_000);
        }
        let reports: Vec<ficus_store::LatencyReport> =
            [ficus_core::Backend::Legacy, ficus_core::Backend::New]
                .into_iter()
                .map(|backend| ficus_store::LatencyReport {
                    tenant: TenantId::parse(tenant).unwrap(),
                    backend,
                    at: Timestamp::from_unix_millis(now),
                    histogram: latency.clone(),
                })
                .collect();
        s.record_latencies(&reports).await.unwrap();
        if let Some(age) = traffic_age_ms {
            let at = Timestamp::from_unix_millis(now - age);
            let c = TrafficCount {
                tenant: Some(TenantId::parse(tenant).unwrap()),
                requests: 3,
                last_at: at,
            };
            s.record_legacy_traffic(&[c], at).await.unwrap();
        }
    });
}

#[test]
fn promotion_passes_the_readiness_gate_or_is_forced_with_a_reason() {
    let f = Ficus::sqlite();
    f.ok(&["tenant", "add", "acme"]);
    f.ok(&["tenant", "add", "globex", "--stage", "shadow"]);
    f.ok(&["tenant", "add", "initech", "--stage", "shadow"]);
    check(
        &f,
        &["tenant", "promote", "acme"],
        expect![[r#"
        exit 0
        tenant acme is now in stage shadow (version 2)
    "#]],
    );
    check(
        &f,
        &["tenant", "promote", "acme"],
        expect![[r#"
            exit 1
            --- stderr
            error: tenant acme is not ready, nothing was changed: comparisons (0 compared; at least 500 needed); coverage (no traffic seen in the window); latency (no latency measured in the window); use --force --reason to override
        "#]],
    );
    check(
        &f,
        &["tenant", "promote", "acme", "--force"],
        expect![[r#"
        exit 1
        --- stderr
        error: --force needs --reason: the audit log must say why the readiness gate was overridden
    "#]],
    );

    record_evidence(
        &f.store,
        "acme",
        &[("GET /homes/{id}", 580, 0), ("GET /search", 40, 0)],
        None,
    );
    record_evidence(&f.store, "globex", &[("GET /homes/{id}", 700, 2)], None);
    check(
        &f,
        &["readiness", "acme"],
        expect![[r#"
            exit 0
            tenant acme: ready (window 1day)
              pass  comparisons    620 compared; at least 500 needed
              pass  mismatches     0 mismatched; at most 0 allowed
              pass  coverage       2 of 2 endpoints compared at least 5 times
              pass  shadow errors  0.00% of shadow requests failed; at most 1.00% allowed
              pass  latency        new p50 4.4 ms p99 4.4 ms vs legacy p50 4.4 ms p99 4.4 ms; new p99 at most 14.4 ms allowed
        "#]],
    );
    check(
        &f,
        &["readiness", "--all"],
        expect![[r#"
            exit 0
            TENANT   VERDICT    SCORE  FAILING
            acme     ready      100%
            globex   not ready  80%    mismatches
            initech  not ready  40%    comparisons, coverage, latency
        "#]],
    );
    check(
        &f,
        &["tenant", "promote", "acme"],
        expect![[r#"
        exit 0
        tenant acme is now in stage migrated (version 3)
    "#]],
    );
    check(
        &f,
        &["tenant", "promote", "acme"],
        expect![[r#"
        exit 1
        --- stderr
        error: tenant acme is migrated already; there is no stage after it
    "#]],
    );
    check(
        &f,
        &[
            "tenant",
            "promote",
            "globex",
            "--force",
            "--reason",
            "the two price mismatches are a known rounding fix",
        ],
        expect![[r#"
        exit 0
        tenant globex is now in stage migrated (version 2)
    "#]],
    );
    let audit = f.json(&["audit", "globex"]);
    let last = &audit["events"].as_array().unwrap().last().unwrap()["reason"];
    assert!(last.as_str().unwrap().starts_with("forced past the readiness gate: the two price mismatches are a known rounding fix (failing: mismatches"), "{last}");
    let ready = f.json(&["readiness", "initech"]);
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["criteria"][0]["name"], "comparisons");
}

#[test]
fn legacy_is_retired_only_when_empty_and_quiet_and_can_be_undone() {
    let f = Ficus::sqlite();
    f.ok(&["tenant", "add", "acme", "--stage", "shadow"]);
    check(
        &f,
        &["retire-legacy"],
        expect![[r#"
        exit 1
        --- stderr
        error: legacy cannot be retired yet, nothing was changed: 1 tenant not migrated (0 on legacy, 1 in shadow); no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle
    "#]],
    );
    f.ok(&["tenant", "stage", "acme", "migrated", "--reason", "moved"]);
    record_evidence(&f.store, "acme", &[], Some(5 * 60 * 1000));
    check(
        &f,
        &["retire-legacy"],
        expect![[r#"
        exit 1
        --- stderr
        error: legacy cannot be retired yet, nothing was changed: legacy received traffic within the quiet window
    "#]],
    );
    check(
        &f,
        &["status"],
        expect![[r#"
            exit 0
            store     STORE
            tenants   1
              legacy           0  [------------------------------]
              shadow           0  [------------------------------]
              migrated         1  [##############################]
            migrated  100.0%  [##############################]
            legacy    3 requests in the last hour, 3 in the last day
              TENANT  LAST HOUR  LAST DAY  LAST REQUEST
              acme    3          3         TIME
            finish line: not reached (quiet window 1day)
              - legacy received traffic within the quiet window
        "#]],
    );
    check(
        &f,
        &["retire-legacy", "--quiet-window", "1m"],
        expect![[r#"
        exit 0
        legacy is retired: every proxy now sends all traffic to new (undo with --undo)
    "#]],
    );
    check(
        &f,
        &["retire-legacy", "--quiet-window", "1m"],
        expect![[r#"
        exit 0
        legacy was retired already
    "#]],
    );
    check(
        &f,
        &["status", "--json"],
        expect![[r#"
            exit 0
            {
              "store": "STORE",
              "version": "legacy:retired",
              "tenants": 1,
              "stages": {
                "legacy": 0,
                "shadow": 0,
                "migrated": 1
              },
              "percent_migrated": 100.0,
              "legacy_retired": true,
              "legacy_traffic": {
                "last_hour": 3,
                "last_day": 3,
                "tenants": [
                  {
                    "tenant": "acme",
                    "last_hour": 3,
                    "last_day": 3,
                    "last_at": "TIME"
                  }
                ]
              },
              "finish_line": {
                "reached": false,
                "quiet_window": "1day",
                "blockers": [
                  "legacy received traffic within the quiet window"
                ]
              },
              "held_routes": []
            }
        "#]],
    );
    check(
        &f,
        &[
            "retire-legacy",
            "--undo",
            "--reason",
            "a partner integration still calls legacy",
        ],
        expect![[r#"
        exit 0
        legacy is no longer retired; tenants on legacy or in shadow are routed to it again
    "#]],
    );
}

/// A `ficus serve` process, stopped when dropped.
struct Served {
    child: std::process::Child,
    url: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ficus {
    fn serve(&self) -> Served {
        self.serve_with_env(&[])
    }

    fn serve_with_env(&self, env: &[(&str, &str)]) -> Served {
        use std::io::BufRead;
        let mut cmd = self.command(&["serve", "--listen", "127.0.0.1:0"]);
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_string();
        Served { child, url }
    }

    /// Runs a command against the API at `url` with `token`, not the store.
    fn remote(&self, url: &str, token: &str, args: &[&str]) -> Output {
        let mut cmd = self.command(args);
        cmd.env_remove("FICUS_STORE")
            .env("FICUS_API", url)
            .env("FICUS_TOKEN", token);
        cmd.output().unwrap()
    }
}

#[test]
fn the_cli_drives_a_remote_control_plane_through_the_api() {
    let f = Ficus::sqlite();
    let token = f.json(&["token", "rotate"])["api_token"]
        .as_str()
        .unwrap()
        .to_string();
    let served = f.serve();
    let api = |args: &[&str]| render(&f, &f.remote(&served.url, &token, args));
    expect![[r#"
        exit 0
        added tenant acme in stage legacy (version 1)
    "#]]
    .assert_eq(&api(&["tenant", "add", "acme", "--reason", "onboarding"]));
    expect![[r#"
        exit 0
        tenant acme is now in stage shadow (version 2)
    "#]]
    .assert_eq(&api(&["tenant", "promote", "acme"]));
    expect![[r#"
        exit 1
        --- stderr
        error: tenant acme is not ready, nothing was changed: comparisons (0 compared; at least 500 needed); coverage (no traffic seen in the window); latency (no latency measured in the window); use --force --reason to override
    "#]]
    .assert_eq(&api(&["tenant", "promote", "acme"]));
    expect![[r#"
        exit 0
        window             1h
        min_comparisons    100
        max_mismatches     0
        min_per_endpoint   5
        max_error_rate     0.01
        max_latency_ratio  1.5
        latency_slack_ms   10
        quiet_window       1day
    "#]]
    .assert_eq(&api(&[
        "gate",
        "set",
        "--window",
        "1h",
        "--min-comparisons",
        "100",
        "--reason",
        "small tenants",
    ]));
    expect![[r#"
        exit 1
        --- stderr
        error: max_error_rate must be between 0.0 and 1.0, got 3
    "#]]
    .assert_eq(&api(&[
        "gate",
        "set",
        "--max-error-rate",
        "3",
        "--reason",
        "x",
    ]));
    record_evidence(&f.store, "acme", &[("GET /homes/{id}", 150, 0)], None);
    expect![[r#"
        exit 0
        tenant acme: ready (window 1h)
          pass  comparisons    150 compared; at least 100 needed
          pass  mismatches     0 mismatched; at most 0 allowed
          pass  coverage       1 of 1 endpoints compared at least 5 times
          pass  shadow errors  0.00% of shadow requests failed; at most 1.00% allowed
          pass  latency        new p50 4.4 ms p99 4.4 ms vs legacy p50 4.4 ms p99 4.4 ms; new p99 at most 14.4 ms allowed
    "#]]
    .assert_eq(&api(&["readiness", "acme"]));
    expect![[r#"
        exit 0
        tenant acme is now in stage migrated (version 3)
    "#]]
    .assert_eq(&api(&["tenant", "promote", "acme"]));
    expect![[r#"
        exit 1
        --- stderr
        error: legacy cannot be retired yet, nothing was changed: no proxy has reported legacy traffic yet, so legacy cannot be shown to be idle
    "#]]
    .assert_eq(&api(&["retire-legacy"]));
    // The audit log, read directly from the store, says the API did it.
    let events = f.json(&["audit", "acme"]);
    let actors: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    assert_eq!(actors, ["api", "api", "api"]);
    // A wrong token, and a command that needs the store itself.
    expect![[r#"
        exit 1
        --- stderr
        error: the control plane refused the token: wrong token
    "#]]
    .assert_eq(&render(
        &f,
        &f.remote(&served.url, "ficus_wrong", &["status"]),
    ));
    expect![[r#"
        exit 1
        --- stderr
        error: this command works on the store itself; drop --api (and FICUS_API) to use --store
    "#]]
    .assert_eq(&api(&["tenant", "import", "x.csv"]));
    let unreachable = render(&f, &f.remote("http://127.0.0.1:1", &token, &["status"]));
    assert!(
        unreachable.starts_with(
            "exit 1\n--- stderr\nerror: cannot reach the control plane at http://127.0.0.1:1:"
        ),
        "{unreachable}"
    );
    assert!(!unreachable.contains(&token));
}

#[test]
fn promote_next_moves_the_most_ready_one_at_a_time_and_stops_at_a_failure() {
    let f = Ficus::sqlite();
    for t in ["acme", "globex", "initech", "umbrella"] {
        f.ok(&["tenant", "add", t, "--stage", "shadow"]);
    }
    f.ok(&[
        "gate",
        "set",
        "--min-comparisons",
        "100",
        "--reason",
        "test",
    ]);
    record_evidence(&f.store, "acme", &[("GET /a", 300, 0)], None);
    record_evidence(&f.store, "globex", &[("GET /a", 200, 0)], None);
    record_evidence(&f.store, "initech", &[("GET /a", 200, 1)], None);
    expect![[r#"
        exit 1
        tenant acme is now in stage migrated (version 2); soaking for 100ms
        tenant globex is now in stage migrated (version 2); soaking for 100ms
        promoted 2 of 3: acme, globex
        --- stderr
        error: stopped: none of the 2 tenants in shadow is ready
    "#]]
    .assert_eq(&render(
        &f,
        &f.run(&["tenant", "promote", "--next", "3", "--soak", "100ms"]),
    ));
    // A tenant the guard (here: an operator) rolls back during its soak stops the run.
    // The rollback has to land inside the soak, which is only checked when it
    // ends; 30 s leave a busy machine room for the two commands in between (with
    // 3 s, a slow `tenant show` and `tenant rollback` could land after it).
    record_evidence(&f.store, "umbrella", &[("GET /a", 300, 0)], None);
    let child = f
        .command(&["tenant", "promote", "--next", "2", "--soak", "30s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while f.json(&["tenant", "show", "umbrella"])["tenant"]["stage"] != "migrated" {
        assert!(
            std::time::Instant::now() < deadline,
            "umbrella never promoted"
        );
        #[allow(clippy::disallowed_methods, reason = "a test polling another process")]
        std::thread::sleep(Duration::from_millis(50));
    }
    f.ok(&[
        "tenant",
        "rollback",
        "umbrella",
        "--reason",
        "new backend broke",
    ]);
    let out = child.wait_with_output().unwrap();
    expect![[r#"
        exit 1
        tenant umbrella is now in stage migrated (version 2); soaking for 30s
        promoted 1 of 2: umbrella
        --- stderr
        error: stopped: tenant umbrella did not hold through the soak: it is in stage shadow (version 3); see `ficus audit umbrella`
    "#]]
    .assert_eq(&render(&f, &out));
}

#[test]
fn tenant_configuration_is_edited_versioned_and_restored_from_the_cli() {
    let f = Ficus::sqlite();
    f.run(&[
        "tenant",
        "add",
        "acme",
        "--name",
        "Acme Homes",
        "--domain",
        "acme.test",
    ]);
    f.run(&["tenant", "add", "globex", "--domain", "globex.test"]);
    check(
        &f,
        &["tenant", "config", "get", "acme"],
        expect![[r#"
            exit 0
            tenant acme configuration version 1 (by provisioning at TIME: initial configuration from the tenant's addition by an operator)
            {
              "display_name": "Acme Homes",
              "app_name": "Acme Homes",
              "branding": {
                "primary_color": null,
                "accent_color": null,
                "logo_url": null,
                "icon_url": null
              },
              "domains": [
                "acme.test"
              ],
              "locale": "en",
              "features": {}
            }
        "#]],
    );
    let doc = f.dir.path().join("acme.json");
    std::fs::write(
        &doc,
        r##"{"display_name": "Acme Homes", "app_name": "Acme", "domains": ["homes.acme.test"],
            "branding": {"primary_color": "#0a7f5a"}, "features": {"dark_mode": {"default": false, "ios": true}}}"##,
    )
    .unwrap();
    check(
        &f,
        &[
            "tenant",
            "config",
            "set",
            "acme",
            "--file",
            doc.to_str().unwrap(),
            "--reason",
            "rebrand",
        ],
        expect![[r##"
            exit 0
            tenant acme configuration version 2 (by cli at TIME: rebrand)
            {
              "display_name": "Acme Homes",
              "app_name": "Acme",
              "branding": {
                "primary_color": "#0a7f5a",
                "accent_color": null,
                "logo_url": null,
                "icon_url": null
              },
              "domains": [
                "homes.acme.test"
              ],
              "locale": "en",
              "features": {
                "dark_mode": {
                  "default": false,
                  "ios": true
                }
              }
            }
        "##]],
    );
    // Refusals name the field; nothing is written.
    check(
        &f,
        &[
            "tenant",
            "config",
            "set",
            "acme",
            "--set",
            "branding.accent_color=orange",
            "--reason",
            "x",
        ],
        expect![[r##"
            exit 1
            --- stderr
            error: config.branding.accent_color: "orange" is not a colour: use #rgb or #rrggbb
        "##]],
    );
    check(
        &f,
        &[
            "tenant",
            "config",
            "set",
            "acme",
            "--set",
            "domains=globex.test",
            "--reason",
            "x",
        ],
        expect![[r##"
            exit 1
            --- stderr
            error: domain globex.test already belongs to tenant globex
        "##]],
    );
    let edited = f.run(&[
        "tenant",
        "config",
        "set",
        "acme",
        "--set",
        "app_name=Acme Next",
        "--set",
        "features.dark_mode.android=true",
        "--reason",
        "new name",
        "--json",
    ]);
    let edited: serde_json::Value = serde_json::from_slice(&edited.stdout).unwrap();
    assert_eq!(edited["version"], 3);
    assert_eq!(edited["config"]["features"]["dark_mode"]["android"], true);
    check(
        &f,
        &[
            "tenant",
            "config",
            "restore",
            "acme",
            "--version",
            "2",
            "--reason",
            "roll back the name",
            "--json",
        ],
        expect![[r##"
            exit 0
            {
              "tenant": "acme",
              "version": 4,
              "config": {
                "display_name": "Acme Homes",
                "app_name": "Acme",
                "branding": {
                  "primary_color": "#0a7f5a",
                  "accent_color": null,
                  "logo_url": null,
                  "icon_url": null
                },
                "domains": [
                  "homes.acme.test"
                ],
                "locale": "en",
                "features": {
                  "dark_mode": {
                    "default": false,
                    "ios": true
                  }
                }
              },
              "actor": "cli",
              "reason": "restore version 2: roll back the name",
              "at": "TIME"
            }
        "##]],
    );
    check(
        &f,
        &["tenant", "config", "history", "acme"],
        expect![[r#"
            exit 0
            VERSION  AT                        ACTOR         REASON
            4        TIME  cli           restore version 2: roll back the name
            3        TIME  cli           new name
            2        TIME  cli           rebrand
            1        TIME  provisioning  initial configuration from the tenant's addition by an operator
        "#]],
    );
}

/// A billing event whose database step cannot run yet (the tenant database has
/// no tenancy spine), the server killed with the job half done, then restarted
/// once the database is ready: the job is finished without a second delivery.
#[test]
fn a_billing_event_interrupted_between_the_store_and_the_database_is_finished_on_restart() {
    let f = Ficus::sqlite();
    let db = ficus_testkit::shared().fresh_database("provision").unwrap();
    let env = [
        ("FICUS_BILLING_SECRET", "whsec_cli"),
        ("FICUS_TENANT_DB_URL", db.as_str()),
    ];
    let served = f.serve_with_env(&env);
    let body = serde_json::json!({
        "id": "evt_crash",
        "type": "subscription.created",
        "data": {"customer": {"name": "Umbrella Homes"}, "domain": "homes.umbrella.test"}
    })
    .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let signature = ficus_admin::provision::sign(b"whsec_cli", now, body.as_bytes());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, answer) = rt.block_on(async {
        let r = reqwest::Client::new()
            .post(format!("{}/v1/hooks/billing", served.url))
            .header("content-type", "application/json")
            .header("ficus-signature", &signature)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    });
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["steps"], serde_json::json!(["tenant", "config"]));
    assert!(
        answer["last_error"]
            .as_str()
            .unwrap()
            .starts_with("database: this database has no tenancy spine yet"),
        "{answer}"
    );
    // The crash: the store holds the tenant and its configuration, the tenant
    // database nothing.
    drop(served);
    let tenant = f.json(&["tenant", "show", "umbrella-homes"]);
    assert_eq!(
        tenant["tenant"]["domains"],
        serde_json::json!(["homes.umbrella.test"])
    );
    // The database gets its spine; the restarted server finishes the job.
    rt.block_on(async {
        let mut c = ficus_retrofit::connect(&db).await.unwrap();
        let inv = ficus_retrofit::inspect(&c).await.unwrap();
        let plan =
            ficus_retrofit::Plan::draft(&inv, "Acme", ficus_retrofit::plan::IdType::Uuid).unwrap();
        let only = ficus_retrofit::apply::Options {
            only: Some(ficus_retrofit::plan::StepKind::Spine),
            ..Default::default()
        };
        ficus_retrofit::apply::apply(&mut c, &plan, &inv, &only, &mut |_| {})
            .await
            .unwrap();
    });
    let _restarted = f.serve_with_env(&env);
    let started = std::time::Instant::now();
    loop {
        let job = f.json(&["provision", "show", "evt_crash"]);
        if job["jobs"][0]["state"] == "done" {
            assert_eq!(
                job["jobs"][0]["steps"],
                serde_json::json!(["tenant", "config", "database"])
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the restarted server did not finish the job: {job}"
        );
        #[allow(clippy::disallowed_methods, reason = "a test polling another process")]
        std::thread::sleep(Duration::from_millis(100));
    }
    let name = db.rsplit('/').next().unwrap();
    assert_eq!(
        ficus_testkit::shared()
            .psql(
                name,
                "SELECT name FROM tenancy.organizations WHERE slug = 'umbrella-homes'"
            )
            .unwrap(),
        "Umbrella Homes"
    );
    // Exactly one tenant, however many times the event comes again.
    let tenants = f.json(&["tenant", "list"]);
    assert_eq!(tenants["tenants"].as_array().unwrap().len(), 1);
    // A tenant added by hand goes through the same steps: configuration and
    // tenant database.
    let added = f
        .command(&[
            "tenant",
            "add",
            "hand-made",
            "--name",
            "Hand Made",
            "--domain",
            "hand.made.test",
        ])
        .env("FICUS_TENANT_DB_URL", &db)
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let job = f.json(&["provision", "show", "manual:hand-made"]);
    assert_eq!(job["jobs"][0]["state"], "done", "{job}");
    assert_eq!(
        job["jobs"][0]["steps"],
        serde_json::json!(["tenant", "config", "database"])
    );
    assert_eq!(
        ficus_testkit::shared()
            .psql(
                name,
                "SELECT name FROM tenancy.organizations WHERE slug = 'hand-made'"
            )
            .unwrap(),
        "Hand Made"
    );
    let config = f.json(&["tenant", "config", "get", "hand-made"]);
    assert_eq!(
        config["config"]["domains"],
        serde_json::json!(["hand.made.test"])
    );
}

#[test]
fn the_provisioning_mapping_is_shown_replaced_and_checked() {
    let f = Ficus::sqlite();
    let shown = f.json(&["provision", "mapping"]);
    assert_eq!(
        shown["created"],
        serde_json::json!(["subscription.created"])
    );
    assert_eq!(shown["name"], "data.customer.name");
    let file = f.file(
        "mapping.json",
        r#"{"created": ["checkout.completed"], "name": "data.account.company", "start_on_new": true,
            "template": {"locale": "nl-NL", "features": {"beta": true}}}"#,
    );
    let set = f.json(&[
        "provision",
        "mapping",
        "--file",
        file.to_str().unwrap(),
        "--reason",
        "new billing provider",
    ]);
    assert_eq!(set["created"], serde_json::json!(["checkout.completed"]));
    assert_eq!(set["start_on_new"], true);
    // Fields not given keep their defaults.
    assert_eq!(
        set["cancelled"],
        serde_json::json!(["subscription.cancelled", "subscription.deleted"])
    );
    let bad = f.file("bad.json", r#"{"nmae": "data.x"}"#);
    check(
        &f,
        &[
            "provision",
            "mapping",
            "--file",
            bad.to_str().unwrap(),
            "--reason",
            "typo",
        ],
        expect![[r#"
            exit 1
            --- stderr
            error: TMP/bad.json is not a provisioning mapping: unknown field `nmae`, expected one of `created`, `cancelled`, `event_id`, `event_type`, `tenant_id`, `name`, `domain`, `start_on_new`, `template` at line 1 column 7
        "#]],
    );
}
