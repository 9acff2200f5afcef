//! Per-key rate limiting of the public API (`control.rate_limit_per_second`). Its own module
//! so the shared state can hold it without depending on the authentication extractors that
//! consult it.

use std::collections::HashMap;
use std::sync::Mutex;

use marina_config::Id;

use crate::store::now_ms;

/// Requests per second per API key: a fixed one-second window per key.
///
/// Sharded std mutexes: a request holds one shard's lock for a hash-map lookup and an
/// increment (no `.await` inside), so contention is negligible and there is no lock shared by
/// every request. Windows of keys idle for a while are dropped when their shard is touched.
pub struct RateLimiter {
    per_second: u32,
    shards: Vec<Mutex<HashMap<Id, (i64, u32)>>>,
}

const SHARDS: usize = 16;

impl RateLimiter {
    pub fn new(per_second: u32) -> RateLimiter {
        RateLimiter {
            per_second,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Counts one request of `key`; false when it is over the limit this second.
    pub fn allow(&self, key: Id) -> bool {
        if self.per_second == 0 {
            return true;
        }
        let second = now_ms() / 1000;
        let shard = key
            .as_str()
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
            % SHARDS;
        // A poisoned shard only means another request panicked mid-increment; the counts are
        // still usable.
        let mut map = self.shards[shard]
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (s, _)| *s >= second - 1);
        }
        let entry = map.entry(key).or_insert((second, 0));
        if entry.0 != second {
            *entry = (second, 0);
        }
        entry.1 += 1;
        entry.1 <= self.per_second
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_counts_per_key() {
        let l = RateLimiter::new(3);
        let (a, b) = (Id::random(), Id::random());
        let allowed = (0..5).filter(|_| l.allow(a)).count();
        // A second boundary may fall inside the loop; then up to 3 more pass.
        assert!((3..=5).contains(&allowed), "{allowed}");
        assert!(l.allow(b));
        assert!(RateLimiter::new(0).allow(a));
    }
}
