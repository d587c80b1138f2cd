//! Talos: the root file system is read-only, so eddy's CA reaches the host's trust store
//! through machine config instead of `eddy ca install`. `eddy ca talos-patch` renders the
//! patch: a `TrustedRootsConfig` document (Talos 1.7 and later), applied with
//! `talosctl patch mc --patch @eddy-ca.yaml` or put into the machine config of new nodes.
//! Talos adds it to the system roots that its CRI containerd reads at start.

/// The machine-config patch that adds `ca_pem` to the node's trusted roots.
pub fn trusted_roots_patch(ca_pem: &str) -> String {
    let mut out = String::from(
        "# eddy's CA for Talos: talosctl patch mc --nodes NODE --patch @this-file.yaml\n\
         apiVersion: v1alpha1\n\
         kind: TrustedRootsConfig\n\
         name: eddy-ca\n\
         certificates: |-\n",
    );
    for line in ca_pem.trim_end().lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indents_the_certificate_as_a_block_scalar() {
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let patch = trusted_roots_patch(pem);
        assert!(patch.contains("kind: TrustedRootsConfig\n"));
        assert!(patch.ends_with(
            "certificates: |-\n  -----BEGIN CERTIFICATE-----\n  MIIB\n  -----END CERTIFICATE-----\n"
        ));
    }
}
