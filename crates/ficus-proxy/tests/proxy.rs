//! The proxy's pure parts, data-driven: config validation (every refusal names the
//! file, the line and the key) and tenant resolution (every rule kind, rule order,
//! unknown tenants, and JWTs that must verify before they select a tenant). The
//! request path itself is tested end to end, with real sockets, in the `ficus`
//! crate's integration tests.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use expect_test::{Expect, expect};
use ficus_core::{Domain, Stage, Tenant, TenantId, Timestamp};
use ficus_proxy::config::Config;
use ficus_proxy::resolve::{RequestParts, resolve};
use ficus_proxy::table::RoutingTable;
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

const BASE: &str = r#"
[proxy]
listen = ["127.0.0.1:8080"]
admin_listen = "127.0.0.1:9090"
store = "sqlite:ficus.db"

[backends.legacy]
upstreams = ["127.0.0.1:3001"]
[backends.new]
upstreams = ["127.0.0.1:3002"]
"#;

fn env(name: &str) -> Option<String> {
    (name == "TEST_JWT_SECRET").then(|| "s3cret-for-tests".to_string())
}

fn check_config(extra: &str, expect: Expect) {
    let text = format!("{BASE}{extra}");
    let actual = match Config::parse(Path::new("ficus.toml"), &text, &env) {
        Ok(c) => format!("ok: {} rules", c.settings.rules.len()),
        Err(e) => e.to_string(),
    };
    expect.assert_eq(&actual);
}

/// `BASE` with `key = "value"` added to its `[proxy]` table (line 6), parsed.
fn with_proxy_key(key: &str, value: &str) -> Result<Config, String> {
    let text = BASE.replace(
        "store = \"sqlite:ficus.db\"",
        &format!("store = \"sqlite:ficus.db\"\n{key} = {value:?}"),
    );
    Config::parse(Path::new("ficus.toml"), &text, &env).map_err(|e| e.to_string())
}

#[test]
fn the_tenant_config_path_must_be_an_absolute_path() {
    let with = |path: &str| {
        with_proxy_key("tenant_config_path", path)
            .map_or_else(|e| e, |c| format!("ok: {}", c.settings.tenant_config_path))
    };
    assert_eq!(with("/config"), "ok: /config");
    assert_eq!(
        with("config?x=1"),
        "ficus.toml:6: proxy.tenant_config_path: \"config?x=1\" is not an absolute path such as /.well-known/tenant-config"
    );
}

/// Files written while pingora's engine existed chose an engine: `hyper`
/// still loads, `pingora` is refused by name rather than run as something
/// else.
#[test]
fn a_file_that_asks_for_pingora_is_refused_by_name() {
    assert!(with_proxy_key("engine", "hyper").is_ok());
    assert_eq!(
        with_proxy_key("engine", "pingora").err().as_deref(),
        Some(
            "ficus.toml:6: proxy.engine: \"pingora\" is gone; the proxy runs on hyper only (remove this line)"
        )
    );
}

/// The proxy writes its three configurable headers out itself, after the
/// request's own: a name that frames the request, names its host, belongs to
/// the connection or is another header the proxy sets is refused, and so is
/// one name for two of them.
#[test]
fn the_proxys_own_header_names_may_not_frame_the_request_or_repeat() {
    let with = |key: &str, value: &str| {
        with_proxy_key(key, value)
            .map_or_else(|e| e, |c| format!("ok: {}", c.settings.tenant_header))
    };
    assert_eq!(with("tenant_header", "X-Org"), "ok: x-org");
    expect![[r#"ficus.toml:6: proxy.tenant_header: "Content-Length" is a header the proxy may not set this way (it frames the request, names its host, belongs to the connection, or is one the proxy already sets)"#]]
        .assert_eq(&with("tenant_header", "Content-Length"));
    expect![[r#"ficus.toml:6: proxy.request_id_header: "via" is a header the proxy may not set this way (it frames the request, names its host, belongs to the connection, or is one the proxy already sets)"#]]
        .assert_eq(&with("request_id_header", "via"));
    expect![[r#"ficus.toml:6: proxy.tenant_header, proxy.backend_header and proxy.request_id_header must differ (they are "x-ficus-tenant", "x-ficus-tenant" and "x-request-id")"#]]
        .assert_eq(&with("backend_header", "X-Ficus-Tenant"));
}

#[test]
fn header_case_is_lowercase_or_preserve() {
    let with = |value: &str| {
        with_proxy_key("header_case", value)
            .map_or_else(|e| e, |c| format!("ok: {:?}", c.header_case))
    };
    assert_eq!(with("preserve"), "ok: Preserve");
    assert_eq!(with("lowercase"), "ok: Lowercase");
    assert_eq!(
        with("Title-Case"),
        "ficus.toml:6: proxy.header_case: \"Title-Case\" is not \"lowercase\" or \"preserve\""
    );
}

#[test]
fn config_errors_name_the_line_and_the_key() {
    check_config("", expect!["ok: 0 rules"]);
    check_config(
        "[guard]\nmax_error_rate = 0.0\n",
        expect!["ficus.toml:12: guard.max_error_rate: must be above 0.0 and at most 1.0"],
    );
    check_config(
        "[shadows]\nmax_in_flight = 4\n",
        expect![
            "ficus.toml:11: unknown field `shadows`, expected one of `proxy`, `backends`, `tenant_from`, `routes`, `shadow`, `compare`, `guard`"
        ],
    );
    check_config(
        "[shadow]\nsample_rate = 1.5\n",
        expect!["ficus.toml:12: shadow.sample_rate: must be between 0.0 and 1.0"],
    );
    check_config(
        "[shadow]\nunsafe_routes = [\"/export\"]\n",
        expect![[r#"ficus.toml:12: shadow.unsafe_routes: "/export" is not "METHOD /path""#]],
    );
    check_config(
        "[[compare]]\nendpoint = \"GET /homes/{id}\"\nignore = [\"items[*]\"]\n",
        expect![[
            r#"ficus.toml:13: compare.ignore: invalid JSON path "items[*]": it must start with '$'"#
        ]],
    );
    check_config(
        "[[tenant_from]]\nheadr = \"X-Tenant\"\n",
        expect![
            "ficus.toml:12: unknown field `headr`, expected one of `header`, `host`, `custom_domains`, `path_prefix`, `strip`, `jwt_claim`, `hs256_secret_env`, `jwks_file`, `issuer`, `audience`, `leeway_s`"
        ],
    );
    check_config(
        "[[tenant_from]]\nheader = \"X Tenant\"\n",
        expect![[r#"ficus.toml:12: tenant_from[0].header: "X Tenant" is not a valid header name"#]],
    );
    check_config(
        "[[tenant_from]]\nhost = \"example.test\"\n",
        expect![[
            r#"ficus.toml:12: tenant_from[0].host: "example.test" has no {tenant} placeholder"#
        ]],
    );
    check_config(
        "[[tenant_from]]\nhost = \"x{tenant}.example.test\"\n",
        expect![[
            r#"ficus.toml:12: tenant_from[0].host: "x{tenant}.example.test": {tenant} must be a whole label, such as {tenant}.example.com"#
        ]],
    );
    check_config(
        "[[tenant_from]]\npath_prefix = \"/t/{tenant}/x\"\n",
        expect![[
            r#"ficus.toml:12: tenant_from[0].path_prefix: "/t/{tenant}/x" must end with a {tenant} segment, such as /t/{tenant}"#
        ]],
    );
    check_config(
        "[[tenant_from]]\nheader = \"X-T\"\nhost = \"{tenant}.a.test\"\n",
        expect![
            "ficus.toml:13: tenant_from[0]: one rule per [[tenant_from]]; this one has header and host"
        ],
    );
    check_config(
        "[[tenant_from]]\nheader = \"X-T\"\nstrip = true\n",
        expect!["ficus.toml:12: tenant_from[0]: `strip` only applies to a path_prefix rule"],
    );
    check_config(
        "[[tenant_from]]\njwt_claim = \"tenant\"\nhs256_secret_env = \"NOT_SET_ANYWHERE\"\n",
        expect![
            "ficus.toml:13: tenant_from[0].hs256_secret_env: the environment variable NOT_SET_ANYWHERE is not set or empty"
        ],
    );
    check_config(
        "[[tenant_from]]\njwt_claim = \"tenant\"\n",
        expect![
            "ficus.toml:12: tenant_from[0]: a jwt_claim rule needs exactly one of hs256_secret_env or jwks_file"
        ],
    );
    check_config(
        "[[tenant_from]]\njwt_claim = \"tenant\"\nhs256_secret_env = \"TEST_JWT_SECRET\"\n",
        expect!["ok: 1 rules"],
    );
    check_config(
        "[[tenant_from]]\njwt_claim = \"tenant\"\njwks_file = \"missing.json\"\n",
        expect![
            "ficus.toml:13: tenant_from[0].jwks_file: cannot read missing.json: No such file or directory (os error 2)"
        ],
    );
    check_config(
        "[[routes]]\npath_prefix = \"export\"\n",
        expect!["ficus.toml:12: routes.path_prefix: must start with '/'"],
    );
    check_config(
        "[[routes]]\nmatch = \"GET /homes/{id}/valuation\"\nservice = \"valuations\"\n",
        expect![[
            r#"ficus.toml:13: routes.service: no backend "valuations"; define [backends.valuations] (the new side has: new)"#
        ]],
    );
    check_config(
        "[[routes]]\nmatch = \"GET homes\"\n",
        expect![[
            r#"ficus.toml:12: routes.match: route "GET homes" is not "METHOD /template" (such as "DELETE /homes/{id}"): the template must start with '/' and be at most 512 bytes"#
        ]],
    );
    check_config(
        "[backends.search]\nupstreams = [\"127.0.0.1:3003\"]\n\
         [[routes]]\nmatch = \"GET /homes/{id}\"\n\
         [[routes]]\nmatch = \"* /homes/{slug}\"\nservice = \"search\"\n",
        expect![[
            r#"ficus.toml:16: routes.match: * /homes/{slug} overlaps GET /homes/{id}, which goes to new; a request must have one service"#
        ]],
    );
    check_config(
        "[backends.search]\nupstreams = [\"127.0.0.1:3003\"]\n\
         [[routes]]\nmatch = \"GET /search\"\nservice = \"search\"\n\
         [[routes]]\nmatch = \"POST /search\"\n",
        expect!["ok: 0 rules"],
    );
    check_config(
        "[backends.search]\nupstreams = [\"127.0.0.1:3003\"]\n\
         [[routes]]\nmatch = \"GET,HEAD /search/{q}\"\nservice = \"search\"\n",
        expect!["ok: 0 rules"],
    );
    check_config(
        "[[routes]]\nmatch = \"GET,H3AD /search\"\n",
        expect![[
            r#"ficus.toml:12: routes.match: route "H3AD /search" is not "METHOD /template" (such as "DELETE /homes/{id}"): the method must be letters, or *"#
        ]],
    );
    check_config(
        "[[routes]]\nmatch = \"GET /a\"\npath_prefix = \"/a\"\n",
        expect!["ficus.toml:13: routes: one of path_prefix or match, not both"],
    );
    check_config(
        "[backends.Search]\nupstreams = [\"127.0.0.1:3003\"]\n",
        expect![
            "ficus.toml:11: backends.Search: a backend's name is lowercase letters, digits, '-' and '_' (at most 32)"
        ],
    );
    check_config(
        "[shadow]\nversion_header = \"x app version\"\n",
        expect![[r#"ficus.toml:12: shadow.version_header: "x app version" is not a header name"#]],
    );
    check_config(
        "[[compare]]\nendpoint = \"GET /homes/{id}\"\nadditive = \"ignore\"\n",
        expect![[r#"ficus.toml:13: compare.additive: "ignore" is not "compatible" or "mismatch""#]],
    );
    check_config(
        "[[compare]]\nendpoint = \"GET /homes\"\nadditive = \"mismatch\"\nopen_arrays = [\"$.homes\"]\n[shadow]\nversion_header = \"X-App-Version\"\n",
        expect!["ok: 0 rules"],
    );
    let versioned = |v: &str| {
        let text = BASE.replacen(
            "[backends.new]\n",
            &format!("[backends.new]\nversion = {v:?}\n"),
            1,
        );
        match Config::parse(Path::new("ficus.toml"), &text, &env) {
            Ok(c) => format!("ok: {:?}", c.settings.new.version),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(versioned("2.4.1"), "ok: Some(\"2.4.1\")");
    let keyed = |h: &str| {
        let text = BASE.replacen(
            "[backends.new]\n",
            &format!("[backends.new]\nidempotency_header = {h:?}\n"),
            1,
        );
        match Config::parse(Path::new("ficus.toml"), &text, &env) {
            Ok(c) => format!("ok: {:?}", c.settings.new.idempotency_header),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(keyed("Idempotency-Key"), "ok: Some(\"idempotency-key\")");
    for bad in ["", "idempotency key"] {
        assert!(
            keyed(bad).ends_with(&format!(
                "backends.new.idempotency_header: {bad:?} is not a header name"
            )),
            "{}",
            keyed(bad)
        );
    }
    assert!(
        versioned(&"9".repeat(129))
            .ends_with("backends.new.version: give at most 128 printable characters"),
        "{}",
        versioned(&"9".repeat(129))
    );

    let bad = BASE.replace("\"127.0.0.1:3001\"", "\"localhost\"");
    let err = Config::parse(Path::new("ficus.toml"), &bad, &env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        r#"ficus.toml:8: backends.legacy.upstreams: "localhost" is not an IP address with a port, such as 127.0.0.1:8080"#
    );
    let bad = BASE.replace(
        "store = \"sqlite:ficus.db\"",
        "store = \"mysql://x\"\nunknown_tenant = \"drop\"",
    );
    let err = Config::parse(Path::new("ficus.toml"), &bad, &env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        r#"ficus.toml:5: proxy.store: invalid store url "mysql://x": expected sqlite:PATH or postgres://USER@HOST:PORT/DATABASE"#
    );
    let bad = BASE.replace("\"127.0.0.1:9090\"", "\"127.0.0.1:8080\"");
    let err = Config::parse(Path::new("ficus.toml"), &bad, &env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "ficus.toml:4: proxy.admin_listen: must differ from every proxy.listen address"
    );
    let err = Config::parse(Path::new("ficus.toml"), "[proxy\n", &env)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("ficus.toml:1: "), "{err}");
}

#[test]
fn a_secret_never_appears_in_debug_output() {
    let text = format!(
        "{BASE}[[tenant_from]]\njwt_claim = \"tenant\"\nhs256_secret_env = \"TEST_JWT_SECRET\"\n"
    );
    let config = Config::parse(Path::new("ficus.toml"), &text, &env).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(debug.contains("Hs256(<secret>)"));
}

fn table() -> RoutingTable {
    let t = |id: &str, stage, domains: &[&str]| Tenant {
        suspended: false,
        id: TenantId::parse(id).unwrap(),
        name: id.into(),
        stage,
        version: 1,
        domains: domains.iter().map(|d| Domain::parse(d).unwrap()).collect(),
        created_at: Timestamp::from_unix_millis(0),
        updated_at: Timestamp::from_unix_millis(0),
    };
    RoutingTable::from_snapshot(
        7,
        false,
        vec![
            t("acme", Stage::Shadow, &["homes.acme.test"]),
            t("globex", Stage::Migrated, &[]),
            t("www", Stage::Legacy, &[]),
            Tenant {
                suspended: true,
                ..t("initech", Stage::Shadow, &[])
            },
        ],
    )
}

fn jwt(alg: Algorithm, kid: Option<&str>, claims: serde_json::Value) -> String {
    let key = match alg {
        Algorithm::HS256 => EncodingKey::from_secret(b"s3cret-for-tests"),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(include_bytes!("fixtures/rsa.pem")).unwrap(),
        _ => EncodingKey::from_ec_pem(include_bytes!("fixtures/ec.pem")).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Resolves one request with `rules` (TOML) and renders the outcome.
fn check_resolve(
    rules: &str,
    host: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
    expect: Expect,
) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ficus.toml");
    let config = Config::parse(&dir, &format!("{BASE}{rules}"), &env).unwrap();
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let parts = RequestParts {
        host,
        path_and_query: path,
        headers: &map,
    };
    let actual = match resolve(&config.settings.rules, &parts, &table()) {
        None => "no tenant".to_string(),
        Some(r) => {
            // What the table knows comes with the tenant, from one lookup;
            // the header value the proxy sends upstream is the tenant's id.
            let known = match &r.known {
                Some(k) => {
                    assert_eq!(
                        k.header.as_ref().map(HeaderValue::as_bytes),
                        Some(r.tenant.as_str().as_bytes())
                    );
                    format!(
                        " ({}{})",
                        k.stage,
                        if k.suspended { ", suspended" } else { "" }
                    )
                }
                None => " (unknown)".to_string(),
            };
            format!(
                "{} via {}{}{}",
                r.tenant,
                r.rule,
                known,
                r.rewritten_path
                    .map(|p| format!(", forward {p}"))
                    .unwrap_or_default()
            )
        }
    };
    expect.assert_eq(&actual);
}

#[test]
fn resolution_by_header_host_domain_and_path() {
    let rules = r#"
[[tenant_from]]
header = "X-Tenant-Id"
[[tenant_from]]
host = "{tenant}.example.test"
[[tenant_from]]
path_prefix = "/t/{tenant}"
strip = true
"#;
    check_resolve(
        rules,
        None,
        "/",
        &[("x-tenant-id", "initech")],
        expect!["initech via header (shadow, suspended)"],
    );
    check_resolve(
        rules,
        None,
        "/",
        &[("x-tenant-id", "acme")],
        expect!["acme via header (shadow)"],
    );
    check_resolve(
        rules,
        None,
        "/",
        &[("x-tenant-id", " acme ")],
        expect!["acme via header (shadow)"],
    );
    check_resolve(
        rules,
        None,
        "/",
        &[("x-tenant-id", "ACME")],
        expect!["no tenant"],
    );
    check_resolve(
        rules,
        Some("globex.example.test:8080"),
        "/",
        &[],
        expect!["globex via host (migrated)"],
    );
    check_resolve(
        rules,
        Some("Homes.Acme.Test"),
        "/",
        &[],
        expect!["acme via host (shadow)"],
    );
    check_resolve(
        rules,
        Some("a.b.example.test"),
        "/",
        &[],
        expect!["no tenant"],
    );
    check_resolve(
        rules,
        None,
        "/t/globex/homes/1?sort=asc",
        &[],
        expect!["globex via path_prefix (migrated), forward /homes/1?sort=asc"],
    );
    check_resolve(
        rules,
        None,
        "/t/globex?x=1",
        &[],
        expect!["globex via path_prefix (migrated), forward /?x=1"],
    );
    check_resolve(rules, None, "/t/", &[], expect!["no tenant"]);
    // An unknown id does not hide a later rule that names a known tenant.
    check_resolve(
        rules,
        Some("nobody.example.test"),
        "/t/acme/x",
        &[],
        expect!["acme via path_prefix (shadow), forward /x"],
    );
    check_resolve(
        rules,
        Some("nobody.example.test"),
        "/",
        &[],
        expect!["nobody via host (unknown)"],
    );
    // Rule order decides between two known tenants.
    check_resolve(
        rules,
        Some("www.example.test"),
        "/",
        &[("x-tenant-id", "acme")],
        expect!["acme via header (shadow)"],
    );
}

#[test]
fn resolution_by_custom_domain_only() {
    let rules = "[[tenant_from]]\ncustom_domains = true\n";
    check_resolve(
        rules,
        Some("homes.acme.test"),
        "/",
        &[],
        expect!["acme via custom_domain (shadow)"],
    );
    check_resolve(
        rules,
        Some("acme.example.test"),
        "/",
        &[],
        expect!["no tenant"],
    );
}

#[test]
fn a_jwt_selects_a_tenant_only_when_it_verifies() {
    let hs = "[[tenant_from]]\njwt_claim = \"tenant\"\nhs256_secret_env = \"TEST_JWT_SECRET\"\n";
    let ok = jwt(
        Algorithm::HS256,
        None,
        serde_json::json!({"tenant": "acme", "exp": now_s() + 60}),
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("Bearer {ok}"))],
        expect!["acme via jwt (shadow)"],
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("bearer {ok}"))],
        expect!["acme via jwt (shadow)"],
    );
    let expired = jwt(
        Algorithm::HS256,
        None,
        serde_json::json!({"tenant": "acme", "exp": now_s() - 60}),
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("Bearer {expired}"))],
        expect!["no tenant"],
    );
    let early = jwt(
        Algorithm::HS256,
        None,
        serde_json::json!({"tenant": "acme", "exp": now_s() + 600, "nbf": now_s() + 300}),
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("Bearer {early}"))],
        expect!["no tenant"],
    );
    let no_exp = jwt(
        Algorithm::HS256,
        None,
        serde_json::json!({"tenant": "acme"}),
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("Bearer {no_exp}"))],
        expect!["no tenant"],
    );
    let mut forged = ok.clone();
    forged.pop();
    forged.push(if ok.ends_with('A') { 'B' } else { 'A' });
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("Bearer {forged}"))],
        expect!["no tenant"],
    );
    // A token signed with a public key as an HMAC secret (algorithm confusion) fails.
    let rs = jwt(
        Algorithm::RS256,
        Some("rsa-1"),
        serde_json::json!({"tenant": "acme", "exp": now_s() + 60}),
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", &format!("Bearer {rs}"))],
        expect!["no tenant"],
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", "Bearer not.a.jwt")],
        expect!["no tenant"],
    );
    check_resolve(
        hs,
        None,
        "/",
        &[("authorization", "Basic YWxhZGRpbjpvcGVu")],
        expect!["no tenant"],
    );

    let jwks = "[[tenant_from]]\njwt_claim = \"org\"\njwks_file = \"jwks.json\"\nissuer = \"https://id.example.test\"\n";
    let claims =
        serde_json::json!({"org": "globex", "exp": now_s() + 60, "iss": "https://id.example.test"});
    let rs = jwt(Algorithm::RS256, Some("rsa-1"), claims.clone());
    check_resolve(
        jwks,
        None,
        "/",
        &[("authorization", &format!("Bearer {rs}"))],
        expect!["globex via jwt (migrated)"],
    );
    let es = jwt(Algorithm::ES256, Some("ec-1"), claims.clone());
    check_resolve(
        jwks,
        None,
        "/",
        &[("authorization", &format!("Bearer {es}"))],
        expect!["globex via jwt (migrated)"],
    );
    let wrong_kid = jwt(Algorithm::ES256, Some("rsa-1"), claims.clone());
    check_resolve(
        jwks,
        None,
        "/",
        &[("authorization", &format!("Bearer {wrong_kid}"))],
        expect!["no tenant"],
    );
    let hs_on_jwks = jwt(Algorithm::HS256, Some("rsa-1"), claims);
    check_resolve(
        jwks,
        None,
        "/",
        &[("authorization", &format!("Bearer {hs_on_jwks}"))],
        expect!["no tenant"],
    );
    let wrong_issuer = jwt(
        Algorithm::RS256,
        Some("rsa-1"),
        serde_json::json!({"org": "globex", "exp": now_s() + 60, "iss": "https://evil.test"}),
    );
    check_resolve(
        jwks,
        None,
        "/",
        &[("authorization", &format!("Bearer {wrong_issuer}"))],
        expect!["no tenant"],
    );
}
