//! `ficus`: the one binary. It parses the command line, opens the store, calls the
//! library crates and prints; all real work lives in those crates.
//!
//! Exit codes (DESIGN.md §5): 0 success, 1 refused or failed operation with a
//! one-line reason on stderr, 2 usage error (clap's own). A closed stdout (`ficus
//! tenant list | head`) is success, not an error.

/// mimalloc instead of the system allocator: the proxy allocates per request
/// (headers, buffers), and glibc's malloc was a tenth of its profile. Its v2
/// line, not v3: see the workspace's `Cargo.toml`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cli;
mod commands;
mod db;
mod demo;
mod import;
mod output;

use std::io;
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // The proxy brings its own runtimes (one for control, one for requests), so it starts outside any other.
    if let cli::Command::Proxy(args) = &cli.command {
        return match commands::proxy(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .any(|io| io.kind() == io::ErrorKind::BrokenPipe)
}
