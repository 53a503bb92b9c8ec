//! The `ficus` binary end to end, in one test binary: the control-plane commands
//! (`cli`), `ficus db` (`db`) and its distribution onto a real Citus cluster
//! (`citus`), the whole demo run from the dashboard in a real browser
//! (`dashboard`), the proxy (`proxy`), the parallel run (`shadow`) and its reconciliation
//! (`reconcile`), routes and the write surface (`routes`), with real processes, real sockets, real SQLite
//! files and a real PostgreSQL server. `support` holds the test backends and the
//! proxy launcher.

mod citus;
mod cli;
mod dashboard;
mod db;
mod proxy;
mod reconcile;
mod routes;
mod shadow;
mod support;
