//! The whole `ficus db` flow on schemas nobody here wrote, under a workload
//! derived from the catalogs that runs as the role owning the tables (and as a
//! role that only reads views) the whole time: plan with nobody connected,
//! apply, enforce every table, probe, lint, unenforce, revert. Each must give
//! zero workload errors, zero leaks, no lint error caused by Ficus, and a schema
//! `pg_dump --schema-only` cannot tell from the one before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use expect_test::expect;
use ficus_retrofit::apply::{self, Options};
use ficus_retrofit::enforce;
use ficus_retrofit::ident::Table;
use ficus_retrofit::lint::{Severity, lint};
use ficus_retrofit::plan::{IdType, Plan, ViewAction};
use ficus_retrofit::workload::{Failure, Workload};
use ficus_retrofit::{connect, inspect};

/// One schema of the corpus.
struct Case {
    name: &'static str,
    /// Creates the roles and the schema, as the superuser.
    load: String,
    owner: &'static str,
    tenant: &'static str,
    /// Roles besides the owner that the workload runs as.
    readers: &'static [&'static str],
    /// Lint errors the sample brings with it (check names), not Ficus's.
    own_lint_errors: &'static [&'static str],
}

/// A public sample database (copied from the workplace's `shared/schemas`, with
/// its license, so that the tests need nothing outside the repository), loaded
/// as `corpus_owner`; the tenant-aware backend's role may use every table.
fn public_sample(file: &str) -> String {
    let sql = match file {
        "chinook.sql" => include_str!("schemas/chinook.sql"),
        "northwind.sql" => include_str!("schemas/northwind.sql"),
        other => panic!("no corpus schema {other}"),
    };
    format!(
        "CREATE ROLE corpus_owner LOGIN;
         CREATE ROLE corpus_tenant LOGIN;
         GRANT CREATE ON SCHEMA public TO corpus_owner;
         SET ROLE corpus_owner;
         {sql};
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO corpus_tenant;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO corpus_tenant;
         RESET ROLE;
         RESET ALL;"
    )
}

/// Stops the workload when the flow ends, however it ends.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// What one run of the flow found.
#[derive(Debug, Default)]
struct Outcome {
    failures: Vec<String>,
    rounds: u64,
    steps: Vec<(String, Duration)>,
    /// `ficus db distribute plan` on the enforced database, one line per
    /// table and per blocker.
    distribution: String,
}

/// A distribution plan in a few lines: each table as it becomes, each blocker
/// with who fixes it.
fn render(d: &ficus_retrofit::distribute::Distribution) -> String {
    use ficus_retrofit::distribute::Placement;
    let mut out = String::new();
    for t in &d.tables {
        let placement = match &t.placement {
            Placement::Distributed {
                column,
                colocate_with: Some(w),
            } => format!("distributed by {column} with {w}"),
            Placement::Distributed { column, .. } => format!("distributed by {column}"),
            Placement::Reference => "reference".to_string(),
            Placement::Local => "local".to_string(),
        };
        out.push_str(&format!("{} ({}): {placement}\n", t.table, t.class));
        for b in &t.blockers {
            let by = if b.automatic { "ficus" } else { "operator" };
            out.push_str(&format!("  {} [{by}]: {}\n", b.kind, b.object));
        }
    }
    for p in &d.propagate {
        out.push_str(&format!("propagate {}\n", p.split(':').next().unwrap_or(p)));
    }
    out
}

async fn whole_flow(case: &Case) -> Outcome {
    let (cluster, url) = crate::own_cluster("corpus").await;
    let database = url.rsplit('/').next().unwrap().to_string();
    let mut client = connect(&url).await.unwrap();
    client.batch_execute(&case.load).await.unwrap();
    let before = cluster.dump_schema(&database).unwrap();

    // Nobody is connected: the plan finds the owner in the catalogs.
    let inv = inspect(&client).await.unwrap();
    let mut plan = Plan::draft(&inv, "Acme", IdType::Uuid).unwrap();
    assert!(
        plan.app_roles.iter().any(|r| r == case.owner),
        "{}: the owner is not among the drafted app roles {:?}",
        case.name,
        plan.app_roles
    );
    plan.app_roles.retain(|r| r != case.tenant);
    plan.tenant_roles = vec![case.tenant.to_string()];
    let text = plan.to_toml_explained(&inv).unwrap();
    let plan = Plan::from_toml(&text, "plan.toml").unwrap();
    plan.check_against(&inv, "plan.toml").unwrap();

    // The workload, as the owner and each reader, round after round.
    let tables: Vec<Table> = inv.tables.iter().map(|t| t.table.clone()).collect();
    let views: Vec<Table> = inv.views.iter().map(|v| v.view.clone()).collect();
    let workload = Workload::derive(&client, &tables, &views).await.unwrap();
    eprintln!("{}: workload skips {:?}", case.name, workload.skipped());
    let stop = Arc::new(AtomicBool::new(false));
    // A failing assertion below must not leave the workload running forever.
    let _stop_on_drop = StopOnDrop(Arc::clone(&stop));
    let rounds = Arc::new(AtomicU64::new(0));
    let step = Arc::new(Mutex::new("before apply".to_string()));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let worker = {
        let (stop, rounds, step, failures) = (
            Arc::clone(&stop),
            Arc::clone(&rounds),
            Arc::clone(&step),
            Arc::clone(&failures),
        );
        let roles: Vec<String> = std::iter::once(case.owner)
            .chain(case.readers.iter().copied())
            .map(String::from)
            .collect();
        let url = url.clone();
        tokio::spawn(async move {
            let mut sessions = Vec::new();
            for role in &roles {
                let c =
                    connect(&url.replace("postgres://postgres@", &format!("postgres://{role}@")))
                        .await
                        .unwrap();
                sessions.push((role.clone(), c));
            }
            while !stop.load(Ordering::Relaxed) {
                for (role, c) in &sessions {
                    let when = step.lock().unwrap().clone();
                    // The owner runs everything; a reader only reads the views.
                    let found: Vec<Failure> = if role.as_str() == roles[0] {
                        workload.round(c, role).await
                    } else {
                        workload.read_views(c, role).await
                    };
                    let mut all = failures.lock().unwrap();
                    // The first hundred say what broke; the rest would only grow.
                    let room = 100usize.saturating_sub(all.len());
                    all.extend(found.iter().take(room).map(|f| format!("{when}: {f}")));
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let until_rounds = |at_least: u64| {
        let rounds = Arc::clone(&rounds);
        async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while rounds.load(Ordering::Relaxed) < at_least {
                assert!(Instant::now() < deadline, "the workload is stuck");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            rounds.load(Ordering::Relaxed)
        }
    };
    let mut outcome = Outcome::default();
    let mut timed = |name: &str, started: Instant| {
        outcome.steps.push((name.to_string(), started.elapsed()));
    };
    let set_step = |s: String| *step.lock().unwrap() = s;

    let at = until_rounds(1).await;
    set_step("apply".into());
    let started = Instant::now();
    apply::apply(&mut client, &plan, &inv, &Options::default(), &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("{}: apply: {e}", case.name));
    timed("apply", started);
    // As `ficus db enforce` does: the catalogs as apply left them.
    let inv = inspect(&client).await.unwrap();
    let started = Instant::now();
    while let Some(t) = enforce::next_table(&client, &plan).await.unwrap() {
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
            .unwrap_or_else(|e| panic!("{}: enforcing {t}: {e}", case.name));
            set_step(format!("{t} {}", r.to.as_str()));
        }
    }
    timed("enforce every table", started);
    // The workload runs whole rounds against the enforced schema.
    let at = until_rounds(at + 2).await;
    let started = Instant::now();
    let probe = ficus_retrofit::probe::probe(&mut client, &plan)
        .await
        .unwrap();
    timed("probe", started);
    assert_eq!(probe.leaks(), 0, "{}: {:#?}", case.name, probe.findings);
    let started = Instant::now();
    let report = lint(&client).await.unwrap();
    timed("lint", started);
    let errors: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error && !case.own_lint_errors.contains(&f.check))
        .collect();
    assert!(errors.is_empty(), "{}: lint errors {errors:#?}", case.name);
    // What distributing the enforced database onto Citus would take.
    let facts = ficus_retrofit::distribute::read(&client, &plan)
        .await
        .unwrap();
    let distribution = render(&ficus_retrofit::distribute::decide(&plan, &facts));
    // Revert steps every table's row level security back first, by itself.
    set_step("revert".into());
    let started = Instant::now();
    let all = Options {
        allow_destructive: true,
        ..Options::default()
    };
    apply::revert(&mut client, &plan, &inv, None, &all, &mut |_| {})
        .await
        .unwrap_or_else(|e| panic!("{}: revert: {e}", case.name));
    timed("revert", started);
    set_step("after revert".into());
    until_rounds(at + 1).await;
    stop.store(true, Ordering::Relaxed);
    worker.await.unwrap();
    outcome.rounds = rounds.load(Ordering::Relaxed);
    outcome.distribution = distribution;
    outcome.failures = failures.lock().unwrap().clone();
    let after = cluster.dump_schema(&database).unwrap();
    assert!(
        before == after,
        "{}: revert did not restore the schema:\n{}",
        case.name,
        ficus_retrofit::rehearse::schema_difference(&before, &after).join("\n")
    );
    drop(cluster);
    eprintln!(
        "{}: {} workload rounds, steps {:?}",
        case.name, outcome.rounds, outcome.steps
    );
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rental_shop_run_by_its_owner_with_definer_views_a_materialized_view_and_partitions() {
    let case = Case {
        name: "rentals",
        load: include_str!("schemas/rentals.sql").to_string(),
        owner: "rent_owner",
        tenant: "rent_tenant",
        readers: &["rent_report"],
        own_lint_errors: &[
            "definer-mutable-search-path",
            "definer-executable-by-public",
        ],
    };
    let outcome = whole_flow(&case).await;
    assert!(outcome.failures.is_empty(), "{:#?}", outcome.failures);
    expect![[r#"
        tenancy.organizations (spine): reference
        tenancy.units (spine): distributed by organization_id
          key-without-distribution-column [ficus]: primary key units_pkey (id)
        tenancy.members (spine): distributed by organization_id with tenancy.units
          foreign-key-without-distribution-column [ficus]: foreign key members_unit_id_fkey (unit_id) → tenancy.units (id)
        country (shared): reference
          trigger [operator]: trigger last_updated
          narrow-sequence [ficus]: column country_id (integer) from sequence public.country_country_id_seq
        language (shared): reference
          trigger [operator]: trigger last_updated
          narrow-sequence [ficus]: column language_id (integer) from sequence public.language_language_id_seq
        actor (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key actor_pkey (actor_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column actor_id (integer) from sequence public.actor_actor_id_seq
        city (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key city_pkey (city_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column city_id (integer) from sequence public.city_city_id_seq
        film (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key film_pkey (film_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column film_id (integer) from sequence public.film_film_id_seq
        address (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key address_pkey (address_id)
          foreign-key-without-distribution-column [ficus]: foreign key address_city_id_fkey (city_id) → city (city_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column address_id (integer) from sequence public.address_address_id_seq
        film_actor (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key film_actor_pkey (actor_id, film_id)
          foreign-key-without-distribution-column [ficus]: foreign key film_actor_actor_id_fkey (actor_id) → actor (actor_id)
          foreign-key-without-distribution-column [ficus]: foreign key film_actor_film_id_fkey (film_id) → film (film_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        inventory (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key inventory_pkey (inventory_id)
          foreign-key-without-distribution-column [ficus]: foreign key inventory_film_id_fkey (film_id) → film (film_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column inventory_id (integer) from sequence public.inventory_inventory_id_seq
        customer (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key customer_pkey (customer_id)
          key-without-distribution-column [ficus]: unique constraint customer_email_key (email)
          foreign-key-without-distribution-column [ficus]: foreign key customer_address_id_fkey (address_id) → address (address_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column customer_id (integer) from sequence public.customer_customer_id_seq
        rental (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key rental_pkey (rental_id)
          key-without-distribution-column [ficus]: unique constraint rental_rental_date_inventory_id_customer_id_key (rental_date, inventory_id, customer_id)
          foreign-key-without-distribution-column [ficus]: foreign key rental_customer_id_fkey (customer_id) → customer (customer_id)
          foreign-key-without-distribution-column [ficus]: foreign key rental_inventory_id_fkey (inventory_id) → inventory (inventory_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column rental_id (integer) from sequence public.rental_rental_id_seq
        payment (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [operator]: primary key payment_pkey (payment_date, payment_id)
          foreign-key-without-distribution-column [ficus]: foreign key payment_customer_id_fkey (customer_id) → customer (customer_id)
          foreign-key-without-distribution-column [ficus]: foreign key payment_rental_id_fkey (rental_id) → rental (rental_id)
          trigger [operator]: trigger last_updated
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
          narrow-sequence [ficus]: column payment_id (integer) from sequence public.payment_payment_id_seq
        propagate function rewards_report(numeric)
        propagate function tenancy_private.current_tenant_id()
        propagate function tenancy_private.default_tenant_id()
        propagate tenant context ficus.tenant_id
        propagate view customer_count
        propagate view customer_list
        propagate view film_list
        propagate view rentals_by_rating
        propagate view sales_by_film
        propagate view top_customers
    "#]].assert_eq(&outcome.distribution);
}

/// A public sample loaded as `corpus_owner`, through the whole flow; `expect`
/// is its distribution plan.
async fn public_sample_flow(name: &'static str, file: &str, expect: expect_test::Expect) {
    let case = Case {
        name,
        load: public_sample(file),
        owner: "corpus_owner",
        tenant: "corpus_tenant",
        readers: &[],
        own_lint_errors: &[],
    };
    let outcome = whole_flow(&case).await;
    assert!(outcome.failures.is_empty(), "{:#?}", outcome.failures);
    expect.assert_eq(&outcome.distribution);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chinook_goes_through_the_whole_flow_without_a_workload_error() {
    public_sample_flow("chinook", "chinook.sql", expect![[r#"
        tenancy.organizations (spine): reference
        tenancy.units (spine): distributed by organization_id
          key-without-distribution-column [ficus]: primary key units_pkey (id)
        tenancy.members (spine): distributed by organization_id with tenancy.units
          foreign-key-without-distribution-column [ficus]: foreign key members_unit_id_fkey (unit_id) → tenancy.units (id)
        artist (shared): reference
        genre (shared): reference
        media_type (shared): reference
        playlist (shared): reference
        album (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key album_pkey (album_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        employee (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key employee_pkey (employee_id)
          foreign-key-without-distribution-column [ficus]: foreign key employee_reports_to_fkey (reports_to) → employee (employee_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        customer (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key customer_pkey (customer_id)
          foreign-key-without-distribution-column [ficus]: foreign key customer_support_rep_id_fkey (support_rep_id) → employee (employee_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        track (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key track_pkey (track_id)
          foreign-key-without-distribution-column [ficus]: foreign key track_album_id_fkey (album_id) → album (album_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        invoice (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key invoice_pkey (invoice_id)
          foreign-key-without-distribution-column [ficus]: foreign key invoice_customer_id_fkey (customer_id) → customer (customer_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        playlist_track (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key playlist_track_pkey (playlist_id, track_id)
          foreign-key-without-distribution-column [ficus]: foreign key playlist_track_track_id_fkey (track_id) → track (track_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        invoice_line (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key invoice_line_pkey (invoice_line_id)
          foreign-key-without-distribution-column [ficus]: foreign key invoice_line_invoice_id_fkey (invoice_id) → invoice (invoice_id)
          foreign-key-without-distribution-column [ficus]: foreign key invoice_line_track_id_fkey (track_id) → track (track_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        propagate function tenancy_private.current_tenant_id()
        propagate function tenancy_private.default_tenant_id()
        propagate tenant context ficus.tenant_id
    "#]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn northwind_goes_through_the_whole_flow_without_a_workload_error() {
    public_sample_flow("northwind", "northwind.sql", expect![[r#"
        tenancy.organizations (spine): reference
        tenancy.units (spine): distributed by organization_id
          key-without-distribution-column [ficus]: primary key units_pkey (id)
        tenancy.members (spine): distributed by organization_id with tenancy.units
          foreign-key-without-distribution-column [ficus]: foreign key members_unit_id_fkey (unit_id) → tenancy.units (id)
        customer_demographics (shared): reference
        region (shared): reference
        shippers (shared): reference
        categories (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_categories (category_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        customers (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_customers (customer_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        employees (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_employees (employee_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_employees_employees (reports_to) → employees (employee_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        suppliers (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_suppliers (supplier_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        territories (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_territories (territory_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        us_states (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_usstates (state_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        customer_customer_demo (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_customer_customer_demo (customer_id, customer_type_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_customer_customer_demo_customers (customer_id) → customers (customer_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        employee_territories (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_employee_territories (employee_id, territory_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_employee_territories_employees (employee_id) → employees (employee_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_employee_territories_territories (territory_id) → territories (territory_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        orders (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_orders (order_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_orders_customers (customer_id) → customers (customer_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_orders_employees (employee_id) → employees (employee_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        products (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_products (product_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_products_categories (category_id) → categories (category_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_products_suppliers (supplier_id) → suppliers (supplier_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        order_details (tenant-owned): distributed by tenant_id with tenancy.units
          key-without-distribution-column [ficus]: primary key pk_order_details (order_id, product_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_order_details_orders (order_id) → orders (order_id)
          foreign-key-without-distribution-column [ficus]: foreign key fk_order_details_products (product_id) → products (product_id)
          policy-with-subquery [ficus]: policy ficus_single_tenant USING/CHECK (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id)) / (tenant_id = ( SELECT tenancy_private.default_tenant_id() AS default_tenant_id))
          policy-with-subquery [ficus]: policy ficus_tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id)) / (tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))
        propagate function tenancy_private.current_tenant_id()
        propagate function tenancy_private.default_tenant_id()
        propagate tenant context ficus.tenant_id
    "#]]).await;
}

/// The plan of the rental shop lists each view with its decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plan_lists_every_view_over_tenant_data_with_its_readers_and_decision() {
    let (cluster, url) = crate::own_cluster("views").await;
    let client = connect(&url).await.unwrap();
    client
        .batch_execute(include_str!("schemas/rentals.sql"))
        .await
        .unwrap();
    let inv = inspect(&client).await.unwrap();
    let plan = Plan::draft(&inv, "Acme", IdType::Uuid).unwrap();
    let views: Vec<(String, ViewAction)> = plan
        .views
        .iter()
        .map(|v| (v.name.clone(), v.action))
        .collect();
    assert_eq!(
        views,
        [
            ("customer_count".to_string(), ViewAction::Invoker),
            ("customer_list".to_string(), ViewAction::Invoker),
            ("film_list".to_string(), ViewAction::Invoker),
            ("rentals_by_rating".to_string(), ViewAction::Revoke),
            ("sales_by_film".to_string(), ViewAction::Invoker),
            ("top_customers".to_string(), ViewAction::Invoker),
        ]
    );
    let text = plan.to_toml_explained(&inv).unwrap();
    assert!(
        text.contains(
            "#   rentals_by_rating (materialized): read by rent_owner, rent_report, rent_tenant\n"
        ),
        "{text}"
    );
    // A role that reads only views is the live app too: once the views run as
    // their reader, it reads the tables under them.
    assert!(
        text.contains("#   rent_report: reads view customer_count (over tenant-owned tables)\n"),
        "{text}"
    );
    drop(cluster);
}
