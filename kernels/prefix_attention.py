"""Prefix attention: FlashAttention-style attention over a learned prefix followed by the
sequence's own keys.  The prefix is read in place from the single (Hkv, P, D) tensor, or from
the row's slice of an (N, Hkv, P, D) tensor chosen by prefix_index: never concatenated with the
sequence, never expanded over the batch.  Its gradient is reduced across batch rows, query heads
and query blocks straight into an O(P) fp32 buffer of the prefix's shape with atomic adds.

Scores run in the log2 domain (exp2, scale·log2 e folded into one multiply); lse is written in
natural log to match the reference.  All accumulation is fp32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 128
LN2_C = tl.constexpr(LN2)  # globals read inside @triton.jit must be constexpr
LOG2E_C = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------- shared helpers
@triton.jit
def _load_tile(ptrs, offs_rows, n_rows, offs_d, D, ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    # masks only where an edge can be ragged: rows (ROWS) and the padded head dim (not EVEN_D)
    if ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=offs_rows[:, None] < n_rows, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(offs_rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
    return tile


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    # "upcast" is for the interpreter only: its bf16 tl.dot multiplies the raw bit patterns
    # (triton-lang/triton#11584), so operands (already rounded to bf16) go through fp32
    if PRECISION == "upcast":
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _visible(offs_n, n_keys, q_pos, keep_base, stride_ms,
             BOUNDS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr):
    # (BLOCK_M, BLOCK_N) key visibility: in range, causal (key j ≤ query position), not padded
    valid = offs_n[None, :] >= 0
    if BOUNDS:
        valid = valid & (offs_n[None, :] < n_keys)
    if CAUSAL_MASK:
        valid = valid & (offs_n[None, :] <= q_pos[:, None])
    if HAS_MASK:
        keep = tl.load(keep_base + offs_n * stride_ms, mask=offs_n < n_keys, other=0)
        valid = valid & (keep[None, :] != 0)
    return valid


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               keep_base, stride_ms, lo, hi, n_keys, q_pos, offs_d, D, qk_scale,
               BOUNDS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    # online softmax over key blocks [lo, hi); masks applied only when BOUNDS/CAUSAL_MASK/HAS_MASK
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, n_keys,
                       offs_d, D, BOUNDS, EVEN_D)
        s = _dot(q, tl.trans(k), PRECISION) * qk_scale
        if BOUNDS or CAUSAL_MASK or HAS_MASK:
            valid = _visible(offs_n, n_keys, q_pos, keep_base, stride_ms, BOUNDS, CAUSAL_MASK, HAS_MASK)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row that has seen no visible key yet keeps m = -inf: subtract 0 instead (no inf - inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, n_keys,
                       offs_d, D, BOUNDS, EVEN_D)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              keep_base, stride_ms, lo, hi, n_keys, q_pos, offs_d, D, qk_scale,
              BOUNDS: tl.constexpr, CAUSAL_MASK: tl.constexpr, HAS_MASK: tl.constexpr,
              BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    # dq += (p ∘ (dO·vᵀ − delta))·k over key blocks [lo, hi), p recomputed from the saved lse
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, n_keys,
                       offs_d, D, BOUNDS, EVEN_D)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, n_keys,
                       offs_d, D, BOUNDS, EVEN_D)
        p = tl.exp2(_dot(q, tl.trans(k), PRECISION) * qk_scale - lse2[:, None])
        if BOUNDS or CAUSAL_MASK or HAS_MASK:
            valid = _visible(offs_n, n_keys, q_pos, keep_base, stride_ms, BOUNDS, CAUSAL_MASK, HAS_MASK)
            p = tl.where(valid, p, 0.0)
        dp = _dot(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    return dq


# ----------------------------------------------------------------------------- forward
# out = softmax(q·[prefix_k; k]ᵀ·scale + mask)·[prefix_v; v], one program per (query block, b, h);
# saves lse = log Σ exp(scores) (natural log, fp32) per query for the backward.
@triton.jit
def _prefix_attn_fwd(q, k, v, pk, pv, keep, pidx, out, lse,
                     stride_qb, stride_qh, stride_qt, stride_qd,
                     stride_kb, stride_kh, stride_ks, stride_kd,
                     stride_vb, stride_vh, stride_vs, stride_vd,
                     stride_pkn, stride_pkh, stride_pkp, stride_pkd,
                     stride_pvn, stride_pvh, stride_pvp, stride_pvd,
                     stride_mb, stride_ms,
                     stride_ob, stride_oh, stride_ot, stride_od,
                     Hq, T, S, P, D, GROUP, qk_scale, T_BUCKET,
                     CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:  # the longest query blocks (most keys) first
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    n = tl.load(pidx + b).to(tl.int64) if HAS_INDEX else 0

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + (S - T)  # lower-right causal: query t sees sequence keys j ≤ t + S − T
    q = _load_tile(q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, T, offs_d, D, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # 1) the prefix: every query sees all of it
    pk_base = pk + n * stride_pkn + hk * stride_pkh
    pv_base = pv + n * stride_pvn + hk * stride_pvh
    p_full = (P // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
                               keep, stride_ms, 0, p_full, P, q_pos, offs_d, D, qk_scale,
                               False, False, False, BLOCK_N, EVEN_D, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
                               keep, stride_ms, p_full, P, P, q_pos, offs_d, D, qk_scale,
                               True, False, False, BLOCK_N, EVEN_D, PRECISION)

    # 2) the sequence keys: blocks wholly visible to every row first (no causal mask), then the rest
    k_base = k + b * stride_kb + hk * stride_kh
    v_base = v + b * stride_vb + hk * stride_vh
    keep_base = keep + b * stride_mb
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + S - T)
        full = (tl.maximum(tl.minimum(start_m + S - T + 1, S), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full = (S // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               keep_base, stride_ms, 0, full, S, q_pos, offs_d, D, qk_scale,
                               False, False, HAS_MASK, BLOCK_N, EVEN_D, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               keep_base, stride_ms, full, hi, S, q_pos, offs_d, D, qk_scale,
                               True, CAUSAL, HAS_MASK, BLOCK_N, EVEN_D, PRECISION)

    # a row that sees no key at all (P = 0, everything masked) gives 0 and lse = -inf
    seen = l_i > 0.0
    out_tile = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse_row = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2_C, float("-inf"))
    row_ok = offs_m < T
    tl.store(lse + pid_bh.to(tl.int64) * T + offs_m, lse_row, mask=row_ok)
    o_ptrs = out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out_tile.to(out.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------- backward
# delta = rowsum(dO ∘ O) in fp32, the softmax-gradient correction term of FlashAttention-2.
@triton.jit
def _prefix_attn_bwd_delta(out, do, delta,
                           stride_ob, stride_oh, stride_ot, stride_od,
                           stride_db, stride_dh, stride_dt, stride_dd,
                           Hq, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    g = tl.load(do + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd,
                mask=mask, other=0.0).to(tl.float32)
    tl.store(delta + pid_bh.to(tl.int64) * T + offs_m, tl.sum(o * g, 1), mask=offs_m < T)


# dq = scale · Σ_keys p ∘ (dO·vᵀ − delta) · k over the prefix and the visible sequence keys, one
# program per (query block, b, h); p is recomputed from the forward's lse (nothing else saved).
@triton.jit
def _prefix_attn_bwd_dq(q, k, v, pk, pv, keep, pidx, do, lse, delta, dq,
                        stride_qb, stride_qh, stride_qt, stride_qd,
                        stride_kb, stride_kh, stride_ks, stride_kd,
                        stride_vb, stride_vh, stride_vs, stride_vd,
                        stride_pkn, stride_pkh, stride_pkp, stride_pkd,
                        stride_pvn, stride_pvh, stride_pvp, stride_pvd,
                        stride_mb, stride_ms,
                        stride_dob, stride_doh, stride_dot, stride_dod,
                        stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                        Hq, T, S, P, D, GROUP, qk_scale, scale, T_BUCKET,
                        CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    hk = h // GROUP
    n = tl.load(pidx + b).to(tl.int64) if HAS_INDEX else 0

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_pos = offs_m + (S - T)
    row_ok = offs_m < T
    q = _load_tile(q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, T, offs_d, D, True, EVEN_D)
    do = _load_tile(do + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                    offs_m, T, offs_d, D, True, EVEN_D)
    lse_row = tl.load(lse + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    lse2 = tl.where(lse_row == float("-inf"), 0.0, lse_row * LOG2E_C)  # rows that saw nothing: p = 0 anyway
    delta_row = tl.load(delta + pid_bh.to(tl.int64) * T + offs_m, mask=row_ok, other=0.0)
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    pk_base = pk + n * stride_pkn + hk * stride_pkh
    pv_base = pv + n * stride_pvn + hk * stride_pvh
    p_full = (P // BLOCK_N) * BLOCK_N
    dq_acc = _dq_inner(dq_acc, q, do, lse2, delta_row, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp,
                       stride_pvd, keep, stride_ms, 0, p_full, P, q_pos, offs_d, D, qk_scale,
                       False, False, False, BLOCK_N, EVEN_D, PRECISION)
    dq_acc = _dq_inner(dq_acc, q, do, lse2, delta_row, pk_base, pv_base, stride_pkp, stride_pkd, stride_pvp,
                       stride_pvd, keep, stride_ms, p_full, P, P, q_pos, offs_d, D, qk_scale,
                       True, False, False, BLOCK_N, EVEN_D, PRECISION)

    k_base = k + b * stride_kb + hk * stride_kh
    v_base = v + b * stride_vb + hk * stride_vh
    keep_base = keep + b * stride_mb
    if CAUSAL:
        hi = tl.minimum(S, start_m + BLOCK_M + S - T)
        full = (tl.maximum(tl.minimum(start_m + S - T + 1, S), 0) // BLOCK_N) * BLOCK_N
    else:
        hi = S
        full = (S // BLOCK_N) * BLOCK_N
    dq_acc = _dq_inner(dq_acc, q, do, lse2, delta_row, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                       keep_base, stride_ms, 0, full, S, q_pos, offs_d, D, qk_scale,
                       False, False, HAS_MASK, BLOCK_N, EVEN_D, PRECISION)
    dq_acc = _dq_inner(dq_acc, q, do, lse2, delta_row, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                       keep_base, stride_ms, full, hi, S, q_pos, offs_d, D, qk_scale,
                       True, CAUSAL, HAS_MASK, BLOCK_N, EVEN_D, PRECISION)

    dq_ptrs = dq + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq_acc * scale).to(dq.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _dkdv_inner(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, start_n, n_keys,
                q_base, do_base, lse_base, delta_base, stride_qh, stride_qt, stride_qd,
                stride_doh, stride_dot, stride_dod, keep_base, stride_ms, m_lo, T, S, D, GROUP, qk_scale,
                IS_SEQ: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    # (dk, dv) of one key block, summed over the GQA group's query heads and query blocks m_lo..T
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, n_keys,
                   offs_d, D, True, EVEN_D)
    v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, n_keys,
                   offs_d, D, True, EVEN_D)
    key_ok = offs_n < n_keys
    if IS_SEQ and HAS_MASK:
        key_ok = key_ok & (tl.load(keep_base + offs_n * stride_ms, mask=offs_n < n_keys, other=0) != 0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        for start_m in range(m_lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_ok = offs_m < T
            q = _load_tile(q_base + g * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                           offs_m, T, offs_d, D, True, EVEN_D)
            do = _load_tile(do_base + g * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                            offs_m, T, offs_d, D, True, EVEN_D)
            lse_row = tl.load(lse_base + g * T + offs_m, mask=row_ok, other=0.0)
            lse2 = tl.where(lse_row == float("-inf"), 0.0, lse_row * LOG2E_C)
            delta_row = tl.load(delta_base + g * T + offs_m, mask=row_ok, other=0.0)
            # transposed tiles (keys × queries) so dk, dv accumulate without transposing the result
            p_t = tl.exp2(_dot(k, tl.trans(q), PRECISION) * qk_scale - lse2[None, :])
            valid = key_ok[:, None] & row_ok[None, :]
            if IS_SEQ and CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + (S - T))
            p_t = tl.where(valid, p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, PRECISION)
            dp_t = _dot(v, tl.trans(do), PRECISION)
            ds_t = p_t * (dp_t - delta_row[None, :])
            dk += _dot(ds_t.to(q.dtype), q, PRECISION)
    return dk, dv


# dk = scale · Σ dsᵀ·q and dv = Σ pᵀ·dO for one key block of one (b, kv head), summed over the GQA
# group; program ids below cdiv(P, BLOCK_N) take prefix key blocks and atomically add their fp32
# partials into the (N or 1, Hkv, P, D) prefix-gradient buffer, the rest store sequence dk, dv.
@triton.jit
def _prefix_attn_bwd_dkdv(q, k, v, pk, pv, keep, pidx, do, lse, delta, dk, dv, dpk, dpv,
                          stride_qb, stride_qh, stride_qt, stride_qd,
                          stride_kb, stride_kh, stride_ks, stride_kd,
                          stride_vb, stride_vh, stride_vs, stride_vd,
                          stride_pkn, stride_pkh, stride_pkp, stride_pkd,
                          stride_pvn, stride_pvh, stride_pvp, stride_pvd,
                          stride_mb, stride_ms,
                          stride_dob, stride_doh, stride_dot, stride_dod,
                          stride_dkb, stride_dkh, stride_dks, stride_dkd,
                          stride_dvb, stride_dvh, stride_dvs, stride_dvd,
                          Hkv, T, S, P, D, GROUP, qk_scale, scale, T_BUCKET,
                          CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_INDEX: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                          EVEN_D: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    hk = (pid_bh % Hkv).to(tl.int64)
    h0 = hk * GROUP
    Hq = Hkv * GROUP
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q + b * stride_qb + h0 * stride_qh
    do_base = do + b * stride_dob + h0 * stride_doh
    lse_base = lse + (b * Hq + h0) * T
    delta_base = delta + (b * Hq + h0) * T
    n_prefix_blocks = tl.cdiv(P, BLOCK_N)
    if pid_n < n_prefix_blocks:
        n = tl.load(pidx + b).to(tl.int64) if HAS_INDEX else 0
        start_n = pid_n * BLOCK_N
        dk_t, dv_t = _dkdv_inner(pk + n * stride_pkn + hk * stride_pkh, pv + n * stride_pvn + hk * stride_pvh,
                                 stride_pkp, stride_pkd, stride_pvp, stride_pvd, start_n, P,
                                 q_base, do_base, lse_base, delta_base, stride_qh, stride_qt, stride_qd,
                                 stride_doh, stride_dot, stride_dod, keep, stride_ms, 0, T, S, D, GROUP, qk_scale,
                                 False, CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        acc_off = ((n * Hkv + hk) * P + offs_n[:, None]) * D + offs_d[None, :]
        acc_mask = (offs_n[:, None] < P) & (offs_d[None, :] < D)
        tl.atomic_add(dpk + acc_off, dk_t * scale, mask=acc_mask)
        tl.atomic_add(dpv + acc_off, dv_t, mask=acc_mask)
    else:
        start_n = (pid_n - n_prefix_blocks) * BLOCK_N
        m_lo = 0
        if CAUSAL:  # queries before t = j − (S − T) never see key j
            m_lo = (tl.maximum(start_n - (S - T), 0) // BLOCK_M) * BLOCK_M
        dk_t, dv_t = _dkdv_inner(k + b * stride_kb + hk * stride_kh, v + b * stride_vb + hk * stride_vh,
                                 stride_ks, stride_kd, stride_vs, stride_vd, start_n, S,
                                 q_base, do_base, lse_base, delta_base, stride_qh, stride_qt, stride_qd,
                                 stride_doh, stride_dot, stride_dod, keep + b * stride_mb, stride_ms, m_lo, T, S, D,
                                 GROUP, qk_scale,
                                 True, CAUSAL, HAS_MASK, BLOCK_M, BLOCK_N, BLOCK_D, EVEN_D, PRECISION)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        dk_ptrs = dk + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
        dv_ptrs = dv + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
        tl.store(dk_ptrs, (dk_t * scale).to(dk.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv_t.to(dv.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs
def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Candidates that fit both sm_80 (164 KB shared memory) and sm_90 (228 KB) at D = 128 bf16; the
# autotuner drops any that does not compile for the device.  BLOCK_M 16/32 serve decoding (T small).
_FWD_CONFIGS = [_cfg(128, 64, 8, 3), _cfg(128, 64, 4, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3),
                _cfg(64, 128, 4, 3), _cfg(32, 64, 4, 3), _cfg(16, 64, 4, 3), _cfg(16, 128, 4, 2)]
_DQ_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 32, 4, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3),
               _cfg(32, 64, 4, 2), _cfg(16, 64, 4, 2)]
# dkdv: BLOCK_N keys per program, BLOCK_M queries per inner step
# (8-warp 64/32-key tiles: the fp32 dK/dV accumulators of D >= 80 spill registers at 4 warps,
# as `tools/compile_check.py` shows for sm_80 and sm_90)
_DKDV_CONFIGS = [_cfg(64, 128, 8, 2), _cfg(32, 128, 4, 3), _cfg(64, 64, 4, 3), _cfg(32, 64, 4, 3),
                 _cfg(16, 64, 4, 2), _cfg(16, 128, 4, 2), _cfg(64, 64, 8, 2), _cfg(32, 64, 8, 2),
                 _cfg(32, 128, 8, 2), _cfg(16, 32, 4, 2)]
_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16}

_TUNE_KEY = ["D", "T_BUCKET", "CAUSAL", "HAS_MASK", "HAS_INDEX"]


def _prune_by_query_length(configs, named_args, **kwargs):
    # query blocks much taller than T only waste work (decoding: T = 1); T_BUCKET = next_pow2(T)
    t_bucket = named_args.get("T_BUCKET", kwargs.get("T_BUCKET", 1 << 30))
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, t_bucket)]
    return kept or configs


def _tuned(fn, configs, reset_to_zero=None):
    return triton.autotune(configs, key=_TUNE_KEY, reset_to_zero=reset_to_zero,
                           prune_configs_by={"early_config_prune": _prune_by_query_length})(fn)


_fwd_tuned = _tuned(_prefix_attn_fwd, _FWD_CONFIGS)
_dq_tuned = _tuned(_prefix_attn_bwd_dq, _DQ_CONFIGS)
_dkdv_tuned = _tuned(_prefix_attn_bwd_dkdv, _DKDV_CONFIGS, reset_to_zero=["dpk", "dpv"])


def _launch(jit_fn, tuned_fn, grid, args, meta):
    if _interpret():
        jit_fn[grid(_INTERPRET_META)](*args, **meta, **_INTERPRET_META)
    else:
        tuned_fn[grid](*args, **meta)


# ----------------------------------------------------------------------------- launch wrappers
def _prefix_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(task, head, position, dim) strides; a shared (Hkv, P, D) prefix has task stride 0."""
    return (0, *t.stride()) if t.dim() == 3 else tuple(t.stride())


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products (the reference's accuracy), not TF32
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if _interpret() and dtype == torch.bfloat16 else "tf32"


def _common(q, k, prefix_k, attention_mask, prefix_index, causal, scale):
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    keep = attention_mask.view(torch.uint8) if attention_mask is not None else q
    mask_strides = tuple(attention_mask.stride()) if attention_mask is not None else (0, 0)
    pidx = prefix_index if prefix_index is not None else q
    block_d = max(16, triton.next_power_of_2(D))
    meta = dict(CAUSAL=bool(causal), HAS_MASK=attention_mask is not None, HAS_INDEX=prefix_index is not None,
                BLOCK_D=block_d, EVEN_D=block_d == D,
                PRECISION=_precision(q.dtype))
    t_bucket = min(triton.next_power_of_2(max(T, 1)), 1 << 16)
    return B, Hq, T, D, Hkv, S, P, keep, mask_strides, pidx, meta, t_bucket


def forward(q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, causal, scale):
    """(out, lse) of prefix attention; see fastpeft.ops.prefix_attention for shapes."""
    B, Hq, T, D, Hkv, S, P, keep, mstr, pidx, meta, t_bucket = _common(q, k, prefix_k, attention_mask,
                                                                       prefix_index, causal, scale)
    out = torch.empty_like(q)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    args = (q, k, v, prefix_k, prefix_v, keep, pidx, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *mstr, *out.stride(), Hq, T, S, P, D, Hq // Hkv, float(scale) * LOG2E, t_bucket)
    _launch(_prefix_attn_fwd, _fwd_tuned, lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * Hq), args, meta)
    return out, lse


def backward(dout, q, k, v, prefix_k, prefix_v, attention_mask, prefix_index, out, lse, causal, scale):
    """(dq, dk, dv, dprefix_k, dprefix_v) of prefix attention (FlashAttention-2 style)."""
    B, Hq, T, D, Hkv, S, P, keep, mstr, pidx, meta, t_bucket = _common(q, k, prefix_k, attention_mask,
                                                                       prefix_index, causal, scale)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # prefix gradients accumulate in fp32 over every batch row and query block: O(P) memory
    dpk = torch.zeros(prefix_k.shape, dtype=torch.float32, device=q.device)
    dpv = torch.zeros(prefix_v.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.shape[0] == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    block_m = 16 if _interpret() else 64
    _prefix_attn_bwd_delta[(triton.cdiv(T, block_m), B * Hq)](
        out, dout, delta, *out.stride(), *dout.stride(), Hq, T, D, BLOCK_M=block_m, BLOCK_D=meta["BLOCK_D"])
    common = (*q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
              *mstr, *dout.stride())
    group = Hq // Hkv
    qk_scale = float(scale) * LOG2E
    dq_args = (q, k, v, prefix_k, prefix_v, keep, pidx, dout, lse, delta, dq, *common, *dq.stride(),
               Hq, T, S, P, D, group, qk_scale, float(scale), t_bucket)
    _launch(_prefix_attn_bwd_dq, _dq_tuned, lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * Hq), dq_args, meta)
    if S + P > 0:
        dkdv_args = (q, k, v, prefix_k, prefix_v, keep, pidx, dout, lse, delta, dk, dv, dpk, dpv, *common,
                     *dk.stride(), *dv.stride(), Hkv, T, S, P, D, group, qk_scale, float(scale), t_bucket)
        _launch(_prefix_attn_bwd_dkdv, _dkdv_tuned,
                lambda m: (triton.cdiv(P, m["BLOCK_N"]) + triton.cdiv(S, m["BLOCK_N"]), B * Hkv), dkdv_args, meta)
    return dq, dk, dv, dpk.to(prefix_k.dtype), dpv.to(prefix_v.dtype)
