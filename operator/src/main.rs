//! `corescale-operator`: see `corescale-operator --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    corescale_operator::run::run(corescale_operator::run::Args::parse()).await
}
