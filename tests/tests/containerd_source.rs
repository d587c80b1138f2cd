//! containerd's content store as a source, against a real containerd 1.6 (its own daemon
//! and socket per test, see `eddy_tests::containerd`):
//! - eddy lists the content of the configured namespace at start, learns an image import
//!   from its event (well before the 60 s re-list), and forgets deleted content from
//!   `/content/delete`; `eddy status` and the metric say the same;
//! - a missing socket gives one warning, eddy runs, and it connects when containerd appears;
//! - `ContainerdSource::open` returns the blob's bytes, from any offset.
//!
//! Run as root: `cargo xtask test --privileged-only -- containerd_source`.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use eddy_tests::{
    containerd::Containerd,
    eddy::{eddy_bin, status_text},
    oci::{write_layout, Image, ImageSpec},
    process::run_bounded,
    require_privileges, CgroupGuard, Eddy, EddyConfig,
};

const NAMESPACE: &str = "k8s.io";
/// Events arrive in milliseconds; this bounds every wait for eddy to catch up.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Import a new image of random layers (`sizes`) into `namespace` as `name` with `ctr
/// images import`, from a layout written under `work`. Imported content is referenced by
/// its image, so containerd's garbage collector keeps it (content ingested alone is
/// collected within moments).
fn import_image(
    containerd: &Containerd,
    namespace: &str,
    name: &str,
    sizes: &[u64],
    work: &Path,
) -> Result<Image> {
    let dir = work.join(name.replace(['/', ':'], "_"));
    let layout = dir.join("layout");
    let image = write_layout(&layout, "v1", &ImageSpec::single(sizes))?;
    let archive = dir.join("image.tar");
    let out = run_bounded(
        Command::new("tar")
            .arg("-cf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout)
            .arg("."),
        Duration::from_secs(30),
    )?;
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ctr(
        containerd,
        namespace,
        &[
            "images",
            "import",
            "--no-unpack",
            "--all-platforms",
            "--index-name",
            name,
            &archive.to_string_lossy(),
        ],
    )?;
    containerd.ensure_content(namespace, &image.blobs())?;
    Ok(image)
}

fn ctr(containerd: &Containerd, namespace: &str, args: &[&str]) -> Result<()> {
    containerd
        .ctr(namespace, args, Duration::from_secs(30))
        .map(drop)
}

/// The digests eddy's containerd source knows (admin `GET /containerd/digests`).
fn known(eddy: &Eddy) -> Result<Vec<String>> {
    let (code, body) = eddy.admin_get("/containerd/digests")?;
    ensure!(code == 200, "GET /containerd/digests: HTTP {code}: {body}");
    Ok(body.lines().map(str::to_string).collect())
}

/// The admin `GET /containerd` answer.
fn source_status(eddy: &Eddy) -> Result<serde_json::Value> {
    let (code, body) = eddy.admin_get("/containerd")?;
    ensure!(code == 200, "GET /containerd: HTTP {code}: {body}");
    serde_json::from_str(&body).with_context(|| format!("GET /containerd: {body}"))
}

/// Wait (bounded) until eddy knows exactly what containerd lists in [`NAMESPACE`], with
/// the count in `/containerd` and the metric agreeing; returns the count.
fn same_as_containerd(eddy: &Eddy, containerd: &Containerd) -> Result<usize> {
    let mut listed = containerd.content_digests(NAMESPACE)?;
    listed.sort();
    wait_until("eddy knows what containerd lists", CATCH_UP, || {
        let mut digests = known(eddy)?;
        digests.sort();
        Ok(digests == listed
            && source_status(eddy)?["digests"] == listed.len()
            && eddy.metric("eddy_containerd_digests")? == listed.len() as f64)
    })
    .with_context(|| {
        format!(
            "containerd lists {listed:?}; eddy knows {:?}, /containerd {:?}, metric {:?}",
            known(eddy),
            source_status(eddy),
            eddy.metric("eddy_containerd_digests")
        )
    })?;
    Ok(listed.len())
}

/// Poll `check` until it holds or `timeout` passes; the error names `what`.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if check()? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn start_eddy(cgroup: &CgroupGuard, socket: &Path) -> Result<Eddy> {
    let mut config = EddyConfig::new(cgroup.path());
    config.extra_args = vec![
        "--containerd-socket".into(),
        socket.into(),
        "--containerd-namespace".into(),
        NAMESPACE.into(),
    ];
    Eddy::start(&eddy_bin(), &config)
}

#[test]
fn containerd_source_lists_follows_events_and_forgets_deleted_content() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let containerd = Containerd::start()?;
    let before = import_image(
        &containerd,
        NAMESPACE,
        "eddy.test/before:v1",
        &[300_000],
        work.path(),
    )?;
    // Another namespace's content is not served.
    let elsewhere = import_image(
        &containerd,
        "other",
        "eddy.test/elsewhere:v1",
        &[1000],
        work.path(),
    )?;
    let cgroup = CgroupGuard::new()?;
    let eddy = start_eddy(&cgroup, &containerd.socket)?;

    let took = wait_until("eddy lists containerd's content", CATCH_UP, || {
        let digests = known(&eddy)?;
        Ok(before.blobs().iter().all(|b| digests.contains(&b.digest)))
    })?;
    eprintln!("listed at start within {took:?}");
    let digests = known(&eddy)?;
    for blob in elsewhere.blobs() {
        ensure!(
            !digests.contains(&blob.digest),
            "content of namespace `other` is listed: {}",
            blob.digest
        );
    }
    let status = source_status(&eddy)?;
    ensure!(status["connected"] == true, "{status}");
    let at_start = same_as_containerd(&eddy, &containerd)?;

    // An image import: containerd 1.6 announces only the image, and eddy re-lists on it.
    let imported = import_image(
        &containerd,
        NAMESPACE,
        "eddy.test/ctrd:v1",
        &[200_000, 100_000],
        work.path(),
    )?;
    let took = wait_until("eddy learns the imported image's content", CATCH_UP, || {
        let digests = known(&eddy)?;
        Ok(imported.blobs().iter().all(|b| digests.contains(&b.digest)))
    })?;
    eprintln!("image import learned within {took:?} (the periodic re-list is every 60 s)");
    let expected = same_as_containerd(&eddy, &containerd)?;
    ensure!(
        expected > at_start,
        "{expected} digests after the import, {at_start} before"
    );

    // A delete: `/content/delete`.
    let layer = before.layers()[0].digest.clone();
    ctr(&containerd, NAMESPACE, &["content", "rm", &layer])?;
    let took = wait_until("eddy forgets deleted content", CATCH_UP, || {
        Ok(!known(&eddy)?.contains(&layer))
    })?;
    eprintln!("delete learned within {took:?}");
    // The set equals containerd's again, one digest fewer.
    let after = same_as_containerd(&eddy, &containerd)?;
    ensure!(
        after == expected - 1,
        "{after} digests after one delete, {expected} before"
    );

    // `eddy status` says the same as the admin endpoint.
    let text = status_text(&eddy.pin_dir, eddy.admin)?;
    let line = format!(
        "containerd source: on, {after} digests (socket {}, namespaces {NAMESPACE})",
        containerd.socket.display()
    );
    ensure!(text.contains(&line), "eddy status lacks {line:?}:\n{text}");
    eddy.stop_quietly();
    Ok(())
}

#[test]
fn containerd_source_missing_socket_warns_once_and_connects_later() -> Result<()> {
    if !require_privileges() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    // A path that does not exist yet; later a symlink to a real containerd's socket.
    let socket = work.path().join("containerd.sock");
    let cgroup = CgroupGuard::new()?;
    let eddy = start_eddy(&cgroup, &socket)?;
    let status = source_status(&eddy)?;
    ensure!(status["connected"] == false, "{status}");
    // Retries at 1, 2 and 4 s have happened by now: still one warning.
    std::thread::sleep(Duration::from_secs(4));
    let log = eddy.stderr();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("containerd source off"))
        .collect();
    ensure!(
        warnings.len() == 1 && warnings[0].contains("WARN"),
        "expected one warning, got {warnings:#?}\nlog:\n{log}"
    );
    ensure!(
        !log.contains("ERROR"),
        "a missing containerd socket logged an error:\n{log}"
    );
    let (code, _) = eddy.admin_get("/readyz")?;
    ensure!(
        code == 200,
        "eddy is not ready without containerd: HTTP {code}"
    );

    // containerd appears: eddy connects on its own (retries double up to 30 s).
    let containerd = Containerd::start()?;
    let image = import_image(
        &containerd,
        NAMESPACE,
        "eddy.test/late:v1",
        &[5000],
        work.path(),
    )?;
    std::os::unix::fs::symlink(&containerd.socket, &socket)?;
    let took = wait_until(
        "eddy connects to a containerd that appeared",
        Duration::from_secs(35),
        || {
            let digests = known(&eddy)?;
            Ok(image.blobs().iter().all(|b| digests.contains(&b.digest)))
        },
    )
    .with_context(|| {
        format!(
            "containerd lists {:?}; eddy knows {:?}; log:\n{}",
            containerd.content_digests(NAMESPACE),
            known(&eddy),
            eddy.stderr()
        )
    })?;
    eprintln!("connected within {took:?} of the socket appearing");
    ensure!(source_status(&eddy)?["connected"] == true);
    eddy.stop_quietly();
    Ok(())
}

#[test]
fn containerd_source_open_returns_the_blob_from_any_offset() -> Result<()> {
    use agent::{
        oci::digest::Digest,
        sources::containerd::ContainerdSource,
        sources::source::{ContentSource, SourceKind},
    };
    use futures_util::TryStreamExt;

    if !require_privileges() {
        return Ok(());
    }
    let work = tempfile::tempdir()?;
    let containerd = Containerd::start()?;
    // Larger than containerd's read chunks, so the body comes in several messages.
    let image = import_image(
        &containerd,
        NAMESPACE,
        "eddy.test/open:v1",
        &[3 * 1024 * 1024 + 17],
        work.path(),
    )?;
    let layer = image.largest_layer();
    let bytes = image.read_blob(&layer)?;
    let digest: Digest = layer.digest.parse()?;
    let absent = Digest::of(b"not in containerd");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        let source = ContainerdSource::start(
            containerd.socket.clone(),
            vec![NAMESPACE.into()],
            &mut prometheus_client::registry::Registry::default(),
            stop,
        );
        let deadline = Instant::now() + CATCH_UP;
        while source.contains(&digest).is_none() {
            ensure!(
                Instant::now() < deadline,
                "the source never listed {digest}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ensure!(source.contains(&digest) == Some(bytes.len() as u64));
        ensure!(source.kind() == SourceKind::Containerd);
        for from in [
            0u64,
            1,
            1_048_576,
            bytes.len() as u64 - 1,
            bytes.len() as u64,
        ] {
            let opened = source
                .open(&digest, from)
                .await
                .with_context(|| format!("open {digest} from {from}"))?;
            ensure!(opened.len == bytes.len() as u64 && opened.offset == from);
            ensure!(opened.media_type.is_none());
            let body: Vec<u8> = opened
                .body
                .map_ok(|b| b.to_vec())
                .try_concat()
                .await
                .map_err(|e| anyhow::anyhow!("reading from {from}: {e}"))?;
            ensure!(
                body == bytes[from as usize..],
                "from {from}: {} bytes differ from the blob's {}",
                body.len(),
                bytes.len() - from as usize
            );
        }
        ensure!(source.open(&digest, bytes.len() as u64 + 1).await.is_none());
        let started = Instant::now();
        ensure!(source.open(&absent, 0).await.is_none());
        eprintln!("an absent digest answered None in {:?}", started.elapsed());
        // Content imported a moment ago opens whether or not the re-list has caught up
        // (open asks containerd for a digest it does not know yet).
        let late = import_image(
            &containerd,
            NAMESPACE,
            "eddy.test/open-late:v1",
            &[70_000],
            work.path(),
        )?;
        let late_layer = late.largest_layer();
        let late_digest: Digest = late_layer.digest.parse()?;
        let opened = source
            .open(&late_digest, 0)
            .await
            .context("open late content")?;
        let body: Vec<u8> = opened
            .body
            .map_ok(|b| b.to_vec())
            .try_concat()
            .await
            .map_err(|e| anyhow::anyhow!("reading late content: {e}"))?;
        ensure!(body == late.read_blob(&late_layer)?);
        ensure!(source.contains(&late_digest) == Some(late_layer.size));
        Ok(())
    })
}
