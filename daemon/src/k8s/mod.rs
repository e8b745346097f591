//! Kubernetes: labeled Secrets turned into shadows of placeholders, the
//! secrets published to the data path, this node's pods bound to exactly
//! the secrets they reference, and the webhook's certificate.

pub mod certs;
pub mod containers;
pub mod controller;
pub mod pods;
pub mod policy;
pub mod shadow;
