//! `cargo xtask bench` (to be written).
use anyhow::Result;

#[derive(clap::Args, Default)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    anyhow::bail!("xtask bench is not written yet")
}
