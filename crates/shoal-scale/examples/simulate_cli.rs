// Scratch harness for crates/shoal/src/simulate.rs (removed before hand-off).
#[path = "../../shoal/src/simulate.rs"]
mod simulate;
use clap::Parser;
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: simulate::SimulateArgs,
}
fn main() -> anyhow::Result<()> {
    simulate::run(Cli::parse().args)
}
