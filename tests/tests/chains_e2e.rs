//! End-to-end tests of registry chains (`--mirror`, `--fallback`) with real programs: two
//! docker-registry upstreams in their own network namespaces, containerd 1.6 + ctr pulling
//! from inside the hooked cgroup, skopeo to push. What each upstream served is read from its
//! own log.
//!
//! Run as root: `cargo xtask test --privileged-only -- chain_`.
use std::{ffi::OsString, time::Duration};

use anyhow::{ensure, Context, Result};
use eddy_tests::{
    containerd::{Client, Containerd},
    oci::{Image, ImageSpec},
    registry::{Upstream, UpstreamOptions, REGISTRY_HOST},
    registry_eddy::{connections_series, RegistryEddy, RegistryEddyConfig},
    world::{RegistryWorld, WorldSpec},
    MIB,
};

const PULL_TIMEOUT: Duration = Duration::from_secs(60);
const NS: &str = "chains";
/// The port of the plain-HTTP registries (a home-lab registry's kind of port).
const LOCAL_PORT: u16 = 5000;

struct Options {
    /// Serve the first registry over plain HTTP on [`LOCAL_PORT`] (else HTTPS on 443 as
    /// `registry.test`).
    first_plain: bool,
    /// The same for the second.
    second_plain: bool,
    /// Protect the second registry with Basic auth for this user and password.
    second_auth: Option<(&'static str, &'static str)>,
    /// eddy's chain flags, given the two upstreams.
    flags: fn(&Upstream, &Upstream) -> Vec<String>,
}

/// eddy with chain `flags` and no `--registry`: a chained registry must be intercepted by
/// the chain flags alone (the defaults stay), and a chained registry's own port is added
/// by eddy.
fn chain_eddy(config: &mut RegistryEddyConfig, flags: Vec<String>) {
    println!("eddy chain flags: {flags:?}");
    config.registries = Vec::new();
    config.extra_args = flags.into_iter().map(OsString::from).collect();
}

/// Two upstreams as `options` say, and eddy with their chain flags (see [`WorldSpec`]): the
/// world's first upstream is the registry clients ask for, its other the registry the
/// chain leads to.
fn chain_world(options: Options) -> WorldSpec {
    let plain = |yes: bool| UpstreamOptions {
        plain_http_port: yes.then_some(LOCAL_PORT),
        ..Default::default()
    };
    let flags = options.flags;
    WorldSpec::new()
        .upstream(plain(options.first_plain))
        .and_upstream(UpstreamOptions {
            basic_auth: options
                .second_auth
                .map(|(u, p)| (u.to_string(), p.to_string())),
            ..plain(options.second_plain)
        })
        .cert_names(&[REGISTRY_HOST])
        // Clients know registry.test as the first registry; eddy as the second (an
        // endpoint is resolved by eddy itself, like any host it is not intercepting).
        .client_hosts(&[(REGISTRY_HOST, 0)])
        .eddy_hosts(&[(REGISTRY_HOST, 1)])
        .configure_eddy(move |config, upstreams| {
            chain_eddy(config, flags(upstreams[0], upstreams[1]))
        })
        // eddy creates its CA at start, constrained to the registries it serves.
        .eddy_ca_created_at_start()
}

/// What the chain tests ask of their world.
trait Chain {
    /// The registry clients ask for.
    fn first(&self) -> &Upstream;
    /// The registry the chain leads to.
    fn second(&self) -> &Upstream;
    /// Stop eddy and start it again on the same data dir with `extra` flags added.
    fn restart_with(&mut self, extra: &[String]) -> Result<()>;
    /// `ctr images pull` of `reference` into a fresh containerd; checks that containerd
    /// holds every blob of `image` and records the image under `image`'s digest.
    fn pull(&self, reference: &str, extra: &[&str], image: &Image, what: &str) -> Result<Duration>;
    fn endpoint_series(&self, registry: &str, endpoint: &str, outcome: &str) -> Result<f64>;
}

impl Chain for RegistryWorld {
    fn first(&self) -> &Upstream {
        &self.upstream
    }

    fn second(&self) -> &Upstream {
        &self.others[0].upstream
    }

    fn restart_with(&mut self, extra: &[String]) -> Result<()> {
        self.eddy_config
            .extra_args
            .extend(extra.iter().map(OsString::from));
        self.restart_eddy()
    }

    fn pull(&self, reference: &str, extra: &[&str], image: &Image, what: &str) -> Result<Duration> {
        pull_checked(&self.client, self.eddy(), reference, extra, image, what)
    }

    fn endpoint_series(&self, registry: &str, endpoint: &str, outcome: &str) -> Result<f64> {
        self.eddy().metric(&format!(
            r#"eddy_endpoint_requests_total{{registry="{registry}",endpoint="{endpoint}",outcome="{outcome}"}}"#
        ))
    }
}

/// `ctr images pull` of `reference` by `client` into a fresh containerd; checks that
/// containerd holds every blob of `image` and records the image under `image`'s digest.
fn pull_checked(
    client: &Client,
    eddy: &RegistryEddy,
    reference: &str,
    extra: &[&str],
    image: &Image,
    what: &str,
) -> Result<Duration> {
    let containerd = Containerd::start()?;
    let run = client
        .pull(&containerd, NS, reference, extra, PULL_TIMEOUT)?
        .check(&format!("{what}: ctr images pull {reference}"))
        .map_err(|e| e.context(format!("eddy log:\n{}", eddy.log_tail(30))))?;
    containerd.ensure_content(NS, &image.blobs())?;
    let digest = containerd.image_digest(NS, reference)?;
    ensure!(
        digest == image.top.digest,
        "{what}: containerd recorded {reference} as {digest}, the endpoint has {}",
        image.top.digest
    );
    println!(
        "{what}: pulled {reference} ({digest}) in {:.2?}",
        run.elapsed
    );
    Ok(run.elapsed)
}

/// Requests for `uri` that `upstream` answered with `status`, from its JSON log.
fn logged_status(upstream: &Upstream, uri: &str, status: u64) -> Result<usize> {
    let text = std::fs::read_to_string(&upstream.log)?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["http.request.uri"] == uri && v["http.response.status"] == status)
        .count())
}

fn world(options: Options) -> Option<RegistryWorld> {
    chain_world(options).start_if_privileged()
}

/// `--fallback <local:5000>=https://registry.test/acme`: a plain-HTTP local registry without
/// the image (named only in `--fallback`, its port not in `--intercept-port`), and an HTTPS
/// registry that has it under a prefix. `ctr --plain-http` pulls `<local:5000>/app:v1` with
/// the second registry's digest; a second pull (another containerd) is served from eddy's
/// store: the second registry sends no blob again.
#[test]
fn chain_fallback_serves_what_the_registry_lacks() -> Result<()> {
    let Some(w) = world(Options {
        first_plain: true,
        second_plain: false,
        second_auth: None,
        flags: |first, _| {
            vec![
                "--fallback".into(),
                format!("{}=https://{REGISTRY_HOST}/acme", first.ip_authority()),
            ]
        },
    }) else {
        return Ok(());
    };
    let image = w.image_at(
        w.second(),
        "acme/app",
        "v1",
        &ImageSpec::single(&[4 * MIB, MIB]),
    )?;
    let local = w.first().ip_authority();
    let reference = format!("{local}/app:v1");

    w.pull(&reference, &["--plain-http"], &image, "cold pull")?;
    // distribution logs a 404 as "response completed with error", which `requests()` leaves
    // out: read those from the log itself.
    let not_found = logged_status(w.first(), "/v2/app/manifests/v1", 404)?;
    let pulled = w.second().served()?;
    println!(
        "local registry: {not_found} manifest 404s, {} blob requests (404); registry.test \
         sent {} blobs, {:.1} MiB",
        w.first()
            .answered()?
            .iter()
            .filter(|r| r.contains("/blobs/") && r.ends_with(" 404"))
            .count(),
        pulled.blob_gets,
        pulled.blob_bytes as f64 / MIB as f64
    );
    ensure!(
        not_found >= 1,
        "the local registry was not asked first; its log:\n{}",
        w.first().logs_tail()
    );
    ensure!(
        pulled.blob_gets >= image.layers().len() as u64,
        "registry.test served {pulled:?}: the layers did not come from the fallback"
    );
    let endpoint = format!("https://{REGISTRY_HOST}/acme");
    let served = w.endpoint_series(&local, &endpoint, "served")?;
    let missed = w.endpoint_series(&local, &local, "not_found")?;
    println!(
        "eddy_endpoint_requests_total: {endpoint} served {served}, {local} not_found {missed}"
    );
    ensure!(
        served >= 3.0 && missed >= 1.0,
        "metrics: served {served}, not_found {missed}"
    );
    ensure!(
        w.eddy().metric(&connections_series("registry_http"))? >= 1.0,
        "the local registry's connections were not intercepted"
    );

    w.pull(&reference, &["--plain-http"], &image, "second pull")?;
    let again = w.second().served()?;
    println!(
        "second pull: registry.test blob GETs {} -> {}",
        pulled.blob_gets, again.blob_gets
    );
    ensure!(
        again.blob_gets == pulled.blob_gets && again.manifest_gets == pulled.manifest_gets,
        "the second pull was not served from the store: {pulled:?} -> {again:?}"
    );
    Ok(())
}

/// The registry stopped (connections refused): pulls go to the fallback, including a tag
/// eddy never saw; after the first refused connect, the registry is skipped for a while.
#[test]
fn chain_fallback_serves_while_the_registry_is_down() -> Result<()> {
    let Some(mut w) = world(Options {
        first_plain: true,
        second_plain: true,
        second_auth: None,
        flags: |first, second| {
            vec![
                "--fallback".into(),
                format!(
                    "{}=http://{}/mirror",
                    first.ip_authority(),
                    second.ip_authority()
                ),
            ]
        },
    }) else {
        return Ok(());
    };
    let image = w.image_at(
        w.second(),
        "mirror/app",
        "v2",
        &ImageSpec::single(&[2 * MIB, MIB]),
    )?;
    w.upstream.stop_registry()?;
    let local = w.first().ip_authority();
    let reference = format!("{local}/app:v2");
    w.pull(
        &reference,
        &["--plain-http"],
        &image,
        "pull while the registry is down",
    )?;
    let endpoint = format!("http://{}/mirror", w.second().ip_authority());
    let unreachable = w.endpoint_series(&local, &local, "unreachable")?;
    // Once found unreachable, the registry is not waited for again for a while.
    let skipped = w.endpoint_series(&local, &local, "skipped")?;
    let served = w.endpoint_series(&local, &endpoint, "served")?;
    println!(
        "eddy_endpoint_requests_total: {local} unreachable {unreachable}, skipped {skipped}; \
         {endpoint} served {served}"
    );
    ensure!(
        unreachable >= 1.0 && skipped >= 1.0 && served >= 3.0,
        "metrics: unreachable {unreachable}, skipped {skipped}, served {served}"
    );
    ensure!(
        w.second().served()?.blob_gets >= image.layers().len() as u64,
        "the fallback did not serve the layers"
    );
    Ok(())
}

/// `--mirror registry.test=http://<second:5000>`: a TLS registry named only in `--mirror`
/// is terminated (eddy's CA covers it), and the mirror serves the image: the registry itself
/// gets no blob or manifest request at all.
#[test]
fn chain_mirror_serves_without_touching_the_registry() -> Result<()> {
    let Some(w) = world(Options {
        first_plain: false,
        second_plain: true,
        second_auth: None,
        flags: |_, second| {
            vec![
                "--mirror".into(),
                format!("{REGISTRY_HOST}=http://{}", second.ip_authority()),
            ]
        },
    }) else {
        return Ok(());
    };
    // One layout, pushed to both with its digests kept: a true mirror.
    let image = w.image_at(
        w.first(),
        "team/app",
        "v1",
        &ImageSpec::single(&[4 * MIB, MIB]),
    )?;
    w.second().push(&image, "team/app")?;
    let before = w.first().answered()?.len();
    // The push is in the log: an empty log below means no requests, not an unread log.
    ensure!(before > 0, "registry.test's log shows no push");

    let reference = format!("{REGISTRY_HOST}/team/app:v1");
    w.pull(&reference, &[], &image, "pull with a mirror")?;
    let origin = w.first().answered()?.split_off(before);
    let content: Vec<&String> = origin
        .iter()
        .filter(|r| r.contains("/blobs/") || r.contains("/manifests/"))
        .collect();
    let mirror = w.second().served()?;
    println!(
        "registry.test got {} requests during the pull ({} blob or manifest requests: {content:?}); \
         the mirror sent {} blobs",
        origin.len(),
        content.len(),
        mirror.blob_gets
    );
    ensure!(
        content.is_empty(),
        "the registry itself served content: {content:?}"
    );
    ensure!(
        mirror.blob_gets >= image.layers().len() as u64,
        "the mirror did not serve the layers: {mirror:?}"
    );
    ensure!(
        w.eddy().metric(&connections_series("registry_tls"))? >= 1.0,
        "registry.test's TLS was not terminated"
    );
    let endpoint = format!("http://{}", w.second().ip_authority());
    let served = w.endpoint_series(REGISTRY_HOST, &endpoint, "served")?;
    ensure!(served >= 3.0, "{endpoint} served {served} requests");
    Ok(())
}

/// A client's own `Authorization` was issued for the registry it asked, so it never goes to
/// an endpoint: a Basic-auth endpoint refuses eddy even when the client sent credentials it
/// would accept, and the client gets the registry's own 404. With those credentials in
/// `--upstream-auth-file` (node credentials, per endpoint host), an anonymous `ctr` pull is
/// served by that endpoint.
#[test]
fn chain_endpoints_get_node_credentials_never_the_clients() -> Result<()> {
    const USER: &str = "carol";
    const PASSWORD: &str = "chain-pw";
    let Some(mut w) = world(Options {
        first_plain: true,
        second_plain: false,
        second_auth: Some((USER, PASSWORD)),
        flags: |first, _| {
            vec![
                "--fallback".into(),
                format!("{}=https://{REGISTRY_HOST}/acme", first.ip_authority()),
            ]
        },
    }) else {
        return Ok(());
    };
    let image = w.image_at(w.second(), "acme/app", "v1", &ImageSpec::single(&[2 * MIB]))?;
    let local = w.first().ip_authority();
    let endpoint = format!("https://{REGISTRY_HOST}/acme");

    let creds = format!("{USER}:{PASSWORD}");
    let (run, status) = w.client.curl_status(
        w.work.path(),
        "manifest",
        &format!("http://{local}/v2/app/manifests/v1"),
        &[
            "-u",
            &creds,
            "-H",
            "Accept: application/vnd.oci.image.manifest.v1+json",
        ],
        Duration::from_secs(30),
    )?;
    let refused = w.endpoint_series(&local, &endpoint, "refused")?;
    let accepted = w
        .second()
        .answered()?
        .into_iter()
        .filter(|r| r.contains("/manifests/") && r.ends_with(" 200"))
        .count();
    println!(
        "curl with the endpoint's credentials as the client's own: HTTP {status:?} (curl ok={}); \
         {endpoint} refused {refused}; manifest 200s at the endpoint {accepted}",
        run.ok()
    );
    ensure!(
        status == Some(404) && refused >= 1.0 && accepted == 0,
        "the client's credentials reached the endpoint: HTTP {status:?}, refused {refused}, \
         {accepted} manifest 200s; eddy log:\n{}",
        w.eddy().log_tail(20)
    );

    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(&creds);
    let auth_file = w.work.path().join("config.json");
    std::fs::write(
        &auth_file,
        format!(r#"{{"auths": {{"{REGISTRY_HOST}": {{"auth": "{auth}"}}}}}}"#),
    )?;
    let flag = auth_file.to_str().context("utf-8 path")?.to_string();
    w.restart_with(&["--upstream-auth-file".into(), flag])?;
    w.pull(
        &format!("{local}/app:v1"),
        &["--plain-http"],
        &image,
        "anonymous pull with node credentials for the endpoint",
    )?;
    let served = w.endpoint_series(&local, &endpoint, "served")?;
    ensure!(served >= 3.0, "{endpoint} served {served} requests");
    Ok(())
}

/// Docker Hub's API host: what eddy dials for `docker.io` in a chain flag.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The home-lab registry's host name, as the issue writes it (`local:5000`).
const LOCAL_HOST: &str = "local";

/// When a registry's log line was written (distribution logs RFC 3339 in UTC with up to
/// nine fraction digits): (date, nanoseconds into the day), which order as times do.
fn log_time(time: &str) -> Option<(String, u64)> {
    let (date, clock) = time.split_once('T')?;
    let clock = clock.strip_suffix('Z')?;
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut parts = hms.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let nanos = match fraction {
        "" => 0,
        f if f.len() <= 9 && f.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{f:0<9}").parse::<u64>().ok()?
        }
        _ => return None,
    };
    Some((
        date.to_string(),
        ((h * 60 + m) * 60 + s) * 1_000_000_000 + nanos,
    ))
}

/// One answered request for a URI, from a registry's JSON log.
#[derive(Debug)]
struct Ask {
    at: (String, u64),
    method: String,
    status: u64,
}

/// Every request for exactly `uri` that `upstream` answered (404s included), in log order,
/// leaving out the first `skip` answered requests (as [`Upstream::answered`] counts them: the pushes).
fn asks(upstream: &Upstream, uri: &str, skip: usize) -> Result<Vec<Ask>> {
    let text = std::fs::read_to_string(&upstream.log)?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["http.response.status"].is_u64())
        .skip(skip)
        .filter(|v| v["http.request.uri"] == uri)
        .map(|v| {
            let time = v["time"].as_str().unwrap_or("");
            Ok(Ask {
                at: log_time(time).with_context(|| format!("log time {time:?}"))?,
                method: v["http.request.method"].as_str().unwrap_or("?").to_string(),
                status: v["http.response.status"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// The issue's home-lab chain with real registries under its names:
/// `--fallback local:5000=https://registry.test/acme,docker.io`. `local:5000` is a
/// plain-HTTP registry without the image (clients resolve `local` through their hosts
/// file; eddy dials the address the client chose), `registry.test/acme` an HTTPS endpoint
/// whose prefixed repositories lack it too (404), and `docker.io` has it.
///
/// `docker.io` is real as far as eddy can tell: a chain endpoint is dialled by name through
/// the system resolver, so eddy runs with a hosts file (bind-mounted over /etc/hosts; eddy
/// does not start if the mount fails) mapping `registry-1.docker.io` to a test namespace,
/// and `--upstream-ca` trusts the test CA that signed that registry's certificate. No
/// packet leaves for the real Docker Hub.
///
/// `ctr --plain-http` pulls `local:5000/test/app:v1` (prefix: `acme/test/app`; a
/// multi-component name gets no `library/`) and `local:5000/app:v1` (Docker Hub's rule:
/// `library/app`), each with Docker Hub's digest. Each registry's log shows it was asked
/// for the tag in chain order (local 404, then the prefixed name at registry.test 404,
/// then Docker Hub 200), and no endpoint was asked for a name without its rewrite. Decoys
/// under the unrewritten names (`test/app` at registry.test, `app` at Docker Hub) would
/// give a wrong digest if a rewrite were skipped.
#[test]
// One scenario (or run) read top to bottom, step after step; split it when it changes.
#[allow(clippy::too_many_lines)]
fn chain_home_lab_fallbacks_in_order_with_prefix_and_docker_hub_library() -> Result<()> {
    let local_name = format!("{LOCAL_HOST}:{LOCAL_PORT}");
    let acme_endpoint = format!("https://{REGISTRY_HOST}/acme");
    let flags = vec![
        "--fallback".to_string(),
        format!("{local_name}={acme_endpoint},docker.io"),
    ];
    // Upstreams: 0 the local registry, 1 registry.test (acme), 2 Docker Hub. The client
    // knows only the local registry; eddy knows every endpoint by name. eddy starts once
    // the images are pushed.
    let Some(mut world) = WorldSpec::new()
        .upstream(UpstreamOptions {
            plain_http_port: Some(LOCAL_PORT),
            ..Default::default()
        })
        .and_upstream(UpstreamOptions::default())
        .and_upstream(UpstreamOptions::default())
        .cert_names(&[REGISTRY_HOST, DOCKER_HUB_API])
        .client_hosts(&[(LOCAL_HOST, 0)])
        .eddy_hosts(&[(LOCAL_HOST, 0), (REGISTRY_HOST, 1), (DOCKER_HUB_API, 2)])
        .configure_eddy(move |config, _| chain_eddy(config, flags))
        .eddy_ca_created_at_start()
        .eddy_started_later()
        .start_if_privileged()
    else {
        return Ok(());
    };
    let (acme, hub) = (world.upstream_at(1), world.upstream_at(2));

    let spec = ImageSpec::single(&[2 * MIB, MIB]);
    let decoy = ImageSpec::single(&[64 << 10]);
    let hub_app = world.image_at(hub, "library/app", "v1", &spec)?;
    let hub_test_app = world.image_at(hub, "test/app", "v1", &spec)?;
    world.image_at(acme, "test/app", "v1", &decoy)?;
    world.image_at(hub, "app", "v1", &decoy)?;
    // Requests before these marks were the pushes.
    let acme_before = acme.answered()?.len();
    let hub_before = hub.answered()?.len();
    ensure!(
        acme_before > 0 && hub_before > 0,
        "the registries' logs show no push"
    );

    world.start_eddy()?;
    let (local, acme, hub) = (&world.upstream, world.upstream_at(1), world.upstream_at(2));
    let (eddy, client) = (world.eddy(), &world.client);

    // (name at local:5000, name at registry.test, name at Docker Hub, Docker Hub's image)
    let cases = [
        ("test/app", "acme/test/app", "test/app", &hub_test_app),
        ("app", "acme/app", "library/app", &hub_app),
    ];
    for (name, at_acme, at_hub, image) in cases {
        let reference = format!("{local_name}/{name}:v1");
        pull_checked(
            client,
            eddy,
            &reference,
            &["--plain-http"],
            image,
            &format!("pull through the chain ({name})"),
        )?;
        let tag_uri = |repo: &str| format!("/v2/{repo}/manifests/v1");
        let at_local = asks(local, &tag_uri(name), 0)?;
        let at_acme_asks = asks(acme, &tag_uri(at_acme), acme_before)?;
        let at_hub_asks = asks(hub, &tag_uri(at_hub), hub_before)?;
        println!(
            "{reference}: local asked {:?}; registry.test asked {at_acme} {:?}; docker.io asked \
             {at_hub} {:?}",
            at_local
                .iter()
                .map(|a| format!("{} {}", a.method, a.status))
                .collect::<Vec<_>>(),
            at_acme_asks
                .iter()
                .map(|a| format!("{} {}", a.method, a.status))
                .collect::<Vec<_>>(),
            at_hub_asks
                .iter()
                .map(|a| format!("{} {}", a.method, a.status))
                .collect::<Vec<_>>(),
        );
        let (Some(first_local), Some(first_acme), Some(first_hub)) =
            (at_local.first(), at_acme_asks.first(), at_hub_asks.first())
        else {
            anyhow::bail!(
                "{reference}: not every endpoint was asked for the tag (local {at_local:?}, \
                 registry.test {at_acme_asks:?}, docker.io {at_hub_asks:?}); eddy log:\n{}",
                eddy.log_tail(30)
            );
        };
        ensure!(
            first_local.status == 404 && at_acme_asks.iter().all(|a| a.status == 404),
            "{reference}: the local registry or registry.test did not answer 404: local \
             {at_local:?}, registry.test {at_acme_asks:?}"
        );
        ensure!(
            at_hub_asks.iter().any(|a| a.status == 200),
            "{reference}: docker.io never served {at_hub}: {at_hub_asks:?}"
        );
        ensure!(
            first_local.at < first_acme.at && first_acme.at < first_hub.at,
            "{reference}: endpoints not asked in chain order: local at {:?}, registry.test at \
             {:?}, docker.io at {:?}",
            first_local.at,
            first_acme.at,
            first_hub.at
        );
    }

    // Every request an endpoint got during the pulls named a rewritten repository.
    let acme_during = acme.answered()?.split_off(acme_before);
    let unprefixed: Vec<&String> = acme_during
        .iter()
        .filter(|r| {
            let uri = r.split_whitespace().nth(1).unwrap_or("");
            uri != "/v2/" && !uri.starts_with("/v2/acme/")
        })
        .collect();
    ensure!(
        !acme_during.is_empty() && unprefixed.is_empty(),
        "registry.test got requests without the acme/ prefix: {unprefixed:?} (of {})",
        acme_during.len()
    );
    let hub_during = hub.answered()?.split_off(hub_before);
    let unrewritten: Vec<&String> = hub_during
        .iter()
        .filter(|r| {
            let uri = r.split_whitespace().nth(1).unwrap_or("");
            uri.starts_with("/v2/app/") || uri.starts_with("/v2/library/test/")
        })
        .collect();
    ensure!(
        unrewritten.is_empty(),
        "docker.io was asked for names without (or with a wrong) library/: {unrewritten:?}"
    );
    let served = hub.served()?;
    ensure!(
        served.blob_gets >= (hub_app.layers().len() + hub_test_app.layers().len()) as u64,
        "docker.io served {served:?}: the layers did not come from the last endpoint"
    );

    let series = |endpoint: &str, outcome: &str| {
        eddy.metric(&format!(
            r#"eddy_endpoint_requests_total{{registry="{local_name}",endpoint="{endpoint}",outcome="{outcome}"}}"#
        ))
    };
    let hub_endpoint = format!("https://{DOCKER_HUB_API}");
    let local_missed = series(&local_name, "not_found")?;
    let acme_missed = series(&acme_endpoint, "not_found")?;
    let hub_served = series(&hub_endpoint, "served")?;
    println!(
        "eddy_endpoint_requests_total: {local_name} not_found {local_missed}, {acme_endpoint} \
         not_found {acme_missed}, {hub_endpoint} served {hub_served}"
    );
    ensure!(
        local_missed >= 2.0 && acme_missed >= 2.0 && hub_served >= 6.0,
        "metrics: {local_name} not_found {local_missed}, {acme_endpoint} not_found \
         {acme_missed}, {hub_endpoint} served {hub_served}"
    );
    ensure!(
        eddy.metric(&connections_series("registry_http"))? >= 1.0,
        "the local registry's connections were not intercepted"
    );
    Ok(())
}

#[test]
fn log_times_order_as_times() {
    let t = |s| log_time(s).unwrap();
    assert!(t("2026-12-02T00:02:21.87305903Z") > t("2026-12-02T00:02:21.872910928Z"));
    assert!(t("2026-12-02T00:02:21.9Z") > t("2026-12-02T00:02:21.872910928Z"));
    assert!(t("2026-12-02T00:02:22Z") > t("2026-12-02T00:02:21.999999999Z"));
    assert!(t("2026-12-03T00:00:00Z") > t("2026-12-02T23:59:59.9Z"));
    assert_eq!(log_time("2026-12-02T00:02:21+01:00"), None);
}
