//! Episodes of a condition that can recur at any rate, so that the log says
//! so once when an episode starts and once when it ends, with counts,
//! instead of once per occurrence: the open-file limit refusing accepts
//! (at the limit, every freed descriptor lets one client in and the next
//! accept fails again, a line per connection with clients coming and
//! going), clients taking over each other's sessions, slow subscribers
//! skipping messages. A client, or a crowd of them, repeating one in a
//! loop must not flood the log; the metrics count every occurrence. An
//! episode ends when the condition has not occurred for [`Episodes::QUIET`].

use std::time::Duration;

use tokio::time::Instant;

/// The episode in progress, if any, of one condition.
#[derive(Debug, Default)]
pub(crate) struct Episodes {
    current: Option<Episode>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Episode {
    pub(crate) started: Instant,
    pub(crate) last_hit: Instant,
    /// Occurrences of the condition.
    pub(crate) hits: u64,
    /// Other events between them (for the accept loop: connections
    /// accepted while the limit kept refusing others).
    pub(crate) meanwhile: u64,
    /// From the first occurrence to the last, once the episode has ended.
    pub(crate) lasted: Duration,
}

impl Episodes {
    pub(crate) const QUIET: Duration = Duration::from_secs(10);

    /// The condition occurred `times` times (at least once); true when this
    /// starts an episode (and should be logged).
    pub(crate) fn hit(&mut self, now: Instant, times: u64) -> bool {
        if let Some(episode) = &mut self.current
            && now.duration_since(episode.last_hit) < Self::QUIET
        {
            episode.hits += times;
            episode.last_hit = now;
            return false;
        }
        self.current =
            Some(Episode { started: now, last_hit: now, hits: times, meanwhile: 0, lasted: Duration::ZERO });
        true
    }

    /// Something other than the condition happened: counted in the episode
    /// in progress, or, if the condition has been quiet long enough, this
    /// ends the episode, which is returned.
    pub(crate) fn meanwhile(&mut self, now: Instant) -> Option<Episode> {
        let episode = self.current.as_mut()?;
        if now.duration_since(episode.last_hit) < Self::QUIET {
            episode.meanwhile += 1;
            return None;
        }
        self.end_if_quiet(now)
    }

    /// Ends the episode in progress, and returns it, if the condition has
    /// been quiet long enough.
    pub(crate) fn end_if_quiet(&mut self, now: Instant) -> Option<Episode> {
        let episode = self.current.as_ref()?;
        if now.duration_since(episode.last_hit) < Self::QUIET {
            return None;
        }
        let mut ended = self.current.take()?;
        ended.lasted = ended.last_hit.duration_since(ended.started);
        Some(ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_episode_until_the_condition_is_quiet() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut e = Episodes::default();
        assert_eq!(e.meanwhile(at(0)), None, "no episode, nothing to end");
        assert!(e.hit(at(0), 1), "the first occurrence starts an episode");
        // At the open-file limit with churn: one client in, the next accept fails.
        for i in 1..1000 {
            assert_eq!(e.meanwhile(at(i * 5)), None);
            assert!(!e.hit(at(i * 5 + 1), 1), "still the same episode at {i}");
        }
        let last_hit = 999 * 5 + 1;
        assert_eq!(e.meanwhile(at(last_hit + 9_999)), None, "not quiet for long enough yet");
        let ended = e.meanwhile(at(last_hit + 10_000)).expect("quiet for 10 s ends it");
        assert_eq!((ended.hits, ended.meanwhile), (1000, 1000));
        assert_eq!(ended.lasted, Duration::from_millis(last_hit));
        assert_eq!(e.meanwhile(at(last_hit + 10_001)), None, "ended once");
        assert!(e.hit(at(last_hit + 20_000), 1), "a later occurrence is a new episode");
        assert!(e.hit(at(last_hit + 40_000), 1), "so is one after a quiet spell without other events");
    }

    #[test]
    fn counted_occurrences_add_up_and_quiet_ends_the_episode() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut e = Episodes::default();
        assert_eq!(e.end_if_quiet(at(0)), None);
        assert!(e.hit(at(0), 700));
        assert!(!e.hit(at(1), 300));
        assert_eq!(e.end_if_quiet(at(10)), None, "9 s since the last");
        let ended = e.end_if_quiet(at(11)).expect("10 s quiet");
        assert_eq!((ended.hits, ended.meanwhile, ended.lasted), (1000, 0, Duration::from_secs(1)));
        assert_eq!(e.end_if_quiet(at(30)), None, "ended once");
    }
}
