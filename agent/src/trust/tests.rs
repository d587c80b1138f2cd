//! The gate against a fake /proc: each fake process has stat, environ, an exe link and a
//! root link to its own directory tree, so roots are read exactly as from a real /proc.
use std::{fs, os::unix::fs::symlink, path::Path};

use super::*;

/// A CA certificate that is eddy's, and one that is not.
fn certs() -> (rcgen::Certificate, rcgen::Certificate) {
    let make = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap()
    };
    (make("eddy test CA"), make("some other CA"))
}

struct FakeHost {
    dir: tempfile::TempDir,
    eddy: rcgen::Certificate,
    other: rcgen::Certificate,
    boot: SystemTime,
}

const HZ_TICKS_PER_S: u64 = 100;

impl FakeHost {
    fn new() -> Self {
        let (eddy, other) = certs();
        FakeHost {
            dir: tempfile::tempdir().unwrap(),
            eddy,
            other,
            // Processes start `ticks` after this.
            boot: SystemTime::now() - Duration::from_secs(100_000),
        }
    }

    fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    fn gate(&self) -> TrustGate {
        let host = Host {
            proc_root: self.proc_root(),
            boot_time: Some(self.boot),
            pids_visible: true,
        };
        let mut gate = TrustGate::new(self.eddy.der(), host, TrustMetrics::default());
        gate.ticks_per_second = HZ_TICKS_PER_S;
        gate
    }

    /// A process `pid` with root `root` (created), environment `env`, started `ago` before
    /// now. Files written afterwards count as newer than the process.
    fn process(&self, pid: u32, root: &str, env: &[&str], ago: Duration, exe: &str) -> PathBuf {
        let dir = self.proc_root().join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        let since_boot = SystemTime::now().duration_since(self.boot).unwrap() - ago;
        let ticks = since_boot.as_millis() as u64 / (1000 / HZ_TICKS_PER_S);
        fs::write(
            dir.join("stat"),
            format!("{pid} (proc) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {ticks} 0 0"),
        )
        .unwrap();
        let environ: Vec<u8> = env
            .iter()
            .flat_map(|v| [v.as_bytes(), b"\0"].concat())
            .collect();
        fs::write(dir.join("environ"), environ).unwrap();
        let rootfs = self.dir.path().join(root);
        fs::create_dir_all(&rootfs).unwrap();
        let _ = fs::remove_file(dir.join("root"));
        symlink(&rootfs, dir.join("root")).unwrap();
        let _ = fs::remove_file(dir.join("exe"));
        symlink(exe, dir.join("exe")).unwrap();
        rootfs
    }

    /// A process started just now (see [`FakeHost::process`]).
    fn start(&self, pid: u32, root: &str, env: &[&str], exe: &str) -> PathBuf {
        self.process(pid, root, env, Duration::ZERO, exe)
    }

    /// Restart: same pid, a later start time.
    fn restart(&self, pid: u32, root: &str, env: &[&str], exe: &str) {
        self.start(pid, root, env, exe);
    }

    fn bundle(&self, rootfs: &Path, path: &str, with_eddy: bool) {
        let file = rootfs.join(path.trim_start_matches('/'));
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        let mut pem = self.other.pem();
        if with_eddy {
            pem.push_str(&self.eddy.pem());
        }
        fs::write(file, pem).unwrap();
    }
}

const AN_HOUR: Duration = Duration::from_secs(3600);

const NOT_IN_ROOTS: TrustVerdict = TrustVerdict::Untrusting(Reason::CaNotInRoots);

fn client(tgid: u32) -> ClientProcess {
    ClientProcess { tgid, cgroup_id: 7 }
}

#[test]
fn ssl_cert_file_with_the_ca_trusts() {
    let host = FakeHost::new();
    // Bundle first, then a process that started after it.
    let rootfs = host.dir.path().join("r1");
    host.bundle(&rootfs, "/certs/bundle.pem", true);
    host.start(10, "r1", &["SSL_CERT_FILE=/certs/bundle.pem"], "/bin/ctr");
    // The fake start time has tick resolution: keep the bundle strictly older.
    std::thread::sleep(Duration::from_millis(20));
    host.restart(10, "r1", &["SSL_CERT_FILE=/certs/bundle.pem"], "/bin/ctr");
    assert_eq!(host.gate().verdict(&client(10)), TrustVerdict::Trusting);
}

#[test]
fn ssl_cert_file_without_the_ca_does_not_trust() {
    let host = FakeHost::new();
    let rootfs = host.process(
        11,
        "r",
        &["SSL_CERT_FILE=/certs/bundle.pem"],
        AN_HOUR,
        "/bin/ctr",
    );
    host.bundle(&rootfs, "/certs/bundle.pem", false);
    // The distro bundle has it, but SSL_CERT_FILE replaces the bundle list.
    host.bundle(&rootfs, "/etc/ssl/cert.pem", true);
    host.restart(11, "r", &["SSL_CERT_FILE=/certs/bundle.pem"], "/bin/ctr");
    assert_eq!(host.gate().verdict(&client(11)), NOT_IN_ROOTS);
}

#[test]
fn a_process_started_before_the_ca_entered_its_bundle_does_not_trust() {
    let host = FakeHost::new();
    let rootfs = host.process(12, "r", &[], AN_HOUR, "/usr/bin/containerd");
    host.bundle(&rootfs, "/etc/ssl/certs/ca-certificates.crt", true);
    let gate = host.gate();
    assert_eq!(
        gate.verdict(&client(12)),
        TrustVerdict::Untrusting(Reason::StartedBeforeCa)
    );
    assert_eq!(gate.report().untrusting.len(), 1);
    // After a restart (same pid, new start time) it reads the bundle with the CA. Start
    // times have tick resolution: let the restart fall in a later tick than the write.
    std::thread::sleep(Duration::from_millis(20));
    host.restart(12, "r", &[], "/usr/bin/containerd");
    assert_eq!(gate.verdict(&client(12)), TrustVerdict::Trusting);
    assert!(gate.report().untrusting.is_empty());
}

#[test]
fn only_the_first_readable_distro_bundle_counts() {
    let host = FakeHost::new();
    let rootfs = host.dir.path().join("r");
    // Go stops at /etc/pki/tls/certs/ca-bundle.crt (second in its list) and never reads
    // /etc/ssl/ca-bundle.pem; /etc/pki/tls/certs is also a root directory, so the CA is
    // put in a file outside every directory Go reads whole.
    host.bundle(&rootfs, "/etc/pki/tls/certs/ca-bundle.crt", false);
    host.bundle(&rootfs, "/etc/ssl/ca-bundle.pem", true);
    std::thread::sleep(Duration::from_millis(20));
    host.start(13, "r", &[], "/bin/ctr");
    assert_eq!(host.gate().verdict(&client(13)), NOT_IN_ROOTS);
    // With no earlier bundle present, the same file is read.
    fs::remove_file(rootfs.join("etc/pki/tls/certs/ca-bundle.crt")).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    host.restart(13, "r", &[], "/bin/ctr");
    assert_eq!(host.gate().verdict(&client(13)), TrustVerdict::Trusting);
}

#[test]
fn cert_dirs_are_read_even_with_ssl_cert_file_and_absolute_symlinks_stay_in_the_root() {
    let host = FakeHost::new();
    let rootfs = host.dir.path().join("r");
    host.bundle(&rootfs, "/certs/only-other.pem", false);
    // Debian's layout: /etc/ssl/certs/<hash>.0 -> /usr/share/ca-certificates/eddy.crt, an
    // absolute link that must resolve inside the process's root, not eddy's.
    host.bundle(&rootfs, "/usr/share/ca-certificates/eddy.crt", true);
    fs::create_dir_all(rootfs.join("etc/ssl/certs")).unwrap();
    symlink(
        "/usr/share/ca-certificates/eddy.crt",
        rootfs.join("etc/ssl/certs/abcd1234.0"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    host.start(
        14,
        "r",
        &["SSL_CERT_FILE=/certs/only-other.pem"],
        "/bin/ctr",
    );
    assert_eq!(host.gate().verdict(&client(14)), TrustVerdict::Trusting);

    // SSL_CERT_DIR replaces the default directories.
    host.bundle(&rootfs, "/mydir/x.pem", false);
    std::thread::sleep(Duration::from_millis(20));
    host.restart(
        14,
        "r",
        &["SSL_CERT_FILE=/certs/only-other.pem", "SSL_CERT_DIR=/mydir"],
        "/bin/ctr",
    );
    assert_eq!(host.gate().verdict(&client(14)), NOT_IN_ROOTS);
}

#[test]
fn a_relative_ssl_cert_file_is_read_from_the_working_directory() {
    let host = FakeHost::new();
    let rootfs = host.dir.path().join("r");
    host.bundle(&rootfs, "/work/certs/bundle.pem", true);
    std::thread::sleep(Duration::from_millis(20));
    host.start(19, "r", &["SSL_CERT_FILE=certs/bundle.pem"], "/bin/ctr");
    // /proc/PID/cwd names the directory as the process sees it, inside its root.
    symlink("/work", host.proc_root().join("19/cwd")).unwrap();
    assert_eq!(host.gate().verdict(&client(19)), TrustVerdict::Trusting);
}

#[test]
fn each_process_is_judged_by_its_own_root() {
    let host = FakeHost::new();
    let with = host.dir.path().join("with");
    let without = host.dir.path().join("without");
    host.bundle(&with, "/etc/ssl/certs/ca-certificates.crt", true);
    host.bundle(&without, "/etc/ssl/certs/ca-certificates.crt", false);
    std::thread::sleep(Duration::from_millis(20));
    host.start(15, "with", &[], "/bin/ctr");
    host.start(16, "without", &[], "/bin/ctr");
    let gate = host.gate();
    assert_eq!(gate.verdict(&client(15)), TrustVerdict::Trusting);
    assert_eq!(gate.verdict(&client(16)), NOT_IN_ROOTS);
}

#[test]
fn verdicts_are_kept_per_process_and_a_reused_pid_is_judged_again() {
    let host = FakeHost::new();
    let rootfs = host.dir.path().join("r");
    host.bundle(&rootfs, "/etc/ssl/certs/ca-certificates.crt", true);
    std::thread::sleep(Duration::from_millis(20));
    host.start(17, "r", &[], "/bin/ctr");
    let gate = host.gate();
    assert_eq!(gate.verdict(&client(17)), TrustVerdict::Trusting);
    let remembered = gate.memo.remembered();
    // The bundle loses the CA: the same process keeps its verdict (it read its roots
    // already), and no file is read for it again.
    host.bundle(&rootfs, "/etc/ssl/certs/ca-certificates.crt", false);
    assert_eq!(gate.verdict(&client(17)), TrustVerdict::Trusting);
    assert_eq!(gate.memo.remembered(), remembered);
    // A new process under the same pid reads the bundle as it is now.
    std::thread::sleep(Duration::from_millis(20));
    host.restart(17, "r", &[], "/bin/ctr");
    assert_eq!(gate.verdict(&client(17)), NOT_IN_ROOTS);
}

#[test]
fn unidentified_clients_pass_through() {
    let host = FakeHost::new();
    let gate = host.gate();
    // No tgid recorded, and a process that is gone.
    assert_eq!(
        gate.verdict(&client(0)),
        TrustVerdict::Untrusting(Reason::Unidentified)
    );
    assert_eq!(
        gate.verdict(&client(999)),
        TrustVerdict::Untrusting(Reason::Unidentified)
    );
    // eddy outside the host's pid namespace cannot map tgids to processes.
    let rootfs = host.dir.path().join("r");
    host.bundle(&rootfs, "/etc/ssl/certs/ca-certificates.crt", true);
    std::thread::sleep(Duration::from_millis(20));
    host.start(18, "r", &[], "/bin/ctr");
    let mut blind = host.gate();
    blind.host.pids_visible = false;
    assert_eq!(
        blind.verdict(&client(18)),
        TrustVerdict::Untrusting(Reason::Unidentified)
    );
    assert_eq!(host.gate().verdict(&client(18)), TrustVerdict::Trusting);
}

#[test]
fn a_rejection_guards_the_executable_in_its_cgroup_for_a_while() {
    let host = FakeHost::new();
    let rootfs = host.dir.path().join("r");
    host.bundle(&rootfs, "/etc/ssl/certs/ca-certificates.crt", true);
    std::thread::sleep(Duration::from_millis(20));
    host.start(20, "r", &[], "/usr/bin/curl");
    host.start(21, "r", &[], "/usr/bin/curl");
    host.start(22, "r", &[], "/usr/bin/ctr");
    let gate = host.gate().with_guard_for(Duration::from_secs(1));
    assert_eq!(gate.verdict(&client(20)), TrustVerdict::Trusting);
    gate.record_rejection(&client(20));
    assert_eq!(gate.metrics.rejections.get(), 1);
    let guarded = TrustVerdict::Untrusting(Reason::RejectedCertificate);
    // The same process, and another process of the same executable in the same cgroup.
    assert_eq!(gate.verdict(&client(20)), guarded);
    assert_eq!(gate.verdict(&client(21)), guarded);
    // Another executable, or the same one in another cgroup, is judged on its own.
    assert_eq!(gate.verdict(&client(22)), TrustVerdict::Trusting);
    let elsewhere = ClientProcess {
        tgid: 21,
        cgroup_id: 8,
    };
    assert_eq!(gate.verdict(&elsewhere), TrustVerdict::Trusting);
    let report = gate.report();
    assert!(
        report
            .untrusting
            .iter()
            .any(|c| c.exe == "/usr/bin/curl" && c.guarded_secs.is_some() && c.cgroup_id == 7),
        "{report:?}"
    );
    // The guard expires.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(gate.verdict(&client(21)), TrustVerdict::Trusting);
    assert!(gate.report().untrusting.is_empty());
}

#[test]
fn an_oversized_bundle_is_not_read() {
    let host = FakeHost::new();
    let rootfs = host.dir.path().join("r");
    host.bundle(&rootfs, "/big.pem", true);
    let f = fs::OpenOptions::new()
        .append(true)
        .open(rootfs.join("big.pem"))
        .unwrap();
    f.set_len(9 << 20).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    host.start(23, "r", &["SSL_CERT_FILE=/big.pem"], "/bin/ctr");
    assert_eq!(host.gate().verdict(&client(23)), NOT_IN_ROOTS);
}

#[test]
fn certificate_rejections_are_told_from_other_handshake_failures() {
    use std::io::{Error, ErrorKind};
    let alert = |a| Error::new(ErrorKind::InvalidData, rustls::Error::AlertReceived(a));
    assert!(is_certificate_rejection(&alert(
        rustls::AlertDescription::UnknownCA
    )));
    assert!(is_certificate_rejection(&alert(
        rustls::AlertDescription::BadCertificate
    )));
    assert!(!is_certificate_rejection(&alert(
        rustls::AlertDescription::ProtocolVersion
    )));
    assert!(!is_certificate_rejection(&Error::new(
        ErrorKind::InvalidData,
        rustls::Error::NoCertificatesPresented
    )));
    assert!(is_certificate_rejection(&Error::from(
        ErrorKind::UnexpectedEof
    )));
    assert!(is_certificate_rejection(&Error::from(
        ErrorKind::ConnectionReset
    )));
    assert!(!is_certificate_rejection(&Error::from(ErrorKind::TimedOut)));
}
