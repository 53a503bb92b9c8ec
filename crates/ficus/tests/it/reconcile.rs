//! Reconciliation end to end: a rebuilt backend that adds members passes the
//! gate, a breaking difference blocks it, a bug's class resolved as fixed stops
//! counting and comes back as a regression, an accepted difference never counts
//! again on any proxy replica, and bad lifecycle requests are refused.

use serde_json::Value;

use crate::support::{
    Backend, HEADER_RULE, PATIENCE, Proxy, ProxySetup, Rig, client, eventually, ficus, ficus_fails,
    ficus_json, get_as,
};

const SHADOW: &str = "[shadow]\nflush_ms = 100\ntimeout_ms = 60000\nnoise_rate = 0.0\n\
                      version_header = \"x-app-version\"\n";

/// A gate that judges counts only: latency never fails it, whatever the
/// machine's load.
fn counting_gate(store: &str, min_comparisons: &str) {
    ficus(
        store,
        &[
            "gate",
            "set",
            "--min-comparisons",
            min_comparisons,
            "--min-per-endpoint",
            "1",
            "--max-mismatches",
            "0",
            "--latency-slack-ms",
            "600000",
            "--reason",
            "a gate on counts",
        ],
    );
}

/// Waits until the store holds exactly `n` comparisons for acme.
async fn compared(store: &str, n: u64) {
    eventually(PATIENCE, || {
        let shown = ficus_json(store, &["tenant", "show", "acme"]);
        async move { shown["comparisons"]["compared"].as_u64() == Some(n) }
    })
    .await;
}

fn criterion<'a>(r: &'a Value, name: &str) -> &'a Value {
    r["criteria"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

fn paths(classes: &Value) -> Vec<String> {
    classes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["endpoint"].as_str().unwrap(),
                c["path"].as_str().unwrap()
            )
        })
        .collect()
}

async fn get_all(proxy: &Proxy, path: &str, n: usize) {
    let c = client();
    for i in 0..n {
        let (status, _) = get_as(&c, proxy, "acme", &format!("{path}/{i}")).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additive_members_pass_a_resolved_bug_stops_counting_and_its_recurrence_is_a_regression() {
    let new = Backend::start("new").await;
    new.set_contract(false, "2.0");
    let Rig {
        store,
        legacy: _legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start_with(&[("acme", "shadow")], "", SHADOW, new).await;
    counting_gate(&store, "10");

    // New grows two members legacy never had: shown, never counted.
    get_all(&proxy, "/contract", 10).await;
    compared(&store, 10).await;
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(r["ready"], true, "{r:#}");
    assert_eq!(r["open_classes"], serde_json::json!([]));
    assert_eq!(
        paths(&r["additive"]),
        ["GET /contract/{id} $.energy", "GET /contract/{id} $.links"]
    );
    assert_eq!(r["additive"][0]["counted"], 10);

    // The bug, in version 2.0: a changed value breaks the legacy contract.
    new.set_contract(true, "2.0");
    get_all(&proxy, "/contract", 10).await;
    compared(&store, 20).await;
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(r["ready"], false);
    assert_eq!(
        criterion(&r, "mismatches")["detail"],
        "10 mismatched in 1 open class; at most 0 allowed"
    );
    let bug = &r["open_classes"][0];
    assert_eq!(
        (
            &bug["path"],
            &bug["kind"],
            &bug["counted"],
            &bug["versions"]
        ),
        (
            &Value::from("$.price"),
            &Value::from("value"),
            &Value::from(10),
            &serde_json::json!({"2.0": 10})
        )
    );
    let explained = ficus(&store, &["readiness", "acme"]);
    for expected in [
        "open mismatch classes (these count):",
        "GET /contract/{id} $.price value  10 mismatched",
        "e.g. GET /contract/",
        "(new 2.0): value   $.price: <number len=3",
        "additive differences (new has more; not counted):",
    ] {
        assert!(
            explained.contains(expected),
            "{expected:?} in:\n{explained}"
        );
    }

    // Fixed in 2.1; once the fix's evidence is in, the class is resolved (by a
    // prefix of its id) and the gate keeps max_mismatches = 0.
    new.set_contract(false, "2.1");
    get_all(&proxy, "/contract", 10).await;
    compared(&store, 30).await;
    let id = bug["id"].as_str().unwrap().to_string();
    let out = ficus(
        &store,
        &[
            "mismatches",
            "resolve",
            &id[..6],
            "--reason",
            "price computed from the right column",
            "--fixed-in",
            "2.1",
        ],
    );
    assert!(
        out.contains(&format!(
            "class {id} (GET /contract/{{id}} $.price value) is resolved now"
        )),
        "{out}"
    );
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(r["ready"], true, "{r:#}");
    let versions: Vec<(&str, u64)> = r["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["version"].as_str().unwrap(),
                v["compared"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [("2.1", 10), ("2.0", 20)], "newest first");
    let current = ficus_json(&store, &["readiness", "acme", "--version", "current"]);
    assert_eq!(current["version"], "2.1");
    assert_eq!(
        criterion(&current, "comparisons")["detail"],
        "10 compared; at least 10 needed"
    );

    // The bug is back, on the very version that was to fix it: a regression.
    new.set_contract(true, "2.1");
    get_all(&proxy, "/contract", 1).await;
    compared(&store, 31).await;
    let classes = ficus_json(&store, &["mismatches", "--classes", "--state", "open"]);
    let back = classes["classes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .unwrap();
    assert_eq!(
        (&back["id"], &back["regression"]),
        (&Value::from(id.as_str()), &Value::from(true))
    );
    let why = back["last_change"]["reason"].as_str().unwrap();
    assert!(
        why.contains("regression: tenant acme saw this class again on version 2.1, the version it was resolved as fixed in"),
        "{why}"
    );
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(r["ready"], false);
    assert_eq!(
        criterion(&r, "mismatches")["detail"],
        "1 mismatched in 1 open class (1 REGRESSION: resolved, then seen again); at most 0 allowed"
    );
    assert!(ficus(&store, &["mismatches", "--classes"]).contains("open (REGRESSION)"));
    // The class's history, for whoever reviews it next.
    let shown = ficus(&store, &["mismatches", "show", &id]);
    for expected in [
        "GET /contract/{id} $.price value (breaking), open (REGRESSION)",
        "resolved by cli: price computed from the right column (version 2.1)",
        "regression by proxy: regression: tenant acme saw this class again on version 2.1",
    ] {
        assert!(shown.contains(expected), "{expected:?} in:\n{shown}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_reverse_shadow_what_only_new_has_is_additive_too_and_never_trips_the_guard() {
    // New serves the migrated tenant; legacy is asked too and compared. The
    // member only new has is still additive: classes follow which backend is
    // new, not which one served.
    let shadow = format!(
        "{SHADOW}reverse = true\n[guard]\nenabled = true\nmin_compared = 5\nmax_mismatch_rate = 0.2\nwindow_ms = 600000\n"
    );
    let Rig {
        store,
        legacy: _legacy,
        new: _new,
        proxy,
        dir: _dir,
    } = Rig::start_with(
        &[("acme", "migrated")],
        "",
        &shadow,
        Backend::start("new").await,
    )
    .await;
    get_all(&proxy, "/contract", 10).await;
    compared(&store, 10).await;
    let shown = ficus_json(&store, &["tenant", "show", "acme"]);
    assert_eq!(shown["comparisons"]["mismatched"], 0, "{shown}");
    assert_eq!(
        shown["tenant"]["stage"], "migrated",
        "the guard did not trip"
    );
    let classes = ficus_json(&store, &["mismatches", "acme", "--classes"]);
    let found: Vec<(String, &str)> = classes["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["compat"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("$.energy".to_string(), "additive"),
            ("$.links".to_string(), "additive")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accepted_difference_never_counts_again_on_any_replica() {
    let Rig {
        store,
        legacy,
        new,
        proxy,
        dir: _dir,
    } = Rig::start_with(
        &[("acme", "shadow")],
        "",
        SHADOW,
        Backend::start("new").await,
    )
    .await;
    let extra = format!("{HEADER_RULE}{SHADOW}");
    let replica = Proxy::start(ProxySetup {
        store: &store,
        legacy: vec![legacy.addr],
        new: vec![new.addr],
        extra: &extra,
        ..Default::default()
    })
    .await;
    counting_gate(&store, "5");
    // `/priced` answers a different price from new, on purpose.
    get_all(&proxy, "/priced", 5).await;
    compared(&store, 5).await;
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(paths(&r["open_classes"]), ["GET /priced/{id} $.price"]);
    let id = r["open_classes"][0]["id"].as_str().unwrap().to_string();

    let before = (proxy.routing_seq().await, replica.routing_seq().await);
    ficus(
        &store,
        &[
            "mismatches",
            "accept",
            &id,
            "--reason",
            "new prices include VAT, as agreed",
        ],
    );
    // Both replicas follow the change feed; from the change on, the class is a
    // comparison rule on each.
    eventually(PATIENCE, || async {
        proxy.routing_seq().await > before.0 && replica.routing_seq().await > before.1
    })
    .await;
    get_all(&proxy, "/priced", 5).await;
    get_all(&replica, "/priced", 5).await;
    compared(&store, 15).await;
    let shown = ficus_json(&store, &["tenant", "show", "acme"]);
    assert_eq!(
        shown["comparisons"]["mismatched"], 5,
        "no replica counts an accepted difference as a mismatch"
    );
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(r["ready"], true, "{r:#}");
    let accepted = ficus_json(&store, &["mismatches", "--classes", "--state", "accepted"]);
    assert_eq!(accepted["classes"][0]["discounted"], 5);
    assert_eq!(
        accepted["classes"][0]["last_change"]["reason"],
        "new prices include VAT, as agreed"
    );

    // Bad requests change nothing and say why.
    for (args, expected) in [
        (
            vec!["mismatches", "resolve", "zz", "--reason", "x"],
            "\"zz\" is not a class id",
        ),
        (
            vec!["mismatches", "resolve", "0000", "--reason", "x"],
            "no mismatch class 0000",
        ),
        (
            vec!["mismatches", "resolve", &id, "--reason", " "],
            "a reason is required",
        ),
        (
            vec!["mismatches", "accept", &id, "--reason", "again"],
            "is accepted already; nothing was changed",
        ),
        (
            vec!["mismatches", "resolve", &id, "--reason", "x"],
            "is accepted; reopen it first",
        ),
    ] {
        let err = ficus_fails(&store, &args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    // A whole-body class (new answers bytes that are not JSON) hides every body
    // difference of its endpoint: accepted only when asked for by name.
    let (status, _) = get_as(&client(), &proxy, "acme", "/garbage").await;
    assert_eq!(status, 200);
    compared(&store, 16).await;
    let garbage = ficus_json(&store, &["mismatches", "--classes", "--state", "open"]);
    assert_eq!(paths(&garbage["classes"]), ["GET /garbage $"]);
    let whole = garbage["classes"][0]["id"].as_str().unwrap().to_string();
    let err = ficus_fails(&store, &["mismatches", "accept", &whole, "--reason", "x"]);
    assert!(
        err.contains("would hide every body difference of GET /garbage"),
        "{err}"
    );
    ficus(
        &store,
        &[
            "mismatches",
            "accept",
            &whole,
            "--reason",
            "the export is binary now",
            "--whole-endpoint",
        ],
    );

    // Reopened, the accepted class's evidence counts again.
    ficus(
        &store,
        &[
            "mismatches",
            "reopen",
            &id,
            "--reason",
            "VAT must not be included",
        ],
    );
    let r = ficus_json(&store, &["readiness", "acme"]);
    assert_eq!(
        criterion(&r, "mismatches")["detail"],
        "5 mismatched in 1 open class; at most 0 allowed"
    );
    let history = ficus_json(
        &store,
        &[
            "mismatches",
            "reopen",
            &whole,
            "--reason",
            "binary export rolled back",
        ],
    );
    let actions: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["accepted", "reopened"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_header_too_long_is_recorded_as_invalid_never_raw() {
    let new = Backend::start("new").await;
    let long = format!("9.{}", "7".repeat(200));
    new.set_contract(true, &long);
    let Rig {
        store,
        legacy: _legacy,
        new: _new,
        proxy,
        dir,
    } = Rig::start_with(&[("acme", "shadow")], "", SHADOW, new).await;
    get_all(&proxy, "/contract", 3).await;
    compared(&store, 3).await;
    let r = ficus_json(&store, &["readiness", "acme"]);
    let versions: Vec<&str> = r["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["invalid"]);
    assert_eq!(
        r["open_classes"][0]["versions"],
        serde_json::json!({"invalid": 3})
    );
    // Neither the database nor its write-ahead log holds the raw value.
    let raw = long.as_bytes();
    for file in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(file.unwrap().path()).unwrap();
        assert!(
            !bytes.windows(raw.len()).any(|w| w == raw),
            "the raw header is not stored"
        );
    }
}
