//! Waiting for something the system under test does on its own time: poll
//! until it shows, or fail naming what never came and what was seen
//! instead. One kind of wait for every test, async and blocking.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, Instant};

/// The pause between two polls when the poll itself is cheap.
pub const POLL: Duration = Duration::from_millis(50);

/// What one poll found: the value, or what was observed instead, which a
/// timeout reports. `Option` for polls with nothing useful to report
/// (None), `Result` for those with something (Err: the log, the last
/// response, ...).
pub trait Observation {
    type Value;
    fn into_result(self) -> Result<Self::Value, Option<String>>;
}

impl<T> Observation for Option<T> {
    type Value = T;
    fn into_result(self) -> Result<T, Option<String>> {
        self.ok_or(None)
    }
}

impl<T, E: Display> Observation for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, Option<String>> {
        self.map_err(|e| Some(e.to_string()))
    }
}

fn timed_out(what: &str, timeout: Duration, seen: Option<String>) -> ! {
    match seen {
        Some(s) => panic!("timed out after {timeout:?} waiting for {what}; last seen:\n{s}"),
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// Polls `f` every [`POLL`] until it yields a value; panics naming `what`
/// (and the last observation) after `timeout`.
pub async fn eventually<O, F, Fut>(what: &str, timeout: Duration, f: F) -> O::Value
where
    O: Observation,
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
{
    eventually_every(what, timeout, POLL, f).await
}

/// [`eventually`] with a pause of `every` between polls, for polls that are
/// costly themselves (a request sent, a process started) and must not crowd
/// the two shared cores.
///
/// A poll that does blocking work with `&mut` state (a client that sends
/// one request) does it in the closure and returns
/// `std::future::ready(...)`: an async block could not hold the borrow.
pub async fn eventually_every<O, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: F,
) -> O::Value
where
    O: Observation,
    F: FnMut() -> Fut,
    Fut: Future<Output = O>,
{
    let end = Instant::now() + timeout;
    loop {
        let seen = match f().await.into_result() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() > end {
            timed_out(what, timeout, seen);
        }
        tokio::time::sleep(every).await;
    }
}

/// The blocking [`eventually_every`], for code outside a runtime.
pub fn eventually_sync<O: Observation>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> O,
) -> O::Value {
    let end = Instant::now() + timeout;
    loop {
        let seen = match f().into_result() {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if Instant::now() > end {
            timed_out(what, timeout, seen);
        }
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_names_what_and_the_last_observation() {
        let n = std::cell::Cell::new(0);
        let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            eventually_sync("the answer", Duration::from_millis(30), POLL, || {
                n.set(n.get() + 1);
                Err::<(), _>(format!("still {}", n.get()))
            })
        }))
        .unwrap_err();
        let msg = panic.downcast_ref::<String>().unwrap();
        assert_eq!(
            *msg,
            format!(
                "timed out after 30ms waiting for the answer; last seen:\nstill {}",
                n.get()
            )
        );
    }

    #[test]
    fn the_value_comes_back_once_there() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut n = 0;
        let v = rt.block_on(eventually("three polls", Duration::from_secs(5), || {
            n += 1;
            std::future::ready((n == 3).then_some(n))
        }));
        assert_eq!(v, 3);
    }
}
