//! The `ficus` binary end to end, in one test binary: the control-plane commands
//! (`cli`), the proxy (`proxy`) and the parallel run (`shadow`), with real processes, real sockets, real SQLite
//! files and a real PostgreSQL server. `support` holds the test backends and the
//! proxy launcher.

mod cli;
mod db;
mod proxy;
mod shadow;
mod support;
