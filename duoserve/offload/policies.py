"""Eviction policies for the GPU expert cache, selected by name (`make_eviction_policy`).

A key is an `ExpertKey` = (layer, expert); all layers share one pool of `capacity` slots.
The cache (duoserve/offload/expert_cache.py; oracle: duoserve/offload/simulate.py) drives a
policy through four calls, with `now` a logical clock that advances by one per key access:

- `on_insert(key, now)`: the key became resident (a demand miss, or a prefetch that is not
  an access). On a demand miss the cache calls `on_insert` then `on_access` with the same `now`.
- `on_access(key, now)`: every access, hit or miss (after the insertion on a miss).
- `on_evict(key)`: the key left the cache.
- `choose_victim(candidates, now)`: pick one of `candidates`, the evictable resident keys
  (the caller has already removed pinned and protected keys). Deterministic: the result does
  not depend on the order of `candidates`; every policy breaks its last tie by smallest key.

Policies (the "recency" of a resident key is the time of its last access or of its
insertion, whichever is later; a key inserted but never accessed counts from its insertion):

- `lru`: evict smallest (recency, key).
- `lfu`: evict smallest (access count, recency, key); counts cover the whole history,
  including accesses made during earlier residencies (they survive eviction).
- `fifo`: evict smallest (insertion time, key); accesses do not matter.

Each victim choice is O(len(candidates)); the cache has a few hundred to a few thousand slots.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

ExpertKey = tuple[int, int]  # (layer, expert)


class EvictionPolicy(ABC):
    """Decides which resident expert to evict; told about every insert, access and eviction."""

    name: str = ""

    @abstractmethod
    def on_access(self, key: ExpertKey, now: int) -> None:
        """Record an access (hit or miss) to resident `key` at logical time `now`."""

    @abstractmethod
    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Record that `key` became resident at logical time `now`."""

    @abstractmethod
    def on_evict(self, key: ExpertKey) -> None:
        """Record that `key` is no longer resident."""

    @abstractmethod
    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """Return the key to evict among `candidates` (non-empty, all resident and evictable)."""

    def pick_victim(
        self, is_evictable: Callable[[ExpertKey], bool], residents: Iterable[ExpertKey], now: int
    ) -> ExpertKey | None:
        """The victim among evictable residents, or None; same answer as choose_victim.

        This default scans every resident; ranked policies answer from a heap instead.
        """
        candidates = [k for k in residents if is_evictable(k)]
        return self.choose_victim(candidates, now) if candidates else None


class _RankedPolicy(EvictionPolicy):
    """A policy whose victim is the evictable resident of smallest `rank(key)`.

    `pick_victim` keeps a lazy min-heap of (rank, key) entries pushed whenever a rank may
    change; stale entries are dropped when they surface, so a pick costs O(log n) amortized
    plus the pinned keys it steps over (few: at most a group and what is in flight).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[tuple, ExpertKey]] = []

    def rank(self, key: ExpertKey) -> tuple:
        raise NotImplementedError

    def is_resident(self, key: ExpertKey) -> bool:
        raise NotImplementedError

    def _touched(self, key: ExpertKey) -> None:
        heapq.heappush(self._heap, (self.rank(key), key))
        if len(self._heap) > 64 + 8 * self.num_resident():  # drop stale entries now and then
            self._heap = [entry for entry in self._heap if self._is_current(entry)]
            heapq.heapify(self._heap)

    def _is_current(self, entry: tuple[tuple, ExpertKey]) -> bool:
        rank, key = entry
        return self.is_resident(key) and self.rank(key) == rank

    def num_resident(self) -> int:
        raise NotImplementedError

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """The candidate of smallest rank."""
        return min(candidates, key=self.rank)

    def pick_victim(self, is_evictable, residents, now) -> ExpertKey | None:
        heap, stepped_over, victim = self._heap, [], None
        while heap:
            rank, key = heap[0]
            if not self._is_current((rank, key)):
                heapq.heappop(heap)  # stale: evicted, or re-ranked since
            elif is_evictable(key):
                victim = key
                break
            else:
                stepped_over.append(heapq.heappop(heap))
        for entry in stepped_over:
            heapq.heappush(heap, entry)
        return victim


class LRUPolicy(_RankedPolicy):
    """Least recently used: evict the smallest (recency, key)."""

    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._recency: dict[ExpertKey, int] = {}  # resident key -> last access or insert time

    def rank(self, key: ExpertKey) -> tuple:
        return (self._recency[key], key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._recency

    def num_resident(self) -> int:
        return len(self._recency)

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Refresh the key's recency."""
        assert key in self._recency, f"lru: access to non-resident expert {key}"
        self._recency[key] = now
        self._touched(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Start tracking the key; it counts as used at its insertion time."""
        assert key not in self._recency, f"lru: expert {key} inserted twice"
        self._recency[key] = now
        self._touched(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Stop tracking the key."""
        del self._recency[key]


class LFUPolicy(_RankedPolicy):
    """Least frequently used over the whole history; ties by recency, then smallest key."""

    name = "lfu"

    def __init__(self) -> None:
        super().__init__()
        self._num_accesses: dict[ExpertKey, int] = {}  # every key ever accessed; never cleared
        self._recency: dict[ExpertKey, int] = {}  # resident key -> last access or insert time

    def rank(self, key: ExpertKey) -> tuple:
        return (self._num_accesses.get(key, 0), self._recency[key], key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._recency

    def num_resident(self) -> int:
        return len(self._recency)

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Count the access and refresh the key's recency."""
        assert key in self._recency, f"lfu: access to non-resident expert {key}"
        self._num_accesses[key] = self._num_accesses.get(key, 0) + 1
        self._recency[key] = now
        self._touched(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Start tracking recency; the access count carries over from earlier residencies."""
        assert key not in self._recency, f"lfu: expert {key} inserted twice"
        self._recency[key] = now
        self._touched(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the recency but keep the access count."""
        del self._recency[key]


class FIFOPolicy(_RankedPolicy):
    """First in, first out: evict the smallest (insertion time, key)."""

    name = "fifo"

    def __init__(self) -> None:
        super().__init__()
        self._inserted_at: dict[ExpertKey, int] = {}  # resident key -> insertion time

    def rank(self, key: ExpertKey) -> tuple:
        return (self._inserted_at[key], key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._inserted_at

    def num_resident(self) -> int:
        return len(self._inserted_at)

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Accesses do not affect FIFO order."""
        assert key in self._inserted_at, f"fifo: access to non-resident expert {key}"

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Remember the insertion time."""
        assert key not in self._inserted_at, f"fifo: expert {key} inserted twice"
        self._inserted_at[key] = now
        self._touched(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the key."""
        del self._inserted_at[key]


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, FIFOPolicy)
}


def make_eviction_policy(name: str) -> EvictionPolicy:
    """Return a fresh policy object for `name`; ValueError listing the known names otherwise."""
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(EVICTION_POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; known: {known}") from None
