//! The state file as the running agent keeps it: secrets, tracked
//! containers, DNS answers and connections mirrored into `kloak-storage`
//! in batches, so that a restarted agent reloads its maps from it.

pub mod mirror;
