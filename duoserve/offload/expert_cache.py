"""GPU expert cache: a fixed pool of equal slots, a residency table, pin counts, a policy.

Residency semantics are exactly those of offload/simulate.py (tests replay traces through
both): a group's resident keys are pinned while the group is served, keys are visited in
ascending order, a miss takes a free slot or evicts the policy's victim among unpinned,
unprotected residents. The cache decides; transfer.py moves bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from duoserve.offload.policies import EvictionPolicy, ExpertKey, make_eviction_policy


@dataclass
class CacheStats:
    """Counters of one cache (bytes and seconds are filled in by the transfer engine)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0  # accesses that found a prefetched, not yet used, expert
    prefetch_unused: int = 0  # prefetched experts evicted before any use
    miss_log: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class Slot:
    """One entry of an acquired group: where the expert is and whether it must be copied."""

    key: ExpertKey
    slot: int
    is_hit: bool


class ExpertCache:
    """Residency of experts in `num_slots` device slots of `slot_numel` elements each."""

    def __init__(
        self,
        num_slots: int,
        slot_numel: int,
        dtype: torch.dtype,
        device: torch.device,
        policy: str | EvictionPolicy = "lru",
        record_misses: bool = False,
        num_layers: int | None = None,
    ) -> None:
        assert num_slots >= 1, "an expert cache needs at least one slot"
        self.num_slots = num_slots
        self.slots = torch.empty(num_slots, slot_numel, dtype=dtype, device=device)
        self.slot_views = list(self.slots.unbind(0))  # slot_views[s] is slots[s], made once
        if isinstance(policy, str):
            policy = make_eviction_policy(policy, num_slots, num_layers)
        self.policy = policy
        self.slot_of: dict[ExpertKey, int] = {}
        self.key_of: list[ExpertKey | None] = [None] * num_slots
        self.pins = [0] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.protected: set[ExpertKey] = set()
        self.unused_prefetched: set[ExpertKey] = set()
        self.now = 0
        self.stats = CacheStats()
        self.record_misses = record_misses

    def is_resident(self, key: ExpertKey) -> bool:
        return key in self.slot_of

    def acquire_group(self, layer_id: int, expert_ids: list[int]) -> list[Slot]:
        """Serve one access group: returns a slot per expert (ascending ids), all pinned.

        Misses get a slot (possibly by eviction) but their bytes are not there yet: the
        caller copies them in. Call `release` when the group's compute is issued.
        """
        expert_ids = sorted(set(expert_ids))
        self.policy.begin_group(layer_id)
        assert len(expert_ids) <= self.num_slots, (
            f"group of {len(expert_ids)} experts exceeds the cache's {self.num_slots} slots"
        )
        for e in expert_ids:  # pin the group's residents first: none of them may be a victim
            if (layer_id, e) in self.slot_of:
                self.pins[self.slot_of[(layer_id, e)]] += 1
        out, missed = [], []
        for e in expert_ids:
            key = (layer_id, e)
            slot = self.slot_of.get(key)
            if slot is not None:
                self.stats.hits += 1
                if key in self.unused_prefetched:
                    self.unused_prefetched.discard(key)
                    self.stats.prefetch_hits += 1
                out.append(Slot(key, slot, True))
            else:
                self.stats.misses += 1
                slot = self._insert(key)
                self.pins[slot] += 1
                missed.append(e)
                out.append(Slot(key, slot, False))
            self.policy.on_access(key, self.now)
            self.now += 1
        if self.record_misses:
            self.stats.miss_log.append((layer_id, tuple(missed)))
        return out

    def prefetch(self, key: ExpertKey) -> Slot | None:
        """Make `key` resident without an access (a prefetch); None if nothing is evictable."""
        if key in self.slot_of:
            return None
        victim = None if self.free else self._pick_victim()
        if not self.free and victim is None:
            return None
        slot = self._insert(key, victim)
        self.pins[slot] += 1  # in flight: released by the caller once the copy is issued
        self.unused_prefetched.add(key)
        self.stats.prefetches += 1
        return Slot(key, slot, False)

    def release(self, slots: list[Slot]) -> None:
        for s in slots:
            assert self.pins[s.slot] > 0, f"slot {s.slot} released more often than pinned"
            self.pins[s.slot] -= 1

    def _is_evictable(self, key: ExpertKey) -> bool:
        return self.pins[self.slot_of[key]] == 0 and key not in self.protected

    def _pick_victim(self) -> ExpertKey | None:
        return self.policy.pick_victim(self._is_evictable, self.slot_of.keys(), self.now)

    def _insert(self, key: ExpertKey, victim: ExpertKey | None = None) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            victim = victim if victim is not None else self._pick_victim()
            if victim is None:
                raise RuntimeError("expert cache: every slot is pinned or protected")
            slot = self.slot_of.pop(victim)
            self.policy.on_evict(victim)
            self.stats.evictions += 1
            if victim in self.unused_prefetched:
                self.unused_prefetched.discard(victim)
                self.stats.prefetch_unused += 1
        self.slot_of[key] = slot
        self.key_of[slot] = key
        self.policy.on_insert(key, self.now)
        return slot
