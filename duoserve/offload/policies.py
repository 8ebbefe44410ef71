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
- `lfu-decay`, `next-use`: LFU with aging counts, the second also ordered by when the
  key's layer runs next (aging_policies.py).

Each victim choice is O(len(candidates)), or O(log n) from a lazy heap (`next-use`: O(layers));
the cache has a few hundred to a few thousand slots.
"""

from __future__ import annotations

from duoserve.offload.aging_policies import (
    PERIOD_PER_SLOT,
    AgedCounts,
    DecayedLFUPolicy,
    NextUsePolicy,
)
from duoserve.offload.policy_base import EvictionPolicy, ExpertKey, RankedPolicy

__all__ = [
    "EVICTION_POLICIES",
    "PERIOD_PER_SLOT",
    "DecayedLFUPolicy",
    "EvictionPolicy",
    "ExpertKey",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "NextUsePolicy",
    "make_eviction_policy",
]


class LRUPolicy(RankedPolicy):
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


class LFUPolicy(RankedPolicy):
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


class FIFOPolicy(RankedPolicy):
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
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, FIFOPolicy, DecayedLFUPolicy, NextUsePolicy)
}


def make_eviction_policy(
    name: str, capacity: int | None = None, num_layers: int | None = None
) -> EvictionPolicy:
    """A fresh policy object for `name`, for a cache of `capacity` slots over a model of
    `num_layers` layers (the aging policies use them); ValueError listing the known names
    otherwise."""
    if name not in EVICTION_POLICIES:
        known = ", ".join(sorted(EVICTION_POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; known: {known}")
    cls = EVICTION_POLICIES[name]
    if issubclass(cls, AgedCounts):
        return cls.for_cache(capacity, num_layers)
    return cls()
