//! Kubernetes: labeled Secrets turned into shadows of placeholders, the
//! secrets published to the data path, this node's pods bound to exactly
//! the secrets they reference, and the webhook's certificate.
//!
//! `controller` owns the loop and the order of a pass; `watch` holds what
//! the API says, `reconciler` is the one writer of shadows, and
//! `publisher` and `binder` decide what the data path holds, returning
//! `effects` rather than sending them so their decisions are tested as data.

pub mod binder;
pub mod certs;
pub mod containers;
pub mod controller;
pub mod effects;
pub mod pods;
pub mod policy;
pub mod publisher;
pub mod reconciler;
pub mod shadow;
pub mod watch;
