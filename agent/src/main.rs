use std::{io::IsTerminal, process::ExitCode};

use agent::{
    app::cli::{CaCommand, Cli, Command, DoctorArgs, LogFormat, TrustArgs},
    app::config::Config,
    listener::registries::Registries,
    ops::status,
};
use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let bpf_log = matches!(&cli.command, Command::Run(args) if args.bpf_log);
    init_tracing(cli.log_format, bpf_log);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("eddy: error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(args) => {
            let config = Config::from_args(&args)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime.block_on(agent::app::run(config))?;
        }
        Command::Status(args) => {
            let s = status::collect(&args.bpf_pin_dir, args.admin)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status::render_text(&s));
            }
        }
        Command::Gc(args) => {
            let report = agent::ops::gc::run(&args.request())?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", agent::store::lifecycle::render_text(&report));
            }
        }
        Command::Ca(CaCommand::Export(trust)) => {
            print!("{}", load_ca(&trust)?.cert_pem());
        }
        Command::Ca(CaCommand::Install {
            trust,
            bundle,
            restart_containerd,
            host_pid,
        }) => {
            ca_install(&trust, &bundle, restart_containerd, host_pid)?;
        }
        Command::Ca(CaCommand::Uninstall { trust, bundle }) => {
            ca_uninstall(&trust, &bundle)?;
        }
        Command::Ca(CaCommand::TalosPatch(trust)) => {
            print!(
                "{}",
                agent::tls::talos::trusted_roots_patch(load_ca(&trust)?.cert_pem())
            );
        }
        Command::Doctor(args) => {
            doctor(args)?;
        }
    }
    Ok(())
}

/// `eddy ca install`: the CA into `bundle`, then containerd restarted once if asked and needed.
fn ca_install(
    trust: &TrustArgs,
    bundle: &std::path::Path,
    restart_containerd: bool,
    host_pid: u32,
) -> anyhow::Result<()> {
    let ca = load_ca(trust)?;
    let added = agent::tls::install_into_bundle(bundle, ca.cert_pem())?;
    if added {
        println!("added eddy's CA to {}", bundle.display());
    } else {
        println!("eddy's CA is already in {}", bundle.display());
    }
    if restart_containerd && added {
        // Only now: a containerd that started after an earlier install trusts the CA.
        let containerd = agent::node::distro::detect(std::path::Path::new("/proc"))?;
        let argv = agent::node::restart::restart_command(&containerd)?;
        agent::node::restart::run_in_host(host_pid, &argv)?;
        println!(
            "restarted containerd ({}, pid {} was): {}",
            containerd.distro,
            containerd.pid,
            argv.join(" ")
        );
    } else if restart_containerd {
        println!("containerd not restarted: the CA was already installed");
    } else {
        println!(
            "containerd reads its trust roots once: start it after the CA is in place, or restart it once now"
        );
    }
    Ok(())
}

/// `eddy ca uninstall`: the CA out of `bundle`.
fn ca_uninstall(trust: &TrustArgs, bundle: &std::path::Path) -> anyhow::Result<()> {
    // Never create a CA just to remove it: read the existing one.
    let cert = trust.ca_dir().join("ca.crt");
    match std::fs::read_to_string(&cert) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no CA at {}: nothing to remove", cert.display());
        }
        Err(e) => return Err(e).context(format!("reading {}", cert.display())),
        Ok(pem) => {
            if agent::tls::remove_from_bundle(bundle, &pem)? {
                println!("removed eddy's CA from {}", bundle.display());
            } else {
                println!("eddy's CA is not in {}", bundle.display());
            }
        }
    }
    Ok(())
}

/// `eddy doctor`: run the checks, print them, and fail if any did.
fn doctor(args: DoctorArgs) -> anyhow::Result<()> {
    let p2p_ports = match &args.p2p_listen {
        Some(listen) => {
            let mut p2p = agent::peers::p2p::config::P2pConfig::new(
                agent::peers::p2p::config::parse_listen(listen)?,
                &args.trust.data_dir,
            );
            p2p.data_port = args.p2p_data_port;
            vec![
                ("p2p-listen", p2p.listen_socket()),
                ("p2p-data-port", p2p.data_listen()),
            ]
        }
        None => Vec::new(),
    };
    let inputs = agent::ops::doctor::Inputs {
        cgroup: args.cgroup,
        containerd_socket: args.containerd_socket,
        listen: args.listen,
        admin: args.admin,
        data_dir: args.trust.data_dir.clone(),
        ca_dir: args.trust.ca_dir(),
        bundle: args.bundle,
        pin_dir: args.bpf_pin_dir,
        registries: Registries::parse(&args.trust.registry_values())?,
        proc: "/proc".into(),
        p2p_ports,
    };
    let checks = agent::ops::doctor::run(&inputs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", agent::ops::doctor::render_text(&checks));
    }
    if agent::ops::doctor::failed(&checks) {
        anyhow::bail!("eddy doctor: some checks failed (see above)");
    }
    Ok(())
}

fn load_ca(trust: &TrustArgs) -> anyhow::Result<agent::tls::Ca> {
    let registries = Registries::parse(&trust.registry_values())?;
    Ok(agent::app::load_ca(
        &trust.ca_dir(),
        &registries,
        trust.ca_unconstrained,
    )?)
}

/// The error and its causes on one line. Many of eddy's messages already name their cause,
/// so a cause whose text is already there is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// `bpf_log`: `--bpf-log` shows the eBPF decision logs whatever the filter says.
fn init_tracing(format: LogFormat, bpf_log: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info".into());
    if bpf_log {
        filter = filter.add_directive("eddy::bpf=debug".parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in files, pipes and container logs.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
