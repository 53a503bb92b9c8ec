//! `ficus-soak`: a whole migration on real parts — two PostgreSQL clusters,
//! two `ficus proxy` replicas on the shared store, HAProxy in front, the
//! demo's legacy backend and two instances of the rebuilt one, and client
//! processes reading and writing through it all — with faults injected on a
//! schedule drawn from a seed, ending in a verdict (`scripts/soak.sh`).

mod chaos;
mod client;
mod run;
mod schedule;
mod verdict;
mod world;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "The migration soak under faults")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the soak and print its verdict; exit 1 on any loss, duplicate, leak
    /// or unexplained failure.
    Run {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the logs, the configurations and verdict.json go.
        #[arg(long, default_value = "target/soak")]
        out: PathBuf,
        /// The ficus binary the replicas and `ficus db` run from (default: next
        /// to this one).
        #[arg(long)]
        ficus: Option<PathBuf>,
        /// Homes in the portal's database before the retrofit.
        #[arg(long, default_value_t = 20_000)]
        homes: u32,
        /// Requests per second of each tenant's client.
        #[arg(long, default_value_t = 20)]
        rate: u32,
    },
    /// One tenant's client (started by `run`).
    #[command(hide = true)]
    Client(client::Args),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Client(args) => rt.block_on(client::run(args)),
        Command::Run {
            minutes,
            seed,
            out,
            ficus,
            homes,
            rate,
        } => {
            let ficus = match ficus {
                Some(f) => f,
                None => std::env::current_exe()?
                    .parent()
                    .context("this binary's directory")?
                    .join("ficus"),
            };
            let out = out.join(format!("seed-{seed}"));
            let verdict = rt.block_on(run::run(run::Args {
                minutes,
                seed,
                out: out.clone(),
                ficus,
                homes,
                rate,
            }))?;
            let table = verdict.table();
            println!("\n== verdict\n{table}");
            std::fs::write(
                out.join("verdict.json"),
                serde_json::to_string_pretty(&verdict)?,
            )?;
            std::fs::write(out.join("verdict.txt"), &table)?;
            println!("written to {}", out.join("verdict.json").display());
            if !verdict.passed {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
