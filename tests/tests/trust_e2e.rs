//! End-to-end tests of the trust gate with real programs: docker-registry upstream in a
//! network namespace; ctr, curl and a containerd daemon pulling through its CRI plugin (as
//! the kubelet has it do) in the hooked cgroup. A client that does not trust eddy's CA must
//! pull successfully through eddy, untouched and uncached; one that trusts it is served and
//! cached; a client that rejects eddy's certificate anyway fails once, then passes through.
//!
//! Run as root: `cargo xtask test --privileged-only -- trust_` (or `cargo xtask test`).
use std::{
    ops::Deref,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    containerd::{Client, Containerd},
    eddy::status_text,
    oci::{Image, ImageSpec},
    pki::write_bundle,
    registry::{CDN_HOST, REGISTRY_HOST},
    registry_eddy::{connections_series, verify_store},
    world::{RegistryWorld, WorldSpec},
    MIB,
};

const PULL_TIMEOUT: Duration = Duration::from_secs(120);
const NS: &str = "trust";
const REPO: &str = "trust/app";
const REJECTIONS: &str = "eddy_trust_rejections_total";

fn untrusted_series() -> String {
    connections_series("passthrough_untrusted")
}

fn tls_series() -> String {
    connections_series("registry_tls")
}

/// One test's world (see [`WorldSpec`]): a small image pushed, eddy's CA created and
/// both bundles written; eddy not started yet. The registry world's fields and methods
/// are this one's.
struct World {
    registry: RegistryWorld,
    /// The test CA alone: a bundle WITHOUT eddy's CA.
    without_eddy: PathBuf,
    /// eddy's CA and the test CA.
    with_eddy: PathBuf,
    image: Image,
}

impl Deref for World {
    type Target = RegistryWorld;

    fn deref(&self) -> &RegistryWorld {
        &self.registry
    }
}

impl World {
    fn new() -> Result<Self> {
        let registry = WorldSpec::new()
            .cert_names(&[REGISTRY_HOST, CDN_HOST])
            .eddy_hosts(&[(REGISTRY_HOST, 0)])
            .eddy_started_later()
            .start()?;
        let without_eddy = registry.work.path().join("bundle-without-eddy.pem");
        write_bundle(&without_eddy, &[&registry.pki.ca_cert])?;
        let with_eddy = registry.client.ca_bundle.clone();
        let image = registry.image(REPO, "v1", &ImageSpec::single(&[3 * MIB, MIB]))?;
        Ok(World {
            registry,
            without_eddy,
            with_eddy,
            image,
        })
    }

    fn start_eddy(&mut self) -> Result<()> {
        self.registry.start_eddy()
    }

    /// A client in the hooked cgroup (or none) whose SSL_CERT_FILE is `bundle`.
    fn client(&self, bundle: &Path, hooked: bool) -> Client {
        self.client_trusting(bundle, hooked)
    }

    fn reference(&self) -> String {
        format!("{REGISTRY_HOST}/{REPO}:v1")
    }

    fn layer_bytes(&self) -> u64 {
        self.image.layers().iter().map(|b| b.size).sum()
    }

    /// Layer bytes the upstream registry itself sent so far (its log).
    fn upstream_blob_bytes(&self) -> Result<u64> {
        Ok(self.upstream.served()?.blob_bytes)
    }

    fn store_files(&self) -> Result<usize> {
        Ok(verify_store(self.data_dir())?.files)
    }

    /// `eddy status --admin ADDR` as text.
    fn status_text(&self) -> Result<String> {
        status_text(&self.eddy().pin_dir, self.eddy().admin)
    }
}

fn world() -> Option<World> {
    if !eddy_tests::require_privileges() {
        return None;
    }
    Some(World::new().expect("setting up upstream, cgroup and eddy's CA"))
}

/// a) and b): ctr whose SSL_CERT_FILE lacks eddy's CA pulls through the hooked cgroup on
/// the first try, passed through untouched and uncached (a baseline without eddy first);
/// a new ctr whose bundle has the CA is served by eddy and cached.
#[test]
fn trust_ctr_without_the_ca_passes_through_and_with_it_is_cached() -> Result<()> {
    let Some(mut world) = world() else {
        return Ok(());
    };
    let reference = world.reference();

    // Baseline: the same client without eddy (outside the hooked cgroup).
    let baseline_ctd = Containerd::start()?;
    let baseline = world
        .client(&world.without_eddy, false)
        .fetch(&baseline_ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("baseline ctr content fetch without eddy")?;
    baseline_ctd.ensure_content(NS, &world.image.blobs())?;
    println!("baseline (no eddy): {:.2?}", baseline.elapsed);

    world.start_eddy()?;
    let eddy = world.eddy();
    let upstream_before = world.upstream_blob_bytes()?;
    let ctd = Containerd::start()?;
    let untrusting = world
        .client(&world.without_eddy, true)
        .fetch(&ctd, NS, &reference, &[], PULL_TIMEOUT)?
        .check("ctr content fetch through eddy, bundle without eddy's CA")?;
    ctd.ensure_content(NS, &world.image.blobs())?;
    let passed = eddy.metric(&untrusted_series())?;
    let terminated = eddy.metric(&tls_series())?;
    let direct_bytes = world.upstream_blob_bytes()? - upstream_before;
    println!(
        "untrusting ctr through eddy: {:.2?}; {} = {passed}, registry_tls = {terminated}; \
         upstream sent {direct_bytes} layer bytes straight to ctr; eddy upstream bytes {}",
        untrusting.elapsed,
        untrusted_series(),
        eddy.upstream_bytes()?
    );
    ensure!(
        passed >= 1.0 && terminated == 0.0,
        "the untrusting ctr was not passed through: passthrough_untrusted {passed}, \
         registry_tls {terminated}; eddy log:\n{}",
        eddy.log_tail(30)
    );
    ensure!(
        eddy.metric(r#"eddy_trust_verdicts_total{verdict="ca_not_in_roots"}"#)? >= 1.0,
        "no ca_not_in_roots verdict recorded"
    );
    ensure!(
        world.store_files()? == 0 && eddy.upstream_bytes()? == 0,
        "eddy cached or fetched content for an untrusting client"
    );
    ensure!(
        direct_bytes >= world.layer_bytes(),
        "upstream sent {direct_bytes} layer bytes, less than the image's {}",
        world.layer_bytes()
    );

    // b) A new ctr process whose bundle has eddy's CA: terminated and cached.
    let ctd2 = Containerd::start()?;
    world
        .client(&world.with_eddy, true)
        .fetch(&ctd2, NS, &reference, &[], PULL_TIMEOUT)?
        .check("ctr content fetch through eddy, bundle with eddy's CA")?;
    ctd2.ensure_content(NS, &world.image.blobs())?;
    let terminated = eddy.metric(&tls_series())?;
    let files = world.store_files()?;
    println!(
        "trusting ctr: registry_tls = {terminated}, {} still {}, store holds {files} blobs",
        untrusted_series(),
        eddy.metric(&untrusted_series())?
    );
    ensure!(terminated >= 1.0, "the trusting ctr was not terminated");
    ensure!(
        eddy.metric(&untrusted_series())? == passed,
        "the trusting ctr was passed through"
    );
    for blob in world.image.layers() {
        ensure!(
            eddy_tests::registry_eddy::store_has(&world.eddy_config.data_dir, &blob.digest),
            "eddy did not cache {}",
            blob.digest
        );
    }
    Ok(())
}

/// d) The reactive guard: curl whose SSL_CERT_FILE has eddy's CA (so the gate trusts it) but
/// whose `--cacert` does not. Its first connection fails (it rejects eddy's certificate);
/// later connections from curl in that cgroup pass through and succeed.
#[test]
fn trust_a_client_that_rejects_eddys_certificate_fails_once_then_passes_through() -> Result<()> {
    let Some(mut world) = world() else {
        return Ok(());
    };
    world.start_eddy()?;
    let client = world.client(&world.with_eddy, true);
    let url = format!("https://{REGISTRY_HOST}/v2/");
    let cacert = world
        .without_eddy
        .to_str()
        .context("utf-8 path")?
        .to_string();
    let mut outcomes = Vec::new();
    for i in 0..3 {
        let (run, status) = client.curl_status(
            world.work.path(),
            &format!("curl{i}"),
            &url,
            &["--cacert", &cacert],
            Duration::from_secs(30),
        )?;
        println!(
            "curl #{i}: ok={} HTTP {status:?} {}",
            run.ok(),
            run.stderr().trim()
        );
        outcomes.push((run.ok() && status == Some(200), run.stderr()));
    }
    let eddy = world.eddy();
    let rejections = eddy.metric(REJECTIONS)?;
    let passed = eddy.metric(&untrusted_series())?;
    println!(
        "{REJECTIONS} = {rejections}, {} = {passed}",
        untrusted_series()
    );
    ensure!(
        !outcomes[0].0,
        "the first curl succeeded: the gate was supposed to misjudge it"
    );
    ensure!(
        outcomes[1].0 && outcomes[2].0,
        "after the rejection, curl still failed: {outcomes:?}; eddy log:\n{}",
        eddy.log_tail(30)
    );
    ensure!(rejections == 1.0, "{REJECTIONS} is {rejections}, not 1");
    ensure!(passed == 2.0, "passthrough_untrusted is {passed}, not 2");
    let status = world.status_text()?;
    println!("eddy status:\n{status}");
    ensure!(
        status.lines().any(|l| l.contains("curl")
            && l.contains("rejected_certificate")
            && l.contains("passed through for")),
        "eddy status does not name the guarded curl:\n{status}"
    );
    Ok(())
}

/// c) The CRI path: a containerd daemon started BEFORE eddy's CA entered its bundle (the
/// state of every node right after eddy's install) pulls through its CRI plugin, as the
/// kubelet asks it to, successfully and uncached through eddy; `eddy status` names it and
/// the fix. After a restart with the CA in its bundle, eddy caches its pulls by itself.
#[test]
fn trust_cri_pull_by_containerd_started_before_the_ca_is_cached_after_restart() -> Result<()> {
    let Some(mut world) = world() else {
        return Ok(());
    };
    world.start_eddy()?;
    let bundle = world.work.path().join("containerd-bundle.pem");
    write_bundle(&bundle, &[&world.pki.ca_cert])?;
    let daemon = world.client(&bundle, true);
    let containerd = Containerd::start_cri(&daemon)?;
    // `eddy ca install` adds eddy's CA to the bundle the running daemon already read.
    thread::sleep(Duration::from_millis(50));
    write_bundle(&bundle, &[&world.pki.ca_cert, &world.eddy_ca])?;

    let reference = world.reference();
    let image_ref = cri_pull(&containerd, &reference)?;
    containerd.ensure_content("k8s.io", &world.image.blobs())?;
    let eddy = world.eddy();
    let passed = eddy.metric(&untrusted_series())?;
    println!(
        "CRI pull by containerd started before the CA: {image_ref}; {} = {passed}, \
         registry_tls = {}, store {} files",
        untrusted_series(),
        eddy.metric(&tls_series())?,
        world.store_files()?
    );
    ensure!(
        passed >= 1.0 && eddy.metric(&tls_series())? == 0.0,
        "containerd's connections were not passed through; eddy log:\n{}",
        eddy.log_tail(30)
    );
    ensure!(
        eddy.metric(r#"eddy_trust_verdicts_total{verdict="started_before_ca"}"#)? >= 1.0,
        "no started_before_ca verdict recorded"
    );
    ensure!(
        world.store_files()? == 0 && eddy.upstream_bytes()? == 0,
        "eddy cached content for an untrusting containerd"
    );
    let status = world.status_text()?;
    println!("eddy status:\n{status}");
    let pid_line = format!("pid {} ", containerd.pid());
    ensure!(
        status.lines().any(|l| l.contains(&pid_line)
            && l.contains("containerd")
            && l.contains("started_before_ca")
            && l.contains(&world.cgroup.path().display().to_string())),
        "eddy status does not name the untrusting containerd (pid, exe, cgroup):\n{status}"
    );
    ensure!(
        status.contains(
            "restart containerd once (after `eddy ca install`), or set trust.restartContainerd in the chart"
        ),
        "eddy status does not give the fix:\n{status}"
    );
    drop(containerd);

    // Restarted with the CA in its bundle: caching starts by itself.
    let containerd = Containerd::start_cri(&daemon)?;
    cri_pull(&containerd, &reference)?;
    containerd.ensure_content("k8s.io", &world.image.blobs())?;
    let terminated = eddy.metric(&tls_series())?;
    println!(
        "restarted containerd: registry_tls = {terminated}, store {} files",
        world.store_files()?
    );
    ensure!(
        terminated >= 1.0,
        "the restarted containerd was not terminated; eddy log:\n{}",
        eddy.log_tail(30)
    );
    for blob in world.image.layers() {
        ensure!(
            eddy_tests::registry_eddy::store_has(&world.eddy_config.data_dir, &blob.digest),
            "eddy did not cache {} for the restarted containerd",
            blob.digest
        );
    }
    let status = world.status_text()?;
    ensure!(
        status.contains("every client seen trusts eddy's CA"),
        "eddy status still lists untrusting clients after the restart:\n{status}"
    );
    Ok(())
}

fn cri_pull(containerd: &Containerd, reference: &str) -> Result<String> {
    eddy_tests::cri::pull_image(&containerd.socket, reference, PULL_TIMEOUT).with_context(|| {
        format!(
            "CRI PullImage {reference}; containerd log:\n{}",
            containerd.log_tail()
        )
    })
}
