"""Bounds and derived figures of the benchmark suite.

Bounds (DESIGN.md section 5): prefill cannot end before every expert the prompts route to has
crossed PCIe once (from a cold cache): bytes / measured bandwidth. Decode cannot copy fewer
bytes than Belady's MIN misses at the run's cache size over the same access sequence (the
replayed trace fixes it), whatever the cache held when decode began; plus the compute-only
time of the same decode (the unbudgeted full-gpu reference of the same run).
"""

from __future__ import annotations

import heapq
from typing import Any

import torch

GB = 1e9


def replay_access_groups(
    replay, slots: list[int], starts: list[int], num_steps: int
) -> list[tuple[int, tuple[int, ...]]]:
    """The per-layer access groups that trace replay forces on `num_steps` batched steps.

    Step i runs, for each sequence b, the token at position starts[b] + i of KV slot slots[b];
    replay routes it like trace token (base[slot] + position) mod N (bench/replay.py). One
    group per (step, MoE layer): the union of the batch's experts, keyed by the layer id.
    """
    ids_cpu = replay.expert_ids.cpu()  # [L, N, K]
    bases = replay.base_of_slot.cpu().tolist()
    layer_ids = sorted(replay.layer_index, key=replay.layer_index.get)
    groups = []
    for i in range(num_steps):
        idx = torch.tensor([(bases[s] + p + i) % replay.num_tokens for s, p in zip(slots, starts)])
        step_ids = ids_cpu[:, idx].reshape(len(layer_ids), -1).tolist()  # [L, B*K]
        groups += [(lid, tuple(sorted(set(ids)))) for lid, ids in zip(layer_ids, step_ids)]
    return groups


def prefill_access_groups(replay, slots: list[int], prompt_lens: list[int]):
    """One group per MoE layer: every expert the prompts route to (each needed at least once)."""
    ids_cpu = replay.expert_ids.cpu()  # [L, N, K]
    bases = replay.base_of_slot.cpu().tolist()
    idx = torch.cat(
        [(bases[s] + torch.arange(n)) % replay.num_tokens for s, n in zip(slots, prompt_lens)]
    )
    layer_ids = sorted(replay.layer_index, key=replay.layer_index.get)
    per_layer = ids_cpu[:, idx].reshape(len(layer_ids), -1).tolist()
    return [(lid, tuple(sorted(set(ids)))) for lid, ids in zip(layer_ids, per_layer)]


def min_misses(groups: list[tuple[int, tuple[int, ...]]], capacity: int) -> int:
    """Belady's MIN miss count over access groups (same rules as offload/simulate.py).

    A heap of next uses: O(accesses log accesses), so it runs on a full decode trace (the
    reference `belady_misses` scans every resident key per miss). The current group's keys
    are pinned; a group larger than `capacity` is a ValueError.
    """
    uses: dict[tuple[int, int], list[int]] = {}
    for g, (layer, ids) in enumerate(groups):
        if len(ids) > capacity:
            raise ValueError(f"group of {len(ids)} experts > cache capacity {capacity}")
        for e in ids:
            uses.setdefault((layer, e), []).append(g)
    pos = dict.fromkeys(uses, 0)  # index into uses[key] of the next use
    never = len(groups)
    resident: set[tuple[int, int]] = set()
    heap: list[tuple[int, tuple[int, int]]] = []  # (-next use, key); stale entries skipped
    misses = 0
    for layer, ids in groups:
        for e in ids:
            key = (layer, e)
            if key not in resident:
                misses += 1
                if len(resident) >= capacity:
                    pinned = {(layer, x) for x in ids}
                    resident.remove(_pop_victim(heap, resident, pinned, uses, pos, never))
                resident.add(key)
            pos[key] += 1
            nxt = uses[key][pos[key]] if pos[key] < len(uses[key]) else never
            heapq.heappush(heap, (-nxt, key))
    return misses


def _pop_victim(heap, resident, pinned, uses, pos, never: int):
    """The resident key used farthest in the future that the current group does not pin."""
    held = []  # live entries of pinned keys: back on the heap afterwards
    try:
        while True:
            entry = heapq.heappop(heap)
            key = entry[1]
            nxt = uses[key][pos[key]] if pos[key] < len(uses[key]) else never
            if key not in resident or -entry[0] != nxt:
                continue  # stale: evicted, or accessed since this entry was pushed
            if key in pinned:
                held.append(entry)
                continue
            return key
    finally:
        for entry in held:
            heapq.heappush(heap, entry)


def decode_bound_misses(groups: list[tuple[int, tuple[int, ...]]], capacity: int) -> dict:
    """Fewest misses any cache of `capacity` slots can have on `groups`, whatever it held first.

    MIN from an empty cache, less the cold fills a free initial content could have saved
    (at most `capacity`, at most the distinct keys): from any start S, a schedule from empty
    that fetches S's keys on first use pays at most |S| more, so this is a lower bound.
    """
    cold = min_misses(groups, capacity)
    distinct = len({(layer, e) for layer, ids in groups for e in ids})
    return {
        "min_misses_cold": cold,
        "distinct_experts": distinct,
        "bound_misses": max(0, cold - min(capacity, distinct)),
    }


# ------------------------------------------------------------------ a case's bounds and rows


def case_bounds(replay, rows: list[dict], case, expert_bytes: int, bw_gbps: float | None) -> dict:
    """Case-level bounds; each ok row also gets its decode bound at its own cache size.

    Rows whose cache cannot hold a decode group (ondemand: one slot) are bounded at the
    largest cache of the budgeted rows (what the budget allows any policy).
    """
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return {}
    ref = next((r for r in ok if r["policy"] == "full-gpu (reference)"), None)
    compute_s = ref["decode_s"] if ref else None
    steps = case.max_tokens - 1
    budget_caps = [r["slots"] for r in ok if r.get("budget_gib") is not None and r.get("slots")]
    out: dict[str, Any] = {"decode_steps": steps, "compute_only_decode_s": compute_s}
    out["compute_source"] = "full-gpu (reference) decode time" if ref else "not measured"
    memo: dict[tuple, dict] = {}
    for r in ok:
        kv = tuple(r["kv_slots"])
        starts = [case.prompt_len] * len(kv)
        pre = prefill_access_groups(replay, list(kv), starts)
        dec = replay_access_groups(replay, list(kv), starts, steps)
        biggest = max((len(ids) for _, ids in dec), default=0)
        cap = r.get("slots") if r.get("budget_gib") is not None else None
        if cap is None and r.get("budget_gib") is None:
            cap = len({(lay, e) for lay, ids in dec for e in ids}) or 1  # everything resident
        elif cap is None or cap < biggest:
            cap = max(budget_caps, default=biggest)
        if (kv, cap) not in memo:
            memo[(kv, cap)] = decode_bound_misses(dec, cap) if dec else {"bound_misses": 0}
        b = dict(memo[(kv, cap)], capacity=cap, decode_accesses=sum(len(i) for _, i in dec))
        n_pre = sum(len(ids) for _, ids in pre)
        b.update(prefill_experts=n_pre, prefill_bytes=n_pre * expert_bytes)
        if bw_gbps:
            b["prefill_bound_s"] = n_pre * expert_bytes / (bw_gbps * GB)
            b["decode_copy_bound_s"] = b["bound_misses"] * expert_bytes / (bw_gbps * GB)
            b["decode_bound_s"] = b["decode_copy_bound_s"] + (compute_s or 0.0)
            b["tpot_bound_s"] = b["decode_bound_s"] / max(steps, 1)
            b["e2e_bound_s"] = b["prefill_bound_s"] + b["decode_bound_s"]
        r["bound"] = b
        out.setdefault("prefill_experts", n_pre)
        out.setdefault("prefill_bound_s", b.get("prefill_bound_s"))
    return out


def _ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


def _phase(stats: dict, key: str) -> float:
    value = stats.get(key, 0)
    return value if isinstance(value, (int, float)) else 0


def policy_row(r: dict, expert_bytes: int, bw_gbps: float | None) -> None:
    """Derived figures of one measured row, in place (missing stats keys count as 0)."""
    pre, dec = r.get("prefill", {}), r.get("decode", {})
    r["prefill_bytes"] = _phase(pre, "bytes_copied")
    r["decode_bytes"] = _phase(dec, "bytes_copied")
    r["decode_bytes_per_token"] = r["decode_bytes"] / max(r["output_tokens"] - 1, 1)
    for name, st in (("prefill", pre), ("decode", dec)):
        accesses = _phase(st, "hits") + _phase(st, "misses")
        r[f"{name}_hit_rate"] = _phase(st, "hits") / accesses if accesses else None
        r[f"{name}_wait_s"] = _phase(st, "wait_seconds")
        copy_s = _phase(st, "copy_seconds")
        r[f"{name}_copy_gbps"] = r[f"{name}_bytes"] / copy_s / GB if copy_s else None
        phase_s = r["prefill_s"] if name == "prefill" else r["decode_s"]
        r[f"{name}_link_gbps"] = r[f"{name}_bytes"] / phase_s / GB if phase_s else None
        r[f"{name}_link_util"] = _ratio(r[f"{name}_link_gbps"], bw_gbps)
    r["wait_s"] = r["prefill_wait_s"] + r["decode_wait_s"]
    r["prefetches"] = _phase(pre, "prefetches") + _phase(dec, "prefetches")
    r["prefetch_unused"] = _phase(pre, "prefetch_unused") + _phase(dec, "prefetch_unused")
    r["prefetch_unused_bytes"] = r["prefetch_unused"] * expert_bytes
    budget = r.get("budget_gib")
    peak = r.get("peak_gib")
    r["within_budget"] = None if budget is None or peak is None else peak <= budget
    b = r.get("bound", {})
    r["ttft_bound_ratio"] = _ratio(r["prefill_s"], b.get("prefill_bound_s"))
    r["tpot_bound_ratio"] = _ratio(r["tpot_s"], b.get("tpot_bound_s"))
    r["e2e_bound_ratio"] = _ratio(r["e2e_s"], b.get("e2e_bound_s"))


def hf_summary(hf: dict | None, max_tokens: int) -> dict | None:
    """TTFT and TPOT measured; E2E extrapolated as TTFT + (n - 1) x TPOT (labelled)."""
    if not hf or "ttft_s" not in hf:
        return hf
    out = dict(hf)
    if "tpot_s" in hf:
        out["e2e_s"] = hf["ttft_s"] + (max_tokens - 1) * hf["tpot_s"]
        out["e2e_note"] = (
            f"extrapolated: TTFT + {max_tokens - 1} x TPOT, TPOT measured over "
            f"{len(hf.get('decode_step_s', []))} decode steps"
        )
    return out


def finish_rows(res: dict, expert_bytes: int, bw_gbps: float | None) -> None:
    """Derived figures, greedy agreement with the reference, speedups vs each baseline."""
    ok = [r for r in res["rows"] if r.get("status") == "ok"]
    ref = next((r for r in ok if r["policy"] == "full-gpu (reference)"), None)
    for r in ok:
        policy_row(r, expert_bytes, bw_gbps)
        if ref is not None:
            r["greedy_prefix_agree_ref"] = min(
                _prefix(a, b) for a, b in zip(r["output_token_ids"], ref["output_token_ids"])
            )
    res["hf"] = hf_summary(res.get("hf"), res["max_tokens"])
    baselines = {r["policy"]: r for r in ok if r["policy"] in ("ondemand", "lru")}
    if res["hf"] and "e2e_s" in res["hf"]:
        baselines["hf"] = res["hf"]
    for r in ok:
        for name, base in baselines.items():
            for metric in ("ttft", "tpot", "e2e"):
                r[f"speedup_{metric}_vs_{name}"] = _ratio(base.get(f"{metric}_s"), r[f"{metric}_s"])
    for r in ok:
        r.pop("output_token_ids")


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
