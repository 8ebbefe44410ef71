"""Eviction policies with aging access counts: `lfu-decay` and `next-use` (registered in
policies.py).

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
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from duoserve.offload.policy_base import EvictionPolicy, ExpertKey, RankedPolicy

PERIOD_PER_SLOT = 2  # counts halve every 2 x capacity accesses
DEFAULT_PERIOD = 1024  # without a capacity
DEFAULT_NUM_LAYERS = 1  # without a model: dist is 1 for every key


class AgedCounts:
    """What both policies share: per key (count, epoch of that count), whose aged count at
    epoch e is count >> (e - epoch); the recency of each resident; the epoch clock. A
    subclass is told when an epoch ends (`_new_epoch`) and files keys its own way."""

    name = ""

    def __init__(self, period: int | None = None) -> None:
        super().__init__()
        self.period = int(period or DEFAULT_PERIOD)
        assert self.period >= 1, f"{self.name} period must be >= 1 access, got {period}"
        self._count: dict[ExpertKey, tuple[int, int]] = {}  # every key ever accessed
        self._recency: dict[ExpertKey, int] = {}  # resident key -> last access or insert time
        self._epoch = 0

    def aged_count(self, key: ExpertKey) -> int:
        """The key's count at the current epoch."""
        count, epoch = self._count.get(key, (0, self._epoch))
        return count >> (self._epoch - epoch)

    def _advance(self, now: int) -> None:
        epoch = now // self.period
        if epoch != self._epoch:  # every aged count may have changed
            self._epoch = epoch
            self._new_epoch()

    def _new_epoch(self) -> None:
        raise NotImplementedError

    def _count_access(self, key: ExpertKey, now: int) -> int:
        """Age, count an access to resident `key` and refresh its recency; its new count."""
        assert key in self._recency, f"{self.name}: access to non-resident expert {key}"
        self._advance(now)
        count = self.aged_count(key) + 1
        self._count[key] = (count, self._epoch)
        self._recency[key] = now
        return count

    def _start_recency(self, key: ExpertKey, now: int) -> None:
        """A key became resident: age, then track its recency (its count carries over)."""
        assert key not in self._recency, f"{self.name}: expert {key} inserted twice"
        self._advance(now)
        self._recency[key] = now


class DecayedLFUPolicy(AgedCounts, RankedPolicy):
    """LFU with counts halved every `period` accesses (`lfu-decay`, module docstring).

    Ranks hold within an epoch; when an epoch ends the heap is rebuilt (ties appear).
    """

    name = "lfu-decay"

    @classmethod
    def for_cache(cls, capacity: int | None, num_layers: int | None) -> DecayedLFUPolicy:
        """The policy for a cache of `capacity` slots (None: defaults)."""
        return cls(PERIOD_PER_SLOT * capacity if capacity else None)

    def rank(self, key: ExpertKey) -> tuple:
        return (self.aged_count(key), self._recency[key], key)

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self._recency

    def num_resident(self) -> int:
        return len(self._recency)

    def _new_epoch(self) -> None:  # rank afresh
        self._heap = [(self.rank(k), k) for k in self._recency]
        heapq.heapify(self._heap)

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Age, count the access and refresh the key's recency."""
        self._count_access(key, now)
        self._touched(key)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Start tracking recency; the count carries over from earlier residencies."""
        self._start_recency(key, now)
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


class NextUsePolicy(AgedCounts, EvictionPolicy):
    """Aged LFU, ties to the key whose layer runs last (`next-use`, module docstring).

    Residents are filed in buckets by aged count, and within a bucket per layer in an
    insertion-ordered dict kept in recency order (a key moves to the end when accessed). A
    pick walks the counts upwards, and for each count the layers from the one being served
    backwards (largest dist first), and takes the first evictable key, the smallest key among
    those of equal recency. Keys it steps over are pinned or protected: few. When an epoch
    ends, every count halves and the buckets are rebuilt (once per `period` accesses).
    Everything is plain dict work: the cache calls this for every access and eviction.
    """

    name = "next-use"

    def __init__(self, period: int | None = None, num_layers: int | None = None) -> None:
        super().__init__(period)
        self.num_layers = int(num_layers or DEFAULT_NUM_LAYERS)
        assert self.num_layers >= 1, f"next-use needs num_layers >= 1, got {num_layers}"
        self.layer = 0  # layer of the group being served
        self._filed: dict[ExpertKey, int] = {}  # resident key -> the count it is filed under
        self._buckets: dict[int, list[dict[ExpertKey, None]]] = {}  # count -> per layer
        self._sizes: dict[int, int] = {}  # count -> residents filed under it

    @classmethod
    def for_cache(cls, capacity: int | None, num_layers: int | None) -> NextUsePolicy:
        """The policy for a cache of `capacity` slots over `num_layers` layers."""
        return cls(PERIOD_PER_SLOT * capacity if capacity else None, num_layers)

    def begin_group(self, layer: int) -> None:
        self.layer = layer

    def dist(self, layer: int) -> int:
        """Layers until `layer` runs next, from the current group's layer (1..num_layers)."""
        return (layer - self.layer) % self.num_layers or self.num_layers

    def rank(self, key: ExpertKey) -> tuple:
        return (self.aged_count(key), -self.dist(key[0]), self._recency[key], key)

    def _file(self, key: ExpertKey, count: int) -> None:
        layers = self._buckets.get(count)
        if layers is None:
            layers = self._buckets[count] = [{} for _ in range(self.num_layers)]
            self._sizes[count] = 0
        layers[key[0]][key] = None  # appended: the most recent of its bucket and layer
        self._sizes[count] += 1
        self._filed[key] = count

    def _unfile(self, key: ExpertKey) -> None:
        count = self._filed.pop(key)
        del self._buckets[count][key[0]][key]
        self._sizes[count] -= 1
        if not self._sizes[count]:
            del self._buckets[count], self._sizes[count]

    def _new_epoch(self) -> None:  # file afresh, oldest first
        self._buckets, self._sizes, self._filed = {}, {}, {}
        for key in sorted(self._recency, key=self._recency.__getitem__):
            self._file(key, self.aged_count(key))

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Age, count the access and make the key the most recent of its bucket."""
        count = self._count_access(key, now)
        self._unfile(key)
        self._file(key, count)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """File the key; its count carries over from earlier residencies."""
        assert 0 <= key[0] < self.num_layers, (
            f"next-use: layer {key[0]} not in 0..{self.num_layers}"
        )
        self._start_recency(key, now)
        self._file(key, self.aged_count(key))

    def on_evict(self, key: ExpertKey) -> None:
        """Forget the recency but keep the count."""
        self._unfile(key)
        del self._recency[key]

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        self._advance(now)
        return min(candidates, key=self.rank)

    def pick_victim(self, is_evictable, residents, now) -> ExpertKey | None:
        self._advance(now)
        L = self.num_layers
        for count in sorted(self._buckets):
            layers = self._buckets[count]
            for back in range(L):
                keys = layers[(self.layer - back) % L]
                if keys:
                    victim = self._oldest_evictable(keys, is_evictable)
                    if victim is not None:
                        return victim
        return None

    def _oldest_evictable(self, keys: dict, is_evictable) -> ExpertKey | None:
        """The evictable key of least recency in `keys` (recency order), smallest on a tie."""
        victim = None
        for key in keys:
            if victim is not None:
                if self._recency[key] != self._recency[victim]:
                    break
                if key < victim and is_evictable(key):
                    victim = key
            elif is_evictable(key):
                victim = key
        return victim
