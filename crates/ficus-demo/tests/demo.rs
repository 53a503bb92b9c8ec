//! The two sample backends on a real PostgreSQL: legacy as the tables' owner
//! before and after the retrofit, new as a tenant role under enforced row level
//! security, the same answers for tenant zero, isolation for another tenant, and
//! the deliberate bug when it is switched on.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ficus_demo::backend::{Faults, Flavor, TENANT_HEADER, pool, router};
use ficus_retrofit::apply::{self, Options};
use ficus_retrofit::plan::{IdType, Plan};
use ficus_retrofit::{connect, enforce, inspect};
use serde_json::{Value, json};

async fn serve(url: &str, flavor: Flavor) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = router(pool(url, 4).unwrap(), flavor);
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    tenant: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut r = http.request(method, url);
    if let Some(t) = tenant {
        r = r.header(TENANT_HEADER, t);
    }
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_and_new_serve_one_api_and_the_new_one_is_isolated_by_the_database() {
    use reqwest::Method;
    let url =
        tokio::task::spawn_blocking(|| ficus_testkit::shared().fresh_database("demo").unwrap())
            .await
            .unwrap();
    let admin = connect(&url).await.unwrap();
    admin
        .batch_execute(
            "DO $$ BEGIN CREATE ROLE demo_legacy LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             DO $$ BEGIN CREATE ROLE demo_tenant LOGIN; EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$;
             GRANT CREATE, USAGE ON SCHEMA public TO demo_legacy;",
        )
        .await
        .unwrap();
    let as_role = |role: &str| url.replace("postgres://postgres@", &format!("postgres://{role}@"));
    let legacy_db = connect(&as_role("demo_legacy")).await.unwrap();
    ficus_demo::schema::load(&legacy_db, 60).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let legacy = serve(&as_role("demo_legacy"), Flavor::Legacy).await;

    let (status, before) = call(&http, Method::GET, format!("{legacy}/homes"), None, None).await;
    assert_eq!(status, 200);
    assert_eq!(before["homes"].as_array().unwrap().len(), 50);
    let (_, one) = call(&http, Method::GET, format!("{legacy}/homes/7"), None, None).await;
    assert_eq!(
        one["latest_valuation"],
        json!(one["price"].as_i64().unwrap() + 2500)
    );
    let (status, bad) = call(
        &http,
        Method::POST,
        format!("{legacy}/homes"),
        None,
        Some(json!({"address": "1 Way", "city": "Porto", "price": 0, "bedrooms": 2})),
    )
    .await;
    assert_eq!((status, bad["error"].as_str().is_some()), (400, true));

    // The retrofit, enforced on every table, with the legacy role as the live
    // app and demo_tenant as the new backend's role.
    let mut c = connect(&url).await.unwrap();
    let inv = inspect(&c).await.unwrap();
    let mut plan = Plan::draft(&inv, "Acme Homes", IdType::Uuid).unwrap();
    plan.app_roles = vec!["demo_legacy".into()];
    plan.tenant_roles = vec!["demo_tenant".into()];
    apply::apply(&mut c, &plan, &inv, &Options::default(), &mut |_| {})
        .await
        .unwrap();
    c.batch_execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO demo_tenant;
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO demo_tenant;
         GRANT USAGE ON SCHEMA tenancy TO demo_tenant;
         GRANT SELECT ON tenancy.organizations TO demo_tenant;",
    )
    .await
    .unwrap();
    for p in plan.owned() {
        let t = ficus_retrofit::ident::Table::new(&p.schema, &p.name);
        for _ in 0..2 {
            enforce::step(&mut c, &plan, &inv, &t, true, true, &Options::default())
                .await
                .unwrap();
        }
    }
    let faults = Arc::new(Faults::default());
    let new = serve(
        &as_role("demo_tenant"),
        Flavor::New {
            faults: Arc::clone(&faults),
        },
    )
    .await;
    let zero = plan.tenant_zero.slug.clone();

    // The same answer from both for tenant zero; legacy still works enforced.
    let (_, legacy_after) = call(&http, Method::GET, format!("{legacy}/homes"), None, None).await;
    assert_eq!(legacy_after, before);
    let (status, from_new) = call(
        &http,
        Method::GET,
        format!("{new}/homes"),
        Some(&zero),
        None,
    )
    .await;
    // The rebuilt backend adds a member legacy never had; the rest is the same.
    let mut from_new = from_new;
    for home in from_new["homes"].as_array_mut().unwrap() {
        let rating = home.as_object_mut().unwrap().remove("energy_rating");
        assert!(rating.is_some_and(|r| r.is_string()), "{home}");
    }
    assert_eq!((status, &from_new), (200, &before));
    let (status, _) = call(&http, Method::GET, format!("{new}/homes"), None, None).await;
    assert_eq!(status, 400, "no tenant, no answer");
    let (status, _) = call(
        &http,
        Method::GET,
        format!("{new}/homes"),
        Some("nobody"),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Another tenant writes through the new backend: isolated from tenant zero
    // on both backends.
    apply::add_tenant(&c, "globex", "Globex").await.unwrap();
    let (status, created) = call(
        &http,
        Method::POST,
        format!("{new}/homes"),
        Some("globex"),
        Some(json!({"address": "9 Globex Lane", "city": "Lyon", "price": 300000, "bedrooms": 3})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_i64().unwrap();
    let (status, _) = call(
        &http,
        Method::GET,
        format!("{new}/homes/{id}"),
        Some(&zero),
        None,
    )
    .await;
    assert_eq!(status, 404, "tenant zero sees another tenant's home");
    let (status, _) = call(
        &http,
        Method::GET,
        format!("{legacy}/homes/{id}"),
        None,
        None,
    )
    .await;
    assert_eq!(status, 404, "the legacy app sees another tenant's home");
    let (status, globex) = call(
        &http,
        Method::GET,
        format!("{new}/homes"),
        Some("globex"),
        None,
    )
    .await;
    assert_eq!(
        (status, globex["homes"].as_array().unwrap().len()),
        (200, 1)
    );
    // A write through legacy lands in tenant zero.
    let (status, _) = call(
        &http,
        Method::POST,
        format!("{legacy}/searches"),
        None,
        Some(json!({"owner": "ana", "city": "Lisbon", "max_price": 500000})),
    )
    .await;
    assert_eq!(status, 200);
    let (_, searches) = call(
        &http,
        Method::GET,
        format!("{new}/searches"),
        Some(&zero),
        None,
    )
    .await;
    assert_eq!(searches["searches"].as_array().unwrap().len(), 6);

    // The deliberate bug: one field, one endpoint, only on the new backend.
    faults.bug.store(true, Ordering::Relaxed);
    let (_, buggy) = call(
        &http,
        Method::GET,
        format!("{new}/homes/7"),
        Some(&zero),
        None,
    )
    .await;
    let (_, right) = call(&http, Method::GET, format!("{legacy}/homes/7"), None, None).await;
    assert_ne!(buggy["price_per_bedroom"], right["price_per_bedroom"]);
    let mut same = buggy.clone();
    same["price_per_bedroom"] = right["price_per_bedroom"].clone();
    same.as_object_mut().unwrap().remove("energy_rating");
    assert_eq!(same, right);
    let (_, list) = call(
        &http,
        Method::GET,
        format!("{new}/homes"),
        Some(&zero),
        None,
    )
    .await;
    let mut list = list;
    for home in list["homes"].as_array_mut().unwrap() {
        home.as_object_mut().unwrap().remove("energy_rating");
    }
    assert_eq!(list, before, "the bug lives on one endpoint only");
    // A slow tenant: held back, still answered.
    *faults.slow.lock().unwrap() = Some((zero.clone(), 200));
    let started = std::time::Instant::now();
    let (status, _) = call(
        &http,
        Method::GET,
        format!("{new}/searches"),
        Some(&zero),
        None,
    )
    .await;
    assert!(status == 200 && started.elapsed() >= std::time::Duration::from_millis(200));
    *faults.slow.lock().unwrap() = None;

    // A save sent again with its idempotency key is applied once, on either
    // backend (a proxy may send it to another instance, or to legacy after a
    // rollback); the key with another home is refused; a bad key too.
    let save = |base: &str, tenant: Option<&str>, key: &str, price: i64| {
        let mut r = http
            .post(format!("{base}/homes"))
            .header(ficus_demo::backend::IDEMPOTENCY_HEADER, key)
            .json(
                &json!({"address": "5 Key Street", "city": "Leeds", "price": price, "bedrooms": 2}),
            );
        if let Some(t) = tenant {
            r = r.header(TENANT_HEADER, t);
        }
        async move {
            let r = r.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, first) = save(&new, Some(&zero), "save-1", 410_000).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = save(&new, Some(&zero), "save-1", 410_000).await;
    assert_eq!((status, &again), (200, &first));
    let (status, on_legacy) = save(&legacy, None, "save-1", 410_000).await;
    assert_eq!(
        (status, on_legacy["id"].clone()),
        (200, first["id"].clone())
    );
    let (status, other) = save(&new, Some(&zero), "save-1", 420_000).await;
    assert_eq!(status, 422, "{other}");
    let (status, _) = save(&new, Some("globex"), "save-1", 410_000).await;
    assert_eq!(status, 422, "another tenant's key is not found, nor reused");
    let (status, _) = save(&new, Some(&zero), &"k".repeat(300), 410_000).await;
    assert_eq!(status, 400);
    let rows: i64 = c
        .query_one(
            "SELECT count(*) FROM homes WHERE request_key = 'save-1'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1);
}
