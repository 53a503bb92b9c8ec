//! `ficus db distribute apply` and `revert`: the decisions of `distribute
//! plan` carried out online, step by step, under the same rules as `ficus db
//! apply` (lock timeout, retries naming the holder, one migrator at a time).
//!
//! The steps, in order:
//! 1. *widen*: each unique key without the distribution column gets a twin
//!    that leads with it and is otherwise the same (the server's own
//!    deparse of the key, so operator classes, orderings, INCLUDE and NULLS
//!    NOT DISTINCT stay), built concurrently (reads and writes go on);
//! 2. *drop-fk*: every foreign key touching a table Citus will manage is
//!    dropped (Citus distributes a table concurrently only when no regular
//!    table points into it); the definition is kept to restore it;
//! 3. *swap*: each narrow key is replaced by its twin in one short lock
//!    (`ADD PRIMARY KEY USING INDEX`, `ADD UNIQUE USING INDEX`, deferrable
//!    as before);
//! 4. *helpers*: `default_tenant_id()` becomes a function that reads no table
//!    (tenant zero, as the settings hold it now, written into its body), since
//!    a worker's policy cannot read a coordinator table, in the language it
//!    was written in (see [`default_tenant_swap`]), and both helpers are
//!    created on every node (`create_distributed_function`);
//! 5. *policy*: Ficus's policies lose their scalar subquery, which Citus
//!    refuses on distributed tables (the helpers read no table, so a worker
//!    can evaluate them; `current_tenant_id()`, in SQL, is inlined);
//! 6. *tenant-context*: `citus.propagate_set_commands = 'local'` for the
//!    database, so a session's `SET LOCAL ficus.tenant_id` reaches the workers;
//! 7. *reference*, then *distribute*: `create_reference_table`, then
//!    `create_distributed_table_concurrently` in foreign-key order, co-located
//!    with `tenancy.units`;
//! 8. *fk*: the foreign keys come back, widened to pair the distribution
//!    columns, `NOT VALID` then `VALIDATE` (writes go on); those from shared or
//!    excluded tables into distributed ones cannot, and stay dropped until
//!    `revert`.
//!
//! Between steps 2 and 8 the foreign keys are not enforced; a row written in
//! that window that breaks one stops the `VALIDATE`, naming the key. The steps
//! are computed once, from the catalogs as they were, and stored in
//! `tenancy_private.distribution` with each one's undo: a second run resumes
//! them, and `revert` undoes the done ones in reverse from what was stored,
//! not from catalogs that the steps have changed.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

use super::{Decision, Distribution, Facts, Placement, UniqueKey, anchor};
use crate::apply::{Event, Options, lock, relation_exists, run_statement, unlock};
use crate::ident::{Table, literal, quote};
use crate::plan::{Hazard, IdType, Plan, Statement, Step, StepKind, TenantContext, stmt};
use crate::{Error, Result, sql};

/// One step of the distribution, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    /// `distribute:widen:public.homes:homes_pkey`…
    pub id: String,
    pub table: Option<Table>,
    pub forward: Vec<Statement>,
    pub undo: Vec<Statement>,
    /// What it does, for the operator.
    pub note: String,
    /// What must hold before `revert` may undo this step, checked for every
    /// step before the first is undone, so that a revert that cannot finish
    /// does not start.
    #[serde(default)]
    pub undo_needs: Option<UndoNeeds>,
}

/// A condition of undoing a step: a query counting what stands in the way, and
/// what the refusal says when it counts more than none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoNeeds {
    pub query: String,
    pub refusal: String,
}

/// What the helpers' rewrite needs to know, read from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Helpers {
    /// Tenant zero, when the database is in single-tenant compatibility mode
    /// (rows written with no tenant context are tenant zero's).
    pub single_tenant_zero: Option<String>,
    /// `pg_get_functiondef` of `tenancy_private.default_tenant_id()` now.
    pub default_tenant_id: String,
    /// The language it is written in now (`pg_language.lanname`), which its
    /// rewrite keeps: see [`default_tenant_swap`].
    pub default_tenant_language: String,
}

/// A name of at most 63 bytes, PostgreSQL's limit, cut on a char boundary.
fn ident_name(base: &str, suffix: &str) -> String {
    let mut keep = 63 - suffix.len();
    while !base.is_char_boundary(keep.min(base.len())) {
        keep -= 1;
    }
    format!("{}{suffix}", &base[..keep.min(base.len())])
}

fn cols(columns: &[String]) -> String {
    columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ")
}

fn concurrent(sql: String) -> Statement {
    Statement {
        sql,
        concurrent: true,
        done_if: None,
    }
}

fn unless(sql: String, done_if: String) -> Statement {
    Statement {
        sql,
        concurrent: false,
        done_if: Some(done_if),
    }
}

/// `schema.name` of a relation in `table`'s schema, as a SQL literal for
/// `to_regclass`.
fn regclass_literal(table: &Table, name: &str) -> String {
    literal(&format!("{}.{}", quote(&table.schema), quote(name)))
}

fn constraint_exists(table: &Table, name: &str) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = {}::regclass AND conname = {})",
        literal(&table.sql()),
        literal(name)
    )
}

fn distributed(table: &Table) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM pg_dist_partition WHERE logicalrelid = {}::regclass)",
        literal(&table.sql())
    )
}

/// A foreign key's actions as SQL; NO ACTION, the default, is left out.
/// (The plan refuses the actions Citus cannot keep on a distribution column.)
fn actions(on_delete: char, on_update: char) -> String {
    let word = |c: char| match c {
        'r' => Some("RESTRICT"),
        'c' => Some("CASCADE"),
        'n' => Some("SET NULL"),
        'd' => Some("SET DEFAULT"),
        _ => None,
    };
    let mut out = String::new();
    if let Some(w) = word(on_delete) {
        out.push_str(&format!(" ON DELETE {w}"));
    }
    if let Some(w) = word(on_update) {
        out.push_str(&format!(" ON UPDATE {w}"));
    }
    out
}

/// A policy expression without Ficus's scalar-subquery wrapper around its
/// helpers; `None` when a subquery is left.
fn unwrap_helpers(expression: &str) -> Option<String> {
    let mut out = expression.to_string();
    for helper in ["current_tenant_id", "default_tenant_id"] {
        out = out.replace(
            &format!("( SELECT tenancy_private.{helper}() AS {helper})"),
            &format!("tenancy_private.{helper}()"),
        );
    }
    (!out.to_ascii_uppercase().contains("SELECT ")).then_some(out)
}

/// The rewrite of `tenancy_private.default_tenant_id()` (step 4) and its
/// undo, each a list of statements run in order.
///
/// The rewrite reads no table, so it needs no rights of its own and runs
/// with its caller's (the hidden-helper rule is for helpers that read
/// protected data); it is written in the language the helper is written in
/// now. Both are for the sessions calling the helper meanwhile: PostgreSQL
/// looks up a function's language handler, whether it runs as its owner, and
/// the body it runs in separate catalog reads, and a session that takes in a
/// rewrite between them (a new session does, when it first reads
/// `pg_language`) mixes the two versions. A new body in the old language's
/// compiler is a syntax error; the retrofit's body, which reads the settings,
/// run with the rights of a caller who resolved the rewrite's `SECURITY
/// INVOKER`, is a permission error. So the undo first gives the rewrite's
/// body the retrofit's security (owner rights, its pinned settings), then
/// puts the retrofit's body back: a body that needs its owner's rights only
/// replaces a version that already runs as its owner. The rewrite may change
/// both at once, as its body needs no rights: a session that resolved either
/// version's security runs either body without an error.
/// Only SQL and PL/pgSQL are written; another language is refused by name.
pub fn default_tenant_swap(
    id_type: IdType,
    helpers: &Helpers,
) -> Result<(Vec<String>, Vec<String>)> {
    let language = helpers.default_tenant_language.as_str();
    let zero = helpers.single_tenant_zero.as_deref();
    let rewrite = default_tenant_function(id_type, zero, language, "SECURITY INVOKER")?;
    let security = security_of(&helpers.default_tenant_id);
    let mut undo = Vec::new();
    if security != "SECURITY INVOKER" {
        undo.push(default_tenant_function(id_type, zero, language, &security)?);
    }
    undo.push(helpers.default_tenant_id.clone());
    Ok((vec![rewrite], undo))
}

/// The security clauses of a `pg_get_functiondef` text: `SECURITY DEFINER`
/// or `SECURITY INVOKER`, then each `SET` line as the server wrote it.
fn security_of(functiondef: &str) -> String {
    let head = functiondef
        .split_once("\nAS ")
        .map_or(functiondef, |(head, _)| head);
    let mut out = if head.lines().any(|l| {
        l.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w == ["SECURITY", "DEFINER"])
    }) {
        "SECURITY DEFINER".to_string()
    } else {
        "SECURITY INVOKER".to_string()
    };
    for line in head
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("SET "))
    {
        out.push_str("\n    ");
        out.push_str(line);
    }
    out
}

/// `tenancy_private.default_tenant_id()` reading no table, in `language`,
/// with `security` (see [`default_tenant_swap`]).
fn default_tenant_function(
    id_type: IdType,
    zero: Option<&str>,
    language: &str,
    security: &str,
) -> Result<String> {
    let ty = id_type.sql();
    let value = match zero {
        Some(zero) => {
            let qualified = match id_type {
                IdType::Bigint => "pg_catalog.int8",
                IdType::Uuid => "pg_catalog.uuid",
            };
            format!(
                "COALESCE(tenancy_private.current_tenant_id(), {}::{qualified})",
                literal(zero)
            )
        }
        None => "tenancy_private.current_tenant_id()".to_string(),
    };
    let body = match language {
        "sql" => format!("SELECT {value}"),
        "plpgsql" => format!("BEGIN\n    RETURN {value};\nEND"),
        other => {
            return Err(Error::Refused(format!(
                "tenancy_private.default_tenant_id() is written in {other}; distribute apply rewrites it in place in its own language and knows only sql and plpgsql (a function whose language changes under running sessions fails their calls): rewrite it in sql or plpgsql first"
            )));
        }
    };
    Ok(format!(
        "CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() RETURNS {ty}
    LANGUAGE {language} STABLE PARALLEL SAFE {security}
AS $fn$
{body}
$fn$"
    ))
}

/// The steps, from the decisions and the catalogs' facts. Pure. Refuses a
/// distribution that needs the operator first.
pub fn steps(plan: &Plan, facts: &Facts, d: &Distribution, helpers: &Helpers) -> Result<Vec<Move>> {
    if plan.tenant_context == TenantContext::Member {
        return Err(Error::Refused(
            "the member tenant context reads tenancy.members on every query, which a worker's policy cannot do: distribute a database whose tenant context is the setting".into(),
        ));
    }
    if let Some((table, b)) = d.blockers().find(|(_, b)| !b.automatic) {
        let n = d.blockers().filter(|(_, b)| !b.automatic).count();
        return Err(Error::Refused(format!(
            "{n} blocker(s) need the operator's decision first (ficus db distribute plan lists them); the first: {table}: {} {}: {}",
            b.kind, b.object, b.fix
        )));
    }
    // Concurrent index builds and NOT VALID foreign keys are refused on a
    // partitioned table: its keys would have to be widened partition by
    // partition, which this does not do yet.
    if let Some(t) = d.tables.iter().find(|dec| {
        !matches!(dec.placement, Placement::Local)
            && facts.tables.get(&dec.table).is_some_and(|f| f.partitioned)
    }) {
        return Err(Error::Refused(format!(
            "{} is partitioned: distribute apply does not widen a partitioned table's keys online yet; distribute it by hand (create_distributed_table) or make it excluded in the plan",
            t.table
        )));
    }
    let placement = |t: &Table| -> Placement {
        d.tables
            .iter()
            .find(|x| x.table == *t)
            .map_or(Placement::Local, |x| x.placement.clone())
    };
    let column_of = |t: &Table| match placement(t) {
        Placement::Distributed { column, .. } => Some(column),
        _ => None,
    };
    let mut widen = Vec::new();
    let mut swap = Vec::new();
    // Keys first, so that the widened foreign keys find their targets.
    for dec in &d.tables {
        let Some(column) = column_of(&dec.table) else {
            continue;
        };
        if facts
            .tables
            .get(&dec.table)
            .is_some_and(|f| f.partition_of.is_some())
        {
            continue;
        }
        let Some(f) = facts.tables.get(&dec.table) else {
            continue;
        };
        for k in f.keys.iter().filter(|k| !k.columns.contains(&column)) {
            let (w, s) = widen_key(&dec.table, &column, k);
            widen.push(w);
            swap.push(s);
        }
    }
    let mut drop_fks = Vec::new();
    let mut add_fks = Vec::new();
    for (holder, f) in &facts.tables {
        if f.partition_of.is_some() {
            continue;
        }
        for fk in &f.foreign_keys {
            let mine = placement(holder);
            let theirs = placement(&fk.references);
            if matches!(mine, Placement::Local) && matches!(theirs, Placement::Local) {
                continue;
            }
            let original = fk.definition.trim_end_matches(" NOT VALID").to_string();
            drop_fks.push(Move {
                undo_needs: None,
                id: format!(
                    "distribute:drop-fk:{}:{}",
                    crate::plan::key(holder),
                    fk.name
                ),
                table: Some(holder.clone()),
                forward: vec![stmt(format!(
                    "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                    holder.sql(),
                    quote(&fk.name)
                ))],
                undo: add_foreign_key(holder, &fk.name, &original, fk.validated),
                note: format!(
                    "drop {} on {holder} until both ends are in Citus: {original}",
                    fk.name
                ),
            });
            let definition = match (&mine, &theirs) {
                (
                    Placement::Distributed { column, .. },
                    Placement::Distributed { column: other, .. },
                ) => {
                    let paired = fk
                        .columns
                        .iter()
                        .zip(&fk.referenced_columns)
                        .any(|(a, b)| a == column && b == other);
                    let (from, to) = if paired {
                        (fk.columns.clone(), fk.referenced_columns.clone())
                    } else {
                        (
                            std::iter::once(column.clone())
                                .chain(fk.columns.clone())
                                .collect(),
                            std::iter::once(other.clone())
                                .chain(fk.referenced_columns.clone())
                                .collect::<Vec<_>>(),
                        )
                    };
                    Some(format!(
                        "FOREIGN KEY ({}) REFERENCES {} ({}){}",
                        cols(&from),
                        fk.references.sql(),
                        cols(&to),
                        actions(fk.on_delete, fk.on_update)
                    ))
                }
                // Into a reference table, or between tables outside the
                // distribution's hash: as it was.
                (_, Placement::Reference) | (_, Placement::Local) => Some(original.clone()),
                // From a shared or excluded table into a distributed one:
                // Citus cannot enforce it.
                (_, Placement::Distributed { .. }) => None,
            };
            if let Some(definition) = definition {
                add_fks.push(Move {
                    undo_needs: None,
                    id: format!("distribute:fk:{}:{}", crate::plan::key(holder), fk.name),
                    table: Some(holder.clone()),
                    forward: add_foreign_key(holder, &fk.name, &definition, fk.validated),
                    undo: vec![stmt(format!(
                        "ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}",
                        holder.sql(),
                        quote(&fk.name)
                    ))],
                    note: format!("{} on {holder} again: {definition}, validated", fk.name),
                });
            }
        }
    }
    let mut policies = Vec::new();
    for dec in d
        .tables
        .iter()
        .filter(|d| !matches!(d.placement, Placement::Local))
    {
        let Some(f) = facts.tables.get(&dec.table) else {
            continue;
        };
        for p in f.policies.iter().filter(|p| p.subquery) {
            let rewrite = |e: &Option<String>| -> Result<Option<String>> {
                e.as_deref()
                    .map(|e| {
                        unwrap_helpers(e).ok_or_else(|| {
                            Error::Refused(format!(
                                "policy {} on {}: {e} keeps a subquery once the helpers are unwrapped; rewrite it by hand",
                                p.name, dec.table
                            ))
                        })
                    })
                    .transpose()
            };
            let clauses = |using: &Option<String>, check: &Option<String>| {
                let mut s = String::new();
                if let Some(u) = using {
                    s.push_str(&format!(" USING ({u})"));
                }
                if let Some(c) = check {
                    s.push_str(&format!(" WITH CHECK ({c})"));
                }
                s
            };
            let new = clauses(&rewrite(&p.using)?, &rewrite(&p.check)?);
            let old = clauses(&p.using, &p.check);
            let alter =
                |c: &str| format!("ALTER POLICY {} ON {}{c}", quote(&p.name), dec.table.sql());
            policies.push(Move {
                undo_needs: None,
                id: format!(
                    "distribute:policy:{}:{}",
                    crate::plan::key(&dec.table),
                    p.name
                ),
                table: Some(dec.table.clone()),
                forward: vec![stmt(alter(&new))],
                undo: vec![stmt(alter(&old))],
                note: format!(
                    "policy {} on {} calls its helper directly:{new}",
                    p.name, dec.table
                ),
            });
        }
    }
    let function_distributed = |signature: &str| {
        format!(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_dist_object WHERE classid = 'pg_proc'::regclass AND objid = {}::regprocedure)",
            literal(signature)
        )
    };
    let (rewrite, restore) = default_tenant_swap(plan.id_type, helpers)?;
    let helper_steps = Move {
        undo_needs: None,
        id: "distribute:helpers".into(),
        table: None,
        forward: rewrite
            .into_iter()
            .map(stmt)
            .chain([
            unless(
                "SELECT create_distributed_function('tenancy_private.current_tenant_id()')".into(),
                function_distributed("tenancy_private.current_tenant_id()"),
            ),
            unless(
                "SELECT create_distributed_function('tenancy_private.default_tenant_id()')".into(),
                function_distributed("tenancy_private.default_tenant_id()"),
            ),
        ])
            .collect(),
        // The functions stay known to Citus (it has no way to forget one);
        // the definition comes back everywhere.
        undo: restore.into_iter().map(stmt).collect(),
        note: match &helpers.single_tenant_zero {
            Some(zero) => format!(
                "default_tenant_id() reads no table (the transaction's tenant, else tenant zero {zero}); both helpers on every node"
            ),
            None => "default_tenant_id() reads no table (the transaction's tenant); both helpers on every node".into(),
        },
    };
    let context = Move {
        undo_needs: None,
        id: "distribute:tenant-context".into(),
        table: None,
        forward: vec![stmt(
            "DO $ctx$ BEGIN EXECUTE pg_catalog.format('ALTER DATABASE %I SET citus.propagate_set_commands = %L', pg_catalog.current_database(), 'local'); END $ctx$",
        )],
        undo: vec![stmt(
            "DO $ctx$ BEGIN EXECUTE pg_catalog.format('ALTER DATABASE %I RESET citus.propagate_set_commands', pg_catalog.current_database()); END $ctx$",
        )],
        note: "new sessions send SET LOCAL ficus.tenant_id to the workers (citus.propagate_set_commands = 'local' for the database)".into(),
    };
    let mut tables = Vec::new();
    for dec in &d.tables {
        if let Some(m) = place(dec, facts) {
            tables.push(m);
        }
    }
    let mut all = widen;
    all.extend(drop_fks.clone());
    all.extend(swap);
    all.push(helper_steps);
    all.extend(policies);
    all.push(context);
    all.extend(tables);
    all.extend(add_fks);
    Ok(all)
}

/// Adds a foreign key without blocking writes: `NOT VALID` (a moment's lock),
/// then `VALIDATE` (reads and writes go on), unless it was not valid before
/// (old rows may break it: it stays as the operator left it).
fn add_foreign_key(holder: &Table, name: &str, definition: &str, validate: bool) -> Vec<Statement> {
    let mut statements = vec![unless(
        format!(
            "ALTER TABLE {} ADD CONSTRAINT {} {definition} NOT VALID",
            holder.sql(),
            quote(name)
        ),
        constraint_exists(holder, name),
    )];
    if validate {
        statements.push(stmt(format!(
            "ALTER TABLE {} VALIDATE CONSTRAINT {}",
            holder.sql(),
            quote(name)
        )));
    }
    statements
}

/// The step that hands one table to Citus, if it goes.
fn place(dec: &Decision, facts: &Facts) -> Option<Move> {
    let t = &dec.table;
    if facts
        .tables
        .get(t)
        .is_some_and(|f| f.partition_of.is_some())
    {
        // Its parent takes it along.
        return None;
    }
    let undo = vec![unless(
        format!("SELECT undistribute_table({})", literal(&t.sql())),
        format!("SELECT NOT ({})", distributed(t)),
    )];
    match &dec.placement {
        Placement::Reference => Some(Move {
            undo_needs: None,
            id: format!("distribute:reference:{}", crate::plan::key(t)),
            table: Some(t.clone()),
            forward: vec![unless(
                format!("SELECT create_reference_table({})", literal(&t.sql())),
                distributed(t),
            )],
            undo,
            note: format!("{t} copied to every node (writes to it wait for the copy)"),
        }),
        Placement::Distributed {
            column,
            colocate_with,
        } => {
            let with = colocate_with
                .as_ref()
                .map_or_else(|| "none".to_string(), |w| w.sql());
            Some(Move {
                undo_needs: None,
                id: format!("distribute:table:{}", crate::plan::key(t)),
                table: Some(t.clone()),
                forward: vec![Statement {
                    done_if: Some(distributed(t)),
                    ..concurrent(format!(
                        "SELECT create_distributed_table_concurrently({}, {}, colocate_with => {})",
                        literal(&t.sql()),
                        literal(column),
                        literal(&with)
                    ))
                }],
                undo,
                note: format!(
                    "{t} distributed by {column} (co-located with {}), online: writes go on",
                    colocate_with.as_ref().unwrap_or(&anchor())
                ),
            })
        }
        Placement::Local => None,
    }
}

/// What `revert` needs before it narrows `k` again: no value of the narrow
/// key held by two rows, which tenants may have made since it was widened
/// (uniqueness per tenant). Nulls count as the key counts them. Equality is
/// the columns' default (`GROUP BY`), not the index's operator class or
/// collation: a key under a nondeterministic collation can still fail its
/// rebuild, named by the server then.
fn narrow_again(t: &Table, k: &UniqueKey) -> UndoNeeds {
    let filter = if k.nulls_not_distinct {
        String::new()
    } else {
        format!(
            " WHERE {}",
            k.columns
                .iter()
                .map(|c| format!("{} IS NOT NULL", quote(c)))
                .collect::<Vec<_>>()
                .join(" AND ")
        )
    };
    UndoNeeds {
        query: format!(
            "SELECT count(*) FROM (SELECT 1 FROM {}{filter} GROUP BY {} HAVING count(*) > 1) AS shared",
            t.sql(),
            cols(&k.columns)
        ),
        refusal: format!(
            "{} {} on {t} cannot be ({}) again",
            k.kind,
            k.name,
            k.columns.join(", ")
        ),
    }
}

/// The two steps that widen one key: its twin built concurrently, then the
/// swap in one short lock.
fn widen_key(t: &Table, column: &str, k: &UniqueKey) -> (Move, Move) {
    let wide = ident_name(&k.name, "_ficus_wide");
    let narrow = ident_name(&k.name, "_ficus_narrow");
    let wide_cols: Vec<String> = std::iter::once(column.to_string())
        .chain(k.columns.iter().cloned())
        .collect();
    let key = crate::plan::key(t);
    let build = Move {
        undo_needs: None,
        id: format!("distribute:widen:{key}:{}", k.name),
        table: Some(t.clone()),
        // The key as the server deparsed it, the distribution column put
        // first: operator classes, orderings, INCLUDE and NULLS NOT DISTINCT
        // stay as they were.
        forward: vec![concurrent(format!(
            "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} ({}, {}",
            quote(&wide),
            t.sql(),
            quote(&k.method),
            quote(column),
            k.columns_and_rest
        ))],
        undo: vec![concurrent(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
            quote(&t.schema),
            quote(&wide)
        ))],
        note: format!(
            "unique index {wide} on {t} ({}), built concurrently",
            wide_cols.join(", ")
        ),
    };
    let gone = |name: &str| format!("SELECT to_regclass({}) IS NULL", regclass_literal(t, name));
    let exists = |name: &str| {
        format!(
            "SELECT to_regclass({}) IS NOT NULL",
            regclass_literal(t, name)
        )
    };
    let swap = match k.kind {
        "primary key" | "unique constraint" => {
            let what = if k.kind == "primary key" {
                "PRIMARY KEY"
            } else {
                "UNIQUE"
            };
            let to = |index: &str| {
                format!(
                    "ALTER TABLE {} DROP CONSTRAINT {name}, ADD CONSTRAINT {name} {what} USING INDEX {}{}",
                    t.sql(),
                    quote(index),
                    k.deferrable,
                    name = quote(&k.name)
                )
            };
            Move {
                undo_needs: Some(narrow_again(t, k)),
                id: format!("distribute:swap:{key}:{}", k.name),
                table: Some(t.clone()),
                forward: vec![unless(to(&wide), gone(&wide))],
                undo: vec![
                    concurrent(format!(
                        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} ({}",
                        quote(&narrow),
                        t.sql(),
                        quote(&k.method),
                        k.columns_and_rest
                    )),
                    unless(to(&narrow), gone(&narrow)),
                ],
                note: format!(
                    "{} {} on {t} becomes ({})",
                    k.kind,
                    k.name,
                    wide_cols.join(", ")
                ),
            }
        }
        _ => {
            // A unique index that no constraint owns: the narrow one goes and
            // its twin takes its name.
            let rebuild = k.definition.replacen(
                "CREATE UNIQUE INDEX ",
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS ",
                1,
            );
            Move {
                undo_needs: Some(narrow_again(t, k)),
                id: format!("distribute:swap:{key}:{}", k.name),
                table: Some(t.clone()),
                forward: vec![
                    Statement {
                        done_if: Some(gone(&wide)),
                        ..concurrent(format!(
                            "DROP INDEX CONCURRENTLY IF EXISTS {}.{}",
                            quote(&t.schema),
                            quote(&k.name)
                        ))
                    },
                    unless(
                        format!(
                            "ALTER INDEX {}.{} RENAME TO {}",
                            quote(&t.schema),
                            quote(&wide),
                            quote(&k.name)
                        ),
                        gone(&wide),
                    ),
                ],
                undo: vec![
                    unless(
                        format!(
                            "ALTER INDEX {}.{} RENAME TO {}",
                            quote(&t.schema),
                            quote(&k.name),
                            quote(&wide)
                        ),
                        exists(&wide),
                    ),
                    concurrent(rebuild),
                ],
                note: format!(
                    "unique index {} on {t} becomes ({})",
                    k.name,
                    wide_cols.join(", ")
                ),
            }
        }
    };
    (build, swap)
}

const STORE: &str = "CREATE TABLE IF NOT EXISTS tenancy_private.distribution (
    position int PRIMARY KEY,
    id text NOT NULL UNIQUE,
    step text NOT NULL,
    started_at timestamptz,
    done_at timestamptz
)";

/// The stored steps and whether each is done; empty before the first run.
pub async fn stored(client: &Client) -> Result<Vec<(Move, bool)>> {
    read_steps(client, "done_at IS NOT NULL").await
}

/// The stored steps and whether each was begun: what a revert undoes. A step
/// killed half-way is undone too (every undo copes with a forward that ran in
/// part), or its half would be left behind.
pub async fn begun(client: &Client) -> Result<Vec<(Move, bool)>> {
    read_steps(client, "started_at IS NOT NULL OR done_at IS NOT NULL").await
}

async fn read_steps(client: &Client, flag: &str) -> Result<Vec<(Move, bool)>> {
    if !relation_exists(client, "tenancy_private.distribution").await? {
        return Ok(Vec::new());
    }
    client
        .query(
            &format!("SELECT step, {flag} FROM tenancy_private.distribution ORDER BY position"),
            &[],
        )
        .await
        .map_err(sql("reading the distribution's steps"))?
        .iter()
        .map(|r| {
            let text: String = r.get(0);
            serde_json::from_str(&text)
                .map(|m| (m, r.get(1)))
                .map_err(|e| {
                    Error::Refused(format!("a stored distribution step is unreadable: {e}"))
                })
        })
        .collect()
}

/// Reads what the helpers' rewrite needs.
pub async fn helpers(client: &Client) -> Result<Helpers> {
    let row = client
        .query_one(
            "SELECT (SELECT value FROM tenancy_private.settings WHERE key = 'tenant_zero'),
                    COALESCE((SELECT value FROM tenancy_private.settings WHERE key = 'single_tenant_mode'), 'off') = 'on',
                    pg_get_functiondef('tenancy_private.default_tenant_id()'::regprocedure),
                    (SELECT l.lanname::text FROM pg_catalog.pg_proc AS p JOIN pg_catalog.pg_language AS l ON l.oid = p.prolang
                     WHERE p.oid = 'tenancy_private.default_tenant_id()'::regprocedure)",
            &[],
        )
        .await
        .map_err(sql("reading the tenancy settings"))?;
    let zero: Option<String> = row.get(0);
    let single: bool = row.get(1);
    Ok(Helpers {
        single_tenant_zero: zero.filter(|_| single),
        default_tenant_id: row.get(2),
        default_tenant_language: row.get(3),
    })
}

/// Refuses a database Citus cannot take online: no coordinator in the
/// metadata, `wal_level` below logical, `synchronous_commit = off` (see
/// [`super::scale::require_durable_commits`]), a tenant-owned table whose
/// tenant_id may still be NULL.
async fn preflight(client: &Client, plan: &Plan) -> Result<()> {
    let coordinator: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_dist_node WHERE groupid = 0)",
            &[],
        )
        .await
        .map_err(sql("reading Citus's nodes"))?
        .get(0);
    if !coordinator {
        return Err(Error::Refused(
            "the coordinator is not in Citus's metadata, which online distribution needs: SELECT citus_set_coordinator_host('HOST', PORT) with the address the workers reach it at".into(),
        ));
    }
    let wal: String = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(sql("reading wal_level"))?
        .get(0);
    if wal != "logical" {
        return Err(Error::Refused(format!(
            "wal_level is {wal}: online distribution needs wal_level = logical on every node (postgresql.conf, then a restart)"
        )));
    }
    super::scale::require_durable_commits(client).await?;
    for t in plan.owned() {
        let table = Table::new(&t.schema, &t.name);
        let not_null: Option<bool> = client
            .query_opt(
                "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass($1) AND attname = 'tenant_id' AND NOT attisdropped",
                &[&table.sql()],
            )
            .await
            .map_err(sql(format!("reading {table}'s tenant_id")))?
            .map(|r| r.get(0));
        if not_null != Some(true) {
            return Err(Error::Refused(format!(
                "{table}: tenant_id may still be NULL, and Citus places every row by it: run ficus db apply --execute to its tighten step first"
            )));
        }
    }
    Ok(())
}

/// Runs a step's statements (its forward or its undo) in order, each under
/// the lock timeout with retries.
async fn run_all(
    client: &mut Client,
    m: &Move,
    statements: &[Statement],
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let step = as_step(m);
    for s in statements {
        run_statement(client, s, &step, opts, on_event).await?;
    }
    Ok(())
}

/// Journals a step as done (or, undone, as not done) and says so.
async fn record(
    client: &Client,
    m: &Move,
    done: bool,
    started: Instant,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    client
        .execute(
            "UPDATE tenancy_private.distribution
             SET done_at = CASE WHEN $2 THEN now() END, started_at = CASE WHEN $2 THEN started_at END
             WHERE id = $1",
            &[&m.id, &done],
        )
        .await
        .map_err(sql("journaling a distribution step"))?;
    on_event(&Event::Step {
        step: m.id.clone(),
        status: if done { "done" } else { "undone" },
        ms: started.elapsed().as_millis() as u64,
    });
    Ok(())
}

fn as_step(m: &Move) -> Step {
    Step {
        id: m.id.clone(),
        kind: StepKind::Distribute,
        table: m.table.clone(),
        forward: Vec::new(),
        undo: Vec::new(),
        lock: String::new(),
        hazard: Hazard::None,
        undo_hazard: Hazard::None,
        note: m.note.clone(),
    }
}

/// The steps to run: the stored ones when a run began before, else fresh
/// ones from the catalogs (checked first).
pub async fn planned(client: &Client, plan: &Plan) -> Result<Vec<(Move, bool)>> {
    super::status::require_citus(client).await?;
    let stored = stored(client).await?;
    if !stored.is_empty() {
        return Ok(stored);
    }
    preflight(client, plan).await?;
    let facts = super::read(client, plan).await?;
    let d = super::decide(plan, &facts);
    let h = helpers(client).await?;
    Ok(steps(plan, &facts, &d, &h)?
        .into_iter()
        .map(|m| (m, false))
        .collect())
}

/// Runs every step not yet done, storing them first. `url` is the
/// coordinator's, for the second session that keeps Citus's replication
/// roles able to write (see [`unblock_replication`]).
pub async fn apply(
    client: &mut Client,
    url: &str,
    plan: &Plan,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    lock(client).await?;
    let result = apply_locked(client, url, plan, opts, on_event).await;
    unlock(client).await;
    result
}

/// How often the second session looks for a new replication role: often,
/// since a small shard's copy (the time between Citus taking the role's
/// superuser away and its subscription starting to apply) can be shorter.
const UNBLOCK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// Consecutive failures of the second session that end the move (about 2 s).
const UNBLOCK_FAILURES: u32 = 40;

/// Lets the roles Citus makes for an online move's subscriptions write past
/// row level security, for as long as the move runs.
///
/// Citus moves a table's rows online with logical replication: on each
/// target node it makes a role (`citus_shard_split_subscription_role_…`,
/// `citus_shard_move_subscription_role_…`) as a member of the table's owner,
/// superuser only until its subscription exists. PostgreSQL's apply worker
/// refuses to write into a table whose row level security applies to its
/// role ("cannot replicate into relation with row-level security enabled"),
/// and with `FORCE ROW LEVEL SECURITY`, which the retrofit sets so that an
/// owner-run legacy app stays inside tenant zero, it applies to the owner's
/// members too. For a split (`create_distributed_table_concurrently`) the
/// subscription then retries every 5 seconds forever and the move never
/// finishes while the application writes (found by the distribution test: it
/// waited 17 minutes). For a shard move it is worse: Citus 13.2.2 finishes
/// the move anyway and the writes made during it are gone (reproduced with
/// pgbench and no Ficus: a table owner writing 100 rows a second under
/// `FORCE ROW LEVEL SECURITY`, 1,464 acknowledged rows lost over four moves;
/// and in the rebalance test, 267 saves in a row). `BYPASSRLS` for those
/// roles alone lets the rows through as they were written, and is less than
/// the superuser Citus made them with.
/// The roles are Citus's and dropped with the move. A role is touched only
/// once Citus has taken its superuser away (until then it bypasses row level
/// security anyway): altering it while Citus's own `ALTER ROLE … NOSUPERUSER`
/// runs fails one of the two with "tuple concurrently updated", and when it is
/// Citus's, the move fails (CI at 9e143e5, Northwind).
async fn unblock_replication(client: &Client) -> Result<()> {
    let failed = client
        .query(
            "SELECT nodename || ':' || nodeport, result FROM run_command_on_workers($cmd$
                DO $do$
                DECLARE r record;
                BEGIN
                    PERFORM pg_catalog.set_config('citus.enable_ddl_propagation', 'off', true);
                    FOR r IN SELECT rolname FROM pg_catalog.pg_roles
                             WHERE rolname ~ '^citus_shard_(split|move)_subscription_role_'
                               AND NOT rolsuper AND NOT rolbypassrls
                    LOOP
                        EXECUTE pg_catalog.format('ALTER ROLE %I BYPASSRLS', r.rolname);
                    END LOOP;
                END
                $do$
             $cmd$) WHERE NOT success",
            &[],
        )
        .await
        .map_err(sql(
            "letting Citus's replication roles past row level security",
        ))?;
    match failed.first() {
        None => Ok(()),
        Some(r) => Err(Error::Refused(format!(
            "node {}: cannot let Citus's replication roles past row level security ({}), so the move could never catch up; the role running ficus db must be a superuser on every node",
            r.get::<_, String>(0),
            r.get::<_, String>(1)
        ))),
    }
}

/// Runs one online move's statements while a second session keeps its
/// replication roles unblocked.
async fn run_online_move(
    client: &mut Client,
    url: &str,
    m: &Move,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let cancel = client.cancel_token();
    with_replication_unblocked(url, cancel, run_all(client, m, &m.forward, opts, on_event)).await
}

/// Runs `work` (an online move, or many: a rebalance) while a second session
/// lets Citus's replication roles past row level security (see
/// [`unblock_replication`]); `cancel` stops `work`'s query when that session
/// fails for good.
pub(crate) async fn with_replication_unblocked<T>(
    url: &str,
    cancel: tokio_postgres::CancelToken,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let watcher = crate::connect(url).await?;
    // The watcher only ever ends with an error; the move may wait for it
    // forever, so a failed watcher cancels the move rather than leave it
    // waiting for rows that can never arrive.
    // A single failure can be a race with Citus itself (it alters the same
    // role to NOSUPERUSER: "tuple concurrently updated"; or drops it when the
    // move ends); only a failure that lasts is the watcher's end.
    let watch = async {
        let mut failures = 0;
        loop {
            match unblock_replication(&watcher).await {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures += 1;
                    if failures >= UNBLOCK_FAILURES {
                        return e;
                    }
                }
            }
            tokio::time::sleep(UNBLOCK_EVERY).await;
        }
    };
    tokio::select! {
        done = work => done,
        failed = watch => {
            let _ = cancel.cancel_query(tokio_postgres::NoTls).await;
            Err(failed)
        }
    }
}

async fn apply_locked(
    client: &mut Client,
    url: &str,
    plan: &Plan,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let moves = planned(client, plan).await?;
    // All the steps or none: a run killed while storing them must not leave a
    // shorter list that a later run would take for the whole.
    let tx = client
        .transaction()
        .await
        .map_err(sql("storing the distribution's steps"))?;
    tx.batch_execute(STORE)
        .await
        .map_err(sql("making tenancy_private.distribution"))?;
    for (i, (m, _)) in moves.iter().enumerate() {
        let text = serde_json::to_string(m).expect("a step serializes");
        tx.execute(
            "INSERT INTO tenancy_private.distribution (position, id, step) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            &[&(i as i32), &m.id, &text],
        )
        .await
        .map_err(sql("storing the distribution's steps"))?;
    }
    tx.commit()
        .await
        .map_err(sql("storing the distribution's steps"))?;
    for (m, done) in &moves {
        if *done {
            on_event(&Event::Step {
                step: m.id.clone(),
                status: "already done",
                ms: 0,
            });
            continue;
        }
        let started = Instant::now();
        if m.id.starts_with("distribute:table:") || m.id.starts_with("distribute:reference:") {
            wait_for_fresh_sessions(client, plan, &m.id, on_event).await?;
        }
        client
            .execute(
                "UPDATE tenancy_private.distribution SET started_at = now() WHERE id = $1",
                &[&m.id],
            )
            .await
            .map_err(sql("journaling a distribution step"))?;
        if m.id.starts_with("distribute:table:") {
            run_online_move(client, url, m, opts, on_event).await?;
        } else {
            run_all(client, m, &m.forward, opts, on_event).await?;
        }
        record(client, m, true, started, on_event).await?;
    }
    // The coordinator's copies of the tables' rows, left by the concurrent
    // distribution for Citus to drop later, go now: nothing stale is left
    // behind for an operator to find.
    client
        .batch_execute("CALL citus_cleanup_orphaned_resources()")
        .await
        .map_err(sql("dropping what the moves left behind"))?;
    Ok(())
}

/// How long a run waits for the application to replace the tenant roles'
/// sessions that predate the tenant-context step.
const FRESH_SESSIONS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until no session of a tenant role began before the tenant-context
/// step, or refuses naming them. `citus.propagate_set_commands` is read when a
/// session starts: an older session's `SET LOCAL ficus.tenant_id` stays on the
/// coordinator, and once its tables are on the workers it would see none of
/// its rows and have every write refused by the policies' `WITH CHECK`.
async fn wait_for_fresh_sessions(
    client: &Client,
    plan: &Plan,
    step: &str,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let deadline = Instant::now() + FRESH_SESSIONS_WAIT;
    let mut attempt = 0;
    loop {
        let stale: Vec<String> = client
            .query(
                "SELECT a.pid::text || ' (' || a.usename || ', since ' || to_char(a.backend_start AT TIME ZONE 'UTC', 'HH24:MI:SS') || ')'
                 FROM pg_stat_activity a
                 WHERE a.usename = ANY($1)
                   AND a.backend_start < (SELECT done_at FROM tenancy_private.distribution WHERE id = 'distribute:tenant-context')
                 ORDER BY a.backend_start",
                &[&plan.tenant_roles],
            )
            .await
            .map_err(sql("looking for sessions older than the tenant context"))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let who = format!(
            "{} session(s) of the tenant roles opened before the tenant context reached the workers: {}",
            stale.len(),
            stale.join(", ")
        );
        if Instant::now() >= deadline {
            return Err(Error::Refused(format!(
                "{step}: {who}; recycle the application's connections (they must start after distribute:tenant-context), then run distribute apply again"
            )));
        }
        attempt += 1;
        on_event(&Event::Retry {
            step: step.to_string(),
            attempt,
            wait_ms: 500,
            blockers: who,
        });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Undoes the done steps in reverse, from what was stored; then forgets the
/// steps, so that a later `apply` plans afresh.
pub async fn revert(
    client: &mut Client,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    super::status::require_citus(client).await?;
    lock(client).await?;
    let result = revert_locked(client, opts, on_event).await;
    unlock(client).await;
    result
}

async fn revert_locked(
    client: &mut Client,
    opts: &Options,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<()> {
    let moves = begun(client).await?;
    // Every step's condition first: a revert that would stop halfway (the
    // tables back on the coordinator, a key that cannot be narrowed again)
    // does not start.
    for (m, _) in moves.iter().filter(|(_, begun)| *begun) {
        if let Some(standing) = undo_blocked(client, m).await? {
            return Err(Error::Refused(format!(
                "{standing}; nothing was undone: make them unique, or keep the database distributed"
            )));
        }
    }
    for (m, begun) in moves.iter().rev() {
        if !begun {
            continue;
        }
        // Again right before the step: the application kept writing while
        // the steps after it were undone (copying every table back takes a
        // while).
        if let Some(standing) = undo_blocked(client, m).await? {
            return Err(Error::Refused(format!(
                "{standing}; revert stopped before {}, the steps after it are undone: make them unique and run revert again to go on",
                m.id
            )));
        }
        let started = Instant::now();
        run_all(client, m, &m.undo, opts, on_event).await?;
        record(client, m, false, started, on_event).await?;
    }
    if !moves.is_empty() {
        client
            .batch_execute("DROP TABLE tenancy_private.distribution")
            .await
            .map_err(sql("forgetting the distribution's steps"))?;
    }
    Ok(())
}

/// What stands in the way of undoing `m`, said for the operator, or `None`.
/// Counted with row level security off, so that a migrator that owns a
/// `FORCE ROW LEVEL SECURITY` table counts every tenant's rows (a role that
/// row level security still binds gets an error instead of a short count).
async fn undo_blocked(client: &mut Client, m: &Move) -> Result<Option<String>> {
    let Some(needs) = &m.undo_needs else {
        return Ok(None);
    };
    let checking = || sql(format!("checking that {} can be undone", m.id));
    let tx = client.transaction().await.map_err(checking())?;
    tx.batch_execute("SET LOCAL row_security = off")
        .await
        .map_err(checking())?;
    let standing: i64 = tx
        .query_one(&needs.query, &[])
        .await
        .map_err(checking())?
        .get(0);
    tx.commit().await.map_err(checking())?;
    Ok((standing > 0).then(|| {
        format!(
            "{}: {standing} of its values are each held by more than one row now (tenants may share a value once the key is widened)",
            needs.refusal
        )
    }))
}

/// How many shards a one-tenant point query on each distributed tenant-owned
/// table reaches (Citus's `Task Count`), as `(table, tasks)`.
pub async fn routing(client: &Client, plan: &Plan) -> Result<Vec<(Table, i64)>> {
    let mut out = Vec::new();
    for t in plan.owned() {
        let table = Table::new(&t.schema, &t.name);
        let is_distributed: bool = client
            .query_one(&distributed(&table), &[])
            .await
            .map_err(sql(format!("reading {table}'s placement")))?
            .get(0);
        if !is_distributed {
            continue;
        }
        let rows = client
            .query(
                &format!(
                    "EXPLAIN SELECT * FROM {} WHERE tenant_id = {}::{}",
                    table.sql(),
                    literal(&plan.tenant_zero.id),
                    plan.id_type.sql()
                ),
                &[],
            )
            .await
            .map_err(sql(format!("explaining a point query on {table}")))?;
        let tasks = rows
            .iter()
            .filter_map(|r| {
                let line: String = r.get(0);
                line.trim()
                    .strip_prefix("Task Count: ")
                    .and_then(|n| n.parse::<i64>().ok())
            })
            .next()
            .unwrap_or(0);
        out.push((table, tasks));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    #[test]
    fn names_are_cut_to_postgres_limit_on_a_char_boundary() {
        let long = "é".repeat(40);
        let n = ident_name(&long, "_ficus_wide");
        assert!(n.len() <= 63, "{n}");
        assert!(n.ends_with("_ficus_wide"));
        assert_eq!(
            ident_name("homes_pkey", "_ficus_wide"),
            "homes_pkey_ficus_wide"
        );
    }

    #[test]
    fn ficus_policies_lose_their_subquery_and_others_are_refused() {
        assert_eq!(
            unwrap_helpers(
                "(tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))"
            )
            .as_deref(),
            Some("(tenant_id = tenancy_private.current_tenant_id())")
        );
        assert_eq!(
            unwrap_helpers("(EXISTS ( SELECT 1 FROM members m WHERE m.id = owner))"),
            None
        );
    }

    /// The rewritten `default_tenant_id()` is in the language the database
    /// has it in, and the undo gives it the retrofit's security before its
    /// body; a language Ficus cannot write is refused by name.
    #[test]
    fn the_default_tenant_helper_keeps_its_language_and_is_undone_security_first() {
        let check = |zero: Option<&str>, language: &str, now: &str, expect: Expect| {
            let helpers = Helpers {
                single_tenant_zero: zero.map(str::to_string),
                default_tenant_id: now.to_string(),
                default_tenant_language: language.to_string(),
            };
            let out = match default_tenant_swap(IdType::Bigint, &helpers) {
                Ok((rewrite, undo)) => format!(
                    "rewrite:\n{}\nundo:\n{}",
                    rewrite.join(";\n"),
                    undo.join(";\n")
                ),
                Err(e) => format!("error: {e}"),
            };
            expect.assert_eq(&out);
        };
        // As `pg_get_functiondef` shows the retrofit's helper.
        let retrofit = "CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id()\n RETURNS bigint\n LANGUAGE plpgsql\n STABLE SECURITY DEFINER\n SET search_path TO ''\nAS $function$\nBEGIN\n    RETURN NULL; -- SECURITY DEFINER\nEND\n$function$\n";
        check(
            Some("1"),
            "plpgsql",
            retrofit,
            expect![[r#"
            rewrite:
            CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() RETURNS bigint
                LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER
            AS $fn$
            BEGIN
                RETURN COALESCE(tenancy_private.current_tenant_id(), '1'::pg_catalog.int8);
            END
            $fn$
            undo:
            CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() RETURNS bigint
                LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
                SET search_path TO ''
            AS $fn$
            BEGIN
                RETURN COALESCE(tenancy_private.current_tenant_id(), '1'::pg_catalog.int8);
            END
            $fn$;
            CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id()
             RETURNS bigint
             LANGUAGE plpgsql
             STABLE SECURITY DEFINER
             SET search_path TO ''
            AS $function$
            BEGIN
                RETURN NULL; -- SECURITY DEFINER
            END
            $function$
        "#]],
        );
        let invoker = "CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id()\n RETURNS bigint\n LANGUAGE sql\n STABLE\nAS $function$ SELECT NULL::bigint $function$\n";
        check(
            None,
            "sql",
            invoker,
            expect![[r#"
            rewrite:
            CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() RETURNS bigint
                LANGUAGE sql STABLE PARALLEL SAFE SECURITY INVOKER
            AS $fn$
            SELECT tenancy_private.current_tenant_id()
            $fn$
            undo:
            CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id()
             RETURNS bigint
             LANGUAGE sql
             STABLE
            AS $function$ SELECT NULL::bigint $function$
        "#]],
        );
        check(
            None,
            "plv8",
            invoker,
            expect![
                "error: tenancy_private.default_tenant_id() is written in plv8; distribute apply rewrites it in place in its own language and knows only sql and plpgsql (a function whose language changes under running sessions fails their calls): rewrite it in sql or plpgsql first"
            ],
        );
    }
}
