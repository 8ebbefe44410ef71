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
  key's layer runs next (below).

Both count a key's accesses and let the counts age: time (the cache's logical clock, one tick
per access) is cut into epochs of `period` accesses, and at each epoch boundary every count
is halved (integer shift, rounding down); an access adds 1. Counts survive eviction, as in
`lfu`. `period` is PERIOD_PER_SLOT times the cache's slots (`for_cache`), else
DEFAULT_PERIOD: about 5 decode steps of Qwen3-30B-A3B at a 12 GiB budget, 4 of Mixtral-8x7B.

- `lfu-decay`: evict smallest (aged count, recency, key): between LRU (a short period) and
  LFU (an infinite one).
- `next-use`: evict smallest (aged count, -dist, recency, key), where dist is how many layers
  ahead the key's layer runs next, counted from the layer of the group being served (its own
  layer: num_layers, a whole step away). Decode visits the layers in a loop, so among equally
  used experts the one whose layer just ran is needed last; LRU does the opposite (it keeps
  the layers that just ran and evicts the ones about to run).

Why these (docs/offloading.md, "Eviction"): replaying the shipped held-out decode traces with
top-k prefetch at the benchmark cache sizes, `next-use` copies 7.5% fewer experts per token
than `lru` on the Qwen3-30B-A3B topology (931 slots) and 16% fewer on the Mixtral-8x7B
topology (114 slots); `lfu-decay` 3% and 5% fewer. A score mixing count and dist (dist +
w / count) did no better than this lexicographic order for any w tried.

Each victim choice is O(len(candidates)), or O(log n) from a lazy heap (`next-use`: O(layers));
the cache has a few hundred to a few thousand slots.
"""

from __future__ import annotations

import heapq
import math
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

    def begin_group(self, layer: int) -> None:  # noqa: B027 (optional hook)
        """An access group of `layer` starts (its accesses and evictions follow)."""

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
        return _best_evictable(self._heap, self._is_current, is_evictable)


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


PERIOD_PER_SLOT = 2  # counts halve every 2 x capacity accesses
DEFAULT_PERIOD = 1024  # without a capacity
DEFAULT_NUM_LAYERS = 1  # without a model: dist is 1 for every key


class DecayedLFUPolicy(_RankedPolicy):
    """LFU with counts halved every `period` accesses (`lfu-decay`, module docstring).

    Per key: (count, epoch of that count); its aged count at epoch e is count >> (e - epoch).
    Ranks hold within an epoch; when an epoch ends the heap is rebuilt (ties appear).
    """

    name = "lfu-decay"

    def __init__(self, period: int | None = None) -> None:
        super().__init__()
        self.period = int(period or DEFAULT_PERIOD)
        assert self.period >= 1, f"{self.name} period must be >= 1 access, got {period}"
        self._count: dict[ExpertKey, tuple[int, int]] = {}  # every key ever accessed
        self._recency: dict[ExpertKey, int] = {}  # resident key -> last access or insert time
        self._epoch = 0

    @classmethod
    def for_cache(cls, capacity: int | None, num_layers: int | None) -> DecayedLFUPolicy:
        """The policy for a cache of `capacity` slots (None: defaults)."""
        return cls(PERIOD_PER_SLOT * capacity if capacity else None)

    def aged_count(self, key: ExpertKey) -> int:
        """The key's count at the current epoch."""
        count, epoch = self._count.get(key, (0, self._epoch))
        return count >> (self._epoch - epoch)

    def rank(self, key: ExpertKey) -> tuple:
        return (self.aged_count(key), self._recency[key], key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._recency

    def num_resident(self) -> int:
        return len(self._recency)

    def _advance(self, now: int) -> None:
        epoch = now // self.period
        if epoch != self._epoch:  # every aged count may have changed: rank afresh
            self._epoch = epoch
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(self.rank(k), k) for k in self._recency]
        heapq.heapify(self._heap)

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Age, count the access and refresh the key's recency."""
        assert key in self._recency, f"{self.name}: access to non-resident expert {key}"
        self._advance(now)
        self._count[key] = (self.aged_count(key) + 1, self._epoch)
        self._recency[key] = now
        self._touched(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Start tracking recency; the count carries over from earlier residencies."""
        assert key not in self._recency, f"{self.name}: expert {key} inserted twice"
        self._advance(now)
        self._recency[key] = now
        self._touched(key)

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the recency but keep the count."""
        del self._recency[key]

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        self._advance(now)
        return super().choose_victim(candidates, now)

    def pick_victim(self, is_evictable, residents, now) -> ExpertKey | None:
        self._advance(now)
        return super().pick_victim(is_evictable, residents, now)


class NextUsePolicy(DecayedLFUPolicy):
    """Aged LFU, ties to the key whose layer runs last (`next-use`, module docstring).

    Within one layer dist is common, so the layer's best victim is its smallest
    (aged count, recency, key): one lazy heap per layer, whose current top's count is kept in
    `_top_count[layer]`. A pick takes the smallest top count (a C-level min over the layers),
    then walks back from the current layer to the first layer with that count (largest
    dist); a non-evictable top (pinned, protected) makes that layer offer its best evictable
    key instead, for this pick only.
    """

    name = "next-use"

    def __init__(self, period: int | None = None, num_layers: int | None = None) -> None:
        super().__init__(period)
        self.num_layers = int(num_layers or DEFAULT_NUM_LAYERS)
        assert self.num_layers >= 1, f"next-use needs num_layers >= 1, got {num_layers}"
        self.layer = 0  # layer of the group being served
        self._heaps: list[list[tuple[tuple, ExpertKey]]] = [[] for _ in range(self.num_layers)]
        self._top_count: list[float] = [math.inf] * self.num_layers  # inf: no resident key

    @classmethod
    def for_cache(cls, capacity: int | None, num_layers: int | None) -> NextUsePolicy:
        return cls(PERIOD_PER_SLOT * capacity if capacity else None, num_layers)

    def begin_group(self, layer: int) -> None:
        self.layer = layer

    def dist(self, layer: int) -> int:
        """Layers until `layer` runs next, from the current group's layer (1..num_layers)."""
        return (layer - self.layer) % self.num_layers or self.num_layers

    def rank(self, key: ExpertKey) -> tuple:
        return (self.aged_count(key), -self.dist(key[0]), self._recency[key], key)

    def _layer_rank(self, key: ExpertKey) -> tuple:
        return (self.aged_count(key), self._recency[key], key)

    def _touched(self, key: ExpertKey) -> None:
        layer = key[0]
        assert 0 <= layer < self.num_layers, f"next-use: layer {layer} not in 0..{self.num_layers}"
        heap = self._heaps[layer]
        heapq.heappush(heap, (self._layer_rank(key), key))
        if len(heap) > 64 + 8 * len(self._recency) // self.num_layers:
            heap[:] = [entry for entry in heap if self._is_current(entry)]
            heapq.heapify(heap)
        self._refresh(layer)

    def _refresh(self, layer: int) -> None:
        """Drop the layer's stale heap head; record its top count."""
        heap = self._heaps[layer]
        while heap and not self._is_current(heap[0]):
            heapq.heappop(heap)
        self._top_count[layer] = heap[0][0][0] if heap else math.inf

    def _is_current(self, entry: tuple[tuple, ExpertKey]) -> bool:
        rank, key = entry
        return key in self._recency and self._layer_rank(key) == rank

    def on_evict(self, key: ExpertKey) -> None:
        super().on_evict(key)
        self._refresh(key[0])

    def _rebuild(self) -> None:
        self._heaps = [[] for _ in range(self.num_layers)]
        for key in self._recency:
            self._heaps[key[0]].append((self._layer_rank(key), key))
        for layer, heap in enumerate(self._heaps):
            heapq.heapify(heap)
            self._top_count[layer] = heap[0][0][0] if heap else math.inf

    def pick_victim(self, is_evictable, residents, now) -> ExpertKey | None:
        self._advance(now)
        counts, offers = self._top_count, {}  # offers: layer -> its best evictable, or None
        try:
            while True:
                best = min(counts)
                if best == math.inf:
                    return None
                layer = self.layer  # dist num_layers first, then 1 less each step back
                while counts[layer] != best:
                    layer = (layer - 1) % self.num_layers
                if layer in offers:
                    return offers[layer]
                key = self._heaps[layer][0][1]
                if is_evictable(key):
                    return key
                alt = _best_evictable(self._heaps[layer], self._is_current, is_evictable)
                offers[layer] = alt
                counts[layer] = math.inf if alt is None else self.aged_count(alt)
        finally:
            for layer in offers:  # the offers were for this pick only
                counts[layer] = self._heaps[layer][0][0][0] if self._heaps[layer] else math.inf


def _best_evictable(heap: list, is_current, is_evictable) -> ExpertKey | None:
    """The smallest current, evictable entry's key of a lazy heap (stale entries dropped;
    non-evictable ones stepped over and put back)."""
    stepped_over, victim = [], None
    while heap:
        entry = heap[0]
        if not is_current(entry):
            heapq.heappop(heap)
        elif is_evictable(entry[1]):
            victim = entry[1]
            break
        else:
            stepped_over.append(heapq.heappop(heap))
    for entry in stepped_over:
        heapq.heappush(heap, entry)
    return victim


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
    if issubclass(cls, DecayedLFUPolicy):
        return cls.for_cache(capacity, num_layers)
    return cls()
