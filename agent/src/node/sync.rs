//! The crate's one way to take a mutex: poison-tolerant. No critical section in eddy leaves its
//! data half-updated (each is a plain read or a complete update), so a panic in one task while
//! holding a lock must not take every later user of that lock down with it.
use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also when a panic poisoned it: the data behind it is still usable.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
