//! Containers for a sale's book that grow without stopping the world.
//!
//! A stock actor serialises every decision on its sale, so anything that
//! takes it long stalls every buyer of the sale at once. A `Vec` or a
//! `HashMap` grows by doubling: the push or insert that crosses its
//! capacity moves everything it holds. In a large sale that was a move of
//! tens of megabytes (and the page faults of twice as many fresh ones) on
//! the actor's thread every time the book doubled: growing to 2,000,000
//! orders, single reservations of 74-98 ms during which no purchase of the
//! sale was decided, against 1-2 ms in chunks (`examples/book_growth`).
//!
//! - [`Chunked`]: a sequence in chunks of [`CHUNK`] elements. Growing adds a
//!   chunk; nothing already in moves. Sorted use (binary search, insert in
//!   place) and queue use (push at the back, pop at the front) both work.
//! - [`ShardedMap`]: a hash map split in [`SHARDS`] maps by a key's buyer, so
//!   a resize moves 1/[`SHARDS`] of the entries.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use uuid::Uuid;

/// Elements per chunk of a [`Chunked`]: 4096 entries of a book are 320 KiB.
pub const CHUNK: usize = 4096;

/// Where an element of a [`Chunked`] is: (chunk, index in it).
pub type Pos = (usize, usize);

/// A sequence stored in chunks of at most `2 * CHUNK` elements (a chunk
/// filled at the back holds `CHUNK`; one that takes inserts in place splits
/// in two when it reaches twice that).
#[derive(Debug, Clone)]
pub struct Chunked<T> {
    chunks: VecDeque<VecDeque<T>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: VecDeque::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn front(&self) -> Option<&T> {
        self.chunks.front().and_then(VecDeque::front)
    }

    pub fn back(&self) -> Option<&T> {
        self.chunks.back().and_then(VecDeque::back)
    }

    pub fn push_back(&mut self, value: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(value),
            _ => {
                let mut chunk = VecDeque::with_capacity(CHUNK);
                chunk.push_back(value);
                self.chunks.push_back(chunk);
            }
        }
        self.len += 1;
    }

    pub fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let value = first.pop_front();
        if first.is_empty() {
            self.chunks.pop_front();
        }
        if value.is_some() {
            self.len -= 1;
        }
        value
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }

    pub fn get(&self, (c, i): Pos) -> Option<&T> {
        self.chunks.get(c).and_then(|chunk| chunk.get(i))
    }

    pub fn get_mut(&mut self, (c, i): Pos) -> Option<&mut T> {
        self.chunks.get_mut(c).and_then(|chunk| chunk.get_mut(i))
    }

    /// Binary search of a sequence sorted as `cmp` sees it (`cmp` tells
    /// how an element compares with the one sought): `Ok` with where it
    /// is, or `Err` with where it would go.
    pub fn binary_search_by(&self, mut cmp: impl FnMut(&T) -> Ordering) -> Result<Pos, Pos> {
        // The first chunk whose last element is not below the one sought.
        let c = self
            .chunks
            .partition_point(|chunk| chunk.back().is_some_and(|last| cmp(last) == Ordering::Less));
        match self.chunks.get(c) {
            Some(chunk) => chunk
                .binary_search_by(cmp)
                .map(|i| (c, i))
                .map_err(|i| (c, i)),
            None => Err(self.end()),
        }
    }

    /// Where a push at the back would go.
    fn end(&self) -> Pos {
        match self.chunks.back() {
            Some(last) => (self.chunks.len() - 1, last.len()),
            None => (0, 0),
        }
    }

    /// Inserts at `pos` (as [`Self::binary_search_by`] gave it), moving
    /// only the elements of its chunk.
    pub fn insert(&mut self, (c, i): Pos, value: T) {
        let Some(chunk) = self.chunks.get_mut(c) else {
            self.push_back(value);
            return;
        };
        chunk.insert(i.min(chunk.len()), value);
        if chunk.len() >= 2 * CHUNK {
            let upper = chunk.split_off(CHUNK);
            self.chunks.insert(c + 1, upper);
        }
        self.len += 1;
    }

    /// Keeps the elements `keep` says yes to, in order; drops emptied chunks.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for chunk in &mut self.chunks {
            chunk.retain(&mut keep);
        }
        self.chunks.retain(|chunk| !chunk.is_empty());
        self.len = self.chunks.iter().map(VecDeque::len).sum();
    }

    /// Every element in order, leaving the sequence empty. Each chunk is
    /// freed as soon as it is copied, so the peak is one copy and a chunk.
    pub fn take_all(&mut self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.len);
        for chunk in std::mem::take(&mut self.chunks) {
            all.extend(chunk);
        }
        self.len = 0;
        all
    }

    /// A sequence of `values`, in their order.
    pub fn from_vec(values: Vec<T>) -> Self {
        let mut out = Chunked::default();
        for v in values {
            out.push_back(v);
        }
        out
    }

    /// Whether `before` holds for every two neighbours, in order.
    pub fn is_sorted_by(&self, mut before: impl FnMut(&T, &T) -> bool) -> bool {
        self.iter()
            .zip(self.iter().skip(1))
            .all(|(a, b)| before(a, b))
    }
}

impl<T: Ord> Chunked<T> {
    /// Sorts the whole sequence (a restore, or queue entries out of order).
    pub fn sort_unstable(&mut self) {
        let mut all = self.take_all();
        all.sort_unstable();
        *self = Chunked::from_vec(all);
    }
}

/// Shards of a [`ShardedMap`].
pub const SHARDS: usize = 64;

/// A key of a [`ShardedMap`]: it names the buyer it belongs to.
pub trait ByBuyer {
    fn buyer(&self) -> Uuid;
}

impl ByBuyer for Uuid {
    fn buyer(&self) -> Uuid {
        *self
    }
}

impl ByBuyer for (Uuid, Box<str>) {
    fn buyer(&self) -> Uuid {
        self.0
    }
}

/// A hash map in [`SHARDS`] maps, picked by the low bits of the key's buyer
/// id (random in both the v4 and the v7 ids this server makes).
#[derive(Debug, Clone)]
pub struct ShardedMap<K, V> {
    shards: Vec<HashMap<K, V>>,
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| HashMap::new()).collect(),
        }
    }
}

impl<K: ByBuyer + Eq + Hash, V> ShardedMap<K, V> {
    fn shard(&self, key: &K) -> usize {
        (key.buyer().as_u128() as usize) % SHARDS
    }

    fn shard_of(&mut self, key: &K) -> &mut HashMap<K, V> {
        let s = self.shard(key);
        &mut self.shards[s]
    }

    pub fn entry(&mut self, key: K) -> std::collections::hash_map::Entry<'_, K, V> {
        self.shard_of(&key).entry(key)
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashMap::is_empty)
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard(key)].get(key)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.shard_of(key).get_mut(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.shard_of(&key).insert(key, value)
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        self.shard_of(key).remove(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(HashMap::iter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_sequence_grows_by_chunks_and_keeps_its_order() {
        let mut s = Chunked::default();
        for i in 0..(3 * CHUNK + 5) {
            s.push_back(i);
        }
        assert_eq!(s.len(), 3 * CHUNK + 5);
        assert_eq!(s.chunks.len(), 4, "a new chunk per CHUNK elements");
        assert!(s.chunks.iter().all(|c| c.capacity() < 2 * CHUNK));
        assert!(s.iter().copied().eq(0..(3 * CHUNK + 5)));
        assert_eq!(s.front(), Some(&0));
        assert_eq!(s.back(), Some(&(3 * CHUNK + 4)));
    }

    #[test]
    fn binary_search_finds_every_element_and_where_a_missing_one_goes() {
        let s = Chunked::from_vec((0..(2 * CHUNK + 7)).map(|i| 2 * i).collect());
        for i in 0..(2 * CHUNK + 7) {
            let pos = s.binary_search_by(|e| e.cmp(&(2 * i)));
            let found = pos.ok().and_then(|p| s.get(p)).copied();
            assert_eq!(found, Some(2 * i), "element {}", 2 * i);
            let gap = s.binary_search_by(|e| e.cmp(&(2 * i + 1)));
            assert!(gap.is_err(), "odd {} is not there", 2 * i + 1);
        }
        assert_eq!(s.binary_search_by(|e| e.cmp(&usize::MAX)), Err(s.end()));
        assert_eq!(
            Chunked::<u8>::default().binary_search_by(|e| e.cmp(&1)),
            Err((0, 0))
        );
    }

    #[test]
    fn inserts_in_place_keep_the_order_and_split_a_full_chunk() {
        // Evens first, then every odd inserted where the search puts it.
        let n = 2 * CHUNK;
        let mut s = Chunked::from_vec((0..n).map(|i| 2 * i).collect());
        for i in (0..n).rev() {
            let odd = 2 * i + 1;
            let Err(pos) = s.binary_search_by(|e| e.cmp(&odd)) else {
                panic!("{odd} should be missing");
            };
            s.insert(pos, odd);
        }
        assert_eq!(s.len(), 2 * n);
        assert!(s.iter().copied().eq(0..2 * n), "sorted after the inserts");
        assert!(
            s.chunks.iter().all(|c| c.len() < 2 * CHUNK),
            "full chunks split"
        );
        assert!(s.chunks.len() >= 3);
    }

    #[test]
    fn as_a_queue_it_pops_from_the_front_and_drops_empty_chunks() {
        let mut s = Chunked::from_vec((0..(CHUNK + 3)).collect::<Vec<_>>());
        for i in 0..CHUNK {
            assert_eq!(s.pop_front(), Some(i));
        }
        assert_eq!(s.chunks.len(), 1, "the emptied chunk is gone");
        assert_eq!(s.len(), 3);
        assert_eq!(s.front(), Some(&CHUNK));
        while s.pop_front().is_some() {}
        assert!(s.is_empty());
        assert_eq!(s.pop_front(), None);
    }

    #[test]
    fn retain_and_sort_keep_the_length_right() {
        let mut s = Chunked::from_vec((0..(2 * CHUNK)).rev().collect::<Vec<_>>());
        s.sort_unstable();
        assert!(s.iter().copied().eq(0..(2 * CHUNK)));
        s.retain(|v| v % 3 == 0 || *v < 10);
        let kept: Vec<usize> = (0..(2 * CHUNK)).filter(|v| v % 3 == 0 || *v < 10).collect();
        assert_eq!(s.len(), kept.len());
        assert!(s.iter().copied().eq(kept));
        s.retain(|_| false);
        assert!(s.is_empty());
        assert!(s.chunks.is_empty());
    }

    #[test]
    fn a_sharded_map_is_one_map_to_its_users() {
        let mut m: ShardedMap<Uuid, u32> = ShardedMap::default();
        let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(m.insert(*id, n as u32), None);
        }
        assert_eq!(m.len(), 1000);
        assert!(
            m.shards.iter().filter(|s| !s.is_empty()).count() > SHARDS / 2,
            "spread over the shards"
        );
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(m.get(id), Some(&(n as u32)));
        }
        if let Some(v) = m.get_mut(&ids[0]) {
            *v += 5;
        }
        assert_eq!(m.get(&ids[0]), Some(&5));
        *m.entry(ids[0]).or_insert(0) += 1;
        assert_eq!(m.get(&ids[0]), Some(&6));
        assert_eq!(m.remove(&ids[1]), Some(1));
        assert_eq!(m.get(&ids[1]), None);
        assert_eq!(m.iter().count(), 999);
        let mut keyed: ShardedMap<(Uuid, Box<str>), u8> = ShardedMap::default();
        keyed.insert((ids[2], "k".into()), 1);
        assert_eq!(keyed.get(&(ids[2], "k".into())), Some(&1));
        assert_eq!(keyed.get(&(ids[3], "k".into())), None);
    }
}
