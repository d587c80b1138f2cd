//! Where a miss is filled from besides eddy's own store and the upstream registry: the one
//! interface every source implements (`source`), their order (`order`), containerd's
//! content store on this node (`containerd`), and a body that continues at the next source
//! when one fails mid-blob (`failover`).
//!
//! May import `store`, `oci` and `node`.
pub mod containerd;
pub mod failover;
pub mod order;
pub mod source;
