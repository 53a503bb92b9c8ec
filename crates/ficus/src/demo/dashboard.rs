//! `ficus demo --dashboard`: the demo prepares the migration and the world it
//! runs in (the database retrofitted, both backends, the proxy, clients), then
//! leaves every decision to a person in the dashboard. It says what happens
//! and what is theirs to do next, and waits for the store to show it done:
//! tenant zero into shadow, the bug's mismatch looked at and its class
//! resolved, the promotion, the write routes released, the guard's rollback
//! watched and the tenant re-promoted, the destructive route released and
//! legacy retired. The world keeps its side of the story: the rebuilt
//! backend's team ships the fix, customers are sold, the backend slows down.
//!
//! The waits have no deadline (a person takes the time they take); Ctrl-C
//! ends the demo at any point. The browser test in `tests/it/dashboard.rs`
//! plays the person.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, bail};
use ficus_admin::{Control, token};
use ficus_core::{Actor, Stage};
use ficus_store::ControlStore;

use super::{Clock, Demo, provision, say, settled_mismatches};

/// The write routes the demo's clients call that are not destructive.
const WRITES: [&str; 3] = [
    "POST /searches",
    "POST /homes/{id}/valuations",
    "POST /homes",
];

/// The route that deletes: released only with its second confirmation.
const DELETE: &str = "DELETE /searches/{id}";

/// The viewer's token the demo hands out (created once, shown once).
pub(super) async fn viewer_token(store: &dyn ControlStore) -> Result<String> {
    Ok(token::create(
        store,
        "demo_viewer",
        token::Scope::Viewer,
        Actor::Cli,
        "the demo's dashboard login",
    )
    .await?)
}

/// Waits until `done` holds, checking every 200 ms, or bails on Ctrl-C.
async fn wait_for<F, Fut>(what: &str, mut done: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        if done().await? {
            return Ok(());
        }
        tokio::select! {
            _ = &mut interrupted => bail!("stopped by Ctrl-C while waiting for {what}"),
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

async fn stage_of(d: &Demo<'_>) -> Result<Option<Stage>> {
    Ok(d.store.tenant(&d.zero).await?.map(|t| t.stage))
}

/// The demo's side of the migration, with a person in the dashboard taking
/// every decision.
pub(super) async fn run(
    d: &Demo<'_>,
    viewer: &str,
    out: &mut impl Write,
    clock: &mut Clock,
) -> Result<()> {
    let operator = token::create(
        &*d.store,
        "demo_operator",
        token::Scope::Operator,
        Actor::Cli,
        "the demo's operator in the dashboard",
    )
    .await?;
    say(
        out,
        "\n-- the migration is yours: run it from the dashboard; this terminal says what happens and waits for you",
    );
    say(out, &format!("   dashboard: http://{}/ui/", d.proxy.admin));
    say(out, &format!("   operator token: {operator}"));
    say(out, &format!("   viewer token: {viewer}"));

    say(
        out,
        "\n-- 3. next: promote Acme Homes (acme-homes) into shadow from its page; the parallel run starts",
    );
    wait_for("tenant zero in shadow", || async {
        Ok(stage_of(d).await? == Some(Stage::Shadow))
    })
    .await?;
    say(
        out,
        "   acme-homes is in shadow: every safe read also goes to the rebuilt backend",
    );
    wait_for("the first mismatch", || async {
        Ok(!d
            .control
            .mismatches(&d.zero, None, 1)
            .await?
            .mismatches
            .is_empty())
    })
    .await?;
    say(
        out,
        "   a MISMATCH: the tenant page lists its class; the class page shows the differing field, legacy beside new",
    );
    d.faults.bug.store(false, Ordering::Relaxed);
    say(
        out,
        "   the rebuilt backend's team ships 2.0.1 with the fix (price_per_bedroom divided by the right number of bedrooms)",
    );
    // Comparisons of 2.0.0 still on their way to the store would land after a
    // resolution; ask for it once they are in.
    settled_mismatches(&*d.store, &d.zero).await?;
    say(
        out,
        "   next: resolve the class as fixed in 2.0.1 (and set aside any read raced by a client's own write), then promote acme-homes once the gate says ready (the tenant page, or promote next N on the overview)",
    );
    wait_for("tenant zero migrated", || async {
        Ok(stage_of(d).await? == Some(Stage::Migrated))
    })
    .await?;
    say(
        out,
        "   acme-homes is migrated: the rebuilt backend serves its reads",
    );
    clock.lap("3. shadow and promote");

    say(
        out,
        &format!(
            "\n-- 3b. next: its writes are still held on legacy; release {} on the routes page (a canary tenant first if you like, then every tenant)",
            WRITES.join(", ")
        ),
    );
    wait_for("the write routes released", || async {
        let routes = d.control.routes(None).await?;
        Ok(WRITES
            .iter()
            .all(|w| routes.routes.iter().any(|r| r.route == *w && !r.held)))
    })
    .await?;
    say(out, "   the writes go to the rebuilt backend");
    clock.lap("3b. write surface");

    provision(d, out).await?;
    clock.lap("4. provision");

    say(
        out,
        "\n-- 5. the rebuilt backend slows down for Acme Homes: watch the guard roll it back (the overview's guard actions, the tenant page's timeline)",
    );
    *d.faults.slow.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((d.zero.to_string(), super::SLOWDOWN_MS));
    wait_for("the guard's rollback", || async {
        Ok(stage_of(d).await? == Some(Stage::Shadow))
    })
    .await?;
    *d.faults.slow.lock().unwrap_or_else(|p| p.into_inner()) = None;
    say(
        out,
        "   the guard rolled acme-homes back to shadow; the slowdown is fixed",
    );
    say(
        out,
        "   next: promote acme-homes again (if this hour's evidence still holds the incident's slow answers, tick \"past the gate\" and say why)",
    );
    wait_for("tenant zero migrated again", || async {
        Ok(stage_of(d).await? == Some(Stage::Migrated))
    })
    .await?;
    say(out, "   acme-homes is back on the rebuilt backend");
    clock.lap("5. guard");

    say(
        out,
        &format!(
            "\n-- 6. next: release {DELETE} (destructive: type the route to confirm), then retire legacy on the overview once it has been quiet"
        ),
    );
    wait_for("legacy retired", || async {
        Ok(d.store.legacy_retired().await?)
    })
    .await?;
    say(out, "   legacy retired: no request will reach it again");
    clock.lap("6. retire legacy");
    Ok(())
}
