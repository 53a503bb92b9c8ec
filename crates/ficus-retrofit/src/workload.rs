//! A workload derived from the catalogs, standing in for the live application
//! on a schema nobody here wrote: per table, insert a row that honours its keys,
//! foreign keys, checks and defaults, read it back by its position, update a
//! column of it and of an existing row; per view, read a row. Each table's
//! statements run in one transaction that is always rolled back, so the
//! workload leaves no trace and can run as any role, at any step, for as long
//! as needed, while every error an application would see still surfaces (a
//! default it may not evaluate, a policy that hides its rows or refuses its
//! writes, a view it may no longer read).
//!
//! A new row is a copy of an existing one (so foreign keys and checks hold),
//! with fresh values for its single-column unique keys that have no default.
//! When a unique key cannot be made fresh that way (a key made of foreign keys,
//! as in a link table), the existing row is deleted and inserted again inside
//! the rolled-back transaction, provided nothing references the table. A table
//! with no row, or whose new row cannot be derived, is reported as skipped.

use tokio_postgres::Client;

use crate::ident::{Table, quote};
use crate::{Result, describe, sql};

/// One column, as the insert needs to know it.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    /// `format_type`, for the casts of fresh values.
    sql_type: String,
    /// Left to its default (an identity, a sequence, a generated column), or
    /// never written by the app (`tenant_id`).
    omitted: bool,
    /// Needs a fresh value: the one column of a unique key, without a default.
    fresh: bool,
}

/// How a table gets its new row.
#[derive(Debug, Clone)]
enum Insert {
    /// The statement: `INSERT … SELECT` a copy of one row with fresh unique
    /// values, or, where nothing references the table, one that deletes a row
    /// and inserts it again. Either returns the new row's position.
    Statement(String),
    /// No way found; the reason.
    Skip(String),
}

#[derive(Debug, Clone)]
struct TableWork {
    table: Table,
    insert: Insert,
    /// A column to `SET c = c`: not part of a key, not generated.
    update: Option<String>,
    /// What the role running it may do (all, until [`Workload::as_allowed`]).
    may_insert: bool,
    may_update: bool,
}

/// The workload of one database.
#[derive(Debug, Clone)]
pub struct Workload {
    tables: Vec<TableWork>,
    views: Vec<Table>,
}

/// A statement of the workload that failed, or saw a different row count.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Failure {
    pub role: String,
    pub object: String,
    pub statement: &'static str,
    pub error: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}: {}",
            self.role, self.statement, self.object, self.error
        )
    }
}

/// A fresh value of a column's type, or `None` when there is no general one.
fn fresh_value(table: &Table, c: &Column) -> Option<String> {
    let col = quote(&c.name);
    let ty = c.sql_type.as_str();
    let numeric = [
        "smallint",
        "integer",
        "bigint",
        "numeric",
        "real",
        "double precision",
    ];
    if numeric.iter().any(|n| ty.starts_with(n)) {
        return Some(format!(
            "(SELECT coalesce(max({col}), 0) + 1 FROM {})::{ty}",
            table.sql()
        ));
    }
    if ty == "uuid" {
        return Some("gen_random_uuid()".into());
    }
    if ty == "date" {
        return Some(format!(
            "(SELECT coalesce(max({col}), current_date) + 1 FROM {})",
            table.sql()
        ));
    }
    if ty.starts_with("timestamp") {
        return Some(format!(
            "(SELECT coalesce(max({col}), now()) + interval '1 second' FROM {})::{ty}",
            table.sql()
        ));
    }
    if ty == "text" || ty.starts_with("character") {
        // A varchar(n) or char(n) takes at most n characters.
        let limit = ty
            .split_once('(')
            .and_then(|(_, n)| n.trim_end_matches(')').parse::<usize>().ok())
            .unwrap_or(32)
            .min(32);
        return Some(format!("left(md5(random()::text), {limit})::{ty}"));
    }
    None
}

impl Workload {
    /// Derives the workload of `tables` and `views` from the catalogs.
    pub async fn derive(client: &Client, tables: &[Table], views: &[Table]) -> Result<Workload> {
        let mut out = Vec::new();
        for t in tables {
            out.push(derive_table(client, t).await?);
        }
        Ok(Workload {
            tables: out,
            views: views.to_vec(),
        })
    }

    /// The part of the workload `role` may run today: the tables it may insert
    /// into or update (and read), the views it may read, less `except`. Taken
    /// before a change, it is what the role must still be able to do after it.
    pub async fn as_allowed(
        &self,
        client: &Client,
        role: &str,
        except: &[Table],
    ) -> Result<Workload> {
        let may = |object: String, privilege: &'static str| async move {
            client
                .query_one(
                    "SELECT has_table_privilege($1, to_regclass($2), $3)",
                    &[&role, &object, &privilege],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .map_err(sql(format!("reading {role}'s privileges on {object}")))
        };
        let mut tables = Vec::new();
        for t in &self.tables {
            let name = t.table.sql();
            if except.contains(&t.table) || !may(name.clone(), "SELECT").await? {
                continue;
            }
            let (insert, update) = (
                may(name.clone(), "INSERT").await?,
                may(name, "UPDATE").await?,
            );
            if insert || update {
                tables.push(TableWork {
                    may_insert: insert,
                    may_update: update,
                    ..t.clone()
                });
            }
        }
        let mut views = Vec::new();
        for v in &self.views {
            if !except.contains(v) && may(v.sql(), "SELECT").await? {
                views.push(v.clone());
            }
        }
        Ok(Workload { tables, views })
    }

    /// The tables the workload cannot insert into, each with why.
    pub fn skipped(&self) -> Vec<String> {
        self.tables
            .iter()
            .filter_map(|t| match &t.insert {
                Insert::Skip(why) => Some(format!("{}: {why}", t.table)),
                _ => None,
            })
            .collect()
    }

    /// One round as the role `client` is connected as: every table, then every
    /// view. Nothing it does is committed.
    pub async fn round(&self, client: &Client, role: &str) -> Vec<Failure> {
        let mut failures = Vec::new();
        let fail = |object: &Table, statement: &'static str, error: String| Failure {
            role: role.to_string(),
            object: object.to_string(),
            statement,
            error,
        };
        for t in &self.tables {
            if let Err(f) = table_round(client, t).await {
                let (statement, error) = f;
                failures.push(fail(&t.table, statement, error));
            }
            let _ = client.batch_execute("ROLLBACK").await;
        }
        failures.extend(self.read_views(client, role).await);
        failures
    }

    /// One read of every view, as a role that only reads them would.
    pub async fn read_views(&self, client: &Client, role: &str) -> Vec<Failure> {
        let mut failures = Vec::new();
        for v in &self.views {
            if let Err(e) = client
                .query(&format!("SELECT * FROM {} LIMIT 1", v.sql()), &[])
                .await
            {
                failures.push(Failure {
                    role: role.to_string(),
                    object: v.to_string(),
                    statement: "SELECT",
                    error: describe(&e),
                });
            }
        }
        failures
    }
}

/// One table's statements in a transaction the caller rolls back.
async fn table_round(
    client: &Client,
    t: &TableWork,
) -> std::result::Result<(), (&'static str, String)> {
    let err = |statement: &'static str| move |e: tokio_postgres::Error| (statement, describe(&e));
    client.batch_execute("BEGIN").await.map_err(err("BEGIN"))?;
    let table = t.table.sql();
    // An existing row, updated in place.
    if let Some(c) = t.update.as_ref().filter(|_| t.may_update) {
        let c = quote(c);
        client
            .execute(
                &format!(
                    "UPDATE {table} SET {c} = {c} WHERE ctid = (SELECT ctid FROM {table} LIMIT 1)"
                ),
                &[],
            )
            .await
            .map_err(err("UPDATE"))?;
    }
    let insert = match &t.insert {
        _ if !t.may_insert => return Ok(()),
        Insert::Skip(_) => return Ok(()),
        Insert::Statement(sql) => sql,
    };
    let rows = client
        .query(insert.as_str(), &[])
        .await
        .map_err(err("INSERT"))?;
    let Some(row) = rows.first() else {
        // No row to copy (every row is invisible to this role, or the table is
        // empty): an application reading nothing is not an error here.
        return Ok(());
    };
    let (rel, ctid): (String, String) = (row.get(0), row.get(1));
    let seen: i64 = client
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE tableoid = $1::text::regclass AND ctid = $2::text::tid"),
            &[&rel, &ctid],
        )
        .await
        .map_err(err("SELECT"))?
        .get(0);
    if seen != 1 {
        return Err((
            "SELECT",
            format!("saw its new row {seen} times instead of once"),
        ));
    }
    if let Some(c) = t.update.as_ref().filter(|_| t.may_update) {
        let c = quote(c);
        let n = client
            .execute(
                &format!(
                    "UPDATE {table} SET {c} = {c} WHERE tableoid = $1::text::regclass AND ctid = $2::text::tid"
                ),
                &[&rel, &ctid],
            )
            .await
            .map_err(err("UPDATE"))?;
        if n != 1 {
            return Err((
                "UPDATE",
                format!("updated {n} rows of its new row instead of 1"),
            ));
        }
    }
    Ok(())
}

async fn derive_table(client: &Client, t: &Table) -> Result<TableWork> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                    a.attidentity <> '' OR a.attgenerated <> '' OR a.attname = 'tenant_id'
                      OR (d.adbin IS NOT NULL AND pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%'),
                    d.adbin IS NOT NULL,
                    EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = a.attrelid AND c.contype IN ('p', 'u')
                            AND c.conkey = ARRAY[a.attnum]),
                    EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = a.attrelid AND c.contype IN ('p', 'u')
                            AND a.attnum = ANY (c.conkey)),
                    a.attgenerated <> ''
             FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&t.sql()],
        )
        .await
        .map_err(sql(format!("reading the columns of {t}")))?;
    let mut columns = Vec::new();
    let mut update = None;
    for r in &rows {
        let name: String = r.get(0);
        let (omitted, has_default, single_key, in_key, generated): (bool, bool, bool, bool, bool) =
            (r.get(2), r.get(3), r.get(4), r.get(5), r.get(6));
        if update.is_none() && !in_key && !generated && name != "tenant_id" {
            update = Some(name.clone());
        }
        columns.push(Column {
            sql_type: r.get(1),
            omitted,
            fresh: single_key && !omitted && !has_default,
            name,
        });
    }
    // Unique keys of several columns: a copy would collide with its original
    // unless one of its columns is fresh. A column with a default (a serial
    // beside a date, as in a partitioned table's key) already is; otherwise the
    // first column outside every foreign key that can take a fresh value.
    let keys: Vec<Vec<String>> = client
        .query(
            "SELECT ARRAY(SELECT a.attname::text FROM unnest(c.conkey) WITH ORDINALITY k(n, o)
                          JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n ORDER BY k.o)
             FROM pg_constraint c WHERE c.conrelid = to_regclass($1) AND c.contype IN ('p', 'u')
               AND cardinality(c.conkey) > 1",
            &[&t.sql()],
        )
        .await
        .map_err(sql(format!("reading the keys of {t}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let in_fk: Vec<String> = client
        .query(
            "SELECT DISTINCT a.attname::text FROM pg_constraint c
             JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = ANY (c.conkey)
             WHERE c.conrelid = to_regclass($1) AND c.contype = 'f'",
            &[&t.sql()],
        )
        .await
        .map_err(sql(format!("reading the foreign keys of {t}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut multi_keys = 0;
    for key in &keys {
        let covered = key.iter().any(|k| {
            columns
                .iter()
                .any(|c| &c.name == k && (c.omitted || c.fresh))
        });
        if covered {
            continue;
        }
        let pick = columns.iter().position(|c| {
            key.contains(&c.name) && !in_fk.contains(&c.name) && fresh_value(t, c).is_some()
        });
        match pick {
            Some(i) => columns[i].fresh = true,
            None => multi_keys += 1,
        }
    }
    let referenced: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE confrelid = to_regclass($1) AND contype = 'f')",
            &[&t.sql()],
        )
        .await
        .map_err(sql(format!("reading the foreign keys of {t}")))?
        .get(0);
    let written: Vec<&Column> = columns.iter().filter(|c| !c.omitted).collect();
    let names: Vec<String> = written.iter().map(|c| quote(&c.name)).collect();
    let returning = "RETURNING tableoid::regclass::text, ctid::text";
    let table = t.sql();
    let insert = if written.is_empty() {
        Insert::Statement(format!("INSERT INTO {table} DEFAULT VALUES {returning}"))
    } else if multi_keys == 0 {
        let mut values = Vec::new();
        let mut missing = None;
        for c in &written {
            if c.fresh {
                match fresh_value(t, c) {
                    Some(v) => values.push(v),
                    None => {
                        missing = Some(format!(
                            "no fresh value of type {} for its unique column {}",
                            c.sql_type, c.name
                        ));
                        break;
                    }
                }
            } else {
                values.push(quote(&c.name));
            }
        }
        match missing {
            Some(why) if referenced => Insert::Skip(why),
            Some(_) => reinsert(&table, &names, returning),
            None => Insert::Statement(format!(
                "INSERT INTO {table} ({}) SELECT {} FROM (SELECT * FROM {table} LIMIT 1) AS s {returning}",
                names.join(", "),
                values.join(", ")
            )),
        }
    } else if referenced {
        Insert::Skip("a unique key of several columns, and other tables reference it".to_string())
    } else {
        reinsert(&table, &names, returning)
    };
    Ok(TableWork {
        table: t.clone(),
        insert,
        update,
        may_insert: true,
        may_update: true,
    })
}

/// Deletes one row and inserts it again, in one statement.
fn reinsert(table: &str, names: &[String], returning: &str) -> Insert {
    let cols = names.join(", ");
    Insert::Statement(format!(
        "WITH gone AS (DELETE FROM {table} WHERE ctid = (SELECT ctid FROM {table} LIMIT 1) RETURNING {cols})
         INSERT INTO {table} ({cols}) SELECT {cols} FROM gone {returning}"
    ))
}
