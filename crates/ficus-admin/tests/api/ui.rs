//! The dashboard on a real listener: login and sessions, every page and action
//! against the permission matrix, CSRF, stale versions, escaping, revocation,
//! and live updates over server-sent events. Pages are checked with an HTML
//! parser, not by searching text.

use std::time::Duration;

use ficus_admin::api::AddRequest;
use ficus_admin::token::{self, Scope};
use ficus_admin::ui::{CSP, session};
use ficus_admin::{Control, Direct};
use ficus_core::{Actor, Stage};
use ficus_store::StageChange;
use scraper::{Html, Selector};

use super::{Api, id, ready_evidence, start};

/// A browser without a cookie jar or redirects: every cookie and redirect is
/// asserted by hand.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn select<'a>(doc: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    doc.select(&Selector::parse(css).unwrap()).collect()
}

fn text(e: &scraper::ElementRef<'_>) -> String {
    e.text().collect::<String>()
}

fn attr(doc: &Html, css: &str, name: &str) -> String {
    select(doc, css)
        .first()
        .unwrap_or_else(|| panic!("no {css} in the page"))
        .value()
        .attr(name)
        .unwrap_or_else(|| panic!("{css} has no {name}"))
        .to_string()
}

fn set_cookie(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_string)
}

/// The login page's nonce cookie (`name=value`) and the nonce its form carries.
async fn login_form(b: &reqwest::Client, api: &Api) -> (String, String) {
    let form = b
        .get(format!("{}/ui/login", api.base))
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 200);
    let cookie = set_cookie(&form, session::LOGIN_COOKIE).expect("a login nonce cookie");
    let doc = Html::parse_document(&form.text().await.unwrap());
    let nonce = attr(&doc, "input[name=nonce]", "value");
    (cookie.split(';').next().unwrap().to_string(), nonce)
}

/// Logs in through the login page as a person would; returns the session
/// cookie (`name=value`).
async fn login(api: &Api, token: &str) -> String {
    let b = browser();
    let (nonce_cookie, nonce) = login_form(&b, api).await;
    let answer = b
        .post(format!("{}/ui/login", api.base))
        .header("cookie", &nonce_cookie)
        .form(&[("token", token), ("nonce", &nonce), ("next", "/ui/tenants")])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303, "{}", answer.text().await.unwrap());
    assert_eq!(answer.headers()["location"], "/ui/tenants");
    let cookie = set_cookie(&answer, session::COOKIE).expect("a session cookie");
    for part in ["HttpOnly", "SameSite=Strict", "Path=/ui"] {
        assert!(cookie.contains(part), "{cookie} lacks {part}");
    }
    assert!(
        !cookie.contains(token),
        "the cookie carries the token itself"
    );
    cookie.split(';').next().unwrap().to_string()
}

async fn get(api: &Api, path: &str, cookie: Option<&str>) -> reqwest::Response {
    let mut r = browser().get(format!("{}{path}", api.base));
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    r.send().await.unwrap()
}

async fn page(api: &Api, path: &str, cookie: &str) -> Html {
    let r = get(api, path, Some(cookie)).await;
    assert_eq!(r.status(), 200, "{path}");
    assert_eq!(r.headers()["content-security-policy"], CSP);
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    Html::parse_document(&r.text().await.unwrap())
}

/// The CSRF token a page's forms carry.
fn csrf(doc: &Html) -> String {
    attr(doc, "input[name=csrf]", "value")
}

async fn post(
    api: &Api,
    path: &str,
    cookie: Option<&str>,
    form: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = browser().post(format!("{}{path}", api.base)).form(form);
    if let Some(c) = cookie {
        r = r.header("cookie", c);
    }
    r.send().await.unwrap()
}

async fn tenants(api: &Api, names: &[(&str, &str)]) {
    let c = Direct::new(api.store.clone(), Actor::Cli);
    for (tenant, name) in names {
        c.add(AddRequest {
            id: tenant.to_string(),
            name: Some(name.to_string()),
            domains: vec![],
            stage: Some("shadow".to_string()),
            reason: "for the dashboard".into(),
        })
        .await
        .unwrap();
    }
}

async fn viewer_and_operator(api: &Api) -> (String, String) {
    let v = token::create(&*api.store, "watcher", Scope::Viewer, Actor::Cli, "test")
        .await
        .unwrap();
    let o = token::create(&*api.store, "ops", Scope::Operator, Actor::Cli, "test")
        .await
        .unwrap();
    (login(api, &v).await, login(api, &o).await)
}

#[tokio::test]
async fn a_page_without_a_session_sends_the_person_to_log_in_and_back() {
    let api = start().await;
    let r = get(&api, "/ui/tenants?stage=shadow", None).await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/ui/login?next=/ui/tenants%3Fstage%3Dshadow"
    );
    // A wrong token is refused on the page, with the form again.
    let b = browser();
    let (nonce_cookie, nonce) = login_form(&b, &api).await;
    let wrong = b
        .post(format!("{}/ui/login", api.base))
        .header("cookie", &nonce_cookie)
        .form(&[("token", "ficus_nope"), ("nonce", nonce.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let doc = Html::parse_document(&wrong.text().await.unwrap());
    assert_eq!(text(&select(&doc, "#error")[0]), "that is not a live token");
    // A login form posted without its nonce cookie (from another site) is refused.
    let forged = b
        .post(format!("{}/ui/login", api.base))
        .form(&[("token", api.token.as_str()), ("nonce", nonce.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 403);
    assert!(set_cookie(&forged, session::COOKIE).is_none());
}

#[tokio::test]
async fn a_session_cookie_behind_tls_is_marked_secure() {
    let api = start().await;
    let b = browser();
    let (nonce_cookie, nonce) = login_form(&b, &api).await;
    let answer = b
        .post(format!("{}/ui/login", api.base))
        .header("cookie", &nonce_cookie)
        .header("x-forwarded-proto", "https")
        .form(&[("token", api.token.as_str()), ("nonce", nonce.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 303);
    let cookie = set_cookie(&answer, session::COOKIE).unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[tokio::test]
async fn the_login_page_never_sends_a_person_to_another_site() {
    let api = start().await;
    for next in [
        "//evil.example/",
        "https://evil.example/",
        "/v1/tenants",
        "/ui\\..\\x",
        // A header break in the redirect made a logged-in person's answer a 500.
        "/ui/\r\nSet-Cookie: x=y",
    ] {
        let r = get(
            &api,
            &format!("/ui/login?next={}", ficus_admin::ui::encode(next)),
            None,
        )
        .await;
        let doc = Html::parse_document(&r.text().await.unwrap());
        assert_eq!(attr(&doc, "input[name=next]", "value"), "/ui/", "{next}");
    }
}

#[tokio::test]
async fn every_page_answers_a_viewer_and_an_operator_and_sends_no_one_else_to_log_in() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let (viewer, operator) = viewer_and_operator(&api).await;
    for path in [
        "/ui/",
        "/ui/tenants",
        "/ui/tenants?stage=shadow&q=ac&sort=risk",
        "/ui/tenants/acme",
        "/ui/endpoints",
        "/ui/routes",
        "/ui/audit",
        "/ui/audit?tenant=acme&actor=cli&to=shadow",
    ] {
        assert_eq!(get(&api, path, None).await.status(), 303, "{path}");
        assert_eq!(
            get(&api, path, Some("ficus_session=api.99999999999.00"))
                .await
                .status(),
            303,
            "a forged session on {path}"
        );
        for (who, cookie) in [("watcher", &viewer), ("ops", &operator)] {
            let doc = page(&api, path, cookie).await;
            assert!(
                text(&select(&doc, "header .who")[0]).contains(who),
                "{path} as {who}"
            );
        }
    }
    // A viewer sees no action forms; an operator does.
    let doc = page(&api, "/ui/tenants/acme", &viewer).await;
    assert!(select(&doc, "form#promote").is_empty());
    let doc = page(&api, "/ui/tenants/acme", &operator).await;
    assert_eq!(select(&doc, "form#promote").len(), 1);
    // A bearer token works as well as a session (the API's authentication).
    let r = browser()
        .get(format!("{}/ui/tenants", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Unknown tenants and bad filters are clear errors, not crashes.
    let r = get(&api, "/ui/tenants/nobody", Some(&viewer)).await;
    assert_eq!(r.status(), 404);
    let r = get(&api, "/ui/tenants?sort=sideways", Some(&viewer)).await;
    assert_eq!(r.status(), 400);
    let doc = Html::parse_document(&r.text().await.unwrap());
    assert!(text(&select(&doc, "#error")[0]).contains("unknown sort"));
}

#[tokio::test]
async fn every_action_is_refused_without_a_session_to_a_viewer_and_without_the_csrf_token() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let (viewer, operator) = viewer_and_operator(&api).await;
    let doc = page(&api, "/ui/tenants/acme", &operator).await;
    let token = csrf(&doc);
    let version = attr(&doc, "form#promote input[name=version]", "value");
    let actions: [(&str, Vec<(&str, &str)>); 6] = [
        (
            "/ui/tenants/acme/promote",
            vec![("version", version.as_str()), ("reason", "r")],
        ),
        (
            "/ui/tenants/acme/rollback",
            vec![("version", version.as_str()), ("reason", "r")],
        ),
        ("/ui/promote-next", vec![("n", "1"), ("reason", "r")]),
        (
            "/ui/routes/release",
            vec![("route", "POST /homes"), ("reason", "r")],
        ),
        (
            "/ui/routes/hold",
            vec![("route", "POST /homes"), ("reason", "r")],
        ),
        (
            "/ui/retire",
            vec![
                ("version", "legacy:active"),
                ("reason", "r"),
                ("confirm", "retire legacy"),
            ],
        ),
    ];
    for (path, form) in &actions {
        assert_eq!(post(&api, path, None, form).await.status(), 401, "{path}");
        let mut with_csrf = form.clone();
        with_csrf.push(("csrf", &token));
        assert_eq!(
            post(&api, path, Some(&viewer), &with_csrf).await.status(),
            403,
            "{path} as a viewer"
        );
        assert_eq!(
            post(&api, path, Some(&operator), form).await.status(),
            403,
            "{path} without a CSRF token"
        );
        let mut wrong = form.clone();
        wrong.push(("csrf", "0000"));
        assert_eq!(
            post(&api, path, Some(&operator), &wrong).await.status(),
            403,
            "{path} with a wrong CSRF token"
        );
    }
    // Nothing changed through any of them.
    let t = api.store.tenant(&id("acme")).await.unwrap().unwrap();
    assert_eq!((t.stage, t.version), (Stage::Shadow, 1));
    assert!(api.store.route_stages().await.unwrap().is_empty());
    // Retiring legacy needs the typed confirmation, and then the finish line.
    let retire = |confirm: &'static str| {
        vec![
            ("csrf", token.clone()),
            ("version", "legacy:active".to_string()),
            ("reason", "all moved".to_string()),
            ("confirm", confirm.to_string()),
        ]
    };
    let send = |f: Vec<(&'static str, String)>| {
        let api = &api;
        let operator = operator.clone();
        async move {
            browser()
                .post(format!("{}/ui/retire", api.base))
                .header("cookie", operator)
                .form(&f)
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(send(retire("retire")).await.status(), 400);
    let r = send(retire("retire legacy")).await;
    assert_eq!(r.status(), 409);
    let doc = Html::parse_document(&r.text().await.unwrap());
    assert!(
        text(&select(&doc, "#error")[0]).contains("not migrated"),
        "{}",
        doc.html()
    );
    assert!(!api.store.legacy_retired().await.unwrap());
    // A viewer's token cannot change anything through the API either.
    let v = token::create(&*api.store, "reader", Scope::Viewer, Actor::Cli, "test")
        .await
        .unwrap();
    let r = browser()
        .post(format!("{}/v1/tenants/acme/rollback", api.base))
        .bearer_auth(&v)
        .header("if-match", "1")
        .json(&serde_json::json!({ "reason": "r" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("viewer"));
}

#[tokio::test]
async fn an_operator_promotes_from_the_page_and_the_audit_log_names_the_token() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    ready_evidence(&*api.store, "acme").await;
    let (_, operator) = viewer_and_operator(&api).await;
    let doc = page(&api, "/ui/tenants/acme", &operator).await;
    assert_eq!(text(&select(&doc, "#verdict")[0]), "ready");
    let version = attr(&doc, "form#promote input[name=version]", "value");
    let r = post(
        &api,
        "/ui/tenants/acme/promote",
        Some(&operator),
        &[
            ("csrf", &csrf(&doc)),
            ("version", &version),
            ("reason", "ready on the board"),
        ],
    )
    .await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/tenants/acme");
    let t = api.store.tenant(&id("acme")).await.unwrap().unwrap();
    assert_eq!(t.stage, Stage::Migrated);
    // The audit page, filtered by the token's name, shows the change and who.
    let doc = page(&api, "/ui/audit?actor=token:ops", &operator).await;
    let rows = select(
        &doc,
        "table#audit tbody tr, table#audit tr:not(:first-child)",
    );
    let row = rows
        .iter()
        .map(text)
        .find(|r| r.contains("migrated"))
        .expect("the promotion");
    assert!(
        row.contains("token:ops") && row.contains("ready on the board"),
        "{row}"
    );
    // The same form again, from the now stale page, is a conflict that says so.
    let r = post(
        &api,
        "/ui/tenants/acme/promote",
        Some(&operator),
        &[
            ("csrf", &csrf(&doc)),
            ("version", &version),
            ("reason", "again"),
        ],
    )
    .await;
    assert_eq!(r.status(), 412);
    let doc = Html::parse_document(&r.text().await.unwrap());
    assert!(
        text(&select(&doc, "#error")[0]).contains("version"),
        "{}",
        doc.html()
    );
}

#[tokio::test]
async fn a_tenant_named_like_a_script_renders_as_text_on_every_page() {
    let api = start().await;
    let evil = "<script>alert(1)</script>";
    tenants(&api, &[("evil", evil)]).await;
    let c = Direct::new(api.store.clone(), Actor::Cli);
    c.rollback(
        &id("evil"),
        ficus_admin::api::RollbackRequest {
            reason: evil.to_string(),
            to: None,
        },
        None,
    )
    .await
    .unwrap();
    let (viewer, _) = viewer_and_operator(&api).await;
    for path in [
        "/ui/",
        "/ui/tenants",
        "/ui/tenants/evil",
        "/ui/audit?tenant=evil",
    ] {
        let doc = page(&api, path, &viewer).await;
        let scripts = select(&doc, "script");
        assert_eq!(scripts.len(), 1, "{path}: only the dashboard's own script");
        assert_eq!(scripts[0].value().attr("src"), Some("/ui/static/app.js"));
        assert!(
            doc.root_element().text().any(|t| t.contains(evil)),
            "{path} shows the name as text"
        );
    }
}

#[tokio::test]
async fn revoking_a_token_ends_its_sessions_at_once() {
    let api = start().await;
    let (viewer, _) = viewer_and_operator(&api).await;
    assert_eq!(get(&api, "/ui/", Some(&viewer)).await.status(), 200);
    token::revoke(&*api.store, "watcher", Actor::Cli, "left the team")
        .await
        .unwrap();
    assert_eq!(get(&api, "/ui/", Some(&viewer)).await.status(), 303);
    let listed = token::list(&*api.store).await.unwrap();
    let watcher = listed.iter().find(|t| t.name == "watcher").unwrap();
    assert!(watcher.revoked && watcher.scope == Scope::Viewer);
    // The name is not reused, and no token takes an actor's name (a viewer
    // token named `api` once logged in as the first token, an operator).
    for name in ["watcher", "api", "guard"] {
        assert!(
            token::create(&*api.store, name, Scope::Viewer, Actor::Cli, "again")
                .await
                .is_err(),
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_stage_change_reaches_an_open_page_over_server_sent_events() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let (viewer, _) = viewer_and_operator(&api).await;
    // The page as rendered, and a change made before its script opens the
    // stream: the stream starts from the page's position, so it is not missed.
    let doc = page(&api, "/ui/tenants", &viewer).await;
    let seq = attr(&doc, "body", "data-seq");
    assert_eq!(
        text(&select(&doc, r#"tr[data-tenant="acme"] [data-field="stage"]"#)[0]),
        "shadow"
    );
    api.store
        .change_stage(StageChange {
            tenant: id("acme"),
            to: Stage::Migrated,
            expected_version: None,
            actor: Actor::Cli,
            reason: "from the command line".into(),
        })
        .await
        .unwrap();
    let mut stream = browser()
        .get(format!("{}/ui/events?from={seq}", api.base))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    /// Reads `stream` until it carries `want`; returns what it read.
    async fn until(stream: &mut reqwest::Response, want: &str) -> String {
        let mut seen = String::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(chunk) = stream.chunk().await.unwrap() {
                seen.push_str(&String::from_utf8_lossy(&chunk));
                if seen.contains(want) {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "{want} not in {seen}");
        seen
    }
    let seen = until(&mut stream, r#""stage":"migrated""#).await;
    assert!(
        seen.contains("event: tenant") && seen.contains(r#""id":"acme""#),
        "{seen}"
    );
    // A second page opens its stream; a change now reaches both, through the
    // one feed the process shares.
    let mut second = browser()
        .get(format!("{}/ui/events", api.base))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    api.store
        .change_stage(StageChange {
            tenant: id("acme"),
            to: Stage::Shadow,
            expected_version: None,
            actor: Actor::Cli,
            reason: "rolled back from the command line".into(),
        })
        .await
        .unwrap();
    let want = r#""id":"acme","stage":"shadow","version":3"#;
    until(&mut stream, want).await;
    until(&mut second, want).await;
    // The viewer's token is revoked: the next change ends its open streams
    // instead of reaching them.
    token::revoke(&*api.store, "watcher", Actor::Cli, "left the team")
        .await
        .unwrap();
    api.store
        .change_stage(StageChange {
            tenant: id("acme"),
            to: Stage::Migrated,
            expected_version: None,
            actor: Actor::Cli,
            reason: "promoted again".into(),
        })
        .await
        .unwrap();
    for s in [&mut stream, &mut second] {
        let mut after = String::new();
        let ended = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(chunk) = s.chunk().await.unwrap() {
                after.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await;
        assert!(ended.is_ok(), "the stream stayed open: {after}");
        assert!(!after.contains(r#""version":4"#), "{after}");
    }
}

#[tokio::test]
async fn the_board_never_shows_a_verdict_judged_before_the_tenant_left_shadow() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme"), ("beta", "Beta")]).await;
    ready_evidence(&*api.store, "acme").await;
    let (viewer, _) = viewer_and_operator(&api).await;
    let gate = |doc: &Html, tenant: &str| {
        text(&select(doc, &format!(r#"tr[data-tenant="{tenant}"] td"#))[3])
    };
    let doc = page(&api, "/ui/tenants", &viewer).await;
    assert_eq!(gate(&doc, "acme"), "ready");
    assert!(text(&select(&doc, "#judged")[0]).starts_with("Gate verdicts judged"));
    // Promoted from the command line: the verdicts kept are now stale for acme.
    api.store
        .change_stage(StageChange {
            tenant: id("acme"),
            to: Stage::Migrated,
            expected_version: None,
            actor: Actor::Cli,
            reason: "promoted elsewhere".into(),
        })
        .await
        .unwrap();
    let doc = page(&api, "/ui/tenants", &viewer).await;
    let row = r#"tr[data-tenant="acme"] [data-field="stage"]"#;
    assert_eq!(text(&select(&doc, row)[0]), "migrated");
    assert_eq!(gate(&doc, "acme"), "—");
}

#[tokio::test]
async fn an_operator_resolves_a_mismatch_class_from_its_page_and_a_viewer_cannot() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    ready_evidence(&*api.store, "acme").await;
    let class = "00112233aabbccdd";
    super::price_mismatches(&*api.store, "acme", class, 2).await;
    let (viewer, operator) = viewer_and_operator(&api).await;
    // The tenant page shows the endpoint covered and both backends' latency.
    let doc = page(&api, "/ui/tenants/acme", &viewer).await;
    let coverage = text(&select(&doc, "table#coverage")[0]);
    assert!(
        coverage.contains("GET /homes/{id}") && coverage.contains("yes"),
        "{coverage}"
    );
    assert_eq!(
        select(&doc, r#"svg[aria-label^="p99 latency per hour"] path"#).len(),
        3
    );
    let doc = page(&api, &format!("/ui/classes/{class}"), &operator).await;
    let path = format!("/ui/classes/{class}/resolve");
    let form = [("reason", "fixed in 2.1"), ("fixed_in", "2.1")];
    let mut with_csrf = form.to_vec();
    let token = csrf(&doc);
    with_csrf.push(("csrf", &token));
    assert_eq!(
        post(&api, &path, Some(&viewer), &with_csrf).await.status(),
        403
    );
    assert_eq!(
        post(&api, &path, Some(&operator), &form).await.status(),
        403
    );
    let r = post(&api, &path, Some(&operator), &with_csrf).await;
    assert_eq!(r.status(), 303);
    let c = Direct::new(api.store.clone(), Actor::Cli);
    let found = c.mismatch_class(class).await.unwrap();
    assert_eq!(found.class.state, "resolved");
    assert_eq!(found.history.last().unwrap().actor, "token:ops");
    // The page now offers to reopen it, not to resolve it again.
    let doc = page(&api, &format!("/ui/classes/{class}"), &operator).await;
    assert!(select(&doc, "form#resolve").is_empty());
    assert_eq!(select(&doc, "form#reopen").len(), 1);
    let r = post(
        &api,
        &format!("/ui/classes/{class}/explode"),
        Some(&operator),
        &with_csrf,
    )
    .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn one_token_cannot_hold_every_live_stream() {
    let api = start().await;
    let (viewer, operator) = viewer_and_operator(&api).await;
    let open = |cookie: String| {
        let base = api.base.clone();
        async move {
            browser()
                .get(format!("{base}/ui/events"))
                .header("cookie", cookie)
                .send()
                .await
                .unwrap()
        }
    };
    let mut held = Vec::new();
    for _ in 0..ficus_admin::ui::MAX_STREAMS_PER_TOKEN {
        let r = open(viewer.clone()).await;
        assert_eq!(r.status(), 200);
        held.push(r);
    }
    let refused = open(viewer.clone()).await;
    assert_eq!(refused.status(), 503);
    let doc = Html::parse_document(&refused.text().await.unwrap());
    assert!(text(&select(&doc, "#error")[0]).contains("token:watcher"));
    // Another token still gets its stream.
    assert_eq!(open(operator).await.status(), 200);
    assert_eq!(held.len(), ficus_admin::ui::MAX_STREAMS_PER_TOKEN);
}

#[tokio::test]
async fn an_operator_releases_write_routes_from_the_routes_page_a_destructive_one_only_typed() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let control = Direct::new(api.store.clone(), Actor::Cli);
    control
        .mark_route(ficus_admin::api::RouteMarkRequest {
            route: "DELETE /searches/{id}".into(),
            destructive: true,
            reason: "deletes a saved search".into(),
        })
        .await
        .unwrap();
    api.store
        .record_route_census(&[ficus_store::RouteCount {
            tenant: Some(id("acme")),
            route: "POST /homes".into(),
            backend: "legacy".into(),
            client: String::new(),
            count: 12,
            last_at: ficus_core::Timestamp::from_unix_millis(super::now_ms()),
            configured: false,
        }])
        .await
        .unwrap();
    let (viewer, operator) = viewer_and_operator(&api).await;
    // A viewer sees the routes and no forms.
    let doc = page(&api, "/ui/routes", &viewer).await;
    let rows: Vec<String> = select(&doc, "table#routes tr[data-route]")
        .iter()
        .map(text)
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r.contains("POST /homes") && r.contains("held on legacy") && r.contains("12")),
        "{rows:?}"
    );
    assert!(select(&doc, "form.route").is_empty());
    let doc = page(&api, "/ui/routes", &operator).await;
    let token = csrf(&doc);
    // The destructive route's form asks for the route typed again.
    assert_eq!(
        select(
            &doc,
            r#"tr[data-route="DELETE /searches/{id}"] input[name=confirm]"#
        )
        .len(),
        1
    );
    assert!(select(&doc, r#"tr[data-route="POST /homes"] input[name=confirm]"#).is_empty());
    let release = |route: &'static str, tenant: &'static str, confirm: Option<&'static str>| {
        let mut form = vec![
            ("csrf", token.clone()),
            ("route", route.to_string()),
            ("tenant", tenant.to_string()),
            ("reason", "the rebuilt backend writes it".to_string()),
        ];
        if let Some(c) = confirm {
            form.push(("confirm", c.to_string()));
        }
        let api = &api;
        let operator = operator.clone();
        async move {
            browser()
                .post(format!("{}/ui/routes/release", api.base))
                .header("cookie", operator)
                .form(&form)
                .send()
                .await
                .unwrap()
        }
    };
    // A canary first, then every tenant.
    let r = release("POST /homes", "acme", None).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui/routes");
    assert_eq!(release("POST /homes", "", None).await.status(), 303);
    let doc = page(&api, "/ui/routes", &operator).await;
    let cell = text(
        &select(
            &doc,
            r#"tr[data-route="POST /homes"] [data-field="route-stage"]"#,
        )[0],
    );
    assert_eq!(cell, "migrated");
    // Not the destructive one without its confirmation, nor with a typo.
    let r = release("DELETE /searches/{id}", "", None).await;
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());
    let r = release("DELETE /searches/{id}", "", Some("DELETE /searches")).await;
    assert_eq!(r.status(), 400);
    let doc = Html::parse_document(&r.text().await.unwrap());
    assert!(text(&select(&doc, "#error")[0]).contains("exactly"));
    let r = release("DELETE /searches/{id}", "", Some("DELETE /searches/{id}")).await;
    assert_eq!(r.status(), 303);
    // Held again, from the page; the audit log names the token each time.
    let doc = page(&api, "/ui/routes", &operator).await;
    assert!(
        select(
            &doc,
            r#"tr[data-route="POST /homes"] form[action="/ui/routes/hold"]"#
        )
        .len()
            == 1
    );
    let r = post(
        &api,
        "/ui/routes/hold",
        Some(&operator),
        &[
            ("csrf", &token),
            ("route", "POST /homes"),
            ("tenant", ""),
            ("reason", "writes fail on new"),
        ],
    )
    .await;
    assert_eq!(r.status(), 303);
    let stages = control.routes(None).await.unwrap();
    let of = |route: &str| {
        stages
            .routes
            .iter()
            .find(|r| r.route == route)
            .unwrap()
            .clone()
    };
    assert!(of("POST /homes").held);
    assert!(!of("DELETE /searches/{id}").held);
    let changes = api.store.route_stages().await.unwrap();
    assert!(!changes.is_empty());
}

#[tokio::test]
async fn promoting_past_the_gate_from_the_page_needs_the_box_ticked_and_records_why() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let (_, operator) = viewer_and_operator(&api).await;
    let doc = page(&api, "/ui/tenants/acme", &operator).await;
    assert_eq!(text(&select(&doc, "#verdict")[0]), "not ready");
    assert_eq!(select(&doc, "form#promote input[name=force]").len(), 1);
    let version = attr(&doc, "form#promote input[name=version]", "value");
    let form = |force: bool| {
        let mut f = vec![
            ("csrf", csrf(&doc)),
            ("version", version.clone()),
            ("reason", "the incident's own answers".to_string()),
        ];
        if force {
            f.push(("force", "1".to_string()));
        }
        f
    };
    let send = |f: Vec<(&'static str, String)>| {
        let api = &api;
        let operator = operator.clone();
        async move {
            browser()
                .post(format!("{}/ui/tenants/acme/promote", api.base))
                .header("cookie", operator)
                .form(&f)
                .send()
                .await
                .unwrap()
        }
    };
    let r = send(form(false)).await;
    assert_eq!(r.status(), 409);
    let doc2 = Html::parse_document(&r.text().await.unwrap());
    assert!(text(&select(&doc2, "#error")[0]).contains("not ready"));
    assert_eq!(
        api.store.tenant(&id("acme")).await.unwrap().unwrap().stage,
        Stage::Shadow
    );
    assert_eq!(send(form(true)).await.status(), 303);
    let t = api.store.tenant(&id("acme")).await.unwrap().unwrap();
    assert_eq!(t.stage, Stage::Migrated);
    let doc = page(&api, "/ui/audit?tenant=acme&to=migrated", &operator).await;
    let log = text(&select(&doc, "table#audit")[0]);
    assert!(
        log.contains("forced past the readiness gate") && log.contains("token:ops"),
        "{log}"
    );
}

#[tokio::test]
async fn the_tenant_page_previews_its_branded_header_with_the_logo_escaped() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let control = Direct::new(api.store.clone(), Actor::Cli);
    control
        .set_config(
            &id("acme"),
            ficus_admin::api::ConfigRequest {
                config: serde_json::json!({
                    "display_name": "Acme <Homes>",
                    "app_name": "Acme",
                    "branding": {
                        "primary_color": "#0a7f5a",
                        "accent_color": "#f0c",
                        "logo_url": "https://cdn.acme.test/logo.svg?size=64&dark=1"
                    },
                    "domains": ["homes.acme.test"],
                    "locale": "en-GB",
                    "features": {}
                }),
                reason: "white label".into(),
            },
            None,
        )
        .await
        .unwrap();
    let (viewer, _) = viewer_and_operator(&api).await;
    let doc = page(&api, "/ui/tenants/acme", &viewer).await;
    let preview = select(&doc, r#"svg[aria-label="branded header preview"]"#);
    assert_eq!(preview.len(), 1);
    let svg = preview[0].html();
    assert!(svg.contains(r##"fill="#0a7f5a""##), "{svg}");
    assert!(svg.contains(r##"fill="#f0c""##), "{svg}");
    assert!(svg.contains("Acme &lt;Homes&gt;"), "{svg}");
    let logos: Vec<_> = select(&doc, "svg image")
        .iter()
        .map(|i| i.value().attr("href").unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        logos, ["https://cdn.acme.test/logo.svg?size=64&dark=1"; 2],
        "the web and the mobile header draw the logo"
    );
}

/// Regression: `ficus serve` never exited on SIGTERM while a dashboard page
/// was open, because the graceful shutdown waited for the page's event stream,
/// which never ends by itself.
#[tokio::test]
async fn shutting_down_ends_the_open_event_streams_and_the_server_returns() {
    let api = start().await;
    tenants(&api, &[("acme", "Acme")]).await;
    let (viewer, _) = viewer_and_operator(&api).await;
    // A second server on the same store, which this test shuts down.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(ficus_admin::server::serve(
        listener,
        api.store.clone(),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut stream = browser()
        .get(format!("{base}/ui/events"))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    stop.send(()).unwrap();
    // The stream ends (its body finishes) and the server returns. The bound
    // only turns the old hang into a failure; it never decides a pass.
    let ended = tokio::time::timeout(Duration::from_secs(120), async {
        while let Ok(Some(_)) = stream.chunk().await {}
        served.await.unwrap().unwrap();
    })
    .await;
    assert!(ended.is_ok(), "the server still waits on the open stream");
}
