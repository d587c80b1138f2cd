//! The store's lifecycle policy: a size bound with LRU eviction and a TTL on unused content.
//!
//! - `--cache-max-size` (`50GiB`, `500MiB`, `80%` of the store's filesystem; default `80%`):
//!   above it, the least recently used content is evicted down to 80% of the limit, so eviction
//!   runs in batches rather than at every commit.
//! - `--cache-ttl` (`7d`, `12h`, `30s`; default `7d`): content not used for that long goes.
//!   Every hit extends it (the store records hits; see `Store::get`).
//! - Content being served (a live `Blob`) is never evicted, and content being filled is not in
//!   the index yet, so a pull never fails because of eviction. An entry hit after the policy
//!   looked at it is spared too.
//! - The catalog's record of an evicted digest (media type, repositories, public) goes with it,
//!   unless a fill of that digest started meanwhile. Tag records stay: a tag pointing at an
//!   evicted digest is simply a miss for the registry handler, which then refetches.
//!
//! The policy runs in the agent (after every commit and on a timer), through `POST /gc`, and
//! through `eddy gc` on a data dir no agent holds.
use std::{
    str::FromStr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    oci::digest::Digest,
    store::catalog::Catalog,
    store::{EntryInfo, EvictReason, Store},
};

/// Eviction brings the store down to this share of the limit.
const LOW_WATER_PERCENT: u64 = 80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheSize {
    Bytes(u64),
    /// A share of the store filesystem's size.
    Percent(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("{value:?}: not a size (use e.g. 50GiB, 500MiB, 2G, 80%)")]
    BadSize { value: String },
    #[error("{value:?}: a share must be between 1% and 100%")]
    BadPercent { value: String },
    #[error("{value:?}: not a duration (use e.g. 7d, 12h, 30m, 30s)")]
    BadDuration { value: String },
}

impl FromStr for CacheSize {
    type Err = PolicyError;

    fn from_str(value: &str) -> Result<Self, PolicyError> {
        let v = value.trim();
        if let Some(p) = v.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if (1..=100).contains(&p) => Ok(CacheSize::Percent(p)),
                _ => Err(PolicyError::BadPercent {
                    value: value.to_string(),
                }),
            };
        }
        let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
        let (number, unit) = v.split_at(split);
        let bad = || PolicyError::BadSize {
            value: value.to_string(),
        };
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => return Err(bad()),
        };
        number
            .checked_mul(unit)
            .map(CacheSize::Bytes)
            .ok_or_else(bad)
    }
}

/// `7d`, `12h`, `30m`, `30s` (one number, one unit).
pub fn parse_duration(value: &str) -> Result<Duration, PolicyError> {
    let v = value.trim();
    let bad = || PolicyError::BadDuration {
        value: value.to_string(),
    };
    let split = v.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = v.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    match number.checked_mul(seconds) {
        Some(s) if s > 0 => Ok(Duration::from_secs(s)),
        _ => Err(bad()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_size: CacheSize,
    pub ttl: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_size: CacheSize::Percent(80),
            ttl: Duration::from_secs(7 * 86_400),
        }
    }
}

impl Policy {
    /// The limit in bytes, given the size of the store's filesystem.
    pub fn limit_bytes(&self, fs_total: u64) -> u64 {
        match self.max_size {
            CacheSize::Bytes(b) => b,
            CacheSize::Percent(p) => fs_total / 100 * p as u64,
        }
    }
}

/// One entry the policy removes (or would remove).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Removal {
    pub digest: String,
    pub bytes: u64,
    pub reason: EvictReason,
}

/// What one collection did (or, dry, would do).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub removed: Vec<Removal>,
    /// Included in `bytes_freed`: partial fills idle for longer than the TTL.
    #[serde(default)]
    pub partial_bytes: u64,
    pub bytes_freed: u64,
    pub limit_bytes: u64,
    pub ttl_secs: u64,
    /// The store after the collection (unchanged for a dry run).
    pub store_bytes: u64,
    pub store_entries: u64,
}

/// Chooses what to evict: everything unused for `ttl`, then, if the rest is above `limit`, the
/// least recently used until it is at [`LOW_WATER_PERCENT`] of `limit`. Entries in use are never
/// chosen (and still count toward the size).
pub fn plan(
    entries: &[EntryInfo],
    now: SystemTime,
    limit: u64,
    ttl: Duration,
) -> Vec<(EntryInfo, EvictReason)> {
    let mut out = Vec::new();
    let mut kept = Vec::new();
    let mut total: u64 = 0;
    for e in entries {
        let idle = now.duration_since(e.last_access).unwrap_or_default();
        if !e.in_use && idle >= ttl {
            out.push((e.clone(), EvictReason::Ttl));
        } else {
            total += e.size;
            kept.push(e.clone());
        }
    }
    if total > limit {
        let low_water = limit / 100 * LOW_WATER_PERCENT;
        // Ties (content written in the same instant) in digest order, so a dry run names
        // exactly what the real run then removes.
        kept.sort_by_key(|e| (e.last_access, e.digest));
        for e in kept.into_iter().filter(|e| !e.in_use) {
            if total <= low_water {
                break;
            }
            total -= e.size;
            out.push((e, EvictReason::Size));
        }
    }
    out
}

/// The policy bound to a store.
pub struct Lifecycle {
    store: Arc<Store>,
    policy: Policy,
    catalog: Option<Arc<Catalog>>,
}

impl Lifecycle {
    pub fn new(store: Arc<Store>, policy: Policy) -> Self {
        Lifecycle {
            store,
            policy,
            catalog: None,
        }
    }

    /// Evictions also forget the evicted digests' catalog records.
    pub fn with_catalog(mut self, catalog: Arc<Catalog>) -> Self {
        self.catalog = Some(catalog);
        self
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The size limit in bytes now (a percentage follows the filesystem's size).
    pub fn limit_bytes(&self) -> u64 {
        let fs_total = self.store.fs_total_bytes().unwrap_or(u64::MAX);
        self.policy.limit_bytes(fs_total)
    }

    /// Applies the policy once (or, `dry_run`, reports what it would remove).
    pub fn collect(&self, dry_run: bool) -> GcReport {
        let limit = self.limit_bytes();
        let planned = plan(
            &self.store.entries(),
            SystemTime::now(),
            limit,
            self.policy.ttl,
        );
        let mut removed = Vec::new();
        for (entry, reason) in planned {
            let bytes = if dry_run {
                Some(entry.size)
            } else {
                self.store.evict(&entry.digest, entry.last_access, reason)
            };
            if let Some(bytes) = bytes {
                if !dry_run {
                    self.forget(&entry.digest);
                }
                removed.push(Removal {
                    digest: entry.digest.to_string(),
                    bytes,
                    reason,
                });
            }
        }
        // Partial fills nobody resumed within the TTL follow the same rule as content.
        let partial_bytes = self.store.remove_stale_partials(self.policy.ttl, dry_run);
        let stats = self.store.stats();
        GcReport {
            dry_run,
            bytes_freed: removed.iter().map(|r| r.bytes).sum::<u64>() + partial_bytes,
            partial_bytes,
            removed,
            limit_bytes: limit,
            ttl_secs: self.policy.ttl.as_secs(),
            store_bytes: stats.bytes,
            store_entries: stats.entries,
        }
    }

    /// Drops the catalog record of an evicted digest, unless the digest is back (a fill that
    /// started since records its own).
    fn forget(&self, digest: &Digest) {
        let Some(catalog) = &self.catalog else {
            return;
        };
        if self.store.contains(digest).is_some() || self.store.in_flight(digest).is_some() {
            return;
        }
        if let Err(err) = catalog.forget_content(digest) {
            warn!(%digest, %err, "catalog record of an evicted digest not removed");
        }
    }

    /// Keeps the store within the policy until `stop`: after every commit (size), and on a timer
    /// (TTL, and leaving proxy-only once the disk has room).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let every = (self.policy.ttl / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        info!(
            limit_bytes = self.limit_bytes(),
            ttl_secs = self.policy.ttl.as_secs(),
            "store lifecycle: size limit and TTL"
        );
        let mut wait = every;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.store.next_commit() => {}
                _ = stop.changed() => return,
            }
            let this = Arc::clone(&self);
            wait = every;
            match tokio::task::spawn_blocking(move || this.collect(false)).await {
                Ok(report) => {
                    if !report.removed.is_empty() {
                        info!(
                            removed = report.removed.len(),
                            bytes_freed = report.bytes_freed,
                            store_bytes = report.store_bytes,
                            "store lifecycle evicted content"
                        );
                    }
                    // Still above the limit: what is left was being served. Look again soon,
                    // when those responses are likely done.
                    if report.store_bytes > report.limit_bytes {
                        wait = Duration::from_secs(1);
                    }
                }
                Err(e) => warn!(error = %e, "store lifecycle pass failed"),
            }
            self.store.refresh_proxy_only();
        }
    }
}

/// `GET /store`: the store's size and state, with the policy.
pub fn store_status(lifecycle: &Lifecycle) -> serde_json::Value {
    let store = &lifecycle.store;
    let stats = store.stats();
    let oldest = store
        .entries()
        .iter()
        .map(|e| e.last_access)
        .min()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    serde_json::json!({
        "bytes": stats.bytes,
        "entries": stats.entries,
        "oldest_access_unix": oldest,
        "proxy_only": stats.proxy_only,
        "hits": stats.hits,
        "evictions": {"size": stats.evicted_size, "ttl": stats.evicted_ttl},
        "limit_bytes": lifecycle.limit_bytes(),
        "ttl_secs": lifecycle.policy.ttl.as_secs(),
    })
}

/// Human-readable text of a report, for `eddy gc`.
pub fn render_text(report: &GcReport) -> String {
    let verb = if report.dry_run {
        "would remove"
    } else {
        "removed"
    };
    let mut out = String::new();
    for r in &report.removed {
        out.push_str(&format!(
            "{verb} {} ({} bytes, {})\n",
            r.digest,
            r.bytes,
            match r.reason {
                EvictReason::Size => "size",
                EvictReason::Ttl => "ttl",
            }
        ));
    }
    out.push_str(&format!(
        "{verb} {} entries, {} bytes{}; store now {} entries, {} bytes (limit {} bytes, ttl {} s)\n",
        report.removed.len(),
        report.bytes_freed,
        if report.dry_run { " (dry run)" } else { " freed" },
        report.store_entries,
        report.store_bytes,
        report.limit_bytes,
        report.ttl_secs
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{digest::Digest, repo_key::RepoKey};

    #[test]
    fn sizes_parse_with_units_and_shares() {
        assert_eq!("50GiB".parse(), Ok(CacheSize::Bytes(50 << 30)));
        assert_eq!("500MiB".parse(), Ok(CacheSize::Bytes(500 << 20)));
        assert_eq!("2G".parse(), Ok(CacheSize::Bytes(2_000_000_000)));
        assert_eq!("1234".parse(), Ok(CacheSize::Bytes(1234)));
        assert_eq!("80%".parse(), Ok(CacheSize::Percent(80)));
        for bad in [
            "",
            "GiB",
            "12 parsecs",
            "-5MiB",
            "1.5GiB",
            "99999999999999TiB",
        ] {
            assert!(
                matches!(bad.parse::<CacheSize>(), Err(PolicyError::BadSize { .. })),
                "{bad}"
            );
        }
        for bad in ["0%", "101%", "x%"] {
            assert!(
                matches!(
                    bad.parse::<CacheSize>(),
                    Err(PolicyError::BadPercent { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            Policy {
                max_size: CacheSize::Percent(80),
                ttl: Duration::ZERO
            }
            .limit_bytes(1000),
            800
        );
    }

    #[tokio::test]
    async fn collect_applies_the_limit_and_a_dry_run_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 10_000];
            let digest = Digest::of(&data);
            let len = Some(data.len() as u64);
            store
                .fill(&digest, move |_| async move {
                    let body = futures_util::stream::iter([Ok::<_, std::io::Error>(
                        bytes::Bytes::from(data),
                    )]);
                    Ok::<_, std::io::Error>(crate::store::Fetched::whole(body, len))
                })
                .done()
                .await
                .unwrap();
            digests.push(digest);
            std::thread::sleep(Duration::from_millis(5));
        }
        // Used most recently: the first one.
        drop(store.get(&digests[0]).unwrap());
        let catalog = Arc::new(Catalog::open(dir.path()).unwrap());
        for d in &digests {
            catalog
                .record_content(d, None, &RepoKey::from_stored("r.test/app"), true)
                .unwrap();
        }
        let lifecycle = Lifecycle::new(
            Arc::clone(&store),
            Policy {
                max_size: CacheSize::Bytes(25_000),
                ttl: Duration::from_secs(3600),
            },
        )
        .with_catalog(Arc::clone(&catalog));
        let dry = lifecycle.collect(true);
        assert!(
            catalog.content(&digests[1]).is_some(),
            "a dry run forgets nothing"
        );
        assert!(dry.dry_run);
        assert_eq!(dry.bytes_freed, 10_000);
        assert_eq!(dry.removed[0].digest, digests[1].to_string());
        assert_eq!(store.stats().entries, 3);
        let done = lifecycle.collect(false);
        assert_eq!(done.removed, dry.removed);
        assert_eq!((done.store_bytes, done.store_entries), (20_000, 2));
        assert!(store.contains(&digests[1]).is_none());
        assert!(
            catalog.content(&digests[1]).is_none(),
            "the evicted digest's record went"
        );
        assert!(catalog.content(&digests[0]).is_some() && catalog.content(&digests[2]).is_some());
        assert!(lifecycle.collect(false).removed.is_empty());
        let status = store_status(&lifecycle);
        assert_eq!(status["bytes"], 20_000);
        assert_eq!(status["evictions"]["size"], 1);
        assert!(render_text(&done).contains("removed 1 entries, 10000 bytes freed"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        for bad in ["", "7", "d", "0s", "1.5h", "7days", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_duration("7").unwrap_err().to_string(),
            "\"7\": not a duration (use e.g. 7d, 12h, 30m, 30s)"
        );
    }

    fn entry(name: &str, size: u64, age_secs: u64, in_use: bool, now: SystemTime) -> EntryInfo {
        EntryInfo {
            digest: Digest::of(name.as_bytes()),
            size,
            last_access: now - Duration::from_secs(age_secs),
            in_use,
        }
    }

    fn names(plan: &[(EntryInfo, EvictReason)], all: &[EntryInfo]) -> Vec<(usize, EvictReason)> {
        plan.iter()
            .map(|(e, r)| (all.iter().position(|a| a.digest == e.digest).unwrap(), *r))
            .collect()
    }

    #[test]
    fn ttl_first_then_least_recently_used_down_to_the_low_water_mark() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let all = vec![
            entry("a", 100, 10, false, now),
            entry("b", 100, 50, false, now),
            entry("c", 100, 30, false, now),
            entry("d", 100, 7200, false, now), // expired
            entry("e", 100, 40, true, now),    // oldest but one, in use
            entry("f", 100, 20, false, now),
        ];
        // Within the limit: only the expired entry goes.
        assert_eq!(
            names(&plan(&all, now, 1_000, hour), &all),
            vec![(3, EvictReason::Ttl)]
        );
        // 500 left after the TTL pass, limit 400, low water 320: b (50 s), then c (30 s); e is
        // in use and skipped.
        assert_eq!(
            names(&plan(&all, now, 400, hour), &all),
            vec![
                (3, EvictReason::Ttl),
                (1, EvictReason::Size),
                (2, EvictReason::Size)
            ]
        );
        // Nothing evictable: in use entries stay even above the limit.
        let busy = vec![entry("x", 1_000, 9_999, true, now)];
        assert!(plan(&busy, now, 10, hour).is_empty());
    }
}
