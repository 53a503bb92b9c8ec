//! The command line, as clap types. Parsing only checks shape; values with domain
//! rules (tenant ids, stage names) are checked by the commands, so that a bad value
//! is a refused operation (exit 1) with the domain's own message, while a malformed
//! command line is a usage error (exit 2).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ficus",
    version,
    about = "Move a live multi-tenant SaaS and its database onto a rebuilt backend, one tenant at a time",
    after_help = "Exit codes: 0 success, 1 refused or failed operation (reason on stderr), 2 usage error."
)]
pub struct Cli {
    /// The control store: sqlite:PATH or postgres://USER@HOST:PORT/DB[?schema=NAME].
    #[arg(
        long,
        global = true,
        env = "FICUS_STORE",
        default_value = "sqlite:ficus.db",
        hide_env_values = true
    )]
    pub store: String,

    /// Talk to a remote control plane through its HTTP API instead of opening the
    /// store (the token is read from FICUS_TOKEN).
    #[arg(long, global = true, env = "FICUS_API", value_name = "URL")]
    pub api: Option<String>,

    /// Print one JSON object instead of human-readable text.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the control store, or bring it to this version's schema. Safe to repeat.
    Init,
    /// Register tenants and move them between stages.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Show the audit log, oldest first.
    Audit(AuditArgs),
    /// Show how far the migration has come and what stands before the finish line.
    Status,
    /// Follow the change feed and print every committed change as it arrives.
    Watch(WatchArgs),
    /// Run the tenant-aware proxy (the data plane).
    Proxy(ProxyArgs),
    /// Show a tenant's recorded mismatches between the two backends, newest first;
    /// with --classes, the mismatch classes; resolve, accept or reopen a class.
    Mismatches(MismatchesArgs),
    /// Judge whether a tenant's parallel-run evidence allows moving it to migrated.
    Readiness(ReadinessArgs),
    /// List the routes seen (per tenant, backend and client version), their
    /// stages and which write routes are held on legacy.
    Routes(RoutesArgs),
    /// Change one route's stage: release a held write route, hold it again,
    /// mark it destructive.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Retire legacy once every tenant is migrated and it has been idle for the
    /// quiet window; after this the proxy never contacts it.
    RetireLegacy(RetireArgs),
    /// Show the response paths learned as noise (parts that differ between two
    /// answers of the same backend), which are never reported as mismatches.
    Noise,
    /// Show or change the readiness gate's thresholds, kept in the control store.
    #[command(subcommand)]
    Gate(GateCommand),
    /// The admin API's and the dashboard's bearer tokens: rotate the first one,
    /// or create, list and revoke named ones (viewer or operator).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Serve the control plane's HTTP API alone (without a proxy), with the
    /// billing webhook (FICUS_BILLING_SECRET) and the provisioning resumer.
    Serve(ServeArgs),
    /// Run a whole zero-downtime migration on this machine, narrated: a sample
    /// portal retrofitted, enforced, moved tenant by tenant, legacy retired.
    Demo(DemoArgs),
    /// Provisioning jobs: one per billing event received.
    #[command(subcommand)]
    Provision(ProvisionCommand),
    /// Retrofit tenancy onto a live PostgreSQL: inspect, plan, apply, status, revert.
    #[command(subcommand)]
    Db(DbCommand),
}

#[derive(Debug, Args)]
pub struct RoutesArgs {
    /// Only this tenant's census.
    #[arg(long)]
    pub tenant: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum RouteCommand {
    /// Set a route's stage (legacy, shadow, migrated), for every tenant or one;
    /// a request goes to the least advanced of its tenant's and its route's stage.
    Stage {
        /// `METHOD /template`, such as "DELETE /homes/{id}".
        route: String,
        stage: String,
        #[arg(long)]
        tenant: Option<String>,
        /// Change it only if it is still at this version (0: never set).
        #[arg(long)]
        if_version: Option<u64>,
        /// The second confirmation a destructive route needs to leave legacy.
        #[arg(long)]
        destructive: bool,
        #[arg(long)]
        reason: String,
    },
    /// Send a held write route to the new side: for one canary tenant
    /// (--tenant), or every tenant.
    Release {
        route: String,
        #[arg(long)]
        tenant: Option<String>,
        /// The second confirmation a destructive route (DELETE, or marked) needs.
        #[arg(long)]
        destructive: bool,
        #[arg(long)]
        reason: String,
    },
    /// Hold a write route on legacy again, for every tenant or one.
    Hold {
        route: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        reason: String,
    },
    /// Where write routes nobody staged go: `held` on legacy (the default), or
    /// `released` to follow their tenant's stage (what a store upgraded with
    /// migrated tenants starts with, so that their writes do not move).
    Default {
        /// `held` or `released`.
        default: String,
        #[arg(long)]
        reason: String,
    },
    /// Mark a route destructive: releasing it then needs --destructive.
    Protect {
        route: String,
        /// Remove the mark instead.
        #[arg(long)]
        undo: bool,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GateCommand {
    /// Show the gate.
    Show,
    /// Change some of the gate's settings; the others stay as they are.
    Set(GateSetArgs),
}

#[derive(Debug, Args)]
pub struct GateSetArgs {
    #[command(flatten)]
    pub gate: GateArgs,
    /// New's p99 may be at most this many times legacy's.
    #[arg(long)]
    pub max_latency_ratio: Option<f64>,
    /// ...or this many milliseconds above it, whichever allows more.
    #[arg(long)]
    pub latency_slack_ms: Option<u64>,
    /// How long legacy must be idle before it may be retired.
    #[arg(long)]
    pub quiet_window: Option<String>,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Replace the first token (`ficus init`'s); the old one stops working at once.
    Rotate {
        /// Why, for the audit log.
        #[arg(long, default_value = "rotated with ficus token rotate")]
        reason: String,
    },
    /// Make a named token, shown once; the audit log records its changes as
    /// `token:NAME`.
    Create {
        /// 1 to 32 lowercase letters, digits and underscores; never reused.
        name: String,
        /// `viewer` reads; `operator` also acts.
        #[arg(long)]
        scope: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "created with ficus token create")]
        reason: String,
    },
    /// List the named tokens (never the tokens themselves).
    List,
    /// Revoke a named token; it stops working with the next request.
    Revoke {
        name: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "revoked with ficus token revoke")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Where to listen, such as 127.0.0.1:9091.
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub listen: String,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MismatchesArgs {
    #[command(subcommand)]
    pub command: Option<ClassCommand>,
    /// The tenant; with --classes it may be omitted to count every tenant.
    #[arg(required_unless_present = "classes")]
    pub id: Option<String>,
    /// Mismatch classes (endpoint, path, kind) with their state and counts over
    /// the gate's window, instead of samples.
    #[arg(long)]
    pub classes: bool,
    /// With --classes: only open, resolved or accepted classes.
    #[arg(long, requires = "classes")]
    pub state: Option<String>,
    /// Only this endpoint, such as "GET /homes/{id}".
    #[arg(long, conflicts_with = "classes")]
    pub endpoint: Option<String>,
    /// At most this many samples.
    #[arg(long, default_value_t = 10)]
    pub limit: u64,
}

#[derive(Debug, Subcommand)]
pub enum ClassCommand {
    /// One class: what it is, its counts over every tenant, and its history.
    Show {
        /// The class id (`ficus mismatches --classes`), or a unique prefix of it.
        class: String,
    },
    /// The class is fixed as of now: its evidence so far stops counting, and a
    /// mismatch of it from now on reopens it as a regression.
    Resolve {
        /// The class id (`ficus mismatches --classes`), or a unique prefix of it.
        class: String,
        #[arg(long)]
        reason: String,
        /// The version of new that fixed it.
        #[arg(long)]
        fixed_in: Option<String>,
    },
    /// The difference is intended: it becomes a comparison rule on every proxy and
    /// never counts again.
    Accept {
        class: String,
        #[arg(long)]
        reason: String,
        /// Allow accepting a whole-body class (`$`), which hides every body
        /// difference of its endpoint.
        #[arg(long)]
        whole_endpoint: bool,
    },
    /// Undo a resolution (its evidence counts again) or an acceptance.
    Reopen {
        class: String,
        #[arg(long, default_value = "reopened by hand")]
        reason: String,
    },
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The proxy's TOML configuration.
    #[arg(long, value_name = "FILE", default_value = "ficus.toml")]
    pub config: PathBuf,
    /// Validate the configuration and exit without starting.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Register one tenant.
    Add(AddArgs),
    /// List tenants.
    List(ListArgs),
    /// Show one tenant with its latest audit events.
    Show(ShowArgs),
    /// Move a tenant to a stage (low level: checks the stage machine, not readiness).
    Stage(StageArgs),
    /// Move a tenant back: migrated → shadow, shadow → legacy, or to --to.
    Rollback(RollbackArgs),
    /// Add many tenants from a CSV file, all or nothing.
    Import(ImportArgs),
    /// Move a tenant one stage forward: legacy → shadow, or shadow → migrated
    /// when its readiness passes (or with --force and a reason).
    Promote(PromoteArgs),
    /// A tenant's white-label configuration: names, branding, domains, locale,
    /// feature toggles; every change versioned.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Less data and shorter waits (for CI).
    #[arg(long)]
    pub fast: bool,
    /// Leave everything running at the end, for exploring, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Prepare the migration (database retrofitted, backends, proxy and clients
    /// running) and leave every decision to you in the dashboard: the demo
    /// says what happens and waits for you to act.
    #[arg(long)]
    pub dashboard: bool,
}

#[derive(Debug, Subcommand)]
pub enum ProvisionCommand {
    /// Jobs, oldest first.
    List {
        /// Only jobs in this state: pending, done or failed.
        #[arg(long)]
        state: Option<String>,
    },
    /// One job: its steps, attempts and last error.
    Show { event: String },
    /// Run a pending job's remaining steps now.
    Retry { event: String },
    /// Print how billing events map onto tenants, or replace it with --file.
    Mapping {
        /// The mapping as JSON: created, cancelled (event types), event_id,
        /// event_type, tenant_id, name, domain (dotted paths into the event),
        /// start_on_new, template (the configuration new tenants start from).
        #[arg(long, value_name = "FILE", requires = "reason")]
        file: Option<PathBuf>,
        /// Why, for the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration (the latest, or --version N).
    Get(ConfigGetArgs),
    /// Write the next version: a whole document from --file, or --set edits on
    /// the current one.
    Set(ConfigSetArgs),
    /// Every version, newest first, with who wrote it and why.
    History(ConfigIdArgs),
    /// Make an earlier version's document the next version.
    Restore(ConfigRestoreArgs),
}

#[derive(Debug, Args)]
pub struct ConfigIdArgs {
    pub id: String,
}

#[derive(Debug, Args)]
pub struct ConfigGetArgs {
    pub id: String,
    #[arg(long)]
    pub version: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ConfigSetArgs {
    pub id: String,
    /// The whole document, as JSON (see `ficus tenant config get` for its shape).
    #[arg(long, value_name = "FILE", conflicts_with = "set")]
    pub file: Option<PathBuf>,
    /// One edit as key=value, repeatable: display_name=Acme,
    /// branding.primary_color=#0a7f5a, features.dark_mode.ios=true,
    /// domains=a.example.com,b.example.com.
    #[arg(long, value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Why, for the history.
    #[arg(long)]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct ConfigRestoreArgs {
    pub id: String,
    #[arg(long)]
    pub version: u64,
    /// Why, for the history.
    #[arg(long)]
    pub reason: String,
}

/// The readiness gate's thresholds as flags: per-call overrides for `readiness`
/// ("what if"), new stored values for `gate set`.
#[derive(Debug, Args)]
pub struct GateArgs {
    /// The evidence window, as an age (24h, 90m, 7d).
    #[arg(long)]
    pub window: Option<String>,
    /// Comparisons needed over the window.
    #[arg(long)]
    pub min_comparisons: Option<u64>,
    /// Mismatches allowed over the window (noise never counts).
    #[arg(long)]
    pub max_mismatches: Option<u64>,
    /// Comparisons needed on every endpoint the tenant used.
    #[arg(long)]
    pub min_per_endpoint: Option<u64>,
    /// Share of shadow requests allowed to fail, 0.0 to 1.0.
    #[arg(long)]
    pub max_error_rate: Option<f64>,
}

#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The tenant to promote; omit with --next.
    #[arg(required_unless_present = "next")]
    pub id: Option<String>,
    /// Promote the N most ready tenants in shadow, one at a time, waiting --soak
    /// after each and stopping at the first that fails.
    #[arg(long, value_name = "N", conflicts_with_all = ["id", "force"])]
    pub next: Option<u64>,
    /// With --next: how long each promoted tenant must stay migrated (the guard
    /// may roll it back meanwhile) before the next one is promoted.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub soak: std::time::Duration,
    /// Promote past a failing readiness gate; needs --reason, and the audit log says so.
    #[arg(long)]
    pub force: bool,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: Option<String>,
    /// Refuse unless the tenant is still at this version (compare-and-set).
    #[arg(long, value_name = "N")]
    pub if_version: Option<u64>,
}

#[derive(Debug, Args)]
pub struct ReadinessArgs {
    /// The tenant to judge; omit with --all.
    pub id: Option<String>,
    /// Rank every tenant in shadow by how close it is to ready.
    #[arg(long, conflicts_with = "id")]
    pub all: bool,
    /// Judge only the evidence recorded on this version of new; `current` is the
    /// version of the newest evidence.
    #[arg(long)]
    pub version: Option<String>,
    #[command(flatten)]
    pub gate: GateArgs,
}

#[derive(Debug, Args)]
pub struct RetireArgs {
    /// How long legacy must have received no request, served or shadow, for this
    /// retirement (default: the gate's quiet window, `ficus gate show`).
    #[arg(long)]
    pub quiet_window: Option<String>,
    /// Why, for the audit log.
    #[arg(long, default_value = "legacy is empty")]
    pub reason: String,
    /// Undo the retirement (while legacy is still in the proxy's config).
    #[arg(long)]
    pub undo: bool,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Tenant id: lowercase letters, digits and '-', at most 63 characters.
    pub id: String,
    /// Display name (defaults to the id).
    #[arg(long)]
    pub name: Option<String>,
    /// A custom host name the tenant is reached by; repeat for several.
    #[arg(long = "domain", value_name = "HOST")]
    pub domains: Vec<String>,
    /// Starting stage: legacy, shadow or migrated.
    #[arg(long, default_value = "legacy")]
    pub stage: String,
    /// Why the tenant is added, for the audit log.
    #[arg(long, default_value = "added with ficus tenant add")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tenants in this stage.
    #[arg(long)]
    pub stage: Option<String>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub id: String,
    /// How many of the latest audit events to show.
    #[arg(long, default_value_t = 10)]
    pub events: u64,
}

#[derive(Debug, Args)]
pub struct StageArgs {
    pub id: String,
    /// legacy, shadow or migrated.
    pub stage: String,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: String,
    /// Refuse unless the tenant is still at this version (compare-and-set).
    #[arg(long, value_name = "N")]
    pub if_version: Option<u64>,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    pub id: String,
    /// Why, for the audit log.
    #[arg(long)]
    pub reason: String,
    /// The stage to go back to: legacy or shadow (default: one stage back).
    #[arg(long)]
    pub to: Option<String>,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// CSV with a header row: id, and optionally name, stage, domains (space-separated).
    pub file: PathBuf,
    /// Why, for the audit log.
    #[arg(long, default_value = "imported with ficus tenant import")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this tenant's events.
    pub id: Option<String>,
    /// Only events at or after this time: RFC 3339 (2026-11-21T10:00:00Z) or an age (90m, 2h, 7d).
    #[arg(long, value_name = "T", value_parser = parse_since)]
    pub since: Option<std::time::SystemTime>,
    /// At most this many (the most recent).
    #[arg(long)]
    pub limit: Option<u64>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Stop after this many changes (default: follow until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

fn parse_since(raw: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(age) = humantime::parse_duration(raw) {
        return std::time::SystemTime::now()
            .checked_sub(age)
            .ok_or_else(|| format!("{raw:?} reaches back before the Unix epoch"));
    }
    humantime::parse_rfc3339_weak(raw).map_err(|_| {
        format!(
            "{raw:?} is neither an RFC 3339 time (2026-11-21T10:00:00Z) nor an age (90m, 2h, 7d)"
        )
    })
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Tables, keys, foreign keys, sizes, policies, views, roles and hazards, with
    /// each table's class (tenant-owned, shared, excluded) and why.
    Inspect(DbUrl),
    /// Write a plan to review and edit: tenant zero, the id type, each table's class.
    Plan(DbPlanArgs),
    /// Run the plan's steps (dry run, printing SQL and hazards, unless --execute).
    Apply(DbApplyArgs),
    /// Run only the backfill steps (after apply has added the columns and defaults).
    Backfill(DbApplyArgs),
    /// Each tenant-owned table's column, default, backfill, index and constraints,
    /// and its next step.
    Status(DbPlanFile),
    /// Undo steps in reverse order (dry run unless --execute).
    Revert(DbRevertArgs),
    /// Move one table's row level security one phase forward (off → enabled →
    /// enforced), proving what a tenant role sees before committing.
    Enforce(DbEnforceArgs),
    /// Move one table's row level security one phase back.
    Unenforce(DbEnforceArgs),
    /// Attack the isolation as the tenant roles (always rolled back): a matrix of
    /// table × attack, blocked or LEAK; exit 1 on any leak.
    Probe(DbPlanFile),
    /// Security and performance checks on tenancy, from the catalogs, each with a
    /// severity and a fix; exit 1 on any error.
    Lint(DbUrl),
    /// A dress rehearsal: copy the schema and a sample of rows into a scratch
    /// database, run plan → apply → enforce every table → probe → lint → revert
    /// there under a workload as the app's roles and the tenant roles, and report
    /// every error the app would have seen; exit 1 if it would have seen one.
    Rehearse(DbRehearseArgs),
    /// Tenants in the database's spine.
    #[command(subcommand)]
    Tenant(DbTenantCommand),
    /// Outgrow one server: distribute the retrofitted database by tenant onto
    /// Citus.
    #[command(subcommand)]
    Distribute(DbDistributeCommand),
}

#[derive(Debug, Subcommand)]
pub enum DbDistributeCommand {
    /// What each table becomes in Citus (distributed by tenant and
    /// co-located, reference or local), and every blocker Citus would refuse
    /// with the fix; read-only. Exit 1 if a blocker needs the operator.
    Plan(DbPlanFile),
    /// Where a distributed database stands: nodes with their shards and
    /// bytes, each Citus table, where each tenant's rows live (largest first)
    /// and a running rebalance's progress; read-only.
    Status(DbUrl),
    /// Add a worker (HOST:PORT, reached with the coordinator's credentials,
    /// Citus installed in this database) that takes shards; moves nothing
    /// until `rebalance`.
    AddNode(DbAddNodeArgs),
    /// Move shards onto every worker that takes them, online (logical
    /// replication), printing each move as it goes.
    Rebalance(DbUrl),
    /// Give one tenant shards of its own in every co-located table, online.
    Isolate(DbIsolateArgs),
    /// Distribute online, as `distribute plan` decided: keys widened
    /// concurrently, foreign keys set aside and restored, the tables handed to
    /// Citus concurrently, tenant context made to reach the workers; then
    /// proves one-shard routing and runs the probe on the distributed tables.
    /// Resumable; without --execute, prints the steps.
    Apply(DbDistributeArgs),
    /// Undo what `distribute apply` did, in reverse, from its stored steps
    /// (`undistribute_table`, keys and foreign keys restored); without
    /// --execute, prints what would be undone.
    Revert(DbDistributeArgs),
}

/// How long each statement may wait for its lock, and how often it tries.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// How long a statement may wait for its lock before it retries.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub lock_timeout: std::time::Duration,
    /// Attempts per statement before the run stops and names the lock holder.
    #[arg(long, default_value_t = 8)]
    pub attempts: u32,
}

#[derive(Debug, Args)]
pub struct DbDistributeArgs {
    #[command(flatten)]
    pub target: DbPlanFile,
    /// Change the database; without it, print the steps.
    #[arg(long)]
    pub execute: bool,
    #[command(flatten)]
    pub lock: LockArgs,
}

#[derive(Debug, Args)]
pub struct DbIsolateArgs {
    #[command(flatten)]
    pub db: DbUrl,
    /// The tenant's id (its slug in tenancy.organizations).
    pub tenant: String,
}

#[derive(Debug, Args)]
pub struct DbAddNodeArgs {
    #[command(flatten)]
    pub db: DbUrl,
    /// The node: HOST:PORT.
    pub node: String,
}

#[derive(Debug, Args)]
pub struct DbRehearseArgs {
    #[command(flatten)]
    pub db: DbUrl,
    /// The plan to rehearse (made for this database); without it, a draft.
    #[arg(long)]
    pub plan: Option<std::path::PathBuf>,
    /// An empty database to rehearse in; without it, a new one on the same
    /// server (the role needs CREATEDB), dropped at the end.
    #[arg(long, env = "FICUS_SCRATCH_URL", hide_env_values = true)]
    pub scratch_url: Option<String>,
    /// Rows copied per table, at most.
    #[arg(long, default_value_t = 10_000)]
    pub rows: i64,
    /// Keep the scratch database to look at afterwards.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Args)]
pub struct DbUrl {
    /// The database: postgres://USER[:PASSWORD]@HOST:PORT/DB.
    #[arg(long, env = "FICUS_DB_URL", hide_env_values = true)]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct DbPlanArgs {
    #[command(flatten)]
    pub db: DbUrl,
    /// The customer the database serves today; every existing row becomes theirs.
    #[arg(long)]
    pub tenant_zero: String,
    /// The tenant id's type everywhere: uuid or bigint.
    #[arg(long, default_value = "uuid")]
    pub id_type: String,
    /// Write the plan here instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DbPlanFile {
    #[command(flatten)]
    pub db: DbUrl,
    /// The reviewed plan.
    #[arg(long, value_name = "FILE")]
    pub plan: PathBuf,
}

#[derive(Debug, Args)]
pub struct DbApplyArgs {
    #[command(flatten)]
    pub target: DbPlanFile,
    /// Change the database; without it, print what would run.
    #[arg(long)]
    pub execute: bool,
    #[command(flatten)]
    pub lock: LockArgs,
    /// Backfill batches aim to take this long.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub batch_time: std::time::Duration,
    /// At most this many backfilled rows per second.
    #[arg(long)]
    pub max_rows_per_sec: Option<u64>,
    /// The backfill pauses while a replica's replay lag is above this (0: never
    /// waits; seeing the lag needs pg_read_all_stats).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub max_replica_lag: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct DbRevertArgs {
    #[command(flatten)]
    pub target: DbPlanFile,
    /// Keep this step and everything before it (default: undo everything).
    #[arg(long, value_name = "STEP")]
    pub to: Option<String>,
    /// Change the database; without it, print what would be undone.
    #[arg(long)]
    pub execute: bool,
    /// Allow undos that lose data (dropping tenant_id, dropping the spine).
    #[arg(long)]
    pub allow_destructive: bool,
}

#[derive(Debug, Args)]
pub struct DbEnforceArgs {
    #[command(flatten)]
    pub target: DbPlanFile,
    /// The table, as schema.name or name (public).
    #[arg(long, required_unless_present = "next", conflicts_with = "next")]
    pub table: Option<String>,
    /// The first tenant-owned table not yet enforced.
    #[arg(long)]
    pub next: bool,
    /// Change the database; without it, print the checks and the statements.
    #[arg(long)]
    pub execute: bool,
}

#[derive(Debug, Subcommand)]
pub enum DbTenantCommand {
    /// Add an organization and its first unit (idempotent by id).
    Add(DbTenantAddArgs),
}

#[derive(Debug, Args)]
pub struct DbTenantAddArgs {
    #[command(flatten)]
    pub db: DbUrl,
    /// The tenant's id, as in the control plane.
    pub id: String,
    #[arg(long)]
    pub name: String,
}
