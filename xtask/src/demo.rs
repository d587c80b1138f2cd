//! `cargo xtask demo` (to be written).
use anyhow::Result;

#[derive(clap::Args, Default)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    anyhow::bail!("xtask demo is not written yet")
}
