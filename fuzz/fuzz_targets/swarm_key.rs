//! The swarm.key parser (`p2p::config::parse_swarm_key`), which reads a file an operator
//! mounts from a Secret.
#![no_main]
use agent::peers::p2p::config::parse_swarm_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = parse_swarm_key(data) {
        // Whatever was accepted names exactly these 32 bytes in its third line.
        let text = std::str::from_utf8(data).expect("accepted keys are text");
        let line = text.lines().nth(2).expect("accepted keys have a key line").trim();
        assert_eq!(line.to_ascii_lowercase(), hex_of(&key), "{text:?}");
    }
});

fn hex_of(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}
