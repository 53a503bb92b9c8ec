//! `ficus db` against a real PostgreSQL with a realistic single-tenant schema
//! (composite keys, a table without a primary key, a partitioned table, a view,
//! self-referencing and multi-column foreign keys, reserved-word and mixed-case
//! names), while a live workload runs as the application's role.

mod corpus;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ficus_retrofit::apply::{self, Event, Options};
use ficus_retrofit::ident::Table;
use ficus_retrofit::inspect::Class;
use ficus_retrofit::plan::{Backfill, IdType, Plan, StepKind};
use ficus_retrofit::{Error, backfill, connect, describe, inspect};

const SCHEMA: &str = r#"
DO $$ BEGIN CREATE ROLE ficus_app LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE ficus_tenant LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
CREATE TABLE customers (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, country text REFERENCES countries (code), created_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE "order" (id bigserial PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers (id), placed_at timestamptz NOT NULL DEFAULT now(), total numeric(12,2) NOT NULL DEFAULT 0);
CREATE TABLE categories (id serial PRIMARY KEY, parent_id int REFERENCES categories (id), name text NOT NULL);
CREATE TABLE products (sku text PRIMARY KEY, title text NOT NULL, price numeric(12,2) NOT NULL, category_id int REFERENCES categories (id));
CREATE TABLE order_items (order_id bigint NOT NULL REFERENCES "order" (id), line_no int NOT NULL, sku text NOT NULL REFERENCES products (sku), qty int NOT NULL, PRIMARY KEY (order_id, line_no));
CREATE TABLE shipments (id bigserial PRIMARY KEY, order_id bigint NOT NULL, line_no int NOT NULL, carrier text, FOREIGN KEY (order_id, line_no) REFERENCES order_items (order_id, line_no));
CREATE TABLE audit_events (at timestamptz NOT NULL DEFAULT now(), actor text, action text);
CREATE TABLE measurements (id bigint NOT NULL, taken_on date NOT NULL, value float8, PRIMARY KEY (id, taken_on)) PARTITION BY RANGE (taken_on);
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE measurements_2026 PARTITION OF measurements FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE TABLE "Weird ""Name""" ("Id" int PRIMARY KEY, "Value" text);
CREATE TABLE schema_migrations (version text PRIMARY KEY);
CREATE VIEW customer_orders AS SELECT c.email, o.id, o.total FROM customers c JOIN "order" o ON o.customer_id = c.id;
INSERT INTO countries VALUES ('NL', 'Netherlands'), ('US', 'United States');
INSERT INTO customers (email, country) SELECT 'c' || g || '@example.test', CASE WHEN g % 2 = 0 THEN 'NL' ELSE 'US' END FROM generate_series(1, 3000) g;
INSERT INTO "order" (customer_id, total) SELECT 1 + g % 3000, g FROM generate_series(1, 6000) g;
INSERT INTO categories (name) VALUES ('root');
INSERT INTO categories (parent_id, name) SELECT 1, 'c' || g FROM generate_series(1, 20) g;
INSERT INTO products SELECT 'sku-' || g, 'product ' || g, g, 1 + g % 20 FROM generate_series(1, 500) g;
INSERT INTO order_items SELECT 1 + g % 6000, g, 'sku-' || (1 + g % 500), 1 FROM generate_series(1, 8000) g;
INSERT INTO shipments (order_id, line_no, carrier) SELECT order_id, line_no, 'dhl' FROM order_items WHERE line_no % 4 = 0;
INSERT INTO audit_events (actor, action) SELECT 'u' || g, 'login' FROM generate_series(1, 2000) g;
INSERT INTO measurements SELECT g, DATE '2025-06-01' + (g % 400), g * 0.5 FROM generate_series(1, 4000) g;
INSERT INTO "Weird ""Name""" SELECT g, 'v' || g FROM generate_series(1, 700) g;
INSERT INTO schema_migrations VALUES ('20260101'), ('20260102');
GRANT ALL ON ALL TABLES IN SCHEMA public TO ficus_app;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO ficus_app;
GRANT ALL ON ALL TABLES IN SCHEMA public TO ficus_tenant;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO ficus_tenant;
ANALYZE;
"#;

/// The tenant-owned tables of the sample schema.
const OWNED: &[&str] = &[
    "\"Weird \"\"Name\"\"\"",
    "audit_events",
    "categories",
    "customers",
    "measurements",
    "\"order\"",
    "order_items",
    "products",
    "shipments",
];

struct Db {
    url: String,
    app_url: String,
}

async fn sample() -> Db {
    let url =
        tokio::task::spawn_blocking(|| ficus_testkit::shared().fresh_database("retrofit").unwrap())
            .await
            .unwrap();
    let client = connect(&url).await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    let app_url = url.replace("postgres://postgres@", "postgres://ficus_app@");
    Db { url, app_url }
}

async fn draft(db: &Db) -> (Plan, ficus_retrofit::Inventory) {
    let client = connect(&db.url).await.unwrap();
    let inv = inspect(&client).await.unwrap();
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid).unwrap();
    plan.app_roles = vec!["ficus_app".into()];
    (plan, inv)
}

fn quiet() -> impl FnMut(&Event) + Send {
    |_: &Event| {}
}

/// The one number a `SELECT count(*) …` answers.
async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// A checksum of every column but tenant_id, to prove the backfill touched
/// nothing else.
async fn checksum(client: &tokio_postgres::Client, table: &str, columns: &str) -> String {
    client
        .query_one(
            &format!("SELECT md5(string_agg(row_text, ',' ORDER BY row_text)) FROM (SELECT ({columns})::text AS row_text FROM {table}) s"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_classifies_the_sample_schema_and_flags_its_hazards() {
    let db = sample().await;
    let client = connect(&db.url).await.unwrap();
    let inv = inspect(&client).await.unwrap();
    let mut lines: Vec<String> = inv
        .tables
        .iter()
        .map(|t| {
            format!(
                "{} {} pk=[{}] fks={} refs={} views={} hazards={}",
                t.table,
                t.class.as_str(),
                t.primary_key
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                t.foreign_keys.len(),
                t.referenced_by.len(),
                t.views.len(),
                t.hazards.len()
            )
        })
        .collect();
    lines.sort();
    expect_test::expect![[r#"
        Weird "Name" tenant-owned pk=[Id] fks=0 refs=0 views=0 hazards=0
        audit_events tenant-owned pk=[] fks=0 refs=0 views=0 hazards=1
        categories tenant-owned pk=[id] fks=1 refs=1 views=0 hazards=0
        countries shared pk=[code] fks=0 refs=1 views=0 hazards=0
        customers tenant-owned pk=[id] fks=1 refs=1 views=1 hazards=1
        measurements tenant-owned pk=[id,taken_on] fks=0 refs=0 views=0 hazards=1
        order tenant-owned pk=[id] fks=1 refs=1 views=1 hazards=1
        order_items tenant-owned pk=[order_id,line_no] fks=2 refs=1 views=0 hazards=0
        products tenant-owned pk=[sku] fks=1 refs=1 views=0 hazards=0
        schema_migrations excluded pk=[version] fks=0 refs=0 views=0 hazards=0
        shipments tenant-owned pk=[id] fks=1 refs=0 views=0 hazards=0"#]]
    .assert_eq(&lines.join("\n"));
    let measurements = inv.table(&Table::new("public", "measurements")).unwrap();
    assert!(measurements.partitioned && measurements.partitions.len() == 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_under_a_live_workload_sees_no_error_loses_no_row_and_reverts() {
    let db = sample().await;
    let (mut plan, inv) = draft(&db).await;
    plan.tenant_roles = vec!["ficus_tenant".into()];
    let plan = Plan::from_toml(&plan.to_toml().unwrap(), "plan.toml").unwrap();
    let zero = plan.tenant_zero.id.clone();
    let owned: Vec<_> = plan.owned().map(|t| t.name.clone()).collect();
    assert_eq!(owned.len(), OWNED.len(), "{owned:?}");

    // The workload: inserts, updates, deletes and reads as the application role.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for w in 0..2 {
        let (url, stop, errors, ops) = (
            db.app_url.clone(),
            Arc::clone(&stop),
            Arc::clone(&errors),
            Arc::clone(&ops),
        );
        workers.push(tokio::spawn(async move {
            let app = connect(&url).await.unwrap();
            let mut i: i64 = 0;
            let (mut inserted, mut deleted) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let n = w * 1_000_000 + i;
                let statements: Vec<(String, Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>)> = vec![
                    ("INSERT INTO customers (email, country) VALUES ($1, 'NL')".into(), vec![Box::new(format!("live{n}@example.test"))]),
                    ("INSERT INTO \"order\" (customer_id, total) VALUES ($1, 5)".into(), vec![Box::new(1 + n % 3000)]),
                    ("INSERT INTO audit_events (actor, action) VALUES ($1, 'live')".into(), vec![Box::new(format!("w{n}"))]),
                    ("INSERT INTO measurements VALUES ($1, DATE '2026-03-01', 1)".into(), vec![Box::new(100_000 + n)]),
                    ("INSERT INTO \"Weird \"\"Name\"\"\" VALUES ($1, 'live')".into(), vec![Box::new((10_000 + n) as i32)]),
                    ("UPDATE \"order\" SET total = total + 1 WHERE id = $1".into(), vec![Box::new(1 + n % 6000)]),
                    ("UPDATE customers SET country = 'US' WHERE id = $1".into(), vec![Box::new(1 + n % 3000)]),
                    ("SELECT count(*) FROM customer_orders WHERE id = $1".into(), vec![Box::new(1 + n % 6000)]),
                ];
                for (q, params) in &statements {
                    let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                    match app.execute(q.as_str(), &refs).await {
                        Ok(_) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                            if q.starts_with("INSERT INTO audit_events") {
                                inserted += 1;
                            }
                        }
                        Err(e) => {
                            eprintln!("workload error on {q}: {e:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                if i % 10 == 0 {
                    let r = app
                        .execute(
                            "DELETE FROM audit_events WHERE ctid = (SELECT ctid FROM audit_events WHERE actor LIKE 'w%' LIMIT 1)",
                            &[],
                        )
                        .await;
                    match r {
                        Ok(n) => deleted += n,
                        Err(e) => {
                            eprintln!("workload error on delete: {e:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (inserted, deleted)
        }));
    }
    let mut client = connect(&db.url).await.unwrap();
    let before_items = checksum(&client, "order_items", "order_id, line_no, sku, qty").await;
    let opts = Options {
        backfill: backfill::Options {
            // Small batches, so that the workload meets many of them.
            max_batch: 500,
            ..backfill::Options::default()
        },
        ..Options::default()
    };
    // The workload is running before apply starts, runs during it, and goes on
    // against the finished schema: each point is waited for by count, not time.
    until_ops(&ops, 1).await;
    let started = Instant::now();
    let ops_before = ops.load(Ordering::Relaxed);
    apply::apply(&mut client, &plan, &inv, &opts, &mut quiet())
        .await
        .unwrap();
    let took = started.elapsed();
    let ops_during = ops.load(Ordering::Relaxed) - ops_before;
    until_ops(&ops, ops_before + ops_during + 100).await;
    stop.store(true, Ordering::Relaxed);
    let (mut inserted, mut deleted) = (0, 0);
    for w in workers {
        let (i, d) = w.await.unwrap();
        inserted += i;
        deleted += d;
    }
    eprintln!(
        "apply took {took:?} while the workload ran {} statements",
        ops.load(Ordering::Relaxed)
    );
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "the live workload saw errors"
    );
    assert!(
        ops_during > 0,
        "no workload statement ran while apply did ({took:?})"
    );
    // Every tenant-owned table: populated, indexed, NOT NULL, tenant zero only.
    for table in OWNED {
        let r = client
            .query_one(
                &format!(
                    "SELECT count(*), count(*) FILTER (WHERE tenant_id = $1::text::uuid) FROM {table}"
                ),
                &[&zero],
            )
            .await
            .unwrap();
        let (all, zeroed): (i64, i64) = (r.get(0), r.get(1));
        assert_eq!(all, zeroed, "{table}: rows without tenant zero");
    }
    let status = apply::status(&client, &plan, &inv).await.unwrap();
    for s in &status {
        assert_eq!(
            (s.index, s.tightened, s.null_rows, s.next_step.as_deref()),
            ("valid", true, 0, None),
            "{s:?}"
        );
    }
    // No row lost: the audit events are the 2,000 loaded, plus the inserted, minus the deleted.
    let audit = count(&client, "SELECT count(*) FROM audit_events").await;
    assert_eq!(audit, 2_000 + inserted as i64 - deleted as i64);
    assert_eq!(
        checksum(&client, "order_items", "order_id, line_no, sku, qty").await,
        before_items,
        "the backfill changed another column"
    );
    // No policy exists before enforcement: a policy on a table without row
    // level security is an error to Supabase's linter (policy_exists_rls_disabled),
    // so the isolation policy is made when row level security goes on. The
    // helpers belong to a role that cannot log in and PUBLIC cannot call them;
    // the setting mode's tenant helper reads no table and runs with its
    // caller's rights (so it can be inlined), the default's reads the spine.
    let policies = count(&client, "SELECT count(*) FROM pg_policy").await;
    assert_eq!(policies, 0, "apply made a policy before enforcement");
    let helpers: Vec<(String, bool, bool, bool)> = client
        .query(
            "SELECT p.proname::text, r.rolcanlogin, p.prosecdef,
                    has_function_privilege('public', p.oid, 'EXECUTE')
             FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner
             WHERE p.pronamespace = 'tenancy_private'::regnamespace ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        helpers,
        vec![
            ("current_tenant_id".to_string(), false, false, false),
            ("default_tenant_id".to_string(), false, true, false),
        ]
    );
    // A second apply changes nothing.
    let mut ran = Vec::new();
    apply::apply(&mut client, &plan, &inv, &opts, &mut |e: &Event| {
        if let Event::Step { status, .. } = e {
            ran.push(*status);
        }
    })
    .await
    .unwrap();
    assert!(ran.iter().all(|s| *s == "already done"), "{ran:?}");

    // Revert: without --allow-destructive it stops before dropping a column.
    let err = apply::revert(&mut client, &plan, &inv, None, &opts, &mut quiet())
        .await
        .unwrap_err();
    assert!(
        err.to_string().starts_with("undoing column:public.")
            && err.to_string().contains(" is destructive"),
        "{err}"
    );
    let defaults: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum WHERE a.attname = 'tenant_id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(defaults, 0, "the defaults were undone before the columns");
    let all_back = Options {
        allow_destructive: true,
        ..opts.clone()
    };
    apply::revert(&mut client, &plan, &inv, None, &all_back, &mut quiet())
        .await
        .unwrap();
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_attribute WHERE attname = 'tenant_id' AND NOT attisdropped AND attrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let spine: bool = client
        .query_one("SELECT to_regnamespace('tenancy') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((left, spine), (0, false), "revert left tenancy behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_transaction_never_makes_other_queries_wait_past_the_lock_timeout() {
    let db = sample().await;
    let (plan, inv) = draft(&db).await;
    let mut client = connect(&db.url).await.unwrap();
    // The spine first: it touches no application table.
    let opts = Options {
        lock_timeout: Duration::from_millis(200),
        attempts: 3,
        ..Options::default()
    };
    // A reader holds customers in a long transaction.
    let holder_url = format!("{}?application_name=report-job", db.url);
    let (holder, connection) = tokio_postgres::connect(&holder_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("BEGIN; SELECT count(*) FROM customers;")
        .await
        .unwrap();
    // Meanwhile the app keeps doing point queries; measure their worst wait.
    let stop = Arc::new(AtomicBool::new(false));
    let worst = {
        let (url, stop) = (db.app_url.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let app = connect(&url).await.unwrap();
            let (mut worst, mut served) = (Duration::ZERO, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                app.query_one("SELECT email FROM customers WHERE id = 7", &[])
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
                served += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (worst, served)
        })
    };
    // The bound only fails a run stuck in a lock queue; it measures nothing.
    let err = tokio::time::timeout(
        Duration::from_secs(120),
        apply::apply(&mut client, &plan, &inv, &opts, &mut quiet()),
    )
    .await
    .expect("apply never gave up on its lock")
    .unwrap_err();
    stop.store(true, Ordering::Relaxed);
    // Had ficus left a lock request queued, this last query would wait for the
    // reader, who commits only below: the worker would never finish.
    let worst = tokio::time::timeout(Duration::from_secs(120), worst)
        .await
        .expect("a point query is stuck behind a lock ficus left queued")
        .unwrap();
    let text = err.to_string();
    assert!(matches!(err, Error::LockTimeout { .. }), "{text}");
    assert!(
        text.starts_with(
            "column:public.customers: could not take its lock within 200 ms after 3 attempts"
        ),
        "{text}"
    );
    assert!(text.contains("application \"report-job\""), "{text}");
    assert!(text.contains("SELECT count(*) FROM customers"), "{text}");
    // How long a wait lasted depends on the machine; that the app's queries
    // went on between the attempts does not. A lock queued without its
    // timeout would have held them until the reader commits, after apply.
    let (worst, served) = worst;
    eprintln!("worst point-query wait while ficus retried: {worst:?} ({served} queries)");
    assert!(served > 0, "the app's point queries never ran");
    // Once the reader is gone, the columns and defaults go in; then a session
    // that locks the table against writes stops the backfill too, within its
    // budget, naming the holder, instead of retrying forever.
    holder.batch_execute("COMMIT").await.unwrap();
    ready_for_backfill(&mut client, &plan, &inv).await;
    holder
        .batch_execute("BEGIN; LOCK TABLE customers IN SHARE MODE;")
        .await
        .unwrap();
    let backfill_only = Options {
        only: Some(StepKind::Backfill),
        backfill: backfill::Options {
            lock_timeout: Duration::from_millis(100),
            attempts: 3,
            ..backfill::Options::default()
        },
        ..Options::default()
    };
    let err = apply::apply(&mut client, &plan, &inv, &backfill_only, &mut quiet())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "backfill:public.customers: could not take its lock within 100 ms after 3 attempts"
        ),
        "{err}"
    );
    assert!(err.contains("application \"report-job\""), "{err}");
    holder.batch_execute("COMMIT").await.unwrap();
    apply::apply(&mut client, &plan, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_killed_again_and_again_resumes_to_a_complete_unchanged_table() {
    let db = sample().await;
    let client = connect(&db.url).await.unwrap();
    client
        .batch_execute(
            "INSERT INTO \"order\" (customer_id, total) SELECT 1 + g % 3000, g FROM generate_series(1, 150000) g; ANALYZE \"order\";",
        )
        .await
        .unwrap();
    let (mut plan, inv) = draft(&db).await;
    // Only the orders table, so the kills land in its backfill.
    for t in &mut plan.tables {
        if t.name != "order" {
            t.class = Class::Shared;
        }
    }
    let before = checksum(&client, "\"order\"", "id, customer_id, placed_at, total").await;
    let count_before: i64 = client
        .query_one("SELECT count(*) FROM \"order\"", &[])
        .await
        .unwrap()
        .get(0);
    let opts = Options {
        backfill: backfill::Options {
            max_batch: 400,
            min_batch: 100,
            ..backfill::Options::default()
        },
        ..Options::default()
    };
    // Kill the run (its connection dies mid-transaction, as with kill -9) ten
    // times, each time once it has reported keyset progress past the point the
    // previous run was killed at. The rate cap keeps the backfill far longer than
    // ten rounds of one batch each, on any machine, so every kill lands inside it.
    let opts = Options {
        backfill: backfill::Options {
            max_rows_per_sec: Some(5_000),
            ..opts.backfill
        },
        ..opts
    };
    let mut killed_at = 0;
    for kill in 1..=10 {
        let (url, plan, inv, opts) = (db.url.clone(), plan.clone(), inv.clone(), opts.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = tokio::spawn(async move {
            let mut c = connect(&url).await.unwrap();
            let mut on = move |e: &Event| {
                if let Event::Backfill(p) = e
                    && p.phase == "keyset"
                {
                    let _ = tx.send(p.rows);
                }
            };
            apply::apply(&mut c, &plan, &inv, &opts, &mut on).await
        });
        let rows = loop {
            match rx.recv().await {
                Some(rows) if rows > killed_at => break rows,
                Some(_) => {}
                None => panic!(
                    "kill {kill}: the run ended before its backfill passed {killed_at} rows: {:?}",
                    run.await
                ),
            }
        };
        run.abort();
        let _ = run.await;
        let keyset_done = count(
            &client,
            "SELECT count(*) FROM tenancy_private.backfill WHERE keyset_done",
        )
        .await;
        assert_eq!(keyset_done, 0, "kill {kill} landed after the keyset pass");
        killed_at = rows;
    }
    let mut c = connect(&db.url).await.unwrap();
    apply::apply(&mut c, &plan, &inv, &opts, &mut quiet())
        .await
        .unwrap();
    let r = c
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE tenant_id IS NULL) FROM \"order\"",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((r.get::<_, i64>(0), r.get::<_, i64>(1)), (count_before, 0));
    assert_eq!(
        checksum(&c, "\"order\"", "id, customer_id, placed_at, total").await,
        before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_plans_and_privileges_are_refused_and_change_nothing() {
    let db = sample().await;
    let (plan, inv) = draft(&db).await;
    let err = connect("postgres://postgres:s3cret@127.0.0.1:1/x")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot connect to postgres://127.0.0.1:1/x:"),
        "{err}"
    );
    assert!(!err.to_string().contains("s3cret"));
    let err = connect("not a url").await.unwrap_err();
    assert!(err.to_string().starts_with("invalid database url"), "{err}");
    // An edited plan: an unknown table, a bad id, a plan for another database.
    let text = plan.to_toml().unwrap();
    let unknown = text.replacen("name = \"customers\"", "name = \"custmers\"", 1);
    let edited = Plan::from_toml(&unknown, "plan.toml").unwrap();
    let err = edited.check_against(&inv, "plan.toml").unwrap_err();
    assert_eq!(
        err.to_string(),
        "the plan plan.toml: table \"public\".\"custmers\" is not in the database; nothing was changed"
    );
    let bad_id = text.replacen(&plan.tenant_zero.id, "x'; DROP TABLE customers; --", 1);
    let err = Plan::from_toml(&bad_id, "plan.toml").unwrap_err();
    assert!(err.to_string().contains("is not a UUID"), "{err}");
    let bad_class = text.replacen("class = \"tenant-owned\"", "class = \"mine\"", 1);
    assert!(Plan::from_toml(&bad_class, "plan.toml").is_err());
    let mut other = plan.clone();
    other.database = "production".into();
    let err = other.check_against(&inv, "plan.toml").unwrap_err();
    assert!(
        err.to_string()
            .contains("it was made for database \"production\""),
        "{err}"
    );
    // Missing privileges: the application role cannot create the spine.
    let mut app = connect(&db.app_url).await.unwrap();
    let err = apply::apply(&mut app, &plan, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "spine: CREATE SCHEMA IF NOT EXISTS tenancy: permission denied for database {}",
            inv.database
        )
    );
    let client = connect(&db.url).await.unwrap();
    let spine: bool = client
        .query_one("SELECT to_regnamespace('tenancy') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!spine, "a refused apply changed the database");
    // An instant backfill is catalog-only and stamps every row.
    let mut instant = plan.clone();
    for t in &mut instant.tables {
        if t.name == "products" {
            t.backfill = Backfill::Instant;
        }
    }
    let mut c = connect(&db.url).await.unwrap();
    apply::apply(&mut c, &instant, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap();
    let nulls = count(&c, "SELECT count(*) FROM products WHERE tenant_id IS NULL").await;
    assert_eq!(nulls, 0);
    // A tenant for provisioning: idempotent by its id.
    let a = apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    let b = apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    assert_eq!(a, b);
    assert!(apply::add_tenant(&c, "Bad Id", "x").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_index_left_by_a_failed_build_is_rebuilt() {
    let db = sample().await;
    let (mut plan, inv) = draft(&db).await;
    for t in &mut plan.tables {
        if t.name != "customers" {
            t.class = Class::Shared;
        }
    }
    let mut c = connect(&db.url).await.unwrap();
    // Everything up to the backfill, then a failed concurrent build under the
    // name Ficus uses: a unique index on a column where every row is equal.
    let upto = Options {
        only: Some(ficus_retrofit::plan::StepKind::Spine),
        ..Options::default()
    };
    apply::apply(&mut c, &plan, &inv, &upto, &mut quiet())
        .await
        .unwrap();
    for kind in [
        ficus_retrofit::plan::StepKind::Column,
        ficus_retrofit::plan::StepKind::Default,
        ficus_retrofit::plan::StepKind::Backfill,
    ] {
        let only = Options {
            only: Some(kind),
            ..Options::default()
        };
        apply::apply(&mut c, &plan, &inv, &only, &mut quiet())
            .await
            .unwrap();
    }
    let failed = c
        .batch_execute(
            "CREATE UNIQUE INDEX CONCURRENTLY customers_tenant_id_idx ON customers (tenant_id)",
        )
        .await;
    assert!(failed.is_err(), "the build should fail on duplicates");
    let invalid: bool = c
        .query_one(
            "SELECT NOT indisvalid FROM pg_index WHERE indexrelid = 'customers_tenant_id_idx'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(invalid);
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap();
    let (valid, unique): (bool, bool) = {
        let r = c
            .query_one(
                "SELECT indisvalid, indisunique FROM pg_index WHERE indexrelid = 'customers_tenant_id_idx'::regclass",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (valid, unique),
        (true, false),
        "the invalid index was not rebuilt"
    );
}

/// A session as `role`, in a tenant context (or none) for the session.
async fn session_as(url: &str, role: &str, tenant: Option<&str>) -> tokio_postgres::Client {
    let c = connect(&url.replace("postgres://postgres@", &format!("postgres://{role}@")))
        .await
        .unwrap();
    c.execute(
        "SELECT set_config('ficus.tenant_id', $1, false)",
        &[&tenant.unwrap_or("")],
    )
    .await
    .unwrap();
    c
}

/// Rows of `table` a role sees, in a tenant context (or none).
async fn rows_seen(url: &str, role: &str, table: &str, tenant: Option<&str>) -> i64 {
    let c = session_as(url, role, tenant).await;
    c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// Rows of `customers` a role sees, in a tenant context (or none).
async fn visible(url: &str, role: &str, tenant: Option<&str>) -> i64 {
    rows_seen(url, role, "customers", tenant).await
}

/// The sample, its view running as its invoker (a view running as its owner
/// would bypass row level security, and the pre-checks refuse it), a drafted
/// plan with `ficus_tenant` as the tenant role, and a migrator connection.
async fn enforceable() -> (Db, tokio_postgres::Client, Plan, ficus_retrofit::Inventory) {
    let db = sample().await;
    let c = connect(&db.url).await.unwrap();
    c.batch_execute("ALTER VIEW customer_orders SET (security_invoker = true)")
        .await
        .unwrap();
    let (mut plan, inv) = draft(&db).await;
    plan.tenant_roles = vec!["ficus_tenant".into()];
    (db, c, plan, inv)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcement_goes_one_proved_phase_at_a_time_and_back() {
    use ficus_retrofit::enforce::{self, Phase};
    let (db, mut c, plan, inv) = enforceable().await;
    let customers = Table::new("public", "customers");
    for kind in [
        StepKind::Spine,
        StepKind::Column,
        StepKind::Default,
        StepKind::Backfill,
    ] {
        let only = Options {
            only: Some(kind),
            ..Options::default()
        };
        apply::apply(&mut c, &plan, &inv, &only, &mut quiet())
            .await
            .unwrap();
    }
    // A row written behind Ficus's back with no tenant: the pre-check refuses.
    c.batch_execute("INSERT INTO customers (email, tenant_id) VALUES ('ghost@example.test', NULL)")
        .await
        .unwrap();
    let opts = Options::default();
    let err = enforce::step(&mut c, &plan, &inv, &customers, true, true, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tenant_id is not proved NOT NULL (1 row without a tenant right now)"),
        "{err}"
    );
    // The operator gives the row its tenant; the rest of the plan then runs.
    c.execute(
        "UPDATE customers SET tenant_id = $1::text::uuid WHERE tenant_id IS NULL",
        &[&plan.tenant_zero.id],
    )
    .await
    .unwrap();
    apply::apply(&mut c, &plan, &inv, &opts, &mut quiet())
        .await
        .unwrap();
    let globex = apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    let zero = plan.tenant_zero.id.clone();
    let total = visible(&db.url, "postgres", None).await;

    // Enabled: the live app sees everything, tenant roles only their tenant.
    let r = enforce::step(&mut c, &plan, &inv, &customers, true, true, &opts)
        .await
        .unwrap();
    assert_eq!((r.from, r.to), (Phase::Off, Phase::Enabled));
    assert_eq!(
        r.verified,
        vec![
            format!(
                "as ficus_tenant: tenant zero sees {total} of {total} rows, another tenant sees 0"
            ),
            format!("as ficus_app (live app, no tenant context): sees {total} of {total} rows"),
        ]
    );
    assert_eq!(visible(&db.url, "ficus_app", None).await, total);
    assert_eq!(visible(&db.url, "ficus_tenant", Some(&zero)).await, total);
    assert_eq!(visible(&db.url, "ficus_tenant", Some(&globex)).await, 0);
    assert_eq!(visible(&db.url, "ficus_tenant", None).await, 0);
    assert_eq!(
        visible(&db.url, "ficus_tenant", Some("' OR 1=1 --")).await,
        0
    );
    // The probe: every attack on the enabled table is blocked; a planted
    // permissive policy is a leak it finds; nothing the probe did remains.
    let clean = ficus_retrofit::probe::probe(&mut c, &plan).await.unwrap();
    assert_eq!(clean.leaks(), 0, "{:#?}", clean.findings);
    assert_eq!(
        clean.findings.len(),
        4 + ficus_retrofit::probe::ATTACKS.len()
    );
    c.batch_execute("CREATE POLICY planted ON customers FOR SELECT TO ficus_tenant USING (true)")
        .await
        .unwrap();
    let leaky = ficus_retrofit::probe::probe(&mut c, &plan).await.unwrap();
    let leaked: Vec<&str> = leaky
        .findings
        .iter()
        .filter(|f| f.leak)
        .map(|f| f.attack.as_str())
        .collect();
    assert_eq!(
        leaked,
        [
            "read other tenant",
            "no tenant context",
            "empty context",
            "malformed context",
            "sql text as context"
        ]
    );
    c.batch_execute("DROP POLICY planted ON customers")
        .await
        .unwrap();
    let orgs = count(&c, "SELECT count(*) FROM tenancy.organizations").await;
    assert_eq!(orgs, 2, "the probe left an organization behind");
    // Enforced: the pass-through is gone; the live app sees tenant zero's rows
    // (all of them, while tenant zero is the only tenant with rows).
    let r = enforce::step(&mut c, &plan, &inv, &customers, true, true, &opts)
        .await
        .unwrap();
    assert_eq!(r.to, Phase::Enforced);
    assert_eq!(visible(&db.url, "ficus_app", None).await, total);
    assert_eq!(visible(&db.url, "ficus_tenant", Some(&zero)).await, total);
    // The setting mode's helper is inlined into the policy: a tenant role's plan
    // reads the setting itself, once per query, and calls no helper (one call
    // per query made a point lookup 1.39× the cost of no row level security).
    let explained = session_as(&db.url, "ficus_tenant", Some(&zero))
        .await
        .query("EXPLAIN (VERBOSE) SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        explained.contains("current_setting") && !explained.contains("current_tenant_id"),
        "{explained}"
    );
    assert_ne!(
        enforce::next_table(&c, &plan).await.unwrap(),
        Some(customers.clone()),
        "--next skips an enforced table"
    );
    // And back, phase by phase.
    enforce::step(&mut c, &plan, &inv, &customers, false, true, &opts)
        .await
        .unwrap();
    assert_eq!(visible(&db.url, "ficus_app", None).await, total);
    enforce::step(&mut c, &plan, &inv, &customers, false, true, &opts)
        .await
        .unwrap();
    assert_eq!(enforce::phase(&c, &customers).await.unwrap(), Phase::Off);
    assert_eq!(visible(&db.url, "ficus_tenant", None).await, total);

    // A planted leak (a permissive USING (true) for the tenant role) fails the
    // proof, and the phase change is rolled back.
    c.batch_execute("CREATE POLICY leak ON customers FOR SELECT TO ficus_tenant USING (true)")
        .await
        .unwrap();
    let err = enforce::step(&mut c, &plan, &inv, &customers, true, true, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "verification failed, the phase change was rolled back: as ficus_tenant: tenant zero sees {total} of {total} rows, another tenant sees {total} (expected {total} and 0)"
        )
    );
    let rls: bool = c
        .query_one(
            "SELECT relrowsecurity FROM pg_class WHERE oid = 'customers'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!rls, "a failed proof left row level security on");
    assert_eq!(enforce::phase(&c, &customers).await.unwrap(), Phase::Off);
}

/// Rows of `products` a role sees with no tenant context, or in a tenant's.
async fn products_seen(url: &str, role: &str, tenant: Option<&str>) -> i64 {
    rows_seen(url, role, "products", tenant).await
}

/// The live app as the tables' owner, as a plain role and as a `BYPASSRLS`
/// role, plus the tenant-aware backend in tenant zero's context, all reading
/// and writing while every tenant-owned table is enforced and un-enforced: no
/// error for any of them, and what each sees is proved at every phase.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_plain_and_bypassrls_apps_see_the_right_rows_in_every_phase_without_an_error() {
    use ficus_retrofit::enforce::{self, Phase};
    let db = sample().await;
    let mut c = connect(&db.url).await.unwrap();
    c.batch_execute(
        r#"
DO $$ BEGIN CREATE ROLE ficus_owner LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE ficus_bypass LOGIN BYPASSRLS; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
GRANT ALL ON SCHEMA public TO ficus_owner;
DO $$ DECLARE r record; BEGIN
  FOR r IN SELECT c.oid::regclass AS t FROM pg_class c
           WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v') LOOP
    EXECUTE format('ALTER TABLE %s OWNER TO ficus_owner', r.t);
  END LOOP;
END $$;
GRANT ALL ON ALL TABLES IN SCHEMA public TO ficus_bypass, ficus_app, ficus_tenant;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO ficus_bypass, ficus_app, ficus_tenant;
ALTER VIEW customer_orders SET (security_invoker = true);
"#,
    )
    .await
    .unwrap();
    let client = connect(&db.url).await.unwrap();
    let inv = inspect(&client).await.unwrap();
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid).unwrap();
    plan.app_roles = vec![
        "ficus_app".into(),
        "ficus_bypass".into(),
        "ficus_owner".into(),
    ];
    plan.tenant_roles = vec!["ficus_tenant".into()];
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap();
    let zero = plan.tenant_zero.id.clone();

    // The workload: every role reads every tenant-owned table and writes two of
    // them, over and over, until every phase change is done.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let ops = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for (w, role) in ["ficus_owner", "ficus_app", "ficus_bypass", "ficus_tenant"]
        .into_iter()
        .enumerate()
    {
        let url = db
            .url
            .replace("postgres://postgres@", &format!("postgres://{role}@"));
        let (stop, failures, ops, zero) = (
            Arc::clone(&stop),
            Arc::clone(&failures),
            Arc::clone(&ops),
            zero.clone(),
        );
        workers.push(tokio::spawn(async move {
            let live = connect(&url).await.unwrap();
            if role == "ficus_tenant" {
                live.execute("SELECT set_config('ficus.tenant_id', $1, false)", &[&zero])
                    .await
                    .unwrap();
            }
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let n = w as u64 * 1_000_000 + i;
                let mut statements: Vec<String> = OWNED
                    .iter()
                    .map(|t| format!("SELECT count(*) FROM {t}"))
                    .collect();
                statements.push(format!(
                    "INSERT INTO customers (email, country) VALUES ('{role}{n}@example.test', 'NL')"
                ));
                statements.push(format!(
                    "INSERT INTO audit_events (actor, action) VALUES ('{role}', 'live {n}')"
                ));
                statements.push(format!(
                    "UPDATE customers SET country = 'US' WHERE id = {}",
                    1 + n % 3000
                ));
                statements.push("SELECT count(*) FROM customer_orders".into());
                for q in &statements {
                    match live.execute(q.as_str(), &[]).await {
                        Ok(_) => {
                            ops.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{role}: {q}: {}", ficus_retrofit::describe(&e))),
                    }
                }
            }
        }));
    }

    let products = Table::new("public", "products");
    let n = products_seen(&db.url, "postgres", None).await;
    let seen = |tenant: Option<String>| {
        let url = db.url.clone();
        async move {
            let mut out = Vec::new();
            for role in ["ficus_owner", "ficus_app", "ficus_bypass"] {
                out.push(products_seen(&url, role, None).await);
            }
            out.push(products_seen(&url, "ficus_tenant", Some(&zero_of(&url).await)).await);
            out.push(products_seen(&url, "ficus_tenant", tenant.as_deref()).await);
            out.push(products_seen(&url, "ficus_tenant", None).await);
            out
        }
    };
    // Off: row level security changes nothing for anyone.
    assert_eq!(seen(None).await, [n, n, n, n, n, n]);
    let mut phases = Vec::new();
    let owned: Vec<Table> = plan
        .owned()
        .map(|p| Table::new(&p.schema, &p.name))
        .collect();
    for t in &owned {
        for _ in 0..2 {
            let r = enforce::step(&mut c, &plan, &inv, t, true, true, &Options::default())
                .await
                .unwrap();
            phases.push((t.to_string(), r.to));
            if t == &products && r.to == Phase::Enabled {
                // Enabled: the live app, whatever its role, still sees every row;
                // the tenant role only its tenant's.
                assert_eq!(seen(None).await, [n, n, n, n, 0, 0]);
                assert!(
                    r.checks.iter().any(|c| c
                        == "app role ficus_owner owns products: owners bypass row level security unless it is FORCEd, so the enforced phase FORCEs it"),
                    "{:#?}",
                    r.checks
                );
                assert!(
                    r.checks.iter().any(|c| c
                        == "app role ficus_bypass bypasses row level security (BYPASSRLS): it keeps seeing every row in every phase"),
                    "{:#?}",
                    r.checks
                );
            }
        }
    }
    assert!(phases.iter().all(|(_, p)| *p != Phase::Off), "{phases:?}");
    // Enforced everywhere. A second tenant gets a product of its own: the live
    // app (owner or plain role) is confined to tenant zero and cannot see it,
    // the BYPASSRLS role sees it, the tenant roles see exactly their tenant's.
    let globex = apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    let tenant = connect(
        &db.url
            .replace("postgres://postgres@", "postgres://ficus_tenant@"),
    )
    .await
    .unwrap();
    tenant
        .batch_execute(&format!(
            "BEGIN; SET LOCAL ficus.tenant_id = '{globex}'; INSERT INTO products (sku, title, price) VALUES ('globex-1', 'globex only', 1); COMMIT;"
        ))
        .await
        .unwrap();
    assert_eq!(seen(Some(globex.clone())).await, [n, n, n + 1, n, 1, 0]);
    // The live app's own inserts land in tenant zero, even as the owner.
    let owner = connect(
        &db.url
            .replace("postgres://postgres@", "postgres://ficus_owner@"),
    )
    .await
    .unwrap();
    owner
        .batch_execute(
            "INSERT INTO products (sku, title, price) VALUES ('owner-1', 'by the legacy app', 1)",
        )
        .await
        .unwrap();
    let stamped: String = c
        .query_one(
            "SELECT tenant_id::text FROM products WHERE sku = 'owner-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stamped, zero);
    // The live app cannot write into another tenant either.
    let err = owner
        .batch_execute(&format!(
            "INSERT INTO products (sku, title, price, tenant_id) VALUES ('owner-2', 'x', 1, '{globex}')"
        ))
        .await
        .unwrap_err();
    assert!(
        ficus_retrofit::describe(&err).contains("row-level security"),
        "{err}"
    );
    let n = n + 1;

    // And back, every table, phase by phase, with the other tenant's row in place.
    for t in &owned {
        for _ in 0..2 {
            let r = enforce::step(&mut c, &plan, &inv, t, false, true, &Options::default())
                .await
                .unwrap();
            if t == &products && r.to == Phase::Enabled {
                assert_eq!(
                    seen(Some(globex.clone())).await,
                    [n + 1, n + 1, n + 1, n, 1, 0]
                );
            }
        }
    }
    assert_eq!(seen(Some(globex.clone())).await, [n + 1; 6]);
    // However fast the phases went, the workload gets a hundred statements in
    // before it stops, so the failures below were looked for.
    until_ops(&ops, 100).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} failures, first: {:?}",
        failures.len(),
        failures.first()
    );
}

/// Tenant zero's id, from the database's own settings.
async fn zero_of(url: &str) -> String {
    connect(url)
        .await
        .unwrap()
        .query_one(
            "SELECT value FROM tenancy_private.settings WHERE key = 'tenant_zero'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// In member mode the tenant comes from a member identity looked up in
/// `tenancy.members`; a tenant id alone, a stranger, or an ambiguous member
/// with no tenant named gets no rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_identity_mode_finds_the_tenant_from_tenancy_members() {
    use ficus_retrofit::enforce;
    use ficus_retrofit::plan::TenantContext;
    let (db, mut c, mut plan, inv) = enforceable().await;
    plan.tenant_context = TenantContext::Member;
    let plan = Plan::from_toml(&plan.to_toml().unwrap(), "plan.toml").unwrap();
    assert_eq!(plan.tenant_context, TenantContext::Member);
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap();
    let zero = plan.tenant_zero.id.clone();
    let globex = apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO tenancy.members (organization_id, identity) VALUES
           ('{zero}', 'alice'), ('{zero}', 'carol'), ('{globex}', 'carol'), ('{globex}', 'bob')"
    ))
    .await
    .unwrap();
    let customers = Table::new("public", "customers");
    // The proof works in member terms too, and leaves no member behind.
    for _ in 0..2 {
        enforce::step(
            &mut c,
            &plan,
            &inv,
            &customers,
            true,
            true,
            &Options::default(),
        )
        .await
        .unwrap();
    }
    let members = count(&c, "SELECT count(*) FROM tenancy.members").await;
    assert_eq!(members, 4);
    let total = count(&c, "SELECT count(*) FROM customers").await;
    let tenant = connect(
        &db.url
            .replace("postgres://postgres@", "postgres://ficus_tenant@"),
    )
    .await
    .unwrap();
    let check = |member: &'static str, tenant_id: String| {
        let tenant = &tenant;
        async move {
            tenant
                .query_one(
                    "SELECT set_config('ficus.member', $1, false), set_config('ficus.tenant_id', $2, false)",
                    &[&member, &tenant_id],
                )
                .await
                .unwrap();
            tenant
                .query_one("SELECT count(*) FROM customers", &[])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(
        check("alice", String::new()).await,
        total,
        "alice's one org"
    );
    assert_eq!(
        check("bob", String::new()).await,
        0,
        "bob's org has no rows"
    );
    assert_eq!(check("carol", String::new()).await, 0, "carol is ambiguous");
    assert_eq!(
        check("carol", zero.clone()).await,
        total,
        "carol names tenant zero"
    );
    assert_eq!(
        check("bob", zero.clone()).await,
        0,
        "bob is not tenant zero's"
    );
    assert_eq!(check("", zero.clone()).await, 0, "a tenant id alone");
    assert_eq!(check("mallory", zero.clone()).await, 0, "a stranger");
    assert_eq!(check("' OR 1=1 --", String::new()).await, 0, "sql text");
}

/// What Ficus made, enforced everywhere, lints clean; each planted weakness is
/// found, with its severity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lint_finds_planted_weaknesses_and_nothing_in_what_ficus_made() {
    use ficus_retrofit::enforce;
    use ficus_retrofit::lint::{Severity, lint};
    let (db, mut c, plan, inv) = enforceable().await;
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut quiet())
        .await
        .unwrap();
    // Half way, the tables apply prepared and enforcement has not reached yet
    // are worth a note each, nothing more.
    let before = lint(&c).await.unwrap();
    assert_eq!(before.count(Severity::Error), 0, "{:#?}", before.findings);
    assert_eq!(before.count(Severity::Warning), 0, "{:#?}", before.findings);
    assert_eq!(before.count(Severity::Info), OWNED.len());
    assert!(
        before
            .findings
            .iter()
            .all(|f| f.check == "tenant-table-not-enforced"),
        "{:#?}",
        before.findings
    );
    for p in plan.owned() {
        let t = Table::new(&p.schema, &p.name);
        for _ in 0..2 {
            enforce::step(&mut c, &plan, &inv, &t, true, true, &Options::default())
                .await
                .unwrap();
        }
    }
    let clean = lint(&c).await.unwrap();
    assert_eq!(
        clean.findings,
        vec![],
        "what Ficus made does not lint clean"
    );
    let probe = ficus_retrofit::probe::probe(&mut c, &plan).await.unwrap();
    assert_eq!(probe.leaks(), 0, "{:#?}", probe.findings);
    assert_eq!(
        probe.findings.len(),
        4 + OWNED.len() * ficus_retrofit::probe::ATTACKS.len()
    );
    // A partition queried by name is isolated like its parent.
    let globex = apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    let tenant = connect(
        &db.url
            .replace("postgres://postgres@", "postgres://ficus_tenant@"),
    )
    .await
    .unwrap();
    tenant
        .execute(
            "SELECT set_config('ficus.tenant_id', $1, false)",
            &[&globex],
        )
        .await
        .unwrap();
    let leaked = count(&tenant, "SELECT count(*) FROM measurements_2025").await;
    assert_eq!(leaked, 0, "a partition escaped its parent's isolation");

    c.batch_execute(
        r#"
CREATE FUNCTION public.leaky() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';
CREATE POLICY planted ON customers FOR SELECT TO ficus_tenant USING (true);
CREATE POLICY per_row ON products AS RESTRICTIVE FOR SELECT TO ficus_tenant
    USING (tenant_id = tenancy_private.current_tenant_id());
ALTER VIEW customer_orders RESET (security_invoker);
CREATE TABLE notes (id int PRIMARY KEY, tenant_id uuid);
ALTER TABLE countries ENABLE ROW LEVEL SECURITY;
DO $$ BEGIN CREATE ROLE ficus_lint_bypass NOLOGIN BYPASSRLS; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
GRANT SELECT ON customers TO ficus_lint_bypass;
CREATE MATERIALIZED VIEW order_totals AS SELECT customer_id, sum(total) AS total FROM "order" GROUP BY 1;
GRANT SELECT ON order_totals TO ficus_tenant;
CREATE FUNCTION public.customer_count() RETURNS bigint LANGUAGE sql STABLE SECURITY DEFINER SET search_path = ''
    AS 'SELECT count(*) FROM public.customers';
"#,
    )
    .await
    .unwrap();
    let found = lint(&c).await.unwrap();
    let got: String = found
        .findings
        .iter()
        .map(|f| format!("{} {} {}\n", f.severity.as_str(), f.check, f.object))
        .collect();
    expect_test::expect![[r#"
        error definer-executable-by-public public.customer_count()
        error definer-executable-by-public public.leaky()
        error definer-function-reads-tenant-data public.customer_count()
        error definer-mutable-search-path public.leaky()
        error materialized-view-readable-by-tenant-role order_totals
        error tenant-table-without-policy notes
        error view-bypasses-rls customer_orders
        warning definer-in-exposed-schema public.customer_count()
        warning definer-in-exposed-schema public.leaky()
        warning nullable-tenant-id notes
        warning policy-calls-per-row per_row on products
        warning rls-without-policy countries
        warning role-bypasses-rls ficus_lint_bypass
        warning several-permissive-policies customers
        warning tenant-id-not-indexed notes
    "#]]
    .assert_eq(&got);
    let several = found
        .findings
        .iter()
        .find(|f| f.check == "several-permissive-policies")
        .unwrap();
    assert_eq!(
        several.message,
        "role ficus_tenant has 2 permissive policies for SELECT (ficus_tenant_isolation, planted): they are ORed, so the widest one wins"
    );
    let per_row = found
        .findings
        .iter()
        .find(|f| f.check == "policy-calls-per-row")
        .unwrap();
    assert_eq!(
        per_row.message,
        "calls tenancy_private.current_tenant_id() for every row it checks instead of once per query"
    );
}

/// The steps before the backfill, for tests of the backfill alone.
async fn ready_for_backfill(
    client: &mut tokio_postgres::Client,
    plan: &Plan,
    inv: &ficus_retrofit::Inventory,
) {
    for kind in [StepKind::Spine, StepKind::Column, StepKind::Default] {
        let only = Options {
            only: Some(kind),
            ..Options::default()
        };
        apply::apply(client, plan, inv, &only, &mut quiet())
            .await
            .unwrap();
    }
}

/// Waits until a workload has run `at_least` statements; fails only a workload
/// that is stuck.
async fn until_ops(ops: &AtomicU64, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while ops.load(Ordering::Relaxed) < at_least {
        assert!(
            Instant::now() < deadline,
            "the workload stopped at {} statements",
            ops.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `sql` (a count) every `every` until it is above zero; fails the test
/// with `what` after `within`.
async fn until_counted(
    client: &tokio_postgres::Client,
    sql: &str,
    every: Duration,
    within: Duration,
    what: &str,
) {
    let deadline = Instant::now() + within;
    while count(client, sql).await == 0 {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(every).await;
    }
}

/// Runs the steps of one kind and returns the blockers named by each retry.
async fn apply_kind_with_retries(
    client: &mut tokio_postgres::Client,
    plan: &Plan,
    inv: &ficus_retrofit::Inventory,
    kind: StepKind,
) -> Result<Vec<String>, Error> {
    let mut retries = Vec::new();
    let mut on = |e: &Event| {
        if let Event::Retry { blockers, .. } = e {
            retries.push(blockers.clone());
        }
    };
    let only = Options {
        only: Some(kind),
        ..Options::default()
    };
    apply::apply(client, plan, inv, &only, &mut on).await?;
    Ok(retries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waiting_on_an_app_row_gives_way_before_a_deadlock_can_abort_the_app() {
    let db = sample().await;
    let (plan, inv) = draft(&db).await;
    let client = connect(&db.url).await.unwrap();
    // A wide window for the test to close the cycle in: the batch may wait
    // 2 s (half the deadlock timeout), the app's deadlock check runs after 4 s.
    let database: String = client
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    client
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" SET deadlock_timeout = '10s'"
        ))
        .await
        .unwrap();
    let mut client = connect(&db.url).await.unwrap();
    ready_for_backfill(&mut client, &plan, &inv).await;
    // The app holds order 3000, the last row of the third 1,000-row batch, and
    // another session holds order 2999 for a moment.
    let app = connect(&db.app_url).await.unwrap();
    app.batch_execute("BEGIN; UPDATE \"order\" SET total = total + 1 WHERE id = 3000;")
        .await
        .unwrap();
    let other = connect(&db.app_url).await.unwrap();
    other
        .batch_execute("BEGIN; UPDATE \"order\" SET total = total + 1 WHERE id = 2999;")
        .await
        .unwrap();
    let opts = Options {
        only: Some(StepKind::Backfill),
        backfill: backfill::Options {
            min_batch: 1_000,
            max_batch: 1_000,
            lock_timeout: Duration::from_secs(3),
            ..backfill::Options::default()
        },
        ..Options::default()
    };
    let run =
        tokio::spawn(
            async move { apply::apply(&mut client, &plan, &inv, &opts, &mut quiet()).await },
        );
    // The batch stops at order 2999, holding orders 2001 to 2998. The app now
    // asks for one of them and waits first; then order 2999 is let go, the batch
    // reaches order 3000 and waits for the app: a cycle in which the app has
    // waited longer, so without the batch's budget the app's own deadlock
    // check would fire first and abort the app's transaction.
    let watcher = connect(&db.url).await.unwrap();
    until_counted(
        &watcher,
        "SELECT count(*) FROM pg_stat_activity
         WHERE application_name = 'ficus-db' AND wait_event_type = 'Lock' AND query LIKE '%\"order\"%'",
        Duration::from_millis(5),
        Duration::from_secs(20),
        "the backfill never waited for the row held",
    )
    .await;
    let app_pid = count(&app, "SELECT pg_backend_pid()::int8").await;
    let app = Arc::new(app);
    let app_tx = tokio::spawn({
        let app = Arc::clone(&app);
        async move {
            app.batch_execute("UPDATE \"order\" SET total = total + 1 WHERE id = 2500; COMMIT;")
                .await
        }
    });
    // Order 2999 is let go only once the app waits on the batch, and the test then
    // sees both wait on each other: the cycle, formed by events, not by pacing.
    // The batch's budget (half the 10 s deadlock_timeout) leaves every step here
    // seconds to spare on a loaded machine.
    let app_waits = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE pid = {app_pid} AND wait_event_type = 'Lock'"
    );
    let (every, within) = (Duration::from_millis(5), Duration::from_secs(20));
    until_counted(
        &watcher,
        &app_waits,
        every,
        within,
        "the app never waited on the batch",
    )
    .await;
    other.batch_execute("COMMIT").await.unwrap();
    until_counted(
        &watcher,
        &format!(
            "SELECT count(*) FROM pg_stat_activity a, pg_stat_activity b
             WHERE a.pid = {app_pid} AND a.wait_event_type = 'Lock'
               AND b.application_name = 'ficus-db' AND b.wait_event_type = 'Lock'
               AND {app_pid} = ANY(pg_blocking_pids(b.pid))"
        ),
        every,
        within,
        "no cycle formed: the batch never waited on the app while the app waited on it",
    )
    .await;
    app_tx
        .await
        .unwrap()
        .expect("the app's transaction must not be chosen as a deadlock victim");
    run.await.unwrap().unwrap();
    let r = app
        .query_one(
            "SELECT count(*) FILTER (WHERE tenant_id IS NULL), (sum(total) FILTER (WHERE id IN (2500, 3000)))::float8 FROM \"order\"",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 0);
    // Orders 2500 and 3000 had totals 2500 and 3000; each gained one.
    assert_eq!(r.get::<_, f64>(1), 5502.0);
    assert_eq!(
        count(&app, "SELECT total::int8 FROM \"order\" WHERE id = 2999").await,
        3000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backfill_waits_while_a_replica_lags_and_refuses_to_run_blind() {
    // A primary of its own with a streaming replica whose replay can be paused.
    let (primary, standby, url) = tokio::task::spawn_blocking(|| {
        let primary = ficus_testkit::PgCluster::start_with(&[
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("wal_receiver_status_interval", "1s"),
        ])
        .unwrap();
        let url = primary.fresh_database("replica").unwrap();
        let standby = primary.start_standby().unwrap();
        (primary, standby, url)
    })
    .await
    .unwrap();
    let db = Db {
        app_url: url.replace("postgres://postgres@", "postgres://ficus_app@"),
        url,
    };
    connect(&db.url)
        .await
        .unwrap()
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    let (plan, inv) = draft(&db).await;
    let mut client = connect(&db.url).await.unwrap();
    ready_for_backfill(&mut client, &plan, &inv).await;
    let nulls = || async {
        count(
            &connect(&db.url).await.unwrap(),
            "SELECT count(*) FROM \"order\" WHERE tenant_id IS NULL",
        )
        .await
    };
    let before = nulls().await;
    assert_eq!(before, 6_000);
    // A role that may not see the replicas' state would never wait: refused
    // before anything is written.
    client
        .batch_execute(
            "GRANT USAGE ON SCHEMA tenancy, tenancy_private TO ficus_app;
             GRANT ALL ON ALL TABLES IN SCHEMA tenancy_private TO ficus_app;",
        )
        .await
        .unwrap();
    let mut app = connect(&db.app_url).await.unwrap();
    let only_backfill = |lag: Duration| Options {
        only: Some(StepKind::Backfill),
        backfill: backfill::Options {
            max_replica_lag: lag,
            ..backfill::Options::default()
        },
        ..Options::default()
    };
    let err = apply::apply(
        &mut app,
        &plan,
        &inv,
        &only_backfill(Duration::from_secs(1)),
        &mut quiet(),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cannot see the replay lag of 1 replica(s): the role needs pg_read_all_stats"),
        "{err}"
    );
    assert_eq!(nulls().await, before);
    // The replica stops replaying; WAL keeps coming, so its lag grows.
    tokio::task::spawn_blocking({
        let standby = standby.psql("postgres", "SELECT pg_wal_replay_pause()");
        move || standby.unwrap()
    })
    .await
    .unwrap();
    let paused = Instant::now();
    let deadline = paused + Duration::from_secs(30);
    loop {
        client
            .batch_execute("INSERT INTO schema_migrations VALUES (gen_random_uuid()::text)")
            .await
            .unwrap();
        let lag: f64 = client
            .query_one(
                "SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 FROM pg_stat_replication",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if lag > 2.0 {
            eprintln!(
                "replica lag {lag:.1} s, {:?} after the pause",
                paused.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the paused replica's lag never grew ({lag} s)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The backfill waits, says so, and writes nothing while the replica lags.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let run = tokio::spawn(async move {
        let mut on = move |e: &Event| {
            if let Event::Backfill(p) = e {
                let _ = tx.send((p.phase, p.replica_lag_secs));
            }
        };
        apply::apply(
            &mut client,
            &plan,
            &inv,
            &only_backfill(Duration::from_secs(1)),
            &mut on,
        )
        .await
    });
    let (phase, lag) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the backfill said nothing while the replica lagged")
        .unwrap();
    assert_eq!(phase, "waiting for replicas");
    assert!(lag.unwrap() > 1.0, "{lag:?}");
    // Two more reports of waiting (one a second) while the lag stays: the run
    // went on waiting instead of writing.
    for _ in 0..2 {
        let (phase, _) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the backfill stopped reporting while the replica lagged")
            .unwrap();
        assert_eq!(phase, "waiting for replicas");
    }
    assert!(!run.is_finished());
    assert_eq!(
        nulls().await,
        before,
        "rows were backfilled while the replica lagged"
    );
    // Replay resumes: the lag falls and the backfill finishes.
    // The replica stays attached (dropping it would end the lag trivially).
    let resumed = Instant::now();
    let standby = tokio::task::spawn_blocking(move || {
        standby
            .psql("postgres", "SELECT pg_wal_replay_resume()")
            .unwrap();
        standby
    })
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the backfill never went on after the replica caught up")
        .unwrap()
        .unwrap();
    eprintln!(
        "the backfill finished {:?} after replay resumed",
        resumed.elapsed()
    );
    assert_eq!(nulls().await, 0);
    let attached = count(
        &connect(&db.url).await.unwrap(),
        "SELECT count(*) FROM pg_stat_replication",
    )
    .await;
    assert_eq!(attached, 1, "the replica was not attached to the end");
    drop((standby, primary));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_refused_by_name_without_echoing_it() {
    let db = sample().await;
    let client = connect(&db.url).await.unwrap();
    client
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE ficus_pw LOGIN PASSWORD 'right-horse'; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;",
        )
        .await
        .unwrap();
    tokio::task::spawn_blocking(|| {
        ficus_testkit::shared()
            .require_password("ficus_pw")
            .unwrap()
    })
    .await
    .unwrap();
    let at = db.url.trim_start_matches("postgres://postgres@");
    let (host, database) = at.split_once('/').unwrap();
    let err = connect(&format!("postgres://ficus_pw:wrong-horse@{at}"))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "cannot connect to postgres://{host}/{database}: password authentication failed for user \"ficus_pw\""
        )
    );
    assert!(!err.contains("wrong-horse") && !err.contains("right-horse"));
    // The right one gets in, so the refusal above was the password's doing.
    let ok = connect(&format!("postgres://ficus_pw:right-horse@{at}"))
        .await
        .unwrap();
    assert_eq!(count(&ok, "SELECT 1::int8").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autovacuum_started_by_the_backfill_stops_neither_the_index_nor_the_tighten_step() {
    // Regression: on a 10-million-row table the backfill's dead rows started an
    // autovacuum, which held the concurrent index build off for every one of
    // its 500 ms attempts. Here a vacuum made very slow plays that part.
    let (cluster, url) = tokio::task::spawn_blocking(|| {
        let cluster = ficus_testkit::PgCluster::start_with(&[
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("autovacuum_naptime", "1s"),
        ])
        .unwrap();
        let url = cluster.fresh_database("autovacuum").unwrap();
        (cluster, url)
    })
    .await
    .unwrap();
    let db = Db {
        app_url: url.replace("postgres://postgres@", "postgres://ficus_app@"),
        url,
    };
    let mut client = connect(&db.url).await.unwrap();
    client.batch_execute(SCHEMA).await.unwrap();
    let (plan, inv) = draft(&db).await;
    ready_for_backfill(&mut client, &plan, &inv).await;
    let only = |kind| Options {
        only: Some(kind),
        ..Options::default()
    };
    apply::apply(
        &mut client,
        &plan,
        &inv,
        &only(StepKind::Backfill),
        &mut quiet(),
    )
    .await
    .unwrap();
    client
        .batch_execute(
            "ALTER TABLE customers SET (autovacuum_vacuum_threshold = 0, autovacuum_vacuum_scale_factor = 0,
                                        autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1)",
        )
        .await
        .unwrap();
    // Dead rows made after the slow settings: an autovacuum the backfill's
    // own dead rows started at full speed may already have cleaned them up
    // (regression: CI saw no autovacuum of customers within 30 s when that
    // one had finished before the settings changed).
    client
        .batch_execute("UPDATE customers SET created_at = created_at")
        .await
        .unwrap();
    let vacuuming =
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'autovacuum: VACUUM%customers%'";
    let (every, within) = (Duration::from_millis(100), Duration::from_secs(30));
    until_counted(
        &client,
        vacuuming,
        every,
        within,
        "no autovacuum of customers started",
    )
    .await;
    let t = Instant::now();
    let retries = apply_kind_with_retries(&mut client, &plan, &inv, StepKind::Index)
        .await
        .expect("the index step waits out the autovacuum instead of giving up");
    eprintln!(
        "index step done in {:?} after {} retries",
        t.elapsed(),
        retries.len()
    );
    assert!(
        retries.iter().any(|b| b.contains("autovacuum: VACUUM")),
        "the autovacuum was never in the way: {retries:?}"
    );
    let valid = count(
        &client,
        "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE i.indrelid = 'customers'::regclass AND i.indisvalid AND c.relname LIKE '%tenant%'",
    )
    .await;
    assert_eq!(valid, 1);
    // The vacuum comes back (the dead rows are still there); tighten's first
    // statement needs a lock the app would queue behind, so Ficus, as a
    // superuser here, cancels the vacuum instead of waiting it out.
    until_counted(
        &client,
        vacuuming,
        every,
        within,
        "the autovacuum of customers did not come back",
    )
    .await;
    let retries = apply_kind_with_retries(&mut client, &plan, &inv, StepKind::Tighten)
        .await
        .expect("the tighten step moves the autovacuum aside");
    assert!(
        retries
            .iter()
            .any(|b| b.contains("cancelled autovacuum pid")),
        "{retries:?}"
    );
    let not_null = count(
        &client,
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'customers'::regclass AND attname = 'tenant_id' AND attnotnull",
    )
    .await;
    assert_eq!(not_null, 1);
    drop(cluster);
}

/// Roles that may use the tables in every way a privilege can reach them, none
/// connected when the plan is made: the owner, a role's own grant, a role
/// through membership of a group, and any role through PUBLIC.
const ROLE_MATRIX_SCHEMA: &str = r#"
CREATE ROLE m_owner LOGIN;
CREATE ROLE m_grantee LOGIN;
CREATE ROLE m_writers NOLOGIN;
CREATE ROLE m_member LOGIN IN ROLE m_writers;
CREATE ROLE m_anyone LOGIN;
CREATE ROLE m_tenant LOGIN;
GRANT CREATE ON SCHEMA public TO m_owner;
SET ROLE m_owner;
CREATE TABLE owned_t (id bigserial PRIMARY KEY, note text, at timestamptz DEFAULT now(), n int);
CREATE TABLE granted_t (id bigserial PRIMARY KEY, note text, at timestamptz DEFAULT now(), n int);
CREATE TABLE group_t (id bigserial PRIMARY KEY, note text, at timestamptz DEFAULT now(), n int);
CREATE TABLE public_t (id bigserial PRIMARY KEY, note text, at timestamptz DEFAULT now(), n int);
INSERT INTO owned_t (note) SELECT 'seed' FROM generate_series(1, 50);
INSERT INTO granted_t (note) SELECT 'seed' FROM generate_series(1, 50);
INSERT INTO group_t (note) SELECT 'seed' FROM generate_series(1, 50);
INSERT INTO public_t (note) SELECT 'seed' FROM generate_series(1, 50);
GRANT SELECT, INSERT, UPDATE, DELETE ON granted_t TO m_grantee;
GRANT USAGE ON SEQUENCE granted_t_id_seq TO m_grantee;
GRANT SELECT, INSERT, UPDATE, DELETE ON group_t TO m_writers;
GRANT USAGE ON SEQUENCE group_t_id_seq TO m_writers;
GRANT SELECT, INSERT, UPDATE, DELETE ON public_t TO PUBLIC;
GRANT USAGE ON SEQUENCE public_t_id_seq TO PUBLIC;
GRANT SELECT, INSERT ON owned_t, granted_t, group_t TO m_tenant;
RESET ROLE;
"#;

/// Which role uses which table in the role matrix.
const ROLE_MATRIX: &[(&str, &str)] = &[
    ("m_owner", "owned_t"),
    ("m_owner", "granted_t"),
    ("m_owner", "group_t"),
    ("m_owner", "public_t"),
    ("m_grantee", "granted_t"),
    ("m_grantee", "public_t"),
    ("m_member", "group_t"),
    ("m_member", "public_t"),
    ("m_anyone", "public_t"),
];

/// Runs insert, select-by-key, update and delete as each role of the matrix;
/// returns every statement that failed or saw nothing, with `when`.
async fn role_matrix(url: &str, when: &str) -> Vec<String> {
    let mut failures = Vec::new();
    for (role, table) in ROLE_MATRIX {
        let c = connect(&url.replace("postgres://postgres@", &format!("postgres://{role}@")))
            .await
            .unwrap();
        let id: i64 = match c
            .query_one(
                &format!("INSERT INTO {table} (note) VALUES ('by {role}') RETURNING id"),
                &[],
            )
            .await
        {
            Ok(r) => r.get(0),
            Err(e) => {
                failures.push(format!("{when}: {role} INSERT {table}: {}", describe(&e)));
                continue;
            }
        };
        let statements = [
            format!("SELECT count(*) FROM {table} WHERE id = {id}"),
            format!("UPDATE {table} SET n = 1 WHERE id = {id}"),
            format!("DELETE FROM {table} WHERE id = {id}"),
        ];
        for q in &statements {
            match c.execute(q.as_str(), &[]).await {
                Ok(1) => {}
                Ok(n) => failures.push(format!("{when}: {role} {q}: {n} rows instead of 1")),
                Err(e) => failures.push(format!("{when}: {role} {q}: {}", describe(&e))),
            }
        }
    }
    failures
}

/// A cluster of this test's own, with one fresh database: for schemas that
/// make cluster-wide roles of their own.
pub(crate) async fn own_cluster(prefix: &'static str) -> (ficus_testkit::PgCluster, String) {
    tokio::task::spawn_blocking(move || {
        let cluster = ficus_testkit::PgCluster::start_with(&[("fsync", "off")]).unwrap();
        let url = cluster.fresh_database(prefix).unwrap();
        (cluster, url)
    })
    .await
    .unwrap()
}

/// Every kind of apply step in turn, the role matrix run after each.
async fn apply_step_by_step(
    client: &mut tokio_postgres::Client,
    plan: &Plan,
    inv: &ficus_retrofit::Inventory,
    url: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for kind in [
        StepKind::Spine,
        StepKind::Column,
        StepKind::Default,
        StepKind::Backfill,
        StepKind::Index,
        StepKind::Tighten,
        StepKind::View,
    ] {
        let only = Options {
            only: Some(kind),
            ..Options::default()
        };
        apply::apply(client, plan, inv, &only, &mut quiet())
            .await
            .unwrap();
        failures.extend(role_matrix(url, &format!("after {}", kind.as_str())).await);
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_that_may_use_a_table_keeps_working_through_every_step_of_apply_and_enforce() {
    use ficus_retrofit::enforce;
    // A cluster of its own, so that its roles are exactly the matrix's.
    let (cluster, url) = own_cluster("roles").await;
    let mut client = connect(&url).await.unwrap();
    client.batch_execute(ROLE_MATRIX_SCHEMA).await.unwrap();
    let inv = inspect(&client).await.unwrap();
    // Nobody is connected: the plan finds the app's roles in the catalogs.
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid).unwrap();
    assert_eq!(
        plan.app_roles,
        ["m_anyone", "m_grantee", "m_member", "m_owner", "m_tenant"]
    );
    let text = plan.to_toml_explained(&inv).unwrap();
    for why in [
        "#   m_owner: owns owned_t and 3 more tenant-owned tables",
        "#   m_grantee: may SELECT, INSERT, UPDATE, DELETE granted_t (granted) and 1 more tenant-owned table",
        "#   m_member: may SELECT, INSERT, UPDATE, DELETE group_t (member of m_writers) and 1 more tenant-owned table",
        "#   m_anyone: may SELECT, INSERT, UPDATE, DELETE public_t (PUBLIC)",
    ] {
        assert!(text.contains(why), "{why:?} missing from:\n{text}");
    }
    // The operator moves one role to isolation, deliberately.
    plan.app_roles.retain(|r| r != "m_tenant");
    plan.tenant_roles = vec!["m_tenant".into()];
    let plan = Plan::from_toml(&plan.to_toml().unwrap(), "plan.toml").unwrap();

    let mut failures = role_matrix(&url, "before").await;
    failures.extend(apply_step_by_step(&mut client, &plan, &inv, &url).await);
    for table in ["owned_t", "granted_t", "group_t", "public_t"] {
        let t = Table::new("public", table);
        for _ in 0..2 {
            let r = enforce::step(
                &mut client,
                &plan,
                &inv,
                &t,
                true,
                true,
                &Options::default(),
            )
            .await
            .unwrap();
            failures.extend(role_matrix(&url, &format!("{table} {}", r.to.as_str())).await);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The rows each role wrote while enforced are tenant zero's.
    let unstamped = count(
        &client,
        &format!(
            "SELECT count(*) FROM public_t WHERE tenant_id IS DISTINCT FROM '{}'",
            plan.tenant_zero.id
        ),
    )
    .await;
    assert_eq!(unstamped, 0);
    drop(cluster);
}

/// The plan of the first real-schema report: `app_roles = []`, because the
/// owner the app connects as was not connected at plan time. Every role that
/// may write a table still keeps working through every step of apply (the
/// default step grants what its default needs), and a role that may use a table
/// but is in neither list is never isolated quietly: enforcement refuses and
/// names it. Regression: the owner lost every INSERT at the default step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_without_the_owner_breaks_no_insert_and_enforcement_names_the_roles_left_out() {
    use ficus_retrofit::enforce;
    let (cluster, url) = own_cluster("roles").await;
    let mut client = connect(&url).await.unwrap();
    client.batch_execute(ROLE_MATRIX_SCHEMA).await.unwrap();
    let inv = inspect(&client).await.unwrap();
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid).unwrap();
    plan.app_roles = Vec::new();
    plan.tenant_roles = vec!["m_tenant".into()];
    let failures = apply_step_by_step(&mut client, &plan, &inv, &url).await;
    assert!(failures.is_empty(), "{failures:#?}");
    let t = Table::new("public", "group_t");
    let err = enforce::step(
        &mut client,
        &plan,
        &inv,
        &t,
        true,
        true,
        &Options::default(),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains(
            "role m_member may SELECT, INSERT, UPDATE, DELETE group_t (member of m_writers) but is in neither app_roles nor tenant_roles"
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "role m_owner owns group_t but is in neither app_roles nor tenant_roles: an owner bypasses row level security"
        ),
        "{err}"
    );
    assert!(role_matrix(&url, "refused").await.is_empty());
    drop(cluster);
}

/// Regression: `distribute apply` replaced the retrofit's PL/pgSQL
/// `default_tenant_id()` in place with an SQL function, and an insert whose
/// executor had looked the old one up ran the new body through the PL/pgSQL
/// compiler ("syntax error at or near SELECT"); and the undo, putting the
/// retrofit's `SECURITY DEFINER` body back in one statement, let a session
/// that had resolved the rewrite's `SECURITY INVOKER` read the settings with
/// the caller's rights ("permission denied for table settings"). The helper
/// swapped to its distributed form and back, again and again, while new
/// sessions of the application's role call it, fails no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_tenant_helper_swapped_back_and_forth_fails_no_concurrent_call() {
    let db = sample().await;
    let (plan, inv) = draft(&db).await;
    let mut c = connect(&db.url).await.unwrap();
    let spine = Options {
        only: Some(StepKind::Spine),
        ..Options::default()
    };
    apply::apply(&mut c, &plan, &inv, &spine, &mut quiet())
        .await
        .unwrap();
    // What `distribute apply` reads and writes, from the database as it is.
    let helpers = ficus_retrofit::distribute::apply::helpers(&c)
        .await
        .unwrap();
    let (rewrite, undo) =
        ficus_retrofit::distribute::apply::default_tenant_swap(IdType::Uuid, &helpers).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..2)
        .map(|_| {
            // The application's role, with no tenant: the retrofit's body
            // reads the settings, which only the helper's owner may.
            let (url, stop, zero) = (
                db.app_url.clone(),
                stop.clone(),
                plan.tenant_zero.id.clone(),
            );
            let calls = Arc::new(AtomicU64::new(0));
            let counted = calls.clone();
            let task = tokio::spawn(async move {
                let mut failed = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    // A new session each time: its catalog caches are empty,
                    // so looking up the language's handler reads pg_language
                    // and takes in the swaps committed meanwhile, between the
                    // lookup of the function and that of its body.
                    let client = connect(&url).await.unwrap();
                    let got = client
                        .query_one("SELECT tenancy_private.default_tenant_id()::text", &[])
                        .await;
                    match got {
                        Ok(row) => assert_eq!(row.get::<_, String>(0), zero),
                        Err(e) => failed.push(format!("{e:?}")),
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                failed
            });
            (calls, task)
        })
        .collect();
    for i in 0..100 {
        for statement in if i % 2 == 0 { &rewrite } else { &undo } {
            c.batch_execute(statement).await.unwrap();
            // Each caller calls at least twice more before the next
            // statement, so they land among the calls on any machine.
            for (calls, _) in &callers {
                let at = calls.load(Ordering::SeqCst);
                until_ops(calls, at + 2).await;
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let mut failed = Vec::new();
    for (_, task) in callers {
        failed.extend(task.await.unwrap());
    }
    assert_eq!(failed, Vec::<String>::new());
}
