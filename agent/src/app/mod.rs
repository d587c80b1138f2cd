//! The agent as a process: flags (`cli`) → validated `config::Config` → the running agent
//! (`run`: wire every subsystem together, drain on SIGTERM), and the data dir's single owner
//! (`datadir_lock`).
//!
//! May import every other folder: this is the top of the tree. Nothing imports `app`.
pub mod cli;
pub mod config;
pub mod datadir_lock;
mod run;

pub use run::{load_ca, run};
