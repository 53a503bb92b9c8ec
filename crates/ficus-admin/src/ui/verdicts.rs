//! The tenant board's gate verdicts, judged in the background.
//!
//! Judging every tenant in shadow reads the whole window's evidence: about a
//! fifth of a second at ten thousand tenants, too long to pay on every load of
//! the board, and more so with several people watching it. The board therefore
//! shows verdicts judged at most [`FRESH`] ago: a load that finds them older
//! still shows them, with their age, and starts one judgment in the background
//! for the next load; only the very first load of a process judges while it
//! waits. Stages and versions on the board are always read afresh, and a
//! promotion always judges the tenant anew, so a stale verdict can mislead a
//! glance, never an action.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Result;
use crate::api::ReadinessJson;
use crate::ops::{Control, Direct, GateOverrides};

/// How old the verdicts may be before a load asks for new ones.
pub const FRESH: Duration = Duration::from_secs(5);

/// One judgment of every tenant in shadow.
pub struct Judgment {
    pub at: Instant,
    /// How long the judgment took.
    pub took: Duration,
    pub by_tenant: HashMap<String, ReadinessJson>,
}

#[derive(Default)]
pub struct Verdicts {
    latest: Mutex<Option<Arc<Judgment>>>,
    /// A background judgment is under way.
    judging: AtomicBool,
    /// Held by the first judgment, so that concurrent first loads make one.
    first: tokio::sync::Mutex<()>,
}

async fn judge(control: &Direct) -> Result<Judgment> {
    let started = Instant::now();
    let all = control.readiness_all(&GateOverrides::default()).await?;
    Ok(Judgment {
        at: Instant::now(),
        took: started.elapsed(),
        by_tenant: all
            .tenants
            .into_iter()
            .map(|r| (r.tenant.clone(), r))
            .collect(),
    })
}

/// Marks the background judgment finished when dropped.
struct Done(Arc<Verdicts>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.judging.store(false, Ordering::Release);
    }
}

impl Verdicts {
    fn latest(&self) -> Option<Arc<Judgment>> {
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn keep(&self, j: Judgment) -> Arc<Judgment> {
        let j = Arc::new(j);
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(j.clone());
        j
    }

    /// The latest verdicts, judging anew in the background when they are older
    /// than [`FRESH`], or now when there are none yet.
    pub async fn get(self: &Arc<Self>, control: Direct) -> Result<Arc<Judgment>> {
        if let Some(j) = self.latest() {
            if j.at.elapsed() > FRESH && !self.judging.swap(true, Ordering::AcqRel) {
                let this = Arc::clone(self);
                tokio::spawn(async move {
                    // Cleared however the judgment ends, a panic included, so
                    // the board never stops asking for new verdicts.
                    let _done = Done(Arc::clone(&this));
                    match judge(&control).await {
                        Ok(j) => {
                            this.keep(j);
                        }
                        Err(e) => tracing::warn!(error = %e, "dashboard: judging the board failed"),
                    }
                });
            }
            return Ok(j);
        }
        let _first = self.first.lock().await;
        if let Some(j) = self.latest() {
            return Ok(j);
        }
        Ok(self.keep(judge(&control).await?))
    }
}
