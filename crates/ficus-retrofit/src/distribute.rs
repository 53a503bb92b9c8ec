//! `ficus db distribute plan`: what moving the retrofitted database onto Citus
//! takes, table by table, read from the catalogs and the retrofit's plan, and
//! changing nothing. `tenancy.organizations` becomes a reference table (a copy
//! on every node: a tenant's slug stays unique across the cluster and every
//! tenant-owned row's foreign key to its organization is still enforced);
//! `tenancy.units` is distributed by `organization_id` and anchors the
//! co-location group; every tenant-owned table is distributed by `tenant_id`,
//! co-located with it, so that a tenant's rows live together on one node; shared
//! tables become reference tables; excluded tables stay local to the
//! coordinator.
//!
//! For each table it lists every blocker Citus would refuse, in Citus's terms,
//! with the fix Ficus applies: keys without the distribution column, foreign keys
//! Citus cannot enforce across nodes, user triggers, policies with subqueries,
//! sequences narrower than bigint, partitioned tables; and the objects that must
//! be propagated to the workers (views, `SECURITY DEFINER` functions). Reading
//! is split from deciding: [`read`] gathers [`Facts`] from the catalogs,
//! [`decide`] is pure, so the decisions are tested without a server.

pub mod apply;
pub mod scale;
pub mod status;

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

use crate::ident::Table;
use crate::inspect::Class;
use crate::plan::Plan;
use crate::{Result, sql};

/// The spine's table, a reference table.
pub const ORGANIZATIONS: (&str, &str) = ("tenancy", "organizations");

/// The spine's other tables, distributed by `organization_id`; the first is
/// the co-location group's anchor.
pub const SPINE: [&str; 2] = ["units", "members"];

/// The table every distributed table is co-located with.
pub fn anchor() -> Table {
    Table::new(ORGANIZATIONS.0, SPINE[0])
}

/// A unique key: a primary key, a unique constraint or a unique index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UniqueKey {
    pub name: String,
    /// `primary key`, `unique constraint`, `exclusion constraint` or `unique
    /// index`. Its columns include an index's INCLUDE columns only as keys: a
    /// covering column never counts as the distribution column here, which is
    /// stricter than Citus.
    pub kind: &'static str,
    /// Its columns; an expression is `(expression)`.
    pub columns: Vec<String>,
    pub partial: bool,
    /// `pg_get_indexdef`: how to build it again.
    pub definition: String,
    /// The index's access method (`btree`).
    pub method: String,
    /// What `pg_get_indexdef` says after `USING <method> (`: the key columns
    /// with their operator classes, collations and orderings, then `INCLUDE`,
    /// `NULLS NOT DISTINCT` and storage parameters, as the server deparsed
    /// them. The widened twin is this with the distribution column put first,
    /// so that it differs from the key in nothing else. Empty when the
    /// definition did not read as expected; the key is then left to the
    /// operator.
    pub columns_and_rest: String,
    /// ` DEFERRABLE`, ` DEFERRABLE INITIALLY DEFERRED` or empty: when the
    /// constraint is checked, kept when it moves to the widened index.
    pub deferrable: &'static str,
    /// `NULLS NOT DISTINCT`: two rows with a null in the key collide.
    pub nulls_not_distinct: bool,
}

/// Whether Ficus widens `k` by itself: a key over plain columns, everywhere,
/// whose definition it could read (so the twin keeps everything but the added
/// column).
fn widens_alone(k: &UniqueKey) -> bool {
    !k.partial && !k.columns.iter().any(|c| c == "(expression)") && !k.columns_and_rest.is_empty()
}

/// A foreign key, from the table that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ForeignKey {
    pub name: String,
    pub columns: Vec<String>,
    pub references: Table,
    pub referenced_columns: Vec<String>,
    /// `pg_constraint.confdeltype`: a, r, c, n or d.
    pub on_delete: char,
    pub on_update: char,
    /// `pg_get_constraintdef`: how to add it again.
    pub definition: String,
    /// Validated (`convalidated`): not a key left `NOT VALID`.
    pub validated: bool,
}

/// A column's default drawn from a sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SequenceUse {
    pub column: String,
    pub column_type: String,
    pub sequence: String,
    /// `smallint`, `integer` or `bigint`.
    pub sequence_type: String,
}

/// A row level security policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub name: String,
    /// Its `USING` or `WITH CHECK` expression holds a subquery.
    pub subquery: bool,
    pub expression: String,
    /// Its `USING` expression, if any.
    pub using: Option<String>,
    /// Its `WITH CHECK` expression, if any.
    pub check: Option<String>,
}

/// What the catalogs say about one table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TableFacts {
    pub has_tenant_id: bool,
    pub keys: Vec<UniqueKey>,
    pub foreign_keys: Vec<ForeignKey>,
    /// User triggers (not the ones constraints make).
    pub triggers: Vec<String>,
    pub policies: Vec<Policy>,
    pub sequences: Vec<SequenceUse>,
    pub partitioned: bool,
    /// A partition of another table (distributed with its parent).
    pub partition_of: Option<Table>,
}

/// What the catalogs say, for every table in the plan and the spine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    pub tables: BTreeMap<Table, TableFacts>,
    /// `SECURITY DEFINER` functions and Ficus's helpers the policies call
    /// (their signatures): Citus does not follow a policy to the functions it
    /// calls, so each must be created on the workers.
    pub definer_functions: Vec<String>,
    /// Views that read a table in the plan.
    pub views: Vec<Table>,
}

/// What a table becomes in Citus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "as", rename_all = "kebab-case")]
pub enum Placement {
    /// `create_distributed_table(table, column, colocate_with => …)`.
    Distributed {
        column: String,
        colocate_with: Option<Table>,
    },
    /// `create_reference_table(table)`: a copy on every node.
    Reference,
    /// Stays on the coordinator only.
    Local,
}

/// Something Citus would refuse, and what Ficus does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Blocker {
    /// A stable name for the kind of blocker.
    pub kind: &'static str,
    /// The object it is about (a key, a foreign key, a trigger, a policy…).
    pub object: String,
    /// What Citus says, in its terms.
    pub citus: String,
    /// What Ficus will do (`distribute apply`), or what the operator must.
    pub fix: String,
    /// Ficus fixes it itself; otherwise the operator must decide.
    pub automatic: bool,
}

/// One table's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub table: Table,
    pub class: &'static str,
    pub placement: Placement,
    /// How `distribute apply` moves it.
    pub method: String,
    pub blockers: Vec<Blocker>,
}

/// The whole plan for review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Distribution {
    /// In the order `distribute apply` would distribute them: referenced
    /// tables before the tables that reference them.
    pub tables: Vec<Decision>,
    /// Objects Citus must be told about so the workers have them.
    pub propagate: Vec<String>,
}

impl Distribution {
    pub fn blockers(&self) -> impl Iterator<Item = (&Table, &Blocker)> {
        self.tables
            .iter()
            .flat_map(|d| d.blockers.iter().map(move |b| (&d.table, b)))
    }
}

/// Citus's words for a key without the distribution column
/// (`ErrorIfUnsupportedConstraint`), partial and expression keys included.
fn key_refused(table: &Table) -> String {
    format!(
        "cannot create constraint on \"{}\": Distributed relations cannot have UNIQUE, EXCLUDE, or PRIMARY KEY constraints that do not include the partition column (with an equality operator if EXCLUDE).",
        table.name
    )
}

fn col_list(cols: &[String]) -> String {
    cols.join(", ")
}

fn action(c: char) -> &'static str {
    match c {
        'a' => "NO ACTION",
        'r' => "RESTRICT",
        'c' => "CASCADE",
        'n' => "SET NULL",
        'd' => "SET DEFAULT",
        _ => "?",
    }
}

/// Decides what each table becomes and what stands in the way. Pure: the
/// plan's classes and the catalogs' facts in, decisions out.
pub fn decide(plan: &Plan, facts: &Facts) -> Distribution {
    let spine = Table::new(ORGANIZATIONS.0, ORGANIZATIONS.1);
    // What each table becomes, so foreign keys can be judged by both ends.
    let mut placement: BTreeMap<Table, (Placement, &'static str)> = BTreeMap::new();
    placement.insert(spine.clone(), (Placement::Reference, "spine"));
    let anchor = anchor();
    for name in SPINE {
        let table = Table::new(ORGANIZATIONS.0, name);
        let colocate_with = (table != anchor).then(|| anchor.clone());
        placement.insert(
            table,
            (
                Placement::Distributed {
                    column: "organization_id".into(),
                    colocate_with,
                },
                "spine",
            ),
        );
    }
    for t in &plan.tables {
        let table = Table::new(&t.schema, &t.name);
        let p = match t.class {
            Class::TenantOwned => Placement::Distributed {
                column: "tenant_id".into(),
                colocate_with: Some(anchor.clone()),
            },
            Class::Shared => Placement::Reference,
            Class::Excluded => Placement::Local,
        };
        placement.insert(table, (p, t.class.as_str()));
    }
    let distribution_column = |t: &Table| match placement.get(t) {
        Some((Placement::Distributed { column, .. }, _)) => Some(column.clone()),
        _ => None,
    };
    let mut decisions = Vec::new();
    // Foreign keys into each table, from whichever table holds them.
    let mut referenced_by: BTreeMap<&Table, Vec<&Table>> = BTreeMap::new();
    for (holder, f) in &facts.tables {
        for fk in &f.foreign_keys {
            if fk.references != *holder {
                referenced_by
                    .entry(&fk.references)
                    .or_default()
                    .push(holder);
            }
        }
    }
    for (table, (place, class)) in &placement {
        let f = facts.tables.get(table).cloned().unwrap_or_default();
        if let Some(parent) = &f.partition_of {
            // Its parent carries it: keys and foreign keys are the parent's
            // (a partition's own triggers are not judged here).
            let mut blockers = vec![Blocker {
                kind: "partition",
                object: format!("partition of {parent}"),
                citus: format!(
                    "cannot distribute relation \"{}\" which is partition of \"{}\"",
                    table.name, parent.name
                ),
                fix: format!("distributed with {parent}, co-located, by the same column"),
                automatic: true,
            }];
            if f.partitioned {
                blockers.push(Blocker {
                    kind: "multi-level-partitioning",
                    object: "a partition that is partitioned itself".to_string(),
                    citus: "distributing multi-level partitioned tables is not supported"
                        .to_string(),
                    fix: "flatten the partitioning to one level: the operator decides".to_string(),
                    automatic: false,
                });
            }
            decisions.push(Decision {
                table: table.clone(),
                class,
                placement: place.clone(),
                method: format!("with its parent {parent}"),
                blockers,
            });
            continue;
        }
        let mut blockers = Vec::new();
        let dist = distribution_column(table);
        if let Some(column) = &dist {
            for k in &f.keys {
                if !k.columns.iter().any(|c| c == column) {
                    let widened: Vec<String> = std::iter::once(column.clone())
                        .chain(k.columns.iter().cloned())
                        .collect();
                    blockers.push(Blocker {
                        kind: "key-without-distribution-column",
                        object: format!("{} {} ({})", k.kind, k.name, col_list(&k.columns)),
                        citus: key_refused(table),
                        fix: if k.kind == "exclusion constraint" {
                            format!("rebuild it by hand including {column} with the equality operator: an exclusion constraint is not widened automatically")
                        } else if !widens_alone(k) {
                            let why = if f.partitioned {
                                "a partitioned table's key is not widened automatically"
                            } else if k.columns_and_rest.is_empty() {
                                "its definition did not read as a unique index's"
                            } else {
                                "a partial or expression key is not widened automatically"
                            };
                            format!("rebuild it by hand including {column}: {why}")
                        } else if k.kind == "primary key" {
                            format!(
                                "build a unique index on ({}) concurrently, then swap the primary key to it (ADD PRIMARY KEY USING INDEX) in one short lock, while the foreign keys on it are set aside",
                                col_list(&widened)
                            )
                        } else {
                            format!(
                                "build a unique index on ({}) concurrently, then drop the narrow one: uniqueness per tenant, which is what a tenant can see",
                                col_list(&widened)
                            )
                        },
                        automatic: k.kind != "exclusion constraint" && widens_alone(k),
                    });
                }
            }
        }
        for fk in &f.foreign_keys {
            // A table outside the plan stays a plain local table.
            let target = placement
                .get(&fk.references)
                .map_or(&Placement::Local, |(p, _)| p);
            let object = format!(
                "foreign key {} ({}) → {} ({})",
                fk.name,
                col_list(&fk.columns),
                fk.references,
                col_list(&fk.referenced_columns)
            );
            // Citus judges the actions first, whenever the key holds the
            // table's distribution column, which a key between distributed
            // tables does once it is widened.
            let holds_column = match (place, target) {
                (Placement::Distributed { .. }, Placement::Distributed { .. }) => true,
                (Placement::Distributed { column, .. }, _) => fk.columns.contains(column),
                _ => false,
            };
            if holds_column {
                let on_delete = matches!(fk.on_delete, 'n' | 'd');
                let on_update = matches!(fk.on_update, 'n' | 'd' | 'c');
                if on_delete || on_update {
                    blockers.push(Blocker {
                        kind: "foreign-key-action-on-distribution-column",
                        object: format!(
                            "{object} ON DELETE {} ON UPDATE {}",
                            action(fk.on_delete),
                            action(fk.on_update)
                        ),
                        citus: if on_delete {
                            "cannot create foreign key constraint: SET NULL or SET DEFAULT is not supported in ON DELETE operation when distribution key is included in the foreign key constraint".to_string()
                        } else {
                            "cannot create foreign key constraint: SET NULL, SET DEFAULT or CASCADE is not supported in ON UPDATE operation when distribution key included in the foreign constraint.".to_string()
                        },
                        fix: "change the action to one that leaves the distribution column alone (NO ACTION, RESTRICT or CASCADE on delete; NO ACTION or RESTRICT on update): the operator decides".to_string(),
                        automatic: false,
                    });
                }
            }
            match (place, target) {
                (Placement::Distributed { column, .. }, Placement::Distributed { column: theirs, .. }) => {
                    // Both ends distributed: the key must pair the distribution
                    // columns, so that a row and its parent share a shard.
                    let paired = fk
                        .columns
                        .iter()
                        .zip(&fk.referenced_columns)
                        .any(|(mine, other)| mine == column && other == theirs);
                    if !paired {
                        blockers.push(Blocker {
                            kind: "foreign-key-without-distribution-column",
                            object: object.clone(),
                            citus: "cannot create foreign key constraint: Foreign keys are supported in two cases, either in between two colocated tables including partition column in the same ordinal in the both tables or from distributed to reference tables".to_string(),
                            fix: format!(
                                "set aside while the tables move (recorded), then added as ({column}, {}) → {} ({theirs}, {}) NOT VALID and validated without blocking writes",
                                col_list(&fk.columns),
                                fk.references,
                                col_list(&fk.referenced_columns)
                            ),
                            automatic: true,
                        });
                    }
                }
                (Placement::Reference, Placement::Distributed { .. }) => blockers.push(Blocker {
                    kind: "reference-to-distributed-foreign-key",
                    object: object.clone(),
                    citus: "cannot create foreign key constraint since foreign keys from reference tables and local tables to distributed tables are not supported".to_string(),
                    fix: "drop the foreign key (a recorded step, restored by revert); the shared table's rows cannot point into one tenant's shard".to_string(),
                    automatic: true,
                }),
                (Placement::Local, Placement::Distributed { .. }) => blockers.push(Blocker {
                    kind: "local-to-distributed-foreign-key",
                    object: object.clone(),
                    citus: format!(
                        "relation {} is referenced by a foreign key from {table}: foreign keys from a regular table to a distributed table are not supported.",
                        fk.references
                    ),
                    fix: "drop the foreign key (a recorded step, restored by revert), or make the excluded table tenant-owned in the plan".to_string(),
                    automatic: true,
                }),
                (Placement::Distributed { .. }, Placement::Local) => blockers.push(Blocker {
                    kind: "distributed-to-local-foreign-key",
                    object: object.clone(),
                    citus: format!(
                        "referenced table \"{}\" must be a distributed table or a reference table",
                        fk.references.name
                    ),
                    fix: format!(
                        "make {} a reference table (class shared in the plan): it is then copied to every node",
                        fk.references
                    ),
                    automatic: false,
                }),
                (Placement::Reference, Placement::Local) if fk.on_delete != 'a' && fk.on_delete != 'r' || fk.on_update != 'a' && fk.on_update != 'r' => blockers.push(Blocker {
                    kind: "reference-to-local-foreign-key-action",
                    object: object.clone(),
                    citus: "cannot define foreign key constraint, foreign keys from reference tables to local tables can only be defined with NO ACTION or RESTRICT behaviors".to_string(),
                    fix: format!(
                        "make {} shared too, or change the key's actions to NO ACTION or RESTRICT: the operator decides",
                        fk.references
                    ),
                    automatic: false,
                }),
                _ => {}
            }
        }
        // Citus checks the same things of a reference table as of a
        // distributed one, and of a local table linked to a reference table by
        // a foreign key (it becomes a Citus local table when the reference
        // table is created).
        let citus_local =
            matches!(place, Placement::Local) && linked_to_reference(table, &placement, facts);
        let judged = !matches!(place, Placement::Local) || citus_local;
        if judged {
            for t in &f.triggers {
                blockers.push(Blocker {
                    kind: "trigger",
                    object: format!("trigger {t}"),
                    citus: format!(
                        "cannot distribute relation \"{}\" because it has triggers (hint: Consider dropping all the triggers on \"{}\" and retry.)",
                        table.name, table.name
                    ),
                    fix: "review it: a trigger that touches only its own row can run on the shards (citus.enable_unsafe_triggers = on); one that reads or writes other tables must move into the application".to_string(),
                    automatic: false,
                });
            }
            for p in f.policies.iter().filter(|p| p.subquery) {
                // Ficus's own policies wrap its helper in a scalar subquery;
                // any other subquery (EXISTS, membership) is the operator's.
                let ours = p.name.starts_with("ficus_");
                blockers.push(Blocker {
                    kind: "policy-with-subquery",
                    object: format!("policy {} USING/CHECK {}", p.name, p.expression),
                    citus: "cannot create policy: Subqueries are not supported in policies on distributed tables".to_string(),
                    fix: if ours {
                        "recreated calling the helper directly, without the scalar subquery, before the table moves (the helper then runs per row rather than once per statement; its cost is measured before apply)".to_string()
                    } else {
                        "rewrite it without a subquery (a function the workers also have, or a column of the row): the operator decides".to_string()
                    },
                    automatic: ours,
                });
            }
        }
        if !matches!(place, Placement::Local) {
            for s in &f.sequences {
                // Citus turns the sequence into the column's type when it
                // distributes the table, and a worker cannot draw an int or
                // smallint default; the coordinator can.
                if matches!(s.column_type.as_str(), "integer" | "smallint") {
                    blockers.push(Blocker {
                        kind: "narrow-sequence",
                        object: format!("column {} ({}) from sequence {}", s.column, s.column_type, s.sequence),
                        citus: "nextval(sequence) calls in worker nodes are not supported for column defaults of type int or smallint".to_string(),
                        fix: format!(
                            "nothing while the application inserts through the coordinator (where it works); to insert through the workers, widen {} to bigint before distributing (a table rewrite: a maintenance window; ALTER SEQUENCE is refused once distributed)",
                            s.column
                        ),
                        automatic: true,
                    });
                }
            }
            if f.partitioned && matches!(place, Placement::Reference) {
                blockers.push(Blocker {
                    kind: "partitioned",
                    object: "partitioned table".to_string(),
                    citus: "distributing partitioned tables in only supported for hash-distributed tables".to_string(),
                    fix: "make it tenant-owned (distributed by tenant_id), or excluded: the operator decides".to_string(),
                    automatic: false,
                });
            }
        }
        let method = match place {
            Placement::Distributed { .. } => {
                // Concurrently, Citus refuses a table that regular (not yet
                // distributed), local or reference tables point into; the keys
                // from tables that will be distributed come back afterwards.
                let mut from: Vec<String> = referenced_by
                    .get(table)
                    .map(|hs| hs.iter().map(|h| h.to_string()).collect())
                    .unwrap_or_default();
                from.dedup();
                let mut how = "create_distributed_table_concurrently (writes go on; outside a transaction, one at a time; needs wal_level = logical, the coordinator in the metadata and citus.shard_replication_factor = 1)".to_string();
                if f.partitioned {
                    how.push_str("; its partitions follow, co-located");
                }
                if !from.is_empty() {
                    how.push_str(&format!(
                        "; first the foreign keys into it from {} are dropped (recorded; those from tables distributed later are re-added NOT VALID and validated once both ends are)",
                        from.join(", ")
                    ));
                }
                how
            }
            Placement::Reference => "create_reference_table (copies the rows to every node; blocks writes to it meanwhile)".to_string(),
            Placement::Local if citus_local => "becomes a Citus local table (linked by a foreign key to a reference table): stays on the coordinator, and Citus judges it like a distributed one".to_string(),
            Placement::Local => "stays on the coordinator".to_string(),
        };
        decisions.push(Decision {
            table: table.clone(),
            class,
            placement: place.clone(),
            method,
            blockers,
        });
    }
    // Referenced before referencing: the organizations, the rest of the
    // spine, reference tables, then distributed tables in foreign-key order,
    // local tables last.
    let order = fk_order(&decisions, facts);
    decisions.sort_by_key(|d| {
        let rank = match (&d.placement, d.class) {
            _ if d.table == spine => 0,
            // The co-location group's anchor before the tables that join it.
            _ if d.table == anchor => 1,
            (_, "spine") => 2,
            (Placement::Reference, _) => 3,
            (Placement::Distributed { .. }, _) => 4,
            (Placement::Local, _) => 5,
        };
        (
            rank,
            order.get(&d.table).copied().unwrap_or(0),
            d.table.clone(),
        )
    });
    let mut propagate: Vec<String> = facts
        .definer_functions
        .iter()
        .map(|f| format!("function {f}: create_distributed_function, so the shards' policies and the workers' queries find it"))
        .collect();
    // A function call is not a SET: Citus forwards only SET LOCAL, and only
    // when told to.
    propagate.push(
        "tenant context ficus.tenant_id: set_config(…, true) is not sent to the workers; sessions use SET LOCAL ficus.tenant_id = … (its own statement, inside the transaction) with citus.propagate_set_commands = 'local'".to_string(),
    );
    propagate.extend(facts.views.iter().map(|v| {
        format!("view {v}: propagated once the tables it reads are distributed (Citus creates it on every node)")
    }));
    Distribution {
        tables: decisions,
        propagate,
    }
}

/// Whether a local table holds a foreign key to a reference table, or a
/// reference table holds one to it.
fn linked_to_reference(
    table: &Table,
    placement: &BTreeMap<Table, (Placement, &'static str)>,
    facts: &Facts,
) -> bool {
    let is_reference = |t: &Table| matches!(placement.get(t), Some((Placement::Reference, _)));
    let mine = facts
        .tables
        .get(table)
        .is_some_and(|f| f.foreign_keys.iter().any(|fk| is_reference(&fk.references)));
    let theirs = facts.tables.iter().any(|(holder, f)| {
        is_reference(holder) && f.foreign_keys.iter().any(|fk| fk.references == *table)
    });
    mine || theirs
}

/// Each table's depth in the foreign-key graph among the planned tables: a
/// table comes after every table it references (a cycle's tables all end up
/// as deep as there are tables, which keeps the order total).
fn fk_order(decisions: &[Decision], facts: &Facts) -> BTreeMap<Table, usize> {
    let mut depth: BTreeMap<Table, usize> =
        decisions.iter().map(|d| (d.table.clone(), 0)).collect();
    // At most one pass per table: enough for any acyclic chain, and a cycle
    // stops growing there.
    for _ in 0..decisions.len() {
        let mut changed = false;
        for d in decisions {
            let Some(f) = facts.tables.get(&d.table) else {
                continue;
            };
            for fk in &f.foreign_keys {
                if fk.references == d.table {
                    continue;
                }
                if let Some(&parent) = depth.get(&fk.references) {
                    let mine = depth.get(&d.table).copied().unwrap_or(0);
                    if parent + 1 > mine && parent < decisions.len() {
                        depth.insert(d.table.clone(), parent + 1);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

/// Reads the facts for every table of `plan` and the spine.
pub async fn read(client: &Client, plan: &Plan) -> Result<Facts> {
    let mut facts = Facts::default();
    let mut tables: Vec<Table> = plan
        .tables
        .iter()
        .map(|t| Table::new(&t.schema, &t.name))
        .collect();
    tables.push(Table::new(ORGANIZATIONS.0, ORGANIZATIONS.1));
    tables.extend(SPINE.iter().map(|n| Table::new(ORGANIZATIONS.0, n)));
    for t in tables {
        let Some(row) = client
            .query_opt(
                "SELECT c.oid, c.relkind = 'p', c.relispartition,
                        EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped)
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(sql(format!("reading {t}")))?
        else {
            continue;
        };
        let oid: u32 = row.get(0);
        let mut f = TableFacts {
            partitioned: row.get(1),
            has_tenant_id: row.get(3),
            ..TableFacts::default()
        };
        if row.get::<_, bool>(2) {
            f.partition_of = client
                .query_opt(
                    "SELECT n.nspname::text, c.relname::text FROM pg_inherits i
                     JOIN pg_class c ON c.oid = i.inhparent JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE i.inhrelid = $1",
                    &[&oid],
                )
                .await
                .map_err(sql(format!("reading {t}'s parent")))?
                .map(|r| Table::new(r.get(0), r.get(1)));
        }
        for r in client
            .query(
                "SELECT ic.relname::text,
                        CASE con.contype WHEN 'p' THEN 'primary key' WHEN 'u' THEN 'unique constraint' WHEN 'x' THEN 'exclusion constraint' ELSE 'unique index' END,
                        ARRAY(SELECT COALESCE(a.attname::text, '(expression)')
                              FROM unnest(i.indkey::int2[]) WITH ORDINALITY k(attnum, ord)
                              LEFT JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                              WHERE k.ord <= i.indnkeyatts ORDER BY k.ord),
                        i.indpred IS NOT NULL, pg_get_indexdef(i.indexrelid), am.amname::text,
                        CASE WHEN starts_with(pg_get_indexdef(i.indexrelid), head.text)
                             THEN substr(pg_get_indexdef(i.indexrelid), length(head.text) + 1) ELSE '' END,
                        CASE WHEN con.condeferred THEN 'initially deferred' WHEN con.condeferrable THEN 'deferrable' ELSE '' END,
                        -- Read through jsonb: the column is PostgreSQL 15's.
                        COALESCE((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false)
                 FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
                 JOIN pg_am am ON am.oid = ic.relam
                 JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                 -- How pg_get_indexdef starts a unique index's definition, up
                 -- to its column list.
                 CROSS JOIN LATERAL (SELECT format('CREATE UNIQUE INDEX %s ON %s.%s USING %s (',
                        quote_ident(ic.relname), quote_ident(n.nspname), quote_ident(c.relname), quote_ident(am.amname))) head(text)
                 LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x')
                 WHERE i.indrelid = $1 AND (i.indisunique OR i.indisexclusion)
                 ORDER BY i.indisprimary DESC, ic.relname",
                &[&oid],
            )
            .await
            .map_err(sql(format!("reading {t}'s unique keys")))?
        {
            let kind: String = r.get(1);
            f.keys.push(UniqueKey {
                name: r.get(0),
                kind: match kind.as_str() {
                    "primary key" => "primary key",
                    "unique constraint" => "unique constraint",
                    "exclusion constraint" => "exclusion constraint",
                    _ => "unique index",
                },
                columns: r.get(2),
                partial: r.get(3),
                definition: r.get(4),
                method: r.get(5),
                columns_and_rest: r.get(6),
                deferrable: match r.get::<_, &str>(7) {
                    "initially deferred" => " DEFERRABLE INITIALLY DEFERRED",
                    "deferrable" => " DEFERRABLE",
                    _ => "",
                },
                nulls_not_distinct: r.get(8),
            });
        }
        for r in client
            .query(
                "SELECT con.conname::text, fn.nspname::text, fc.relname::text,
                        ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, ord)
                              JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum ORDER BY k.ord),
                        ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, ord)
                              JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum ORDER BY k.ord),
                        con.confdeltype::text, con.confupdtype::text, pg_get_constraintdef(con.oid), con.convalidated
                 FROM pg_constraint con
                 JOIN pg_class fc ON fc.oid = con.confrelid JOIN pg_namespace fn ON fn.oid = fc.relnamespace
                 WHERE con.contype = 'f' AND con.conrelid = $1 AND con.conparentid = 0
                 ORDER BY con.conname",
                &[&oid],
            )
            .await
            .map_err(sql(format!("reading {t}'s foreign keys")))?
        {
            let first = |s: String| s.chars().next().unwrap_or('a');
            f.foreign_keys.push(ForeignKey {
                name: r.get(0),
                references: Table::new(r.get(1), r.get(2)),
                columns: r.get(3),
                referenced_columns: r.get(4),
                on_delete: first(r.get(5)),
                on_update: first(r.get(6)),
                definition: r.get(7),
                validated: r.get(8),
            });
        }
        f.triggers = client
            .query(
                "SELECT tgname::text FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal AND tgparentid = 0 ORDER BY tgname",
                &[&oid],
            )
            .await
            .map_err(sql(format!("reading {t}'s triggers")))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for r in client
            .query(
                "SELECT polname::text,
                        COALESCE(pg_get_expr(polqual, polrelid), '') || CASE WHEN polwithcheck IS NULL THEN '' ELSE ' / ' || pg_get_expr(polwithcheck, polrelid) END,
                        COALESCE(polqual::text, '') LIKE '%{SUBLINK%' OR COALESCE(polwithcheck::text, '') LIKE '%{SUBLINK%',
                        pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
                 FROM pg_policy WHERE polrelid = $1 ORDER BY polname",
                &[&oid],
            )
            .await
            .map_err(sql(format!("reading {t}'s policies")))?
        {
            f.policies.push(Policy {
                name: r.get(0),
                expression: r.get(1),
                subquery: r.get(2),
                using: r.get(3),
                check: r.get(4),
            });
        }
        for r in client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                        quote_ident(sn.nspname) || '.' || quote_ident(sc.relname), format_type(s.seqtypid, NULL)
                 FROM pg_depend d
                 JOIN pg_class sc ON sc.oid = d.objid AND sc.relkind = 'S'
                 JOIN pg_namespace sn ON sn.oid = sc.relnamespace
                 JOIN pg_sequence s ON s.seqrelid = sc.oid
                 JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                 WHERE d.refobjid = $1 AND d.classid = 'pg_class'::regclass
                   AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
                 ORDER BY a.attnum",
                &[&oid],
            )
            .await
            .map_err(sql(format!("reading {t}'s sequences")))?
        {
            f.sequences.push(SequenceUse {
                column: r.get(0),
                column_type: r.get(1),
                sequence: r.get(2),
                sequence_type: r.get(3),
            });
        }
        facts.tables.insert(t, f);
    }
    facts.definer_functions = client
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE (p.prosecdef OR n.nspname = 'tenancy_private')
               AND n.nspname NOT IN ('pg_catalog', 'information_schema')
               AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(sql("reading SECURITY DEFINER functions"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    facts.views = plan
        .views
        .iter()
        .map(|v| Table::new(&v.schema, &v.name))
        .collect();
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use expect_test::{Expect, expect};

    use super::*;
    use crate::plan::{Backfill, IdType, PlannedTable, TenantContext, TenantZero};

    fn plan(tables: &[(&str, Class)]) -> Plan {
        Plan {
            version: crate::plan::PLAN_VERSION,
            database: "shop".into(),
            system_identifier: "1".into(),
            id_type: IdType::Uuid,
            tenant_context: TenantContext::Setting,
            tenant_zero: TenantZero {
                id: "00000000-0000-0000-0000-000000000001".into(),
                slug: "acme".into(),
                name: "Acme".into(),
            },
            app_roles: vec![],
            tenant_roles: vec![],
            tables: tables
                .iter()
                .map(|(name, class)| PlannedTable {
                    schema: "public".into(),
                    name: name.to_string(),
                    class: *class,
                    reason: String::new(),
                    backfill: Backfill::Batched,
                })
                .collect(),
            views: vec![],
        }
    }

    fn key(name: &str, kind: &'static str, cols: &[&str]) -> UniqueKey {
        UniqueKey {
            name: name.into(),
            kind,
            columns: cols.iter().map(|c| c.to_string()).collect(),
            partial: false,
            definition: String::new(),
            method: "btree".into(),
            columns_and_rest: format!("{})", cols.join(", ")),
            deferrable: "",
            nulls_not_distinct: false,
        }
    }

    fn fk(name: &str, cols: &[&str], to: &str, to_cols: &[&str], on_delete: char) -> ForeignKey {
        ForeignKey {
            name: name.into(),
            columns: cols.iter().map(|c| c.to_string()).collect(),
            references: Table::new("public", to),
            referenced_columns: to_cols.iter().map(|c| c.to_string()).collect(),
            on_delete,
            on_update: 'a',
            definition: String::new(),
            validated: true,
        }
    }

    /// The decisions in a few lines: each table in distribution order, its
    /// placement and method, each blocker with who fixes it.
    fn check(plan: &Plan, facts: &Facts, expect: Expect) {
        let d = decide(plan, facts);
        let mut out = String::new();
        for t in &d.tables {
            let placement = match &t.placement {
                Placement::Distributed { column, .. } => format!("distributed by {column}"),
                Placement::Reference => "reference".into(),
                Placement::Local => "local".into(),
            };
            out.push_str(&format!(
                "{} ({}): {placement}; {}\n",
                t.table, t.class, t.method
            ));
            for b in &t.blockers {
                let by = if b.automatic { "ficus" } else { "operator" };
                out.push_str(&format!("  {} [{by}] {}: {}\n", b.kind, b.object, b.fix));
            }
        }
        expect.assert_eq(&out);
    }

    #[test]
    fn keys_and_foreign_keys_are_judged_by_what_both_ends_become() {
        let plan = plan(&[
            ("orders", Class::TenantOwned),
            ("lines", Class::TenantOwned),
            ("countries", Class::Shared),
            ("audit", Class::Excluded),
        ]);
        let mut facts = Facts::default();
        let t = |n: &str| Table::new("public", n);
        facts.tables.insert(
            t("orders"),
            TableFacts {
                has_tenant_id: true,
                keys: vec![
                    key("orders_pkey", "primary key", &["id"]),
                    key(
                        "orders_tenant_number",
                        "unique index",
                        &["tenant_id", "number"],
                    ),
                ],
                foreign_keys: vec![fk(
                    "orders_country",
                    &["country"],
                    "countries",
                    &["code"],
                    'a',
                )],
                triggers: vec!["orders_touch".into()],
                sequences: vec![SequenceUse {
                    column: "id".into(),
                    column_type: "integer".into(),
                    sequence: "public.orders_id_seq".into(),
                    sequence_type: "integer".into(),
                }],
                ..TableFacts::default()
            },
        );
        facts.tables.insert(
            t("lines"),
            TableFacts {
                has_tenant_id: true,
                keys: vec![key("lines_pkey", "primary key", &["tenant_id", "id"])],
                foreign_keys: vec![
                    fk("lines_order", &["order_id"], "orders", &["id"], 'c'),
                    fk(
                        "lines_order_paired",
                        &["tenant_id", "order_id"],
                        "orders",
                        &["tenant_id", "id"],
                        'n',
                    ),
                ],
                policies: vec![Policy {
                    name: "tenant_isolation".into(),
                    subquery: true,
                    expression: "(tenant_id = ( SELECT tenancy_private.current_tenant_id()))"
                        .into(),
                    using: None,
                    check: None,
                }],
                ..TableFacts::default()
            },
        );
        facts.tables.insert(
            t("countries"),
            TableFacts {
                keys: vec![key("countries_pkey", "primary key", &["code"])],
                foreign_keys: vec![fk(
                    "countries_flagship",
                    &["flagship"],
                    "orders",
                    &["id"],
                    'a',
                )],
                ..TableFacts::default()
            },
        );
        facts.tables.insert(
            t("audit"),
            TableFacts {
                foreign_keys: vec![fk("audit_order", &["order_id"], "orders", &["id"], 'a')],
                triggers: vec!["never_judged".into()],
                ..TableFacts::default()
            },
        );
        check(
            &plan,
            &facts,
            expect![[r#"
                tenancy.organizations (spine): reference; create_reference_table (copies the rows to every node; blocks writes to it meanwhile)
                tenancy.units (spine): distributed by organization_id; create_distributed_table_concurrently (writes go on; outside a transaction, one at a time; needs wal_level = logical, the coordinator in the metadata and citus.shard_replication_factor = 1)
                tenancy.members (spine): distributed by organization_id; create_distributed_table_concurrently (writes go on; outside a transaction, one at a time; needs wal_level = logical, the coordinator in the metadata and citus.shard_replication_factor = 1)
                countries (shared): reference; create_reference_table (copies the rows to every node; blocks writes to it meanwhile)
                  reference-to-distributed-foreign-key [ficus] foreign key countries_flagship (flagship) → orders (id): drop the foreign key (a recorded step, restored by revert); the shared table's rows cannot point into one tenant's shard
                orders (tenant-owned): distributed by tenant_id; create_distributed_table_concurrently (writes go on; outside a transaction, one at a time; needs wal_level = logical, the coordinator in the metadata and citus.shard_replication_factor = 1); first the foreign keys into it from audit, countries, lines are dropped (recorded; those from tables distributed later are re-added NOT VALID and validated once both ends are)
                  key-without-distribution-column [ficus] primary key orders_pkey (id): build a unique index on (tenant_id, id) concurrently, then swap the primary key to it (ADD PRIMARY KEY USING INDEX) in one short lock, while the foreign keys on it are set aside
                  trigger [operator] trigger orders_touch: review it: a trigger that touches only its own row can run on the shards (citus.enable_unsafe_triggers = on); one that reads or writes other tables must move into the application
                  narrow-sequence [ficus] column id (integer) from sequence public.orders_id_seq: nothing while the application inserts through the coordinator (where it works); to insert through the workers, widen id to bigint before distributing (a table rewrite: a maintenance window; ALTER SEQUENCE is refused once distributed)
                lines (tenant-owned): distributed by tenant_id; create_distributed_table_concurrently (writes go on; outside a transaction, one at a time; needs wal_level = logical, the coordinator in the metadata and citus.shard_replication_factor = 1)
                  foreign-key-without-distribution-column [ficus] foreign key lines_order (order_id) → orders (id): set aside while the tables move (recorded), then added as (tenant_id, order_id) → orders (tenant_id, id) NOT VALID and validated without blocking writes
                  foreign-key-action-on-distribution-column [operator] foreign key lines_order_paired (tenant_id, order_id) → orders (tenant_id, id) ON DELETE SET NULL ON UPDATE NO ACTION: change the action to one that leaves the distribution column alone (NO ACTION, RESTRICT or CASCADE on delete; NO ACTION or RESTRICT on update): the operator decides
                  policy-with-subquery [operator] policy tenant_isolation USING/CHECK (tenant_id = ( SELECT tenancy_private.current_tenant_id())): rewrite it without a subquery (a function the workers also have, or a column of the row): the operator decides
                audit (excluded): local; stays on the coordinator
                  local-to-distributed-foreign-key [ficus] foreign key audit_order (order_id) → orders (id): drop the foreign key (a recorded step, restored by revert), or make the excluded table tenant-owned in the plan
            "#]],
        );
    }

    /// `distribute apply`'s steps for a schema with nothing for the operator
    /// to decide: each step's id and its forward SQL, in order.
    #[test]
    fn apply_widens_keys_sets_foreign_keys_aside_and_moves_tables_in_order() {
        let plan = plan(&[
            ("orders", Class::TenantOwned),
            ("lines", Class::TenantOwned),
            ("countries", Class::Shared),
        ]);
        let mut facts = Facts::default();
        let t = |n: &str| Table::new("public", n);
        let mut by_number = key("orders_number", "unique index", &["number"]);
        by_number.definition =
            "CREATE UNIQUE INDEX orders_number ON public.orders USING btree (number)".into();
        facts.tables.insert(
            t("orders"),
            TableFacts {
                has_tenant_id: true,
                keys: vec![key("orders_pkey", "primary key", &["id"]), by_number],
                foreign_keys: vec![ForeignKey {
                    definition: "FOREIGN KEY (country) REFERENCES countries(code)".into(),
                    ..fk("orders_country", &["country"], "countries", &["code"], 'a')
                }],
                policies: vec![Policy {
                    name: "ficus_tenant_isolation".into(),
                    subquery: true,
                    expression: String::new(),
                    using: Some(
                        "(tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))".into(),
                    ),
                    check: Some(
                        "(tenant_id = ( SELECT tenancy_private.current_tenant_id() AS current_tenant_id))".into(),
                    ),
                }],
                ..TableFacts::default()
            },
        );
        facts.tables.insert(
            t("lines"),
            TableFacts {
                has_tenant_id: true,
                keys: vec![key("lines_pkey", "primary key", &["tenant_id", "id"])],
                foreign_keys: vec![ForeignKey {
                    definition:
                        "FOREIGN KEY (order_id) REFERENCES orders(id) ON DELETE CASCADE NOT VALID"
                            .into(),
                    ..fk("lines_order", &["order_id"], "orders", &["id"], 'c')
                }],
                ..TableFacts::default()
            },
        );
        facts.tables.insert(
            t("countries"),
            TableFacts {
                keys: vec![key("countries_pkey", "primary key", &["code"])],
                ..TableFacts::default()
            },
        );
        let d = decide(&plan, &facts);
        let helpers = apply::Helpers {
            single_tenant_zero: Some(plan.tenant_zero.id.clone()),
            default_tenant_id: "CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() …"
                .into(),
            default_tenant_language: "plpgsql".into(),
        };
        let steps = apply::steps(&plan, &facts, &d, &helpers).unwrap();
        let mut out = String::new();
        for s in &steps {
            out.push_str(&format!("{}\n", s.id));
            for st in &s.forward {
                let how = if st.concurrent {
                    "  (outside a transaction) "
                } else {
                    "  "
                };
                out.push_str(&format!("{how}{}\n", st.sql.replace('\n', " ")));
            }
        }
        expect![[r#"
            distribute:widen:public.orders:orders_pkey
              (outside a transaction) CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "orders_pkey_ficus_wide" ON "public"."orders" USING "btree" ("tenant_id", id)
            distribute:widen:public.orders:orders_number
              (outside a transaction) CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "orders_number_ficus_wide" ON "public"."orders" USING "btree" ("tenant_id", number)
            distribute:drop-fk:public.lines:lines_order
              ALTER TABLE "public"."lines" DROP CONSTRAINT IF EXISTS "lines_order"
            distribute:drop-fk:public.orders:orders_country
              ALTER TABLE "public"."orders" DROP CONSTRAINT IF EXISTS "orders_country"
            distribute:swap:public.orders:orders_pkey
              ALTER TABLE "public"."orders" DROP CONSTRAINT "orders_pkey", ADD CONSTRAINT "orders_pkey" PRIMARY KEY USING INDEX "orders_pkey_ficus_wide"
            distribute:swap:public.orders:orders_number
              (outside a transaction) DROP INDEX CONCURRENTLY IF EXISTS "public"."orders_number"
              ALTER INDEX "public"."orders_number_ficus_wide" RENAME TO "orders_number"
            distribute:helpers
              CREATE OR REPLACE FUNCTION tenancy_private.default_tenant_id() RETURNS uuid     LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY INVOKER AS $fn$ BEGIN     RETURN COALESCE(tenancy_private.current_tenant_id(), '00000000-0000-0000-0000-000000000001'::pg_catalog.uuid); END $fn$
              SELECT create_distributed_function('tenancy_private.current_tenant_id()')
              SELECT create_distributed_function('tenancy_private.default_tenant_id()')
            distribute:policy:public.orders:ficus_tenant_isolation
              ALTER POLICY "ficus_tenant_isolation" ON "public"."orders" USING ((tenant_id = tenancy_private.current_tenant_id())) WITH CHECK ((tenant_id = tenancy_private.current_tenant_id()))
            distribute:tenant-context
              DO $ctx$ BEGIN EXECUTE pg_catalog.format('ALTER DATABASE %I SET citus.propagate_set_commands = %L', pg_catalog.current_database(), 'local'); END $ctx$
            distribute:reference:tenancy.organizations
              SELECT create_reference_table('"tenancy"."organizations"')
            distribute:table:tenancy.units
              (outside a transaction) SELECT create_distributed_table_concurrently('"tenancy"."units"', 'organization_id', colocate_with => 'none')
            distribute:table:tenancy.members
              (outside a transaction) SELECT create_distributed_table_concurrently('"tenancy"."members"', 'organization_id', colocate_with => '"tenancy"."units"')
            distribute:reference:public.countries
              SELECT create_reference_table('"public"."countries"')
            distribute:table:public.orders
              (outside a transaction) SELECT create_distributed_table_concurrently('"public"."orders"', 'tenant_id', colocate_with => '"tenancy"."units"')
            distribute:table:public.lines
              (outside a transaction) SELECT create_distributed_table_concurrently('"public"."lines"', 'tenant_id', colocate_with => '"tenancy"."units"')
            distribute:fk:public.lines:lines_order
              ALTER TABLE "public"."lines" ADD CONSTRAINT "lines_order" FOREIGN KEY ("tenant_id", "order_id") REFERENCES "public"."orders" ("tenant_id", "id") ON DELETE CASCADE NOT VALID
              ALTER TABLE "public"."lines" VALIDATE CONSTRAINT "lines_order"
            distribute:fk:public.orders:orders_country
              ALTER TABLE "public"."orders" ADD CONSTRAINT "orders_country" FOREIGN KEY (country) REFERENCES countries(code) NOT VALID
              ALTER TABLE "public"."orders" VALIDATE CONSTRAINT "orders_country"
        "#]].assert_eq(&out);

        // A blocker only the operator can lift stops it before anything runs.
        let mut manual = facts.clone();
        manual.tables.get_mut(&t("lines")).unwrap().triggers = vec!["lines_touch".into()];
        let refused = apply::steps(&plan, &manual, &decide(&plan, &manual), &helpers)
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("1 blocker(s) need the operator's decision first")
                && refused.contains("lines: trigger trigger lines_touch"),
            "{refused}"
        );

        // A partitioned table is refused before anything runs.
        let mut partitioned = facts.clone();
        partitioned.tables.get_mut(&t("lines")).unwrap().partitioned = true;
        let refused = apply::steps(&plan, &partitioned, &decide(&plan, &partitioned), &helpers)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("lines is partitioned"), "{refused}");

        // A foreign key the operator left NOT VALID comes back NOT VALID,
        // both ways: old rows may break it.
        let mut unvalidated = facts.clone();
        unvalidated
            .tables
            .get_mut(&t("lines"))
            .unwrap()
            .foreign_keys[0]
            .validated = false;
        let steps =
            apply::steps(&plan, &unvalidated, &decide(&plan, &unvalidated), &helpers).unwrap();
        let find = |id: &str| steps.iter().find(|s| s.id == id).unwrap();
        assert_eq!(
            find("distribute:fk:public.lines:lines_order").forward.len(),
            1
        );
        assert_eq!(
            find("distribute:drop-fk:public.lines:lines_order")
                .undo
                .len(),
            1
        );
    }
}
