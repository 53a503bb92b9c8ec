//! Which backend serves a request: the decision the proxy makes for every request,
//! kept here so that it is one pure function with one table of tests.

use std::fmt;

use crate::Stage;

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

#[cfg(test)]
mod tests {
    use expect_test::expect;

    use super::*;

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
