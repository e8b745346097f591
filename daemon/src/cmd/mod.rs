//! The `kloak` subcommands: each assembles the parts below it and owns
//! their start-up order and shutdown. `datapath` is the one assembly of the
//! data path both `run` and `controller` use. Nothing below `cmd` imports it.

pub mod controller;
pub mod datapath;
pub mod run;
pub mod webhook;
