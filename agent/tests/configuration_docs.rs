//! docs/configuration.md is the reference for eddy's flags. These tests read the flags from
//! the clap definition itself (`agent::app::cli::Cli`, what `eddy` parses), so a flag added to the
//! CLI without a line in the reference fails here instead of going unnoticed.
use agent::app::cli::Cli;
use clap::CommandFactory;

fn configuration_md() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Whether `word` occurs in `text` as a whole token: not followed by a character that could
/// continue it, so `--cache-ttl` is not found inside `--cache-ttl-extra` and `EDDY_ADMIN`
/// not inside `EDDY_ADMIN_PORT`.
fn mentions(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(at, _)| {
        !text[at + word.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    })
}

/// The `--flag` and `EDDY_*` names of `command`'s arguments that `doc` does not mention.
/// Hidden arguments are internal by intent and not required.
fn undocumented<'a>(doc: &str, args: impl Iterator<Item = &'a clap::Arg>) -> Vec<String> {
    let mut missing = Vec::new();
    for arg in args.filter(|a| !a.is_hide_set()) {
        let Some(long) = arg.get_long() else { continue };
        let flag = format!("--{long}");
        if !mentions(doc, &flag) {
            missing.push(flag);
        }
        if let Some(env) = arg.get_env() {
            let env = env.to_string_lossy().into_owned();
            if !mentions(doc, &env) {
                missing.push(env);
            }
        }
    }
    missing
}

#[test]
fn every_run_flag_and_its_environment_variable_is_documented() {
    let cli = Cli::command();
    let run = cli
        .find_subcommand("run")
        .expect("eddy has a `run` subcommand");
    // Global flags (--log-format) apply to `run` too; clap adds them to subcommands only
    // when the command is built, so they are taken from the top level.
    let globals = cli.get_arguments().filter(|a| a.is_global_set());
    let args: Vec<&clap::Arg> = run.get_arguments().chain(globals).collect();
    // Guard against passing vacuously if the CLI's shape changes under this test.
    assert!(
        args.iter().any(|a| a.get_long() == Some("cgroup")),
        "`eddy run` has no --cgroup: the test no longer sees the run flags"
    );
    let missing = undocumented(&configuration_md(), args.into_iter());
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not mention these `eddy run` flags or variables: {missing:?}"
    );
}

#[test]
fn every_other_subcommands_flags_are_documented() {
    let doc = configuration_md();
    let cli = Cli::command();
    let mut missing = Vec::new();
    let mut stack: Vec<(String, &clap::Command)> = cli
        .get_subcommands()
        .filter(|c| c.get_name() != "run")
        .map(|c| (c.get_name().to_string(), c))
        .collect();
    while let Some((name, command)) = stack.pop() {
        for flag in undocumented(&doc, command.get_arguments()) {
            missing.push(format!("eddy {name} {flag}"));
        }
        for sub in command.get_subcommands() {
            stack.push((format!("{name} {}", sub.get_name()), sub));
        }
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not mention these flags or variables: {missing:?}"
    );
}
