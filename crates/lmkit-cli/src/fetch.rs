//! `lmkit fetch`: obtain the default model.

use anyhow::Result;

#[derive(clap::Args)]
#[command(after_help = "Examples:\n  lmkit fetch\n  LMKIT_HOME=/data/lmkit lmkit fetch --force")]
pub struct Args {
    /// Re-extract and re-verify even if the model is cached.
    #[arg(long)]
    force: bool,
}

pub fn main(a: Args) -> Result<()> {
    let p = super::common::fetch_default(a.force)?;
    println!("{}", p.display());
    Ok(())
}
