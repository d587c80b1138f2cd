//! The cluster's single flight, as kept by a digest's home node: for each digest, the one
//! node that fetches it from upstream for everyone. The home of a digest is the connected
//! node that ranks first for it (rendezvous hashing, `peers::home`); every node that misses
//! the digest asks the home, and the home answers with the first node that asked (or the
//! asker itself, when nobody did). One node decides, so two simultaneous misses can never
//! both win, however slow the DHT or the machine is: the decision is a map lookup at the
//! home, not a race between announcements.
//!
//! A claim stands while its fetcher stays connected to the home and for at most
//! [`CLAIM_TTL`]; a node that found the fetcher unable to serve names it as `stale`, and the
//! next asker takes over. Claims are bounded in number ([`MAX_CLAIMS`]), so a peer cannot
//! grow this node's memory without limit.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use libp2p::PeerId;

use crate::{node::sync::lock, oci::digest::Digest};

/// How long a claim stands at most. Long enough to cover the fetch of a large blob and the
/// time until every node's content lookup finds the fetcher's provider record (records are
/// re-published every 10 minutes); after it, a miss claims afresh.
pub const CLAIM_TTL: Duration = Duration::from_secs(10 * 60);
/// Claims held at once. A cold wave claims one digest per blob; this is far more than any
/// image set, and about 8 MiB at most.
pub const MAX_CLAIMS: usize = 65_536;

#[derive(Default)]
pub struct Claims {
    held: Mutex<HashMap<Digest, Held>>,
}

struct Held {
    fetcher: PeerId,
    since: Instant,
}

impl Claims {
    /// Who fetches `digest`: the standing claim's fetcher, or `asker` from now on. A claim
    /// no longer stands once its fetcher is not `alive`, once it is older than
    /// [`CLAIM_TTL`], or when the asker reports it `stale` (it could not serve).
    pub fn decide(
        &self,
        digest: Digest,
        asker: PeerId,
        stale: Option<PeerId>,
        alive: impl Fn(&PeerId) -> bool,
    ) -> PeerId {
        let mut held = lock(&self.held);
        if let Some(claim) = held.get(&digest) {
            let stands = claim.since.elapsed() < CLAIM_TTL
                && alive(&claim.fetcher)
                && stale != Some(claim.fetcher);
            if stands {
                return claim.fetcher;
            }
        }
        if held.len() >= MAX_CLAIMS {
            held.retain(|_, c| c.since.elapsed() < CLAIM_TTL);
            if held.len() >= MAX_CLAIMS {
                // Still full of live claims: forget them all rather than refuse. The worst
                // case is one more upstream fetch per digest in flight.
                held.clear();
            }
        }
        held.insert(
            digest,
            Held {
                fetcher: asker,
                since: Instant::now(),
            },
        );
        asker
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.held).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_asker_fetches_and_later_ones_join_it() {
        let claims = Claims::default();
        let d = Digest::of(b"blob");
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        assert_eq!(claims.decide(d, a, None, |_| true), a);
        assert_eq!(claims.decide(d, b, None, |_| true), a);
        assert_eq!(claims.decide(d, c, None, |_| true), a);
        // Another digest has its own fetcher.
        assert_eq!(claims.decide(Digest::of(b"other"), c, None, |_| true), c);
    }

    #[test]
    fn a_departed_or_stale_fetcher_is_replaced_by_the_asker() {
        let claims = Claims::default();
        let d = Digest::of(b"blob");
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        claims.decide(d, a, None, |_| true);
        // `a` left the swarm: the next asker fetches.
        assert_eq!(claims.decide(d, b, None, |p| *p != a), b);
        // `b` could not serve `c`: `c` takes over, and a report naming an older fetcher
        // does not unseat `c`.
        assert_eq!(claims.decide(d, c, Some(b), |_| true), c);
        assert_eq!(claims.decide(d, a, Some(b), |_| true), c);
    }

    #[test]
    fn claims_are_bounded() {
        let claims = Claims::default();
        let asker = PeerId::random();
        for i in 0..(MAX_CLAIMS + 10) as u32 {
            claims.decide(Digest::of(&i.to_be_bytes()), asker, None, |_| true);
        }
        assert!(claims.len() <= MAX_CLAIMS);
    }
}
