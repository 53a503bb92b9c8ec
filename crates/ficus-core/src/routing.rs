//! Which backend serves a request: the decision the proxy makes for every request,
//! kept here so that it is one pure function with one table of tests.
//!
//! A request is judged by its tenant's stage **and** its route's: it goes to the
//! least advanced of the two ([`effective`]). A route (`METHOD /template`) that
//! writes starts *held* — at `legacy` — until it is released on purpose; a route
//! that only reads starts at `migrated`, so that the tenant's stage alone decides,
//! as before routes had stages.

use std::collections::HashMap;
use std::fmt;

use crate::{Stage, TenantId};

/// One of the two backends behind the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Legacy,
    New,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::New => "new",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What to do with a request whose tenant the control plane does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownTenant {
    /// Serve it from legacy, which served everyone before the migration began.
    Legacy,
    /// Answer with a client error.
    Reject,
}

/// The proxy's verdict for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Serve(Backend),
    Reject,
}

/// Decides where a request goes. `stage` is `None` when no tenant was resolved or
/// the tenant is unknown. Once legacy is retired nothing is ever sent to it, whatever
/// the stage or policy says: retirement is the promise that legacy can be switched off.
pub fn decide(stage: Option<Stage>, legacy_retired: bool, unknown: UnknownTenant) -> Decision {
    match (stage, legacy_retired) {
        (Some(_), true) => Decision::Serve(Backend::New),
        (None, true) => match unknown {
            UnknownTenant::Legacy => Decision::Serve(Backend::New),
            UnknownTenant::Reject => Decision::Reject,
        },
        (Some(Stage::Legacy | Stage::Shadow), false) => Decision::Serve(Backend::Legacy),
        (Some(Stage::Migrated), false) => Decision::Serve(Backend::New),
        (None, false) => match unknown {
            UnknownTenant::Legacy => Decision::Serve(Backend::Legacy),
            UnknownTenant::Reject => Decision::Reject,
        },
    }
}

/// Whether a method cannot change state; only these are ever shadowed.
pub fn is_safe_method(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// The stage a route has when nobody set one: held at `legacy` when it writes,
/// `migrated` (the tenant decides) when it only reads.
pub fn default_route_stage(writes: bool) -> Stage {
    if writes {
        Stage::Legacy
    } else {
        Stage::Migrated
    }
}

/// The least advanced of a tenant's stage and its route's: where the request is
/// judged to be. An unknown tenant has no stage; its route does not change that.
pub fn effective(tenant: Option<Stage>, route: Stage) -> Option<Stage> {
    tenant.map(|t| t.min(route))
}

/// A route as stages and releases name it: `POST /homes/{id}`, one method and a
/// template, or `*` for every method.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Route {
    method: String,
    template: String,
}

/// Why a route's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route {raw:?} is not \"METHOD /template\" (such as \"DELETE /homes/{{id}}\"): {why}")]
pub struct RouteError {
    pub raw: String,
    pub why: String,
}

impl Route {
    /// Parses `DELETE /homes/{id}`: a method in capitals (or `*`), one space, a
    /// template of literal segments and `{name}` placeholders.
    pub fn parse(raw: &str) -> Result<Route, RouteError> {
        let bad = |why: &str| RouteError {
            raw: raw.to_string(),
            why: why.to_string(),
        };
        let (method, template) = raw
            .trim()
            .split_once(' ')
            .ok_or_else(|| bad("no space between method and template"))?;
        let method = method.to_ascii_uppercase();
        if method != "*"
            && (method.is_empty()
                || method.len() > 16
                || !method.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return Err(bad("the method must be letters, or *"));
        }
        if !template.starts_with('/') || template.len() > 512 {
            return Err(bad(
                "the template must start with '/' and be at most 512 bytes",
            ));
        }
        for seg in template[1..].split('/') {
            let placeholder = seg.starts_with('{') && seg.ends_with('}') && seg.len() > 2;
            let literal = !seg.contains(['{', '}', '?', '#', ' '])
                && seg.bytes().all(|b| b.is_ascii_graphic());
            if !(placeholder || literal) {
                return Err(bad(&format!(
                    "segment {seg:?} is neither a literal nor a {{placeholder}}"
                )));
            }
        }
        Ok(Route {
            method,
            template: template.to_string(),
        })
    }

    pub fn method(&self) -> &str {
        &self.method
    }

    pub fn template(&self) -> &str {
        &self.template
    }

    /// Whether requests of this route may change state: every method but GET,
    /// HEAD and OPTIONS (and `*`, which includes them).
    pub fn writes(&self) -> bool {
        !is_safe_method(&self.method)
    }

    /// DELETE, or a route marked destructive: releasing it needs a second,
    /// explicit confirmation.
    pub fn destructive(&self, marked: bool) -> bool {
        marked || self.method == "DELETE"
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.template)
    }
}

/// Every route stage the control store holds: for all tenants, and per tenant
/// (an override that wins over the route's own stage for that tenant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteStages {
    all: HashMap<String, Stage>,
    per_tenant: HashMap<(TenantId, String), Stage>,
    /// Where a write route nobody staged goes: held at `legacy`, unless the
    /// store says writes follow their tenant (a store upgraded with migrated
    /// tenants, whose writes went to new before routes had stages).
    write_default: Stage,
}

impl Default for RouteStages {
    fn default() -> RouteStages {
        RouteStages {
            all: HashMap::new(),
            per_tenant: HashMap::new(),
            write_default: default_route_stage(true),
        }
    }
}

impl RouteStages {
    /// Records `route`'s stage, for `tenant` or (with `None`) for all.
    pub fn set(&mut self, route: &str, tenant: Option<&TenantId>, stage: Stage) {
        match tenant {
            Some(t) => {
                self.per_tenant
                    .insert((t.clone(), route.to_string()), stage);
            }
            None => {
                self.all.insert(route.to_string(), stage);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.per_tenant.is_empty()
    }

    /// Sets where write routes nobody staged go.
    pub fn set_write_default(&mut self, stage: Stage) {
        self.write_default = stage;
    }

    /// The stage a route nobody staged has.
    pub fn default_for(&self, writes: bool) -> Stage {
        if writes {
            self.write_default
        } else {
            default_route_stage(false)
        }
    }

    /// Whether `tenant` has an override of its own for `route`: a canary.
    pub fn overridden(&self, tenant: &TenantId, route: &str) -> bool {
        !self.per_tenant.is_empty()
            && self
                .per_tenant
                .contains_key(&(tenant.clone(), route.to_string()))
    }

    /// The stage of `route` (`METHOD /template`) for `tenant`: its override, else
    /// the route's stage, else the default (held when it writes).
    pub fn stage(&self, tenant: Option<&TenantId>, route: &str, writes: bool) -> Stage {
        if !self.per_tenant.is_empty()
            && let Some(t) = tenant
            && let Some(s) = self.per_tenant.get(&(t.clone(), route.to_string()))
        {
            return *s;
        }
        if self.all.is_empty() {
            return self.default_for(writes);
        }
        self.all
            .get(route)
            .copied()
            .unwrap_or_else(|| self.default_for(writes))
    }
}

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

    /// Every tenant stage × route stage × method, with legacy retired or not:
    /// where the request goes, and whether a second backend sees it (only a
    /// safe read of an effective `shadow`, or `migrated` under reverse shadow).
    #[test]
    fn every_tenant_stage_route_stage_and_method() {
        let mut table = String::new();
        for retired in [false, true] {
            for tenant in [
                None,
                Some(Stage::Legacy),
                Some(Stage::Shadow),
                Some(Stage::Migrated),
            ] {
                for route in [Stage::Legacy, Stage::Shadow, Stage::Migrated] {
                    for method in ["GET", "POST"] {
                        let at = effective(tenant, route);
                        let verdict = match decide(at, retired, UnknownTenant::Legacy) {
                            Decision::Serve(b) => b.to_string(),
                            Decision::Reject => "reject".to_string(),
                        };
                        let compared =
                            is_safe_method(method) && !retired && at == Some(Stage::Shadow);
                        table.push_str(&format!(
                            "retired={retired:<5} tenant={:<8} route={:<8} {method:<4} → {verdict}{}\n",
                            tenant.map_or("unknown", Stage::as_str),
                            route.as_str(),
                            if compared { " + compared with new" } else { "" }
                        ));
                    }
                }
            }
        }
        expect![[r#"
            retired=false tenant=unknown  route=legacy   GET  → legacy
            retired=false tenant=unknown  route=legacy   POST → legacy
            retired=false tenant=unknown  route=shadow   GET  → legacy
            retired=false tenant=unknown  route=shadow   POST → legacy
            retired=false tenant=unknown  route=migrated GET  → legacy
            retired=false tenant=unknown  route=migrated POST → legacy
            retired=false tenant=legacy   route=legacy   GET  → legacy
            retired=false tenant=legacy   route=legacy   POST → legacy
            retired=false tenant=legacy   route=shadow   GET  → legacy
            retired=false tenant=legacy   route=shadow   POST → legacy
            retired=false tenant=legacy   route=migrated GET  → legacy
            retired=false tenant=legacy   route=migrated POST → legacy
            retired=false tenant=shadow   route=legacy   GET  → legacy
            retired=false tenant=shadow   route=legacy   POST → legacy
            retired=false tenant=shadow   route=shadow   GET  → legacy + compared with new
            retired=false tenant=shadow   route=shadow   POST → legacy
            retired=false tenant=shadow   route=migrated GET  → legacy + compared with new
            retired=false tenant=shadow   route=migrated POST → legacy
            retired=false tenant=migrated route=legacy   GET  → legacy
            retired=false tenant=migrated route=legacy   POST → legacy
            retired=false tenant=migrated route=shadow   GET  → legacy + compared with new
            retired=false tenant=migrated route=shadow   POST → legacy
            retired=false tenant=migrated route=migrated GET  → new
            retired=false tenant=migrated route=migrated POST → new
            retired=true  tenant=unknown  route=legacy   GET  → new
            retired=true  tenant=unknown  route=legacy   POST → new
            retired=true  tenant=unknown  route=shadow   GET  → new
            retired=true  tenant=unknown  route=shadow   POST → new
            retired=true  tenant=unknown  route=migrated GET  → new
            retired=true  tenant=unknown  route=migrated POST → new
            retired=true  tenant=legacy   route=legacy   GET  → new
            retired=true  tenant=legacy   route=legacy   POST → new
            retired=true  tenant=legacy   route=shadow   GET  → new
            retired=true  tenant=legacy   route=shadow   POST → new
            retired=true  tenant=legacy   route=migrated GET  → new
            retired=true  tenant=legacy   route=migrated POST → new
            retired=true  tenant=shadow   route=legacy   GET  → new
            retired=true  tenant=shadow   route=legacy   POST → new
            retired=true  tenant=shadow   route=shadow   GET  → new
            retired=true  tenant=shadow   route=shadow   POST → new
            retired=true  tenant=shadow   route=migrated GET  → new
            retired=true  tenant=shadow   route=migrated POST → new
            retired=true  tenant=migrated route=legacy   GET  → new
            retired=true  tenant=migrated route=legacy   POST → new
            retired=true  tenant=migrated route=shadow   GET  → new
            retired=true  tenant=migrated route=shadow   POST → new
            retired=true  tenant=migrated route=migrated GET  → new
            retired=true  tenant=migrated route=migrated POST → new
        "#]]
        .assert_eq(&table);
    }

    #[test]
    fn a_tenant_override_wins_and_writes_start_held() {
        let acme = TenantId::parse("acme").unwrap();
        let globex = TenantId::parse("globex").unwrap();
        let mut stages = RouteStages::default();
        assert_eq!(
            stages.stage(Some(&acme), "POST /homes", true),
            Stage::Legacy
        );
        assert_eq!(
            stages.stage(Some(&acme), "GET /homes", false),
            Stage::Migrated
        );
        stages.set("POST /homes", Some(&acme), Stage::Migrated);
        assert_eq!(
            stages.stage(Some(&acme), "POST /homes", true),
            Stage::Migrated
        );
        assert_eq!(
            stages.stage(Some(&globex), "POST /homes", true),
            Stage::Legacy
        );
        stages.set("POST /homes", None, Stage::Migrated);
        stages.set("POST /homes", Some(&globex), Stage::Legacy);
        assert_eq!(
            stages.stage(Some(&globex), "POST /homes", true),
            Stage::Legacy
        );
        assert_eq!(stages.stage(None, "POST /homes", true), Stage::Migrated);
    }

    #[test]
    fn routes_are_a_method_and_a_template() {
        let r = Route::parse("delete /homes/{id}").unwrap();
        assert_eq!(
            (r.to_string(), r.writes(), r.destructive(false)),
            ("DELETE /homes/{id}".to_string(), true, true)
        );
        let r = Route::parse("GET /homes/{id}/valuation").unwrap();
        assert!(!r.writes() && !r.destructive(false) && r.destructive(true));
        assert!(Route::parse("* /search").unwrap().writes());
        for bad in ["GET", "GET homes", "G3T /x", "GET /a/{b/c", "GET /a b"] {
            assert!(Route::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Route::parse("GET homes").unwrap_err().to_string(),
            "route \"GET homes\" is not \"METHOD /template\" (such as \"DELETE /homes/{id}\"): the template must start with '/' and be at most 512 bytes"
        );
    }

    #[test]
    fn every_case() {
        let mut table = String::new();
        for retired in [false, true] {
            for policy in [UnknownTenant::Legacy, UnknownTenant::Reject] {
                for stage in [
                    None,
                    Some(Stage::Legacy),
                    Some(Stage::Shadow),
                    Some(Stage::Migrated),
                ] {
                    let stage_name = stage.map_or("unknown", Stage::as_str);
                    let verdict = match decide(stage, retired, policy) {
                        Decision::Serve(b) => b.to_string(),
                        Decision::Reject => "reject".to_string(),
                    };
                    table.push_str(&format!(
                        "retired={retired:<5} unknown={policy:<6?} {stage_name:<8} → {verdict}\n"
                    ));
                }
            }
        }
        expect![[r#"
            retired=false unknown=Legacy unknown  → legacy
            retired=false unknown=Legacy legacy   → legacy
            retired=false unknown=Legacy shadow   → legacy
            retired=false unknown=Legacy migrated → new
            retired=false unknown=Reject unknown  → reject
            retired=false unknown=Reject legacy   → legacy
            retired=false unknown=Reject shadow   → legacy
            retired=false unknown=Reject migrated → new
            retired=true  unknown=Legacy unknown  → new
            retired=true  unknown=Legacy legacy   → new
            retired=true  unknown=Legacy shadow   → new
            retired=true  unknown=Legacy migrated → new
            retired=true  unknown=Reject unknown  → reject
            retired=true  unknown=Reject legacy   → new
            retired=true  unknown=Reject shadow   → new
            retired=true  unknown=Reject migrated → new
        "#]]
        .assert_eq(&table);
    }
}
