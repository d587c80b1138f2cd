//! The store's one way to take a mutex: poison-tolerant, because no critical section in the store
//! can leave its data half-updated, so a panic elsewhere must not take the store down with it.
use std::sync::{Mutex, MutexGuard};

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
