//! The agent as a process: flags (`cli`) → validated `config::Config` → the running agent
//! (`run`: wire every subsystem together, drain on SIGTERM).
//!
//! May import every other folder: this is the top of the tree. Nothing imports `app`.
pub mod cli;
pub mod config;
mod run;

pub use run::{load_ca, run};
