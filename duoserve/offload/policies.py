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

from abc import ABC, abstractmethod
from collections.abc import Sequence

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


class LRUPolicy(EvictionPolicy):
    """Least recently used: evict the smallest (recency, key)."""

    name = "lru"

    def __init__(self) -> None:
        self._recency: dict[ExpertKey, int] = {}  # resident key -> last access or insert time

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Refresh the key's recency."""
        assert key in self._recency, f"lru: access to non-resident expert {key}"
        self._recency[key] = now

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Start tracking the key; it counts as used at its insertion time."""
        assert key not in self._recency, f"lru: expert {key} inserted twice"
        self._recency[key] = now

    def on_evict(self, key: ExpertKey) -> None:
        """Stop tracking the key."""
        del self._recency[key]

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """Return the least recently used candidate (ties: smallest key)."""
        recency = self._recency
        return min(candidates, key=lambda k: (recency[k], k))


class LFUPolicy(EvictionPolicy):
    """Least frequently used over the whole history; ties by recency, then smallest key."""

    name = "lfu"

    def __init__(self) -> None:
        self._num_accesses: dict[ExpertKey, int] = {}  # every key ever accessed; never cleared
        self._recency: dict[ExpertKey, int] = {}  # resident key -> last access or insert time

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Count the access and refresh the key's recency."""
        assert key in self._recency, f"lfu: access to non-resident expert {key}"
        self._num_accesses[key] = self._num_accesses.get(key, 0) + 1
        self._recency[key] = now

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Start tracking recency; the access count carries over from earlier residencies."""
        assert key not in self._recency, f"lfu: expert {key} inserted twice"
        self._recency[key] = now

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the recency but keep the access count."""
        del self._recency[key]

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """Return the candidate with the fewest accesses (ties: least recent, smallest key)."""
        counts, recency = self._num_accesses, self._recency
        return min(candidates, key=lambda k: (counts.get(k, 0), recency[k], k))


class FIFOPolicy(EvictionPolicy):
    """First in, first out: evict the smallest (insertion time, key)."""

    name = "fifo"

    def __init__(self) -> None:
        self._inserted_at: dict[ExpertKey, int] = {}  # resident key -> insertion time

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Accesses do not affect FIFO order."""
        assert key in self._inserted_at, f"fifo: access to non-resident expert {key}"

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Remember the insertion time."""
        assert key not in self._inserted_at, f"fifo: expert {key} inserted twice"
        self._inserted_at[key] = now

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the key."""
        del self._inserted_at[key]

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """Return the earliest-inserted candidate (ties: smallest key)."""
        inserted_at = self._inserted_at
        return min(candidates, key=lambda k: (inserted_at[k], k))


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
