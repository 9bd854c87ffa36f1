//! The task that undoes timed control changes (`--for`) when their time is up.
//!
//! It sleeps until the earliest expiry of the control state, woken when a change may have
//! added an earlier one, then reverts every setting that is due ([`Hub::revert_due`]). Expiry
//! times are by the wall clock (see `control::timed`), so a hub that starts after one passed
//! reverts it at once. In cluster mode every hub runs this task; the cluster's state makes
//! sure a setting reverts once.

use std::time::Duration;

use crate::{control::timed, hub::Hub};

/// The longest sleep between looks at the clock, so that a wall clock that was set forward
/// is noticed.
const LONGEST_SLEEP: Duration = Duration::from_secs(60);
/// How soon a revert that could not be made (disk, NATS) or has yet to come back from the
/// cluster is tried again.
const RETRY: Duration = Duration::from_millis(250);

/// Runs until the hub shuts down.
pub async fn run(hub: Hub) {
    let control = hub.control();
    loop {
        // Registered before reading the expiries, so that a change made in between wakes us.
        let changed = control.expiries_changed().notified();
        let sleep = match control.next_expiry() {
            Some(at_ms) => Duration::from_millis(at_ms.saturating_sub(timed::now_ms())),
            None => LONGEST_SLEEP,
        };
        if !sleep.is_zero() {
            tokio::select! {
                () = hub.shutdown_token().cancelled() => return,
                () = changed => continue,
                () = tokio::time::sleep(sleep.min(LONGEST_SLEEP)) => continue,
            }
        }
        if hub.revert_due().await {
            tokio::select! {
                () = hub.shutdown_token().cancelled() => return,
                () = tokio::time::sleep(RETRY) => {}
            }
        }
    }
}
