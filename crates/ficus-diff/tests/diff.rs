//! The diff engine, data-driven: `check` compares two JSON bodies under rules and
//! snapshots the differences; then headers, status, text and bytes, hostile input,
//! noise learning and endpoint templates.

use expect_test::{Expect, expect};
use ficus_diff::endpoint::{Template, endpoint};
use ficus_diff::noise::NoiseModel;
use ficus_diff::{Outcome, PathPattern, Response, Rules, compare};

fn json(body: &str) -> Response<'_> {
    Response {
        status: 200,
        headers: vec![("content-type", "application/json")],
        body: body.as_bytes(),
    }
}

fn render(o: &Outcome) -> String {
    let mut s: String = o.differences.iter().map(|d| format!("{d}\n")).collect();
    if o.truncated {
        s.push_str("(truncated)\n");
    }
    if let Some(n) = &o.note {
        s.push_str(&format!("note: {n}\n"));
    }
    if s.is_empty() {
        s.push_str("match\n");
    }
    s
}

fn check(left: &str, right: &str, rules: &Rules, expect: Expect) {
    expect.assert_eq(&render(&compare(&json(left), &json(right), rules)));
}

fn reveal() -> Rules {
    Rules {
        reveal: true,
        ..Rules::default()
    }
}

fn pat(p: &str) -> PathPattern {
    PathPattern::parse(p).unwrap()
}

#[test]
fn json_bodies_are_compared_structurally() {
    let r = reveal();
    check(
        r#"{"a":1,"b":[1,2]}"#,
        r#"{"b":[1,2],"a":1}"#,
        &r,
        expect!["match\n"],
    );
    check(
        r#"{"a":1}"#,
        r#"{"a":2}"#,
        &r,
        expect![[r#"
        value   $.a: 1 → 2
    "#]],
    );
    check(
        r#"{"a":1,"b":2}"#,
        r#"{"a":1,"c":3}"#,
        &r,
        expect![[r#"
            missing $.b: 2 → (absent)
            extra   $.c: (absent) → 3 (additive)
        "#]],
    );
    check(
        r#"{"a":"1"}"#,
        r#"{"a":1}"#,
        &r,
        expect![[r#"
        type    $.a: "1" → 1
    "#]],
    );
    check(
        r#"{"items":[{"id":1,"price":10},{"id":2,"price":20}]}"#,
        r#"{"items":[{"id":1,"price":10},{"id":2,"price":21}]}"#,
        &r,
        expect![[r#"
        value   $.items[1].price: 20 → 21
    "#]],
    );
    check(
        r#"[1,2,3]"#,
        r#"[1,2]"#,
        &r,
        expect![[r#"
        missing $[2]: 3 → (absent)
    "#]],
    );
    check(
        r#"{"odd key":1}"#,
        r#"{"odd key":2}"#,
        &r,
        expect![[r#"
        value   $["odd key"]: 1 → 2
    "#]],
    );
    check(r#"{"a":1.0}"#, r#"{"a":1}"#, &r, expect!["match\n"]);
}

#[test]
fn samples_are_redacted_unless_revealing_is_asked_for() {
    check(
        r#"{"owner":{"email":"ana@acme.test"}}"#,
        r#"{"owner":{"email":"bob@acme.test"}}"#,
        &Rules::default(),
        expect![[r#"
        value   $.owner.email: <string len=15 #f089f59a> → <string len=15 #13e9728f>
    "#]],
    );
}

#[test]
fn path_rules_ignore_reorder_match_by_key_and_tolerate() {
    let rules = Rules {
        ignore: vec![pat("$.items[*].updated_at"), pat("$.meta.*")],
        ..reveal()
    };
    check(
        r#"{"items":[{"id":1,"updated_at":"t1"},{"id":2,"updated_at":"t2"}],"meta":{"took":3}}"#,
        r#"{"items":[{"id":1,"updated_at":"t9"},{"id":2,"updated_at":"t8"}],"meta":{"took":5,"node":"b"}}"#,
        &rules,
        expect!["match\n"],
    );
    let rules = Rules {
        unordered: vec![pat("$.tags")],
        ..reveal()
    };
    check(
        r#"{"tags":["a","b","b"]}"#,
        r#"{"tags":["b","a","b"]}"#,
        &rules,
        expect!["match\n"],
    );
    check(
        r#"{"tags":["a","b"]}"#,
        r#"{"tags":["b","c"]}"#,
        &rules,
        expect![[r#"
        missing $.tags[0]: "a" → (absent)
        extra   $.tags[1]: (absent) → "c"
    "#]],
    );
    let rules = Rules {
        match_by_key: vec![(pat("$.homes"), "id".into())],
        ..reveal()
    };
    check(
        r#"{"homes":[{"id":7,"v":1},{"id":9,"v":2},{"id":4,"v":0}]}"#,
        r#"{"homes":[{"id":9,"v":2},{"id":7,"v":3},{"id":5,"v":0}]}"#,
        &rules,
        expect![[r#"
            value   $.homes[0].v: 1 → 3
            missing $.homes[2]: {"id":4,"v":0} → (absent)
            extra   $.homes[2]: (absent) → {"id":5,"v":0}
        "#]],
    );
    let rules = Rules {
        numeric_tolerance: 0.01,
        ..reveal()
    };
    check(
        r#"{"price":420000.001}"#,
        r#"{"price":420000.0}"#,
        &rules,
        expect!["match\n"],
    );
    check(
        r#"{"price":1.5}"#,
        r#"{"price":1.52}"#,
        &rules,
        expect![[r#"
        value   $.price: 1.5 → 1.52
    "#]],
    );
    let rules = Rules {
        null_equals_missing: true,
        ..reveal()
    };
    check(
        r#"{"a":1,"b":null}"#,
        r#"{"a":1}"#,
        &rules,
        expect!["match\n"],
    );
    check(
        r#"{"a":1}"#,
        r#"{"a":1,"b":null}"#,
        &rules,
        expect!["match\n"],
    );
    check(
        r#"{"a":1}"#,
        r#"{"a":1,"b":null}"#,
        &reveal(),
        expect![[r#"
            extra   $.b: (absent) → null (additive)
        "#]],
    );
}

#[test]
fn status_headers_text_and_bytes() {
    let a = Response {
        status: 200,
        headers: vec![
            ("content-type", "text/plain"),
            ("date", "x"),
            ("location", "/a"),
        ],
        body: b"hello",
    };
    let b = Response {
        status: 201,
        headers: vec![
            ("content-type", "text/plain"),
            ("date", "y"),
            ("location", "/b"),
        ],
        body: b"hellO",
    };
    expect![[r#"
        status  status: 200 → 201
        header  header:location: <header len=2 #b34abe2a> → <header len=2 #b34ab013>
        value   $: <text len=5 #249a654d> → <text len=5 #249a0b2d>
    "#]]
    .assert_eq(&render(&compare(&a, &b, &Rules::default())));
    let img = |body: &'static [u8]| Response {
        status: 200,
        headers: vec![("content-type", "image/png")],
        body,
    };
    expect![[r#"
        value   $: <bytes len=3 #6bd2e36d> → <bytes len=3 #6bd2ee32>
    "#]]
    .assert_eq(&render(&compare(
        &img(b"\x89PN"),
        &img(b"\x89PO"),
        &Rules::default(),
    )));
    expect!["match\n"].assert_eq(&render(&compare(
        &img(b"same"),
        &img(b"same"),
        &Rules::default(),
    )));
}

#[test]
fn hostile_input_gets_an_answer_not_a_crash() {
    // 100,000 levels of nesting: serde_json's recursion limit turns it into an error,
    // and the bodies are compared as bytes instead.
    let deep_a = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_b = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let o = compare(&json(&deep_a), &json(&deep_b), &Rules::default());
    assert_eq!(o.differences.len(), 1);
    assert_eq!(o.differences[0].path, "$");
    assert!(
        o.note
            .as_deref()
            .unwrap()
            .contains("recursion limit exceeded"),
        "{o:?}"
    );

    let o = compare(&json("[1e400]"), &json("[1]"), &Rules::default());
    assert!(
        o.note.is_some(),
        "a number beyond f64 is a parse error, compared as bytes"
    );
    check(
        "[18446744073709551615]",
        "[18446744073709551614]",
        &reveal(),
        expect![[r#"
        value   $[0]: 18446744073709551615 → 18446744073709551614
    "#]],
    );
    check(
        "[-9223372036854775808]",
        "[18446744073709551615]",
        &reveal(),
        expect![[r#"
        value   $[0]: -9223372036854775808 → 18446744073709551615
    "#]],
    );
    // Invalid UTF-8 inside a JSON string.
    let bad = Response {
        status: 200,
        headers: vec![("content-type", "application/json")],
        body: b"{\"a\":\"\xff\xfe\"}",
    };
    let o = compare(&bad, &json(r#"{"a":"x"}"#), &Rules::default());
    assert_eq!(o.differences.len(), 1);
    assert!(o.note.is_some());
    // Duplicate keys: the last one wins, as in serde_json.
    check(
        r#"{"a":1,"a":2}"#,
        r#"{"a":2}"#,
        &reveal(),
        expect!["match\n"],
    );
    // A huge difference list is capped.
    let many_a: String = format!(
        "[{}]",
        (0..200)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let many_b: String = format!(
        "[{}]",
        (0..200)
            .map(|i| (i + 1).to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    let o = compare(&json(&many_a), &json(&many_b), &Rules::default());
    assert_eq!((o.differences.len(), o.truncated), (50, true));
}

#[test]
fn path_patterns_refuse_what_they_cannot_parse() {
    for (raw, err) in [
        (
            "items[*]",
            "invalid JSON path \"items[*]\": it must start with '$'",
        ),
        (
            "$.items[x]",
            "invalid JSON path \"$.items[x]\": an index must be a number, * or a quoted name",
        ),
        ("$.a..b", "invalid JSON path \"$.a..b\": empty member name"),
        ("$.a[1", "invalid JSON path \"$.a[1\": unclosed '['"),
    ] {
        assert_eq!(PathPattern::parse(raw).unwrap_err(), err);
    }
    assert!(PathPattern::parse(r#"$["odd key"][0].x"#).is_ok());
}

#[test]
fn noise_is_learned_from_a_backend_disagreeing_with_itself() {
    let mut model = NoiseModel::default();
    let ep = "GET /homes/{id}";
    let first = json(r#"{"id":1,"at":"10:00:00","items":[{"t":1},{"t":2}]}"#);
    let again = json(r#"{"id":1,"at":"10:00:01","items":[{"t":5},{"t":2}]}"#);
    model.learn(ep, &compare(&first, &again, &Rules::default()));
    let new = json(r#"{"id":2,"at":"10:00:02","items":[{"t":1},{"t":9}]}"#);
    let split = model.split(ep, &compare(&first, &new, &Rules::default()));
    let paths =
        |ds: &[ficus_diff::Difference]| ds.iter().map(|d| d.path.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&split.mismatches), ["$.id"]);
    assert_eq!(
        paths(&split.noise),
        ["$.at", "$.items[1].t"],
        "noise learned at one index applies to all"
    );
    assert!(
        !model.is_noise("GET /other", "$.at"),
        "noise is per endpoint"
    );
    let report = model.report();
    assert_eq!(
        report.iter().map(|n| n.path.as_str()).collect::<Vec<_>>(),
        ["$.at", "$.items[*].t"]
    );
    // A path that stops differing decays out of the noise set.
    for _ in 0..40 {
        model.learn(ep, &Outcome::default());
    }
    assert!(!model.is_noise(ep, "$.at"));
}

#[test]
fn endpoints_group_identifiers() {
    let templates = [Template::parse("/agents/{slug}").unwrap()];
    let cases = [
        ("GET", "/homes/123/photos?size=2", "GET /homes/{id}/photos"),
        (
            "GET",
            "/homes/6f1c2a9e-5c2b-4c8a-9d1e-2b3c4d5e6f70",
            "GET /homes/{id}",
        ),
        ("GET", "/files/0123456789abcdef0123", "GET /files/{id}"),
        ("GET", "/files/cafe", "GET /files/cafe"),
        ("GET", "/agents/jane-doe", "GET /agents/{slug}"),
        ("POST", "/", "POST /"),
        ("GET", "/homes/", "GET /homes/"),
        ("GET", "//homes//7/", "GET /homes//{id}/"),
        ("GET", "", "GET /"),
        ("GET", "/?q=1", "GET /"),
        ("GET", "/caf\u{e9}/12/x?y", "GET /caf\u{e9}/{id}/x"),
        (
            "DELETE",
            "/a/0123456789abcdef/b/12345678",
            "DELETE /a/{id}/b/{id}",
        ),
    ];
    for (method, path, want) in cases {
        assert_eq!(endpoint(method, path, &templates), want, "{path}");
        // With no templates (the proxy's path without gathering segments),
        // the automatic name is the same as the plain function's.
        assert_eq!(
            ficus_diff::endpoint::Templates::default().endpoint(method, path),
            endpoint(method, path, &[]),
            "{path}"
        );
    }
    assert_eq!(
        ficus_diff::endpoint::Templates::default().endpoint("GET", "/agents/jane-doe?x=/1"),
        "GET /agents/jane-doe"
    );
}

/// The indexed templates name every path as the plain list does, the most
/// specific match winning, among hundreds of templates.
#[test]
fn indexed_templates_name_paths_as_the_list_does() {
    let mut raw: Vec<String> = (0..500)
        .map(|i| format!("/area{}/{{x}}/item{}", i % 50, i))
        .collect();
    raw.insert(0, "/{tenant}/homes/{id}".into());
    raw.push("/area7/{x}/{y}".into());
    raw.push("/area7/special/item7".into());
    let list: Vec<Template> = raw.iter().map(|t| Template::parse(t).unwrap()).collect();
    let indexed: ficus_diff::endpoint::Templates = list.iter().cloned().collect();
    assert_eq!(indexed.len(), 503);
    for path in [
        "/acme/homes/9",
        "/area7/a/item7",
        "/area7/special/item7",
        "/area7/a/b",
        "/area49/x/item499",
        "/area49/x/item498",
        "/nowhere/123",
        "/",
    ] {
        assert_eq!(
            indexed.endpoint("GET", path),
            endpoint("GET", path, &list),
            "{path}"
        );
    }
    // The most specific template names a path: more literals win, then order.
    assert_eq!(
        indexed.endpoint("GET", "/area7/special/item7"),
        "GET /area7/special/item7"
    );
    let homes: ficus_diff::endpoint::Templates = ["/homes/{id}", "/homes/search"]
        .iter()
        .map(|t| Template::parse(t).unwrap())
        .collect();
    assert_eq!(
        homes.endpoint("POST", "/homes/search"),
        "POST /homes/search"
    );
    assert_eq!(homes.endpoint("GET", "/homes/7"), "GET /homes/{id}");
}

/// What a client of the legacy contract sees: a member only new has is additive;
/// an element appended to an array is breaking unless the array is open; under
/// `additive = "mismatch"` nothing is additive; everything else is breaking.
#[test]
fn differences_are_classified_for_a_client_of_the_legacy_contract() {
    let r = reveal();
    check(
        r#"{"id":1,"tags":["a"],"price":10}"#,
        r#"{"id":1,"tags":["a","b"],"price":10,"energy":"A","links":{"self":"/h/1"}}"#,
        &r,
        expect![[r#"
            extra   $.tags[1]: (absent) → "b"
            extra   $.energy: (absent) → "A" (additive)
            extra   $.links: (absent) → {"self":"/h/1"} (additive)
        "#]],
    );
    let open = Rules {
        open_arrays: vec![pat("$.tags")],
        ..reveal()
    };
    check(
        r#"{"tags":["a"],"items":[{"id":1}]}"#,
        r#"{"tags":["a","b"],"items":[{"id":1,"new":true},{"id":2}]}"#,
        &open,
        expect![[r#"
            extra   $.tags[1]: (absent) → "b" (additive)
            extra   $.items[0].new: (absent) → true (additive)
            extra   $.items[1]: (absent) → {"id":2}
        "#]],
    );
    // Removing, renaming and retyping always break, in either direction of
    // serving: the proxy passes legacy's answer first whichever backend served.
    check(
        r#"{"price":10,"name":"x","n":1}"#,
        r#"{"cost":10,"name":null,"n":"1"}"#,
        &r,
        expect![[r#"
            missing $.price: 10 → (absent)
            type    $.name: "x" → null
            type    $.n: 1 → "1"
            extra   $.cost: (absent) → 10 (additive)
        "#]],
    );
    let strict = Rules {
        additive_is_mismatch: true,
        open_arrays: vec![pat("$.tags")],
        ..reveal()
    };
    check(
        r#"{"tags":[]}"#,
        r#"{"tags":["a"],"energy":"A"}"#,
        &strict,
        expect![[r#"
            extra   $.tags[0]: (absent) → "a"
            extra   $.energy: (absent) → "A"
        "#]],
    );
}

/// Regression: additive differences filled the cap and hid a breaking one that
/// came after them, so a comparison with a wrong total read as matched.
#[test]
fn additive_differences_never_crowd_out_a_breaking_one() {
    let items = |extra: bool| {
        (0..60)
            .map(|i| {
                if extra {
                    format!(r#"{{"id":{i},"energy":"A"}}"#)
                } else {
                    format!(r#"{{"id":{i}}}"#)
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    let legacy = format!(r#"{{"items":[{}],"total":60}}"#, items(false));
    let new = format!(r#"{{"items":[{}],"total":61}}"#, items(true));
    let out = compare(&json(&legacy), &json(&new), &Rules::default());
    let breaking: Vec<&str> = out
        .differences
        .iter()
        .filter(|d| d.compat == ficus_diff::Compat::Breaking)
        .map(|d| d.path.as_str())
        .collect();
    assert_eq!(breaking, ["$.total"]);
    assert!(
        out.truncated,
        "the additive ones beyond the cap were dropped"
    );
}
