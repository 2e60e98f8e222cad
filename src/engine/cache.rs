//! A worker's model cache: loaded models by registry id, least recently used evicted first when
//! the summed weight size exceeds the budget. The model a job needs is never evicted, so one
//! model larger than the budget still runs (alone).

use crate::Result;

struct Entry<V> {
    id: String,
    value: V,
    bytes: usize,
    last_used: u64,
}

pub(crate) struct ModelCache<V> {
    budget_bytes: usize,
    entries: Vec<Entry<V>>,
    clock: u64,
    loads: u64,
    evictions: u64,
}

impl<V> ModelCache<V> {
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            budget_bytes,
            entries: Vec::new(),
            clock: 0,
            loads: 0,
            evictions: 0,
        }
    }

    /// The cached model `id`, else the one `load` returns with its size in bytes (then older
    /// models are evicted until the cache fits its budget). A failed load caches nothing.
    pub fn get_or_load(
        &mut self,
        id: &str,
        load: impl FnOnce() -> Result<(V, usize)>,
    ) -> Result<&mut V> {
        self.clock += 1;
        let at = match self.entries.iter().position(|e| e.id == id) {
            Some(at) => at,
            None => {
                let (value, bytes) = load()?;
                self.loads += 1;
                tracing::info!(model = id, bytes, "model loaded");
                self.entries.push(Entry {
                    id: id.to_string(),
                    value,
                    bytes,
                    last_used: self.clock,
                });
                self.evict_beyond_budget(id);
                self.entries
                    .iter()
                    .position(|e| e.id == id)
                    .expect("the model just loaded is never evicted; this is a bug")
            }
        };
        let entry = &mut self.entries[at];
        entry.last_used = self.clock;
        Ok(&mut entry.value)
    }

    /// Sets the size of the cached model `id` (its weights grew or shrank, e.g. by the originals
    /// a LoRA merge keeps) and evicts other models until the cache fits its budget again.
    pub fn resize(&mut self, id: &str, bytes: usize) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.id == id) {
            entry.bytes = bytes;
            self.evict_beyond_budget(id);
        }
    }

    fn evict_beyond_budget(&mut self, keep: &str) {
        while self.bytes() > self.budget_bytes {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.id != keep)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i);
            let Some(i) = oldest else { break };
            let evicted = self.entries.swap_remove(i);
            self.evictions += 1;
            tracing::info!(model = evicted.id, bytes = evicted.bytes, "model evicted");
        }
    }

    /// Models loaded since the cache was made.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Models evicted since the cache was made.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Summed size of the cached models.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// Cached ids, in no particular order.
    #[cfg(test)]
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.id.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    fn ids(cache: &ModelCache<u32>) -> Vec<&str> {
        let mut ids: Vec<&str> = cache.ids().collect();
        ids.sort();
        ids
    }

    #[test]
    fn loads_once() {
        let mut cache = ModelCache::new(100);
        let mut loads = 0;
        for _ in 0..3 {
            let v = cache
                .get_or_load("a", || {
                    loads += 1;
                    Ok((1, 10))
                })
                .unwrap();
            assert_eq!(*v, 1);
        }
        assert_eq!(loads, 1);
        assert_eq!(cache.loads(), 1);
        assert_eq!(cache.bytes(), 10);
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut cache = ModelCache::new(100);
        cache.get_or_load("a", || Ok((1, 40))).unwrap();
        cache.get_or_load("b", || Ok((2, 40))).unwrap();
        // Using `a` again makes `b` the oldest.
        cache.get_or_load("a", || panic!("cached")).unwrap();
        cache.get_or_load("c", || Ok((3, 40))).unwrap();
        assert_eq!(ids(&cache), ["a", "c"]);
        assert_eq!(cache.bytes(), 80);
        assert_eq!((cache.loads(), cache.evictions()), (3, 1));
    }

    #[test]
    fn a_model_over_budget_still_runs_alone() {
        let mut cache = ModelCache::new(50);
        cache.get_or_load("small", || Ok((1, 10))).unwrap();
        assert_eq!(*cache.get_or_load("big", || Ok((2, 80))).unwrap(), 2);
        assert_eq!(ids(&cache), ["big"]);
    }

    #[test]
    fn a_model_that_grows_evicts_others() {
        let mut cache = ModelCache::new(100);
        cache.get_or_load("a", || Ok((1, 40))).unwrap();
        cache.get_or_load("b", || Ok((2, 40))).unwrap();
        cache.resize("b", 70);
        assert_eq!(ids(&cache), ["b"]);
        assert_eq!((cache.bytes(), cache.evictions()), (70, 1));
        cache.resize("gone", 500);
        assert_eq!(cache.bytes(), 70);
    }

    #[test]
    fn failed_load_caches_nothing() {
        let mut cache: ModelCache<u32> = ModelCache::new(50);
        cache.get_or_load("a", || Ok((1, 10))).unwrap();
        let Err(err) = cache.get_or_load("bad", || Err(Error::model("broken"))) else {
            panic!("the load failed");
        };
        assert!(err.to_string().contains("broken"));
        assert_eq!(ids(&cache), ["a"]);
        // The next request for it tries again.
        assert_eq!(*cache.get_or_load("bad", || Ok((2, 10))).unwrap(), 2);
    }
}
