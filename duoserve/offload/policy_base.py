"""Base classes of the eviction policies (policies.py lists them and documents the protocol)."""

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


class RankedPolicy(EvictionPolicy):
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
        return best_evictable(self._heap, self._is_current, is_evictable)


def best_evictable(heap: list, is_current, is_evictable) -> ExpertKey | None:
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
