//! What the publisher and the binder want sent, held as data rather than
//! sent on the spot: they decide, the controller delivers, and a test reads
//! the decision without a data path or a state file behind it.

use crate::datapath::agent::{Command, Link};
use crate::state::mirror::{Mirror, Op as MirrorOp};

/// Commands for the data path and records for the state file, each list in
/// the order it is to be applied.
#[derive(Default)]
pub(crate) struct Effects {
    pub(crate) commands: Vec<Command>,
    pub(crate) mirror: Vec<MirrorOp>,
}

impl Effects {
    /// Hands each list to its receiver; without one (no data path, no
    /// state file) there is nothing to tell.
    pub(crate) fn deliver(self, agent: Option<&Link>, mirror: Option<&Mirror>) {
        if let Some(m) = mirror {
            for op in self.mirror {
                m.send(op);
            }
        }
        if let Some(link) = agent {
            for c in self.commands {
                link.send(c);
            }
        }
    }
}
