"""One Triton kernel for a whole FusedPredictor.predict call; imported lazily by runtime.py.

A call used to be about fifteen small torch kernels (topk of the lookahead, clamp/log, cats,
an add of offsets, embedding_bag, relu, addmm, topk); here it is one launch, one program per
token row b (B rows, E experts, H hidden, K top-k, n path slots, M lookahead width):

    acc[H + E] = sum over the call's table rows of weight * table[row]   (rows as runtime.py
                 lays them out: path slots, lookahead rows weighted by p, 1, log(max(p, floor)),
                 prev-token rows, the bias row), each block gathered as one 2-D tile
    logits[E]  = acc[H:] + relu(acc[:H]) @ W2  (+ rank[m] at the lookahead id of rank m)
    out[num]   = the top-`num` ids by iterative argmax: most likely first, ties to the
                 smaller id (torch.topk leaves the order of equal values unspecified)

Everything accumulates in float32 whatever the table's dtype (the torch path rounds its
embedding_bag and addmm outputs to the table dtype, bf16 on CUDA, before topk: predictions
agree except where logits are within that rounding). Lookahead entries with a negative id
contribute nothing (replayed traces pad with -1); a valid id with p = 0 (dense probabilities
after topk) contributes like any other, as in the torch path. NaN logits count as -inf; the
ids written are always `num` distinct experts. No host sync, fixed shapes: capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4


@triton.jit
def _gather_sum(
    table, stride_t, rows, weights, ok, offs_h, offs_e, H: tl.constexpr, E: tl.constexpr
):
    # sum_r weights[r] * table[rows[r]], split into hidden [BLOCK_H] and logit [BLOCK_E] parts
    base = table + rows.to(tl.int64)[:, None] * stride_t
    w = weights[:, None]
    out = tl.load(base + H + offs_e[None, :], mask=ok[:, None] & (offs_e[None, :] < E), other=0.0)
    sum_o = tl.sum(w * out.to(tl.float32), axis=0)
    if H > 0:
        mask_h = ok[:, None] & (offs_h[None, :] < H)
        hid = tl.load(base + offs_h[None, :], mask=mask_h, other=0.0)
        sum_h = tl.sum(w * hid.to(tl.float32), axis=0)
    else:
        sum_h = tl.zeros(offs_h.shape, tl.float32)
    return sum_h, sum_o


# NOTE: row numbers and the slot count vary per layer: not specialized on (a compile each)
@triton.jit(do_not_specialize=["base_row", "bias_row", "num_slots"])
def _predict_kernel(
    table, stride_t, base_row, bias_row,
    routed, stride_rb, stride_rs, stride_rk, num_slots,
    la_ids, stride_ib, stride_im, la_p, stride_pb, stride_pm, rank,
    prev, stride_vb, stride_vk, prev_rows,
    w2, stride_w2,
    out_ids, stride_ob, logits, stride_lb,
    log_floor,
    E: tl.constexpr, H: tl.constexpr, W: tl.constexpr, K: tl.constexpr,
    HAS_PATH: tl.constexpr, M: tl.constexpr, HAS_RANK: tl.constexpr,
    KP: tl.constexpr, PREV_ROWS: tl.constexpr, NUM: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs_h = tl.arange(0, BLOCK_H)
    acc_h = tl.zeros([BLOCK_H], tl.float32)
    acc_o = tl.zeros([BLOCK_E], tl.float32)
    # path: slot j of the last num_slots layers (oldest first) reads block num_slots - 1 - j
    if HAS_PATH:
        i = tl.arange(0, BLOCK_P)
        ok = i < num_slots * K
        slot, k = i // K, i % K
        ids = tl.load(routed + b * stride_rb + slot * stride_rs + k * stride_rk, mask=ok, other=0)
        rows = base_row + (num_slots - 1 - slot) * E + ids.to(tl.int64)
        sh, so = _gather_sum(table, stride_t, rows, ok.to(tl.float32), ok, offs_h, offs_e, H, E)
        acc_h += sh
        acc_o += so
    # lookahead: rows weighted by p, by 1 and by log(max(p, floor)); negative ids are absent
    if M > 0:
        m = tl.arange(0, BLOCK_M)
        ids = tl.load(la_ids + b * stride_ib + m * stride_im, mask=m < M, other=-1).to(tl.int64)
        ok = ids >= 0
        p = tl.load(la_p + b * stride_pb + m * stride_pm, mask=ok, other=0.0).to(tl.float32)
        one = ok.to(tl.float32)
        ids = tl.where(ok, ids, 0)
        la_row = base_row + W * E + ids
        sh, so = _gather_sum(table, stride_t, la_row, p * one, ok, offs_h, offs_e, H, E)
        acc_h += sh
        acc_o += so
        sh, so = _gather_sum(table, stride_t, la_row + E, one, ok, offs_h, offs_e, H, E)
        acc_h += sh
        acc_o += so
        log_p = tl.log(tl.maximum(p, log_floor)) * one
        sh, so = _gather_sum(table, stride_t, la_row + 2 * E, log_p, ok, offs_h, offs_e, H, E)
        acc_h += sh
        acc_o += so
        if HAS_RANK:  # identity rows into the logits, weighted by the rank biases
            bias = tl.load(rank + m, mask=ok, other=0.0).to(tl.float32)
            hit = (offs_e[None, :] == ids[:, None]) & ok[:, None]
            acc_o += tl.sum(tl.where(hit, bias[:, None], 0.0), axis=0)
    # the previous token's experts at the target layer (row prev_rows[b] of prev)
    if KP > 0:
        k = tl.arange(0, BLOCK_K)
        ok = k < KP
        if PREV_ROWS:
            r = tl.load(prev_rows + b).to(tl.int64)
        else:
            r = b.to(tl.int64)
        ids = tl.load(prev + r * stride_vb + k * stride_vk, mask=ok, other=0).to(tl.int64)
        rows = base_row + (W + 3) * E + ids
        sh, so = _gather_sum(table, stride_t, rows, ok.to(tl.float32), ok, offs_h, offs_e, H, E)
        acc_h += sh
        acc_o += so
    bias_base = table + bias_row.to(tl.int64) * stride_t
    acc_o += tl.load(bias_base + H + offs_e, mask=offs_e < E, other=0.0).to(tl.float32)
    if H > 0:
        acc_h += tl.load(bias_base + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        mask = (offs_h[:, None] < H) & (offs_e[None, :] < E)
        w2_tile = tl.load(w2 + offs_h[:, None] * stride_w2 + offs_e[None, :], mask=mask, other=0.0)
        acc_o += tl.sum(tl.maximum(acc_h, 0.0)[:, None] * w2_tile.to(tl.float32), axis=0)
    if WRITE_LOGITS:
        tl.store(logits + b * stride_lb + offs_e, acc_o, mask=offs_e < E)
    # top NUM: iterative argmax over the experts not yet taken, ties to the smaller id
    x = tl.where(acc_o == acc_o, acc_o, float("-inf"))  # NaN -> -inf
    taken = offs_e >= E
    for i in range(NUM):
        best = tl.max(tl.where(taken, float("-inf"), x), axis=0)
        pick = tl.min(tl.where((x == best) & ~taken, offs_e, BLOCK_E), axis=0)
        tl.store(out_ids + b * stride_ob + i, pick.to(tl.int64))
        taken = taken | (offs_e == pick)


def fused_predict(
    table: torch.Tensor,
    base_row: int,
    bias_row: int,
    shape: tuple[int, int, int],
    routed: torch.Tensor | None,
    lookahead: tuple[torch.Tensor, torch.Tensor] | None,
    rank: torch.Tensor | None,
    prev: torch.Tensor | None,
    prev_rows: torch.Tensor | None,
    w2: torch.Tensor | None,
    num: int,
    num_rows: int,
    log_floor: float,
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert ids [B, num] int64 of one (layer, d) pair, most likely first (module docstring).

    table [*, H + E] (or [*, E] when H = 0) with the pair's rows from `base_row` (layout of
    runtime.FusedPredictor, W path blocks) and its bias row at `bias_row`; shape = (E, H, W);
    routed [B, n, K] the path slots used (oldest first; None: no path rows); lookahead
    (ids [B, M], probs [B, M]) (ids < 0: absent); rank [M] the rank biases (None: no rank
    term); prev [S, KP] with prev_rows [B] (row of each token; None: row b) or None;
    w2 [H, E] (None iff H = 0); B = num_rows. `logits` [B, E] float32, when given, receives
    the logits (tests). Any strides; one launch.
    """
    E, H, W = shape
    B = num_rows
    assert 0 < num <= E, f"num={num} must be in 1..{E}"
    assert (w2 is None) == (H == 0), "w2 is needed exactly when the table has a hidden layer"
    assert table.shape[1] == H + E and table.stride(1) == 1, "table rows must be [H + E], dense"
    out = torch.empty(B, num, dtype=torch.long, device=table.device)
    if B == 0:
        return out
    dummy = out  # stands in for absent tensors (never read: their blocks compile away)
    n, K = (0, 1) if routed is None else routed.shape[1:]
    assert n <= W, f"{n} path slots, the table has {W}"
    la_ids, la_p = lookahead if lookahead is not None else (dummy, dummy)
    M = 0 if lookahead is None else la_ids.shape[1]
    assert rank is None or (M > 0 and rank.shape[0] >= M), "rank biases need the lookahead"
    assert prev is None or prev_rows is not None or prev.shape[0] == B, "prev [B, KP]"
    assert w2 is None or (w2.shape == (H, E) and w2.stride(1) == 1), "w2 [H, E], dense rows"
    assert rank is None or rank.stride(0) == 1, "rank biases must be contiguous"
    for t in (routed, la_ids, la_p, prev, prev_rows, w2, rank):
        assert t is None or t.device == table.device, "all inputs on the table's device"
    routed = dummy[:, None] if routed is None else routed
    prev_t = dummy if prev is None else prev
    lg = dummy if logits is None else logits
    if logits is not None:
        assert logits.shape == (B, E) and logits.dtype == torch.float32 and logits.stride(1) == 1
    _predict_kernel[(B,)](
        table, table.stride(0), base_row, bias_row,
        routed, routed.stride(0), routed.stride(1), routed.stride(-1), n,
        la_ids, la_ids.stride(0), la_ids.stride(-1), la_p, la_p.stride(0), la_p.stride(-1),
        dummy if rank is None else rank,
        prev_t, prev_t.stride(0), prev_t.stride(-1), dummy if prev_rows is None else prev_rows,
        dummy if w2 is None else w2, 0 if w2 is None else w2.stride(0),
        out, out.stride(0), lg, lg.stride(0),
        log_floor,
        E=E, H=H, W=W, K=K, HAS_PATH=n > 0, M=M, HAS_RANK=rank is not None,
        KP=0 if prev is None else prev.shape[1], PREV_ROWS=prev_rows is not None,
        NUM=num, WRITE_LOGITS=logits is not None,
        BLOCK_E=triton.next_power_of_2(E), BLOCK_H=triton.next_power_of_2(max(H, 1)),
        BLOCK_P=triton.next_power_of_2(W * K), BLOCK_M=triton.next_power_of_2(max(M, 1)),
        BLOCK_K=triton.next_power_of_2(1 if prev is None else prev.shape[1]),
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return out
