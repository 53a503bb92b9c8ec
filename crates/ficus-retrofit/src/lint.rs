//! `ficus db lint`: security and performance checks on tenancy, read from
//! PostgreSQL's catalogs. Read-only. Each finding has a severity, the object it
//! is about, what is wrong, and how to fix it; the run fails on any error.
//!
//! A table is tenant-owned here when it has a `tenant_id` column: lint needs no
//! plan, so that it can be pointed at any database, including one Ficus did not
//! retrofit. Roles are cluster-wide, so a role is only reported when it holds a
//! privilege on this database's tables.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tokio_postgres::Client;

use crate::enforce::{PASSTHROUGH, SINGLE_TENANT};
use crate::plan::POLICY;
use crate::{Result, sql};

/// How bad a finding is. Errors fail the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// One thing lint found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    /// The check's stable name, for filtering and documentation.
    pub check: &'static str,
    /// The function, view, table, policy or role it is about.
    pub object: String,
    pub message: String,
    pub fix: String,
}

/// Everything found, most severe first.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }
}

/// Schemas that are the database's own, never the application's.
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'";

/// Runs every check.
pub async fn lint(client: &Client) -> Result<Report> {
    let mut findings = Vec::new();
    definer_functions(client, &mut findings).await?;
    definer_views(client, &mut findings).await?;
    tenant_data_bypasses(client, &mut findings).await?;
    tables(client, &mut findings).await?;
    policies(client, &mut findings).await?;
    bypass_roles(client, &mut findings).await?;
    findings
        .sort_by(|a, b| (a.severity, a.check, &a.object).cmp(&(b.severity, b.check, &b.object)));
    Ok(Report { findings })
}

/// `SECURITY DEFINER` functions run with their owner's rights: a mutable
/// `search_path` lets a caller substitute objects, `PUBLIC` may call them, and
/// an exposed schema publishes them.
async fn definer_functions(client: &Client, findings: &mut Vec<Finding>) -> Result<()> {
    let rows = client
        .query(
            &format!(
                "SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
                        EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{{}}')) AS c WHERE c LIKE 'search_path=%'),
                        has_function_privilege('public', p.oid, 'EXECUTE'),
                        has_schema_privilege('public', n.oid, 'USAGE')
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE p.prosecdef AND {SYSTEM_SCHEMAS}
                   AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')
                 ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(sql("reading SECURITY DEFINER functions"))?;
    for r in rows {
        let name: String = r.get(0);
        let (pinned, public, exposed): (bool, bool, bool) = (r.get(1), r.get(2), r.get(3));
        if !pinned {
            findings.push(Finding {
                severity: Severity::Error,
                check: "definer-mutable-search-path",
                object: name.clone(),
                message: "SECURITY DEFINER function runs with the caller's search_path: a caller can put its own objects first and have them run with the owner's rights".into(),
                fix: format!("ALTER FUNCTION {name} SET search_path = ''; and schema-qualify every name in its body"),
            });
        }
        if public {
            findings.push(Finding {
                severity: Severity::Error,
                check: "definer-executable-by-public",
                object: name.clone(),
                message: "SECURITY DEFINER function may be called by every role (EXECUTE is granted to PUBLIC, the default)".into(),
                fix: format!("REVOKE EXECUTE ON FUNCTION {name} FROM PUBLIC; then GRANT it to the roles that need it"),
            });
        }
        if exposed {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "definer-in-exposed-schema",
                object: name.clone(),
                message: "SECURITY DEFINER function lives in a schema every role may use, which APIs built on the database (PostgREST and the like) publish".into(),
                fix: "move it to a private schema (ALTER FUNCTION … SET SCHEMA) whose USAGE is granted only to the roles that need it".into(),
            });
        }
    }
    Ok(())
}

/// Ways a tenant role reaches every tenant's rows past row level security: a
/// materialized view over tenant-owned tables it may read (no policy applies to
/// a materialized view), and a `SECURITY DEFINER` function it may execute that
/// reads a tenant-owned table while its owner bypasses that table's row level
/// security (superuser, `BYPASSRLS`, or the table's owner without `FORCE`). The
/// tenant roles are those Ficus's isolation policies name; a function is taken
/// to read a table when its body names it.
async fn tenant_data_bypasses(client: &Client, findings: &mut Vec<Finding>) -> Result<()> {
    let tenant_tables = format!(
        "SELECT t.oid, t.relname, t.relowner, t.relforcerowsecurity FROM pg_class t
         JOIN pg_namespace n ON n.oid = t.relnamespace
         JOIN pg_attribute a ON a.attrelid = t.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
         WHERE t.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS} AND n.nspname NOT IN ('tenancy', 'tenancy_private')"
    );
    let tenant_roles = format!(
        "SELECT DISTINCT unnest(polroles) AS oid FROM pg_policy WHERE polname = '{POLICY}'"
    );
    let rows = client
        .query(
            &format!(
                "WITH tt AS ({tenant_tables}), tr AS ({tenant_roles})
                 SELECT v.oid::regclass::text,
                        string_agg(DISTINCT tt.relname::text, ', ' ORDER BY tt.relname::text),
                        string_agg(DISTINCT r.rolname::text, ', ' ORDER BY r.rolname::text)
                 FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace
                 JOIN pg_rewrite w ON w.ev_class = v.oid
                 JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
                 JOIN tt ON tt.oid = d.refobjid
                 CROSS JOIN tr JOIN pg_roles r ON r.oid = tr.oid
                 WHERE v.relkind = 'm' AND {SYSTEM_SCHEMAS} AND has_table_privilege(r.oid, v.oid, 'SELECT')
                 GROUP BY 1 ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(sql("reading materialized views"))?;
    for r in rows {
        let (view, tables, roles): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        findings.push(Finding {
            severity: Severity::Error,
            check: "materialized-view-readable-by-tenant-role",
            object: view.clone(),
            message: format!(
                "materialized view over tenant-owned tables ({tables}) holds every tenant's rows, and tenant roles may read it ({roles}); no row level security applies to it"
            ),
            fix: format!(
                "REVOKE SELECT ON {view} FROM {roles} (ficus db apply's view step does this when the plan says action = \"revoke\")"
            ),
        });
    }
    let rows = client
        .query(
            &format!(
                "WITH tt AS ({tenant_tables}), tr AS ({tenant_roles})
                 SELECT n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
                        string_agg(DISTINCT tt.relname::text, ', ' ORDER BY tt.relname::text),
                        string_agg(DISTINCT r.rolname::text, ', ' ORDER BY r.rolname::text)
                 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 JOIN pg_roles o ON o.oid = p.proowner
                 CROSS JOIN tt CROSS JOIN tr JOIN pg_roles r ON r.oid = tr.oid
                 WHERE p.prosecdef AND {SYSTEM_SCHEMAS} AND n.nspname NOT IN ('tenancy', 'tenancy_private')
                   AND regexp_split_to_array(lower(p.prosrc), '[^a-z0-9_$]+') @> ARRAY[lower(tt.relname::text)]
                   AND (o.rolsuper OR o.rolbypassrls OR (o.oid = tt.relowner AND NOT tt.relforcerowsecurity))
                   AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
                 GROUP BY 1 ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(sql("reading definer functions"))?;
    for r in rows {
        let (function, tables, roles): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        findings.push(Finding {
            severity: Severity::Error,
            check: "definer-function-reads-tenant-data",
            object: function.clone(),
            message: format!(
                "SECURITY DEFINER function reads tenant-owned tables ({tables}) as an owner that bypasses their row level security, and tenant roles may execute it ({roles}): it hands them every tenant's rows"
            ),
            fix: format!(
                "REVOKE EXECUTE ON FUNCTION {function} FROM {roles}, PUBLIC (and grant it to the roles that need it), or make it SECURITY INVOKER"
            ),
        });
    }
    Ok(())
}

/// A view runs as its owner unless `security_invoker` is set, and owners
/// usually bypass row level security: the view hands every tenant's rows out.
async fn definer_views(client: &Client, findings: &mut Vec<Finding>) -> Result<()> {
    let rows = client
        .query(
            &format!(
                "SELECT DISTINCT v.oid::regclass::text, t.oid::regclass::text
                 FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace
                 JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass
                 JOIN pg_rewrite w ON w.oid = d.objid AND w.ev_class = v.oid
                 JOIN pg_class t ON t.oid = d.refobjid
                 WHERE v.relkind = 'v' AND t.oid <> v.oid AND t.relrowsecurity
                   AND {SYSTEM_SCHEMAS}
                   AND NOT coalesce(v.reloptions, '{{}}') && ARRAY['security_invoker=true', 'security_invoker=on', 'security_invoker=1']
                 ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .map_err(sql("reading views"))?;
    let mut by_view: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in rows {
        by_view.entry(r.get(0)).or_default().push(r.get(1));
    }
    for (view, tables) in by_view {
        findings.push(Finding {
            severity: Severity::Error,
            check: "view-bypasses-rls",
            object: view.clone(),
            message: format!(
                "view runs as its owner over tables with row level security ({}): whoever may read the view sees every tenant's rows",
                tables.join(", ")
            ),
            fix: format!("ALTER VIEW {view} SET (security_invoker = true)"),
        });
    }
    Ok(())
}

/// Per table: row level security without policies, policies without row level
/// security, and for tables with a `tenant_id`: no tenant policy, a nullable
/// column, no index; partitions that escape their parent's policies.
async fn tables(client: &Client, findings: &mut Vec<Finding>) -> Result<()> {
    let rows = client
        .query(
            &format!(
                "SELECT c.oid::regclass::text, c.relrowsecurity, c.relkind = 'p',
                        (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid),
                        (SELECT array_agg(p.polname::text ORDER BY p.polname) FROM pg_policy p WHERE p.polrelid = c.oid),
                        a.attnum IS NOT NULL, coalesce(a.attnotnull, false),
                        EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid
                                AND (pg_get_expr(p.polqual, p.polrelid) LIKE '%tenant_id%'
                                     OR pg_get_expr(p.polwithcheck, p.polrelid) LIKE '%tenant_id%')),
                        EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisvalid
                                AND i.indkey[0] = a.attnum),
                        c.relispartition,
                        (SELECT pc.relrowsecurity FROM pg_inherits h JOIN pg_class pc ON pc.oid = h.inhparent
                          WHERE h.inhrelid = c.oid LIMIT 1),
                        n.nspname::text || '.' || c.relname::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
                 WHERE c.relkind IN ('r', 'p') AND {SYSTEM_SCHEMAS}
                   AND n.nspname NOT IN ('tenancy', 'tenancy_private')
                 ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(sql("reading tables"))?;
    // The tables whose tenant_id `ficus db apply` added: until they are
    // enforced, having no policy is the plan's next step, not a hole someone
    // left (the isolation policy is made when row level security goes on).
    let prepared: BTreeSet<String> = if client
        .query_one(
            "SELECT to_regclass('tenancy_private.journal') IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql("looking for the journal"))?
        .get(0)
    {
        client
            .query(
                "SELECT substr(step, length('column:') + 1) FROM tenancy_private.journal WHERE step LIKE 'column:%'",
                &[],
            )
            .await
            .map_err(sql("reading the journal"))?
            .iter()
            .map(|r| r.get(0))
            .collect()
    } else {
        BTreeSet::new()
    };
    for r in rows {
        let table: String = r.get(0);
        let (rls, partitioned, npolicies): (bool, bool, i64) = (r.get(1), r.get(2), r.get(3));
        let policy_names: Vec<String> = r.get::<_, Option<Vec<String>>>(4).unwrap_or_default();
        let (has_tenant, not_null, tenant_policy, indexed): (bool, bool, bool, bool) =
            (r.get(5), r.get(6), r.get(7), r.get(8));
        let (is_partition, parent_rls): (bool, Option<bool>) = (r.get(9), r.get(10));
        if rls && npolicies == 0 {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "rls-without-policy",
                object: table.clone(),
                message: "row level security is on but no policy exists: every role it applies to sees no row and can write none".into(),
                fix: format!("create the policies the roles need (ficus db enforce makes {POLICY}), or ALTER TABLE {table} DISABLE ROW LEVEL SECURITY"),
            });
        }
        if !rls && npolicies > 0 {
            // Ficus's own isolation policy waits, inert, for `ficus db enforce`:
            // that is the plan, not a mistake.
            let ours = policy_names
                .iter()
                .all(|p| p == POLICY || p == PASSTHROUGH || p == SINGLE_TENANT);
            findings.push(Finding {
                severity: if ours {
                    Severity::Info
                } else {
                    Severity::Warning
                },
                check: "policy-without-rls",
                object: table.clone(),
                message: format!(
                    "policies exist ({}) but row level security is off, so they do nothing",
                    policy_names.join(", ")
                ),
                fix: if ours {
                    format!("ficus db enforce --table {table} when the table is ready")
                } else {
                    format!("ALTER TABLE {table} ENABLE ROW LEVEL SECURITY, or drop the policies")
                },
            });
        }
        if is_partition && parent_rls == Some(true) && !rls {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "partition-escapes-rls",
                object: table.clone(),
                message: "its partitioned parent has row level security, but a query naming this partition directly is not subject to the parent's policies".into(),
                fix: format!("REVOKE the tenant roles' privileges on {table}, or enable row level security and the same policies on it"),
            });
        }
        if !has_tenant || (is_partition && !partitioned && parent_rls.is_some()) {
            continue;
        }
        let key: String = r.get(11);
        if !tenant_policy && !rls && prepared.contains(&key) {
            findings.push(Finding {
                severity: Severity::Info,
                check: "tenant-table-not-enforced",
                object: table.clone(),
                message: "ficus db apply gave it a tenant_id; row level security is not enforced yet, so nothing keeps one tenant from another's rows".into(),
                fix: format!("ficus db enforce --table {key} when the table is ready (it needs tenant_roles in the plan)"),
            });
        } else if !tenant_policy {
            findings.push(Finding {
                severity: Severity::Error,
                check: "tenant-table-without-policy",
                object: table.clone(),
                message: "has a tenant_id but no policy filters on it: nothing in the database keeps one tenant from another's rows".into(),
                fix: "let ficus db enforce make the isolation policy (tenant_roles in the plan), or add a policy on tenant_id".into(),
            });
        }
        if !not_null {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "nullable-tenant-id",
                object: table.clone(),
                message: "tenant_id may be NULL: a row without a tenant belongs to nobody and no policy will ever show it".into(),
                fix: "finish ficus db apply (backfill, then tighten: CHECK … NOT VALID, VALIDATE, SET NOT NULL)".into(),
            });
        }
        if !indexed {
            findings.push(Finding {
                severity: Severity::Warning,
                check: "tenant-id-not-indexed",
                object: table.clone(),
                message: "no valid index starts with tenant_id: every policy check and tenant filter scans the table".into(),
                fix: format!("CREATE INDEX CONCURRENTLY ON {table} (tenant_id) (ficus db apply's index step)"),
            });
        }
    }
    Ok(())
}

/// Policies that call a non-immutable function outside a `(SELECT …)` (which
/// PostgreSQL then evaluates per row, not once per query), and roles that more
/// than one permissive policy applies to for the same command (PostgreSQL
/// evaluates them all and ORs them: slow, and easy to widen by accident).
async fn policies(client: &Client, findings: &mut Vec<Finding>) -> Result<()> {
    let rows = client
        .query(
            &format!(
                "SELECT c.oid::regclass::text, p.polname::text, p.polpermissive, p.polcmd::text,
                        CASE WHEN p.polroles = '{{0}}' THEN ARRAY['public']
                             ELSE (SELECT array_agg(r.rolname::text ORDER BY r.rolname) FROM pg_roles r WHERE r.oid = ANY (p.polroles)) END,
                        coalesce(pg_get_expr(p.polqual, p.polrelid), ''),
                        coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '')
                 FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE {SYSTEM_SCHEMAS}
                 ORDER BY 1, 2"
            ),
            &[],
        )
        .await
        .map_err(sql("reading policies"))?;
    let stable: BTreeSet<String> = client
        .query(
            "SELECT DISTINCT p.proname::text FROM pg_proc p WHERE p.provolatile <> 'i'
             UNION SELECT DISTINCT n.nspname || '.' || p.proname FROM pg_proc p
             JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.provolatile <> 'i'",
            &[],
        )
        .await
        .map_err(sql("reading function volatility"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // (table, role, command) → permissive policies.
    let mut permissive: BTreeMap<(String, String, char), Vec<String>> = BTreeMap::new();
    for r in rows {
        let (table, name, is_permissive, cmd): (String, String, bool, String) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let roles: Vec<String> = r.get::<_, Option<Vec<String>>>(4).unwrap_or_default();
        let (using, check): (String, String) = (r.get(5), r.get(6));
        let per_row: BTreeSet<String> = per_row_calls(&using)
            .into_iter()
            .chain(per_row_calls(&check))
            .filter(|f| stable.contains(f))
            .collect();
        if !per_row.is_empty() {
            let calls: Vec<String> = per_row.into_iter().map(|f| format!("{f}()")).collect();
            findings.push(Finding {
                severity: Severity::Warning,
                check: "policy-calls-per-row",
                object: format!("{name} on {table}"),
                message: format!(
                    "calls {} for every row it checks instead of once per query",
                    calls.join(", ")
                ),
                fix: format!(
                    "wrap each call in a scalar subquery: … = (SELECT {}) — PostgreSQL then evaluates it once and can use an index",
                    calls[0]
                ),
            });
        }
        if is_permissive {
            let cmd = cmd.chars().next().unwrap_or('*');
            let commands: &[char] = if cmd == '*' {
                &['r', 'a', 'w', 'd']
            } else {
                std::slice::from_ref(&cmd)
            };
            for role in &roles {
                for c in commands {
                    permissive
                        .entry((table.clone(), role.clone(), *c))
                        .or_default()
                        .push(name.clone());
                }
            }
        }
    }
    // One finding per table and role, naming the policies and the commands
    // concerned.
    type Overlap = (BTreeSet<String>, Vec<&'static str>);
    let mut several: BTreeMap<(String, String), Overlap> = BTreeMap::new();
    for ((table, role, cmd), names) in &permissive {
        if names.len() > 1 {
            let entry = several.entry((table.clone(), role.clone())).or_default();
            entry.0.extend(names.iter().cloned());
            entry.1.push(match cmd {
                'r' => "SELECT",
                'a' => "INSERT",
                'w' => "UPDATE",
                _ => "DELETE",
            });
        }
    }
    for ((table, role), (names, commands)) in several {
        let names: Vec<String> = names.into_iter().collect();
        findings.push(Finding {
            severity: Severity::Warning,
            check: "several-permissive-policies",
            object: table.clone(),
            message: format!(
                "role {role} has {} permissive policies for {} ({}): they are ORed, so the widest one wins",
                names.len(),
                commands.join(", "),
                names.join(", ")
            ),
            fix: "merge them into one policy per role and command, or make the extra ones AS RESTRICTIVE".into(),
        });
    }
    Ok(())
}

/// Function names called in `expr` outside any `(SELECT …)`.
fn per_row_calls(expr: &str) -> Vec<String> {
    // Blank out every parenthesised scalar subquery: what is inside runs once.
    let bytes = expr.as_bytes();
    let mut keep = vec![true; bytes.len()];
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'(' && expr[i + 1..].trim_start().starts_with("SELECT ") {
            let mut depth = 0usize;
            let mut j = i;
            while j < bytes.len() {
                match bytes[j] {
                    b'(' => depth += 1,
                    b')' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            for k in keep.iter_mut().take((j + 1).min(bytes.len())).skip(i) {
                *k = false;
            }
            i = j + 1;
        } else {
            i += 1;
        }
    }
    let outside: String = expr
        .char_indices()
        .map(|(i, c)| if keep[i] { c } else { ' ' })
        .collect();
    // A name followed by "(" is a call; string literals are skipped.
    let mut calls = Vec::new();
    let mut name = String::new();
    let mut in_string = false;
    for c in outside.chars() {
        if in_string {
            in_string = c != '\'';
            continue;
        }
        match c {
            '\'' => {
                in_string = true;
                name.clear();
            }
            c if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '"' => name.push(c),
            '(' if !name.is_empty() => {
                calls.push(name.replace('"', ""));
                name.clear();
            }
            _ => name.clear(),
        }
    }
    calls
}

/// Roles that bypass row level security and hold privileges on this
/// database's tables that have it on.
async fn bypass_roles(client: &Client, findings: &mut Vec<Finding>) -> Result<()> {
    let rows = client
        .query(
            &format!(
                "SELECT r.rolname::text, array_agg(DISTINCT c.oid::regclass::text ORDER BY c.oid::regclass::text)
                 FROM pg_roles r
                 JOIN pg_class c ON c.relrowsecurity AND c.relkind IN ('r', 'p')
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE r.rolbypassrls AND NOT r.rolsuper AND r.rolname NOT LIKE 'pg\\_%'
                   AND {SYSTEM_SCHEMAS}
                   AND (c.relowner = r.oid OR EXISTS (
                        SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = r.oid))
                 GROUP BY r.rolname ORDER BY 1"
            ),
            &[],
        )
        .await
        .map_err(sql("reading roles"))?;
    for r in rows {
        let (role, tables): (String, Vec<String>) = (r.get(0), r.get(1));
        findings.push(Finding {
            severity: Severity::Warning,
            check: "role-bypasses-rls",
            object: role.clone(),
            message: format!(
                "has BYPASSRLS and privileges on tables with row level security ({}): it sees every tenant's rows",
                tables.join(", ")
            ),
            fix: format!("ALTER ROLE {role} NOBYPASSRLS, unless it is a migration or maintenance role that must see everything"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::per_row_calls;

    fn check(expr: &str, expect: &[&str]) {
        assert_eq!(per_row_calls(expr), expect, "{expr}");
    }

    #[test]
    fn calls_outside_a_scalar_subquery_are_per_row() {
        check(
            "(tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))",
            &[],
        );
        check(
            "(tenant_id = (SELECT tenancy_private.current_tenant_id() AS current_tenant_id))",
            &[],
        );
        check(
            "(tenant_id = tenancy_private.current_tenant_id())",
            &["tenancy_private.current_tenant_id"],
        );
        check(
            "((tenant_id)::text = current_setting('app.tenant'::text, true))",
            &["current_setting"],
        );
        check("(owner = 'f(x)'::text)", &[]);
        check(
            "(\"Tenant\".\"Helper\"(a) AND (SELECT now()) > created_at)",
            &["Tenant.Helper"],
        );
    }
}
