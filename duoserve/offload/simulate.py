"""Expert-cache simulators: the oracle the real GPU expert cache (expert_cache.py) must match.

A trace is a sequence of access groups `(layer, expert_ids)`: the experts one MoE layer uses
in one forward step (`trace_from_routing` builds one from router output). The cache has
`capacity` slots shared by all layers. Processing a group:

1. Its ids are deduplicated and sorted; all its keys (layer, expert) are pinned for the
   whole group, so none of them can be evicted while the group is processed.
   A group larger than `capacity` is a ValueError naming both numbers.
2. For each key in ascending expert order, at logical time `now` (starts at 0 and advances by
   one per key access across the whole trace): a resident key is a hit. Otherwise it is a
   miss: it takes a free slot if there is one, else the policy picks a victim among the
   resident keys that are neither pinned nor in the caller's `protected` set (none left is a
   ValueError); the victim is evicted (`on_evict`), then the key inserted (`on_insert`).
3. Every access, hit or miss, then calls `on_access(key, now)`.

`simulate` runs the real policy objects (policies.py) on a plain-Python residency model.
`brute_force_simulate` is an independent reference: it keeps only an event history and, at
each eviction, recomputes every candidate's rank by scanning the whole history.
`belady_misses` is the clairvoyant optimum (the bound benchmarks print next to hit rates);
`belady_brute_force` proves it optimal on tiny traces by exhaustive search.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from duoserve.offload.aging_policies import PERIOD_PER_SLOT
from duoserve.offload.policies import EvictionPolicy, ExpertKey, make_eviction_policy

AccessGroup = tuple[int, tuple[int, ...]]  # (layer, sorted unique expert ids)


def _flatten_ids(ids: Any) -> Iterator[int]:
    if isinstance(ids, (list, tuple)):
        for item in ids:
            yield from _flatten_ids(item)
    else:
        expert_id = int(ids)
        if expert_id < 0:
            raise ValueError(f"expert ids must be >= 0, got {expert_id}")
        yield expert_id


def trace_from_routing(expert_ids: Any) -> Iterator[AccessGroup]:
    """Yield the access groups of routing decisions, step-major then layer-minor.

    `expert_ids` is an int tensor/array of shape [steps, layers, k] (anything with `.tolist()`)
    or nested lists `steps x layers x ids`; a layer entry may itself be nested (e.g. [tokens, k]
    for a batch). Each group's ids are deduplicated and sorted ascending.
    """
    # NOTE: `.tolist()` syncs a GPU tensor; this helper is for traces, not the decode loop.
    rows = expert_ids.tolist() if hasattr(expert_ids, "tolist") else expert_ids
    for step_ids in rows:
        for layer, layer_ids in enumerate(step_ids):
            yield layer, tuple(sorted(set(_flatten_ids(layer_ids))))


@dataclass(frozen=True)
class SimResult:
    """Outcome of replaying a trace: counts, per-group missed ids, victims, final residents."""

    num_hits: int
    num_misses: int
    group_miss_ids: tuple[tuple[int, ...], ...]  # per group: missed expert ids, ascending
    evictions: tuple[ExpertKey, ...]  # victims in eviction order
    resident_keys: tuple[ExpertKey, ...]  # resident at the end, sorted

    @property
    def num_accesses(self) -> int:
        """Total key accesses (hits + misses)."""
        return self.num_hits + self.num_misses

    @property
    def hit_rate(self) -> float:
        """Hits / accesses (0.0 for an empty trace)."""
        return self.num_hits / self.num_accesses if self.num_accesses else 0.0


def _normalize(trace: Iterable[AccessGroup], capacity: int) -> list[AccessGroup]:
    """Dedupe and sort each group's ids; check the capacity against every group."""
    if capacity < 1:
        raise ValueError(f"cache capacity must be >= 1 slot, got {capacity}")
    groups = []
    for layer, ids in trace:
        expert_ids = tuple(sorted({int(e) for e in ids}))
        if len(expert_ids) > capacity:
            raise ValueError(
                f"cache capacity {capacity} is smaller than group size {len(expert_ids)} "
                f"(layer {layer}): all experts of a group must be resident at once"
            )
        groups.append((int(layer), expert_ids))
    return groups


def _no_victim_error(key: ExpertKey, num_resident: int) -> ValueError:
    return ValueError(
        f"no evictable expert to make room for {key}: all {num_resident} resident experts "
        "are pinned by the current group or protected"
    )


def _replay(
    groups: list[AccessGroup],
    capacity: int,
    policy: EvictionPolicy,
    protected: Collection[ExpertKey],
) -> SimResult:
    """Run the residency model of the module docstring, asking `policy` for victims."""
    resident: set[ExpertKey] = set()
    num_hits, now = 0, 0
    group_miss_ids: list[tuple[int, ...]] = []
    evictions: list[ExpertKey] = []
    for layer, expert_ids in groups:
        policy.begin_group(layer)
        pinned = {(layer, e) for e in expert_ids}
        miss_ids = []
        for expert_id in expert_ids:
            key = (layer, expert_id)
            if key in resident:
                num_hits += 1
            else:
                miss_ids.append(expert_id)
                if len(resident) >= capacity:
                    candidates = [k for k in resident if k not in pinned and k not in protected]
                    if not candidates:
                        raise _no_victim_error(key, len(resident))
                    victim = policy.choose_victim(candidates, now)
                    assert victim in candidates, f"policy chose non-candidate {victim}"
                    resident.remove(victim)
                    policy.on_evict(victim)
                    evictions.append(victim)
                resident.add(key)
                policy.on_insert(key, now)
            policy.on_access(key, now)
            now += 1
        group_miss_ids.append(tuple(miss_ids))
    num_misses = sum(len(ids) for ids in group_miss_ids)
    return SimResult(
        num_hits, num_misses, tuple(group_miss_ids), tuple(evictions), tuple(sorted(resident))
    )


def simulate(
    trace: Iterable[AccessGroup],
    capacity: int,
    policy_name: str,
    protected: Collection[ExpertKey] | None = None,
) -> SimResult:
    """Replay `trace` on a `capacity`-slot cache with the named policy (see module docstring).

    `protected` keys are never chosen as victims (e.g. experts in flight).
    """
    groups = _normalize(trace, capacity)
    policy = make_eviction_policy(policy_name, capacity, num_layers_of(groups))
    return _replay(groups, capacity, policy, frozenset(protected or ()))


def num_layers_of(groups: Sequence[AccessGroup]) -> int:
    """Layers a trace loops over: its largest layer id + 1."""
    return 1 + max((layer for layer, _ in groups), default=0)


# Brute-force ranks: each scans the whole event history (time, kind, key); smallest rank
# loses. `at`: the current access time, the current group's layer, the aging period and the
# trace's layer count (the aging policies' parameters for this capacity).
History = list[tuple[int, str, ExpertKey]]


@dataclass(frozen=True)
class _At:
    now: int
    layer: int
    period: int
    num_layers: int


def _recency(key: ExpertKey, history: History) -> int:
    return max(t for t, _, k in history if k == key)


def _rank_lru(key: ExpertKey, history: History, at: _At) -> tuple:
    return (_recency(key, history), key)


def _rank_lfu(key: ExpertKey, history: History, at: _At) -> tuple:
    num_accesses = sum(1 for _, kind, k in history if k == key and kind == "access")
    return (num_accesses, _recency(key, history), key)


def _rank_fifo(key: ExpertKey, history: History, at: _At) -> tuple:
    return (max(t for t, kind, k in history if k == key and kind == "insert"), key)


def _aged_count(key: ExpertKey, history: History, at: _At) -> int:
    count, epoch = 0, 0
    for t, kind, k in history:  # halve once per epoch boundary crossed, then count the access
        if k == key and kind == "access":
            count = (count >> (t // at.period - epoch)) + 1
            epoch = t // at.period
    return count >> (at.now // at.period - epoch)


def _rank_lfu_decay(key: ExpertKey, history: History, at: _At) -> tuple:
    return (_aged_count(key, history, at), _recency(key, history), key)


def _rank_next_use(key: ExpertKey, history: History, at: _At) -> tuple:
    ahead = [d for d in range(1, at.num_layers + 1) if (at.layer + d) % at.num_layers == key[0]]
    return (_aged_count(key, history, at), -ahead[0], _recency(key, history), key)


_BRUTE_RANKS = {
    "lru": _rank_lru,
    "lfu": _rank_lfu,
    "fifo": _rank_fifo,
    "lfu-decay": _rank_lfu_decay,
    "next-use": _rank_next_use,
}


def brute_force_simulate(
    trace: Iterable[AccessGroup],
    capacity: int,
    policy_name: str,
    protected: Collection[ExpertKey] | None = None,
) -> SimResult:
    """Independent reference for `simulate`: no policy objects, victims from the full history.

    Slow (each eviction scans the whole history per candidate); for tests only.
    """
    if policy_name not in _BRUTE_RANKS:
        raise ValueError(f"unknown eviction policy {policy_name!r}; known: {sorted(_BRUTE_RANKS)}")
    rank = _BRUTE_RANKS[policy_name]
    period = PERIOD_PER_SLOT * capacity
    groups = _normalize(trace, capacity)
    num_layers = num_layers_of(groups)
    protected = set(protected or ())
    history: list[tuple[int, str, ExpertKey]] = []
    resident: list[ExpertKey] = []
    group_miss_ids: list[tuple[int, ...]] = []
    evictions: list[ExpertKey] = []
    now = 0
    for layer, expert_ids in groups:
        miss_ids = []
        for expert_id in expert_ids:
            key = (layer, expert_id)
            if key not in resident:
                miss_ids.append(expert_id)
                if len(resident) == capacity:
                    candidates = [
                        k
                        for k in resident
                        if not (k[0] == layer and k[1] in expert_ids) and k not in protected
                    ]
                    if not candidates:
                        raise _no_victim_error(key, len(resident))
                    at = _At(now, layer, period, num_layers)
                    victim = min(candidates, key=lambda k: rank(k, history, at))
                    resident.remove(victim)
                    evictions.append(victim)
                resident.append(key)
                history.append((now, "insert", key))
            history.append((now, "access", key))
            now += 1
        group_miss_ids.append(tuple(miss_ids))
    num_accesses = sum(1 for _, kind, _ in history if kind == "access")
    num_misses = sum(len(ids) for ids in group_miss_ids)
    return SimResult(
        num_accesses - num_misses,
        num_misses,
        tuple(group_miss_ids),
        tuple(evictions),
        tuple(sorted(resident)),
    )


class BeladyPolicy(EvictionPolicy):
    """Clairvoyant policy for one known trace: evict the key whose next use is farthest.

    "Next use" is the index of the next group that uses the key (never again = after the
    last group); ties (same next group, or never used again) go to the smallest key. Only
    valid when driven over exactly the `groups` it was built from.
    """

    name = "belady"

    def __init__(self, groups: Sequence[AccessGroup]) -> None:
        self._num_groups = len(groups)
        self._group_of_access: list[int] = []  # logical time -> group index
        self._use_groups: dict[ExpertKey, list[int]] = {}  # key -> ascending group indices
        for group_index, (layer, expert_ids) in enumerate(groups):
            for expert_id in expert_ids:
                self._group_of_access.append(group_index)
                self._use_groups.setdefault((layer, expert_id), []).append(group_index)

    def on_access(self, key: ExpertKey, now: int) -> None:
        """Nothing to track: the future is known."""

    def on_insert(self, key: ExpertKey, now: int) -> None:
        """Nothing to track: the future is known."""

    def on_evict(self, key: ExpertKey) -> None:
        """Nothing to track: the future is known."""

    def _next_use(self, key: ExpertKey, group_index: int) -> int:
        uses = self._use_groups.get(key, [])
        pos = bisect_right(uses, group_index)
        return uses[pos] if pos < len(uses) else self._num_groups

    def choose_victim(self, candidates: Sequence[ExpertKey], now: int) -> ExpertKey:
        """Return the candidate used farthest in the future (ties: smallest key)."""
        group_index = self._group_of_access[now]
        return min(candidates, key=lambda k: (-self._next_use(k, group_index), k))


def belady_misses(trace: Iterable[AccessGroup], capacity: int) -> SimResult:
    """Fewest misses any demand-fetching cache can have on `trace` (Belady's MIN, with groups).

    Why optimal: only non-pinned keys are candidates (the current group's keys are needed
    now, so evicting one can only add a miss). Take any schedule S that first differs from
    MIN by evicting y where MIN evicts x, with next_use(x) >= next_use(y). S' evicts x
    instead and then copies S with x and y swapped; up to y's next group, x is not used, so
    S' misses no more than S, and at y's group S' hits y where S misses it, after which S'
    either equals S or holds one key S lacks (paid for at most once, when it is next used).
    So S' is no worse than S and agrees with MIN one decision longer; by induction MIN is
    optimal. Keys next used in the same group are interchangeable, hence the key tie-break.
    """
    groups = _normalize(trace, capacity)
    return _replay(groups, capacity, BeladyPolicy(groups), frozenset())


def belady_brute_force(trace: Iterable[AccessGroup], capacity: int) -> int:
    """Fewest misses over every possible sequence of victim choices (exhaustive; tiny traces).

    Demand fetching with the same pinning rules as `simulate`; memoized on the resident set.
    """
    groups = _normalize(trace, capacity)
    accesses = [((layer, e), expert_ids, layer) for layer, expert_ids in groups for e in expert_ids]

    @cache
    def min_misses(pos: int, resident: frozenset[ExpertKey]) -> int:
        if pos == len(accesses):
            return 0
        key, expert_ids, layer = accesses[pos]
        if key in resident:
            return min_misses(pos + 1, resident)
        if len(resident) < capacity:
            return 1 + min_misses(pos + 1, resident | {key})
        candidates = [k for k in resident if not (k[0] == layer and k[1] in expert_ids)]
        return 1 + min(min_misses(pos + 1, (resident - {v}) | {key}) for v in candidates)

    return min_misses(0, frozenset())
