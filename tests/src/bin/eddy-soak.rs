//! eddy-soak: mixed cold and warm pulls from several clients for N minutes, through eddy,
//! with real containerd (ctr content fetch) and docker-registry. Reports pulls done and
//! failed, p50/p99 pull time (cold and warm), and eddy's RSS and open fds at start, middle
//! and end. Run by `cargo xtask soak [--minutes N]` (as root; not part of CI).
//!
//! Cold pulls take images pushed before the run and never pulled; warm pulls take images
//! pulled before. Each pull goes into a fresh namespace of a containerd with isolated
//! content, so every pull downloads every blob (from eddy).
use std::{
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use clap::Parser;
use eddy_tests::{
    containerd::Containerd,
    oci::ImageSpec,
    process::{open_fds, peak_rss_kib, rss_kib},
    registry::REGISTRY_HOST,
    registry_eddy::verify_store,
    require_privileges,
    world::WorldSpec,
};
use rand::Rng;

#[derive(Parser)]
struct Args {
    /// How long to pull, in minutes (fractions allowed).
    #[arg(long, default_value_t = 15.0)]
    minutes: f64,
    /// Concurrent clients (one containerd each).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// One pull in this many is cold (of an image never pulled before).
    #[arg(long, default_value_t = 4)]
    cold_every: usize,
    /// Write the markdown report here too.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Default)]
struct Tally {
    cold: Vec<Duration>,
    warm: Vec<Duration>,
    failed: Vec<String>,
}

// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn main() -> Result<()> {
    let args = Args::parse();
    if !require_privileges() {
        bail!("eddy-soak needs root, cgroup v2 and BPF");
    }
    if !(0.1..=240.0).contains(&args.minutes) || !(1..=16).contains(&args.clients) {
        bail!("--minutes must be within 0.1..=240 and --clients within 1..=16");
    }
    let world = WorldSpec::new().start()?;
    let mut rng = rand::thread_rng();
    // Cold images are pushed before the run (about 0.4 s each), 60 per minute of soak; once
    // they are used up, the remaining pulls are warm (the report counts each kind).
    let cold_count = (args.minutes * 60.0).ceil().clamp(4.0, 900.0) as usize;
    let warm_count = 4;
    let started = Instant::now();
    let mut push = |name: String| -> Result<String> {
        let sizes = [
            rng.gen_range(1 << 20..4 << 20),
            rng.gen_range(64 << 10..1 << 20),
        ];
        world.image(&name, "v1", &ImageSpec::single(&sizes))?;
        Ok(format!("{REGISTRY_HOST}/{name}:v1"))
    };
    let warm: Vec<String> = (0..warm_count)
        .map(|i| push(format!("soak/warm{i}")))
        .collect::<Result<_>>()?;
    let cold: Vec<String> = (0..cold_count)
        .map(|i| push(format!("soak/cold{i}")))
        .collect::<Result<_>>()?;
    let pushed_in = started.elapsed();
    eprintln!(
        "eddy-soak: pushed {warm_count} warm and {cold_count} cold images in {pushed_in:.0?}"
    );
    let daemons: Vec<Containerd> = (0..args.clients)
        .map(|_| Containerd::start_isolated())
        .collect::<Result<_>>()?;
    // Make the warm images warm.
    for reference in &warm {
        world
            .client
            .fetch(
                &daemons[0],
                "soak-prewarm",
                reference,
                &[],
                Duration::from_secs(120),
            )?
            .check("pre-warming pull")?;
    }

    let pid = world.eddy().pid();
    let sample = |label: &str| -> Result<String> {
        Ok(format!(
            "| {label} | {:.1} | {} |",
            rss_kib(pid)? as f64 / 1024.0,
            open_fds(pid)?
        ))
    };
    let mut samples = vec![sample("start")?];
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next_cold = Arc::new(AtomicUsize::new(0));
    let cold = Arc::new(cold);
    let warm = Arc::new(warm);
    let duration = Duration::from_secs_f64(args.minutes * 60.0);
    let run_started = Instant::now();
    let deadline = run_started + duration;
    let pulls = AtomicUsize::new(0);
    thread::scope(|scope| -> Result<()> {
        for (i, daemon) in daemons.iter().enumerate() {
            let (tally, next_cold, cold, warm, world, pulls) =
                (&tally, &next_cold, &cold, &warm, &world, &pulls);
            let cold_every = args.cold_every;
            scope.spawn(move || {
                let mut n = 0usize;
                // Bounded by the deadline; each pull by its own timeout.
                while Instant::now() < deadline {
                    n += 1;
                    let seq = pulls.fetch_add(1, Ordering::Relaxed);
                    // Cold only while never-pulled images are left; then warm, and counted so.
                    let cold_image = (seq % cold_every == 0)
                        .then(|| cold.get(next_cold.fetch_add(1, Ordering::Relaxed)))
                        .flatten();
                    let is_cold = cold_image.is_some();
                    let reference = cold_image.unwrap_or(&warm[seq % warm.len()]).clone();
                    let namespace = format!("soak-{i}-{n}");
                    let t = Instant::now();
                    let run = world.client.fetch(
                        daemon,
                        &namespace,
                        &reference,
                        &[],
                        Duration::from_secs(120),
                    );
                    let took = t.elapsed();
                    let mut tally = tally.lock().unwrap();
                    match run {
                        Ok(run) if run.ok() => {
                            if is_cold {
                                tally.cold.push(took)
                            } else {
                                tally.warm.push(took)
                            }
                        }
                        Ok(run) => tally.failed.push(format!("{reference}: {}", run.stderr())),
                        Err(e) => tally.failed.push(format!("{reference}: {e:#}")),
                    }
                    drop(tally);
                    // Drop the namespace's content, so the daemon's disk stays small.
                    remove_content(daemon, &namespace);
                }
            });
        }
        // The middle sample, from this thread, while the clients pull.
        thread::sleep(duration / 2);
        samples.push(sample("middle")?);
        Ok(())
    })?;
    samples.push(sample("end")?);
    let elapsed = run_started.elapsed();
    verify_store(world.data_dir())?;
    let peak = peak_rss_kib(pid)? as f64 / 1024.0;
    let tally = tally.lock().unwrap();
    let mut all: Vec<Duration> = tally.cold.iter().chain(&tally.warm).copied().collect();
    let row = |what: &str, v: &mut Vec<Duration>| {
        v.sort();
        format!(
            "| {what} | {} | {:.2} | {:.2} |",
            v.len(),
            percentile(v, 0.50),
            percentile(v, 0.99)
        )
    };
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut report = format!(
        "### eddy soak\n\n{:.1} minutes, {} clients (one containerd 1.6 each, `ctr content fetch` into a \
         fresh namespace per pull, content isolated per namespace), docker-registry 2.8 upstream over \
         an unshaped veth; one pull in {} cold. Images of 2 layers, 1-4 MiB + 64 KiB-1 MiB; {} never-pulled \
         images for the cold pulls (pushed in {:.0?}). Load average at the end: {}.\n\n\
         | pulls | done | p50 s | p99 s |\n|---|---:|---:|---:|\n{}\n{}\n{}\n\n\
         Failed pulls: **{}**. The store verified (every file hashes to its name) after the run.\n\n\
         | eddy at | RSS MiB | open fds |\n|---|---:|---:|\n{}\n\nPeak RSS (VmHWM): {peak:.1} MiB.\n",
        elapsed.as_secs_f64() / 60.0,
        args.clients,
        args.cold_every,
        cold.len(),
        pushed_in,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        row("all", &mut all),
        row("cold", &mut tally.cold.clone()),
        row("warm", &mut tally.warm.clone()),
        tally.failed.len(),
        samples.join("\n"),
    );
    for failure in tally.failed.iter().take(5) {
        report += &format!("\n- failed: {}", failure.lines().last().unwrap_or(""));
    }
    println!("{report}");
    if let Some(out) = &args.out {
        if let Some(dir) = out.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(out, &report)?;
    }
    if !tally.failed.is_empty() {
        bail!("{} pulls failed", tally.failed.len());
    }
    Ok(())
}

/// Remove what a pull left in `namespace` (bounded: one list, one remove).
fn remove_content(daemon: &Containerd, namespace: &str) {
    let ctr = |args: &[&str]| {
        let argv = daemon.ctr_args(namespace, args);
        std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
    };
    let Ok(listed) = ctr(&["content", "ls", "-q"]) else {
        return;
    };
    let text = String::from_utf8_lossy(&listed.stdout).into_owned();
    let mut args = vec!["content", "rm"];
    args.extend(text.split_whitespace());
    if args.len() > 2 {
        let _ = ctr(&args);
    }
}

/// The `q` quantile of sorted durations, in seconds (nearest rank).
fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64()
}
