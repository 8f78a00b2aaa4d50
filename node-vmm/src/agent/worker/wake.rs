//! When a worker's timed wait ends: waits of a second or more end on a grid shared by the
//! node's workers, so that its idle guests (each observed every few seconds) wake together.
//!
//! With 1,000 guests on a node, one timer per guest at its own millisecond woke the runtime
//! 200 times a second, each time to run one short step: a thread unparked and parked again
//! per guest. On the grid, the guests due in the same quarter second share one wake-up. A
//! wait ends at most one grid step late; short waits (a booting guest polled every 100 ms)
//! keep their exact deadline.

use std::sync::OnceLock;
use std::time::Duration;
use tokio::time::Instant;

/// The grid's step.
const GRID: Duration = Duration::from_millis(250);
/// Waits shorter than this keep their exact deadline.
const ALIGN_FROM: Duration = Duration::from_secs(1);

/// The deadline of a wait of `sleep` that starts at `now`.
pub(super) fn deadline(now: Instant, sleep: Duration) -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    aligned(*EPOCH.get_or_init(|| now), now, sleep)
}

/// `now + sleep`, rounded up to the next point of the grid that starts at `epoch` when
/// `sleep` is long enough.
fn aligned(epoch: Instant, now: Instant, sleep: Duration) -> Instant {
    let exact = now + sleep;
    if sleep < ALIGN_FROM {
        return exact;
    }
    let since = exact.saturating_duration_since(epoch).as_nanos();
    let step = GRID.as_nanos();
    let rounded = since.div_ceil(step) * step;
    // A grid point this far out fits in u64 nanoseconds (584 years).
    epoch + Duration::from_nanos(u64::try_from(rounded).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_waits_end_on_the_grid_short_ones_exactly() {
        let epoch = Instant::now();
        let ms = Duration::from_millis;
        // Two guests due 5 s after two different moments of the same quarter second wake
        // at the same grid point, no earlier than asked and at most one step later.
        let a = aligned(epoch, epoch + ms(1_010), Duration::from_secs(5));
        let b = aligned(epoch, epoch + ms(1_240), Duration::from_secs(5));
        assert_eq!(a, b);
        assert_eq!(a, epoch + ms(6_250));
        assert!(a >= epoch + ms(6_240) && a - (epoch + ms(6_010)) <= GRID);
        // A deadline already on the grid stays where it is.
        assert_eq!(
            aligned(epoch, epoch + ms(750), Duration::from_secs(2)),
            epoch + ms(2_750)
        );
        // A booting guest's 100 ms poll is not delayed.
        assert_eq!(
            aligned(epoch, epoch + ms(1_010), ms(100)),
            epoch + ms(1_110)
        );
        // A moment before the epoch (another runtime's clock) is not rounded below it.
        assert_eq!(
            aligned(epoch + ms(500), epoch, ms(1_000)),
            epoch + ms(1_000)
        );
    }
}
