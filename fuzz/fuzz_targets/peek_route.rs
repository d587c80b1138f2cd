//! The first bytes of a redirected connection: `peek::classify_bytes` (ClientHello / SNI,
//! plain HTTP) and then `proxy::route`, against a registry set with a host name and an
//! address, and a CA constrained to them.
#![no_main]
use std::{net::SocketAddr, sync::OnceLock};

use agent::{
    listener::registries::Registries,
    listener::peek::{classify_bytes, Hello},
    listener::proxy::{route, Route},
    tls::Ca,
};
use libfuzzer_sys::fuzz_target;

struct Setup {
    registries: Registries,
    ca: Ca,
    _dir: std::path::PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("eddy-fuzz-peek-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let registries = Registries::parse(&[
            "ghcr.io".into(),
            "registry-1.docker.io".into(),
            "10.0.0.9:5000".into(),
        ])
        .unwrap();
        let ca = Ca::load_or_create(&dir, Some(&registries.names())).unwrap();
        Setup {
            registries,
            ca,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let setup = setup();
    // None: undecided, the proxy waits for more bytes (bounded by its peek size and deadline).
    let Some(hello) = classify_bytes(data) else {
        return;
    };
    if let Hello::Tls { sni: Some(sni) } = &hello {
        assert_eq!(*sni, sni.to_ascii_lowercase());
    }
    // The decision must not change when more bytes follow.
    let mut longer = data.to_vec();
    longer.extend_from_slice(b"\0\0\0\0");
    assert_eq!(classify_bytes(&longer), Some(hello.clone()));

    for orig in ["10.1.1.1:443", "10.0.0.9:5000", "[2001:db8::1]:8443"] {
        let orig: SocketAddr = orig.parse().unwrap();
        match route(&hello, orig, &setup.registries, &setup.ca) {
            Route::Tls { authority, .. } => {
                // Only configured registries are ever terminated.
                assert!(matches!(hello, Hello::Tls { .. }));
                assert!(
                    authority.parse::<http::uri::Authority>().is_ok(),
                    "{authority:?}"
                );
            }
            Route::Http => assert_eq!(hello, Hello::HttpRegistry),
            Route::Passthrough => {}
        }
    }
});
