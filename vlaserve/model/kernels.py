# ruff: noqa: N803, N806  (Triton's convention: upper-case sizes and compile-time constants)
"""The action expert's layer as five fused Triton kernels, for the decoder at small batches.

At batch 1 the decoder runs 10 Euler steps x 18 expert layers over 51 tokens: its matrix products are
skinny (51 rows) and each layer's norms, RoPE, key/value writes, masks, softmax, residuals and GeGLU were
about 19 kernels of a few microseconds each, so the GPU spent most of a call between kernels. Here one
expert layer is five kernels:

1. :func:`_norm_qkv_kernel`: RMSNorm (in the matmul's prologue), the q/k/v projection, RoPE on q and k,
   and the write of k and v into the decoder's key/value buffer.
2. :func:`_attention_kernel`: attention of the folded query heads over the prefix and suffix keys, the
   mask made from the prefix validity and the suffix's fixed structure (no bias tensor), split over the
   keys so that a batch of 1 still fills the GPU; :func:`_combine_kernel` merges the splits.
3. :func:`_out_proj_kernel`: the output projection added to the residual stream, in place.
4. :func:`_norm_geglu_kernel`: RMSNorm, the gate and up projections and GeGLU (tanh GELU) in one pass.
5. :func:`_down_proj_kernel`: the down projection added to the residual stream, in place.

The arithmetic is the reference model's (vlaserve.model.policy) up to rounding: float32 accumulation, the
products' outputs rounded to the weights' dtype where the reference rounds them, and RMSNorm's 1 / RMS
applied after the product instead of before it (the reference rounds the normalized input to bfloat16). Results are checked against the
reference by whoever uses them (tests, benchmarks/fused_decoder.py); they are close, not bit-equal.

Triton runs these on a CUDA GPU; with ``TRITON_INTERPRET=1`` it runs them on the CPU (float32 only:
the interpreter's bfloat16 products are wrong), which is how the tests check them here.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vlaserve.interface import ACTION_HORIZON, NUM_FLOW_STEPS
from vlaserve.model.policy import RMS_EPS, Policy, rope_tables, time_embedding


@triton.jit
def _scaled_chunk(x_ptr, nw_ptr, rows, row_ok, k0, K, BLOCK_K: tl.constexpr):
    """Columns k0.. of x times Gemma's norm scale (1 + weight), in x's dtype, and the float32 sum of squares
    of x's columns there. RMSNorm(x) @ w^T = rstd * ((x * scale) @ w^T): the per-row 1 / RMS is applied to
    the product afterwards, so x is read once, in the same loop as the weights."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_ok = cols < K
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    xf = x.to(tl.float32)
    scale = 1.0 + tl.load(nw_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return (xf * scale[None, :]).to(x.dtype), tl.sum(xf * xf, axis=1), cols, col_ok


@triton.jit
def _norm_two_products(x_ptr, nw_ptr, w_ptr, rows, row_ok, w_rows1, w_rows2, w_ok, K, k_start, k_stop,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """(x[rows] * scale) @ w[w_rows1]^T and (x[rows] * scale) @ w[w_rows2]^T over columns k_start..k_stop of
    K, float32 [BLOCK_M, BLOCK_N] each, and the float32 sum of squares of x's rows there: RMSNorm's 1 / RMS is
    applied by the epilogue, once the squares of all of K are summed. x and both weight tiles are read once
    per step of one loop over K (the weight tiles [BLOCK_N, BLOCK_K] as stored, transposed for the product)."""
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        y, chunk_squares, ks, k_ok = _scaled_chunk(x_ptr, nw_ptr, rows, row_ok, k0, K, BLOCK_K)
        squares += chunk_squares
        ok = w_ok[:, None] & k_ok[None, :]
        w1 = tl.load(w_ptr + w_rows1[:, None] * K + ks[None, :], mask=ok, other=0.0)
        w2 = tl.load(w_ptr + w_rows2[:, None] * K + ks[None, :], mask=ok, other=0.0)
        acc1 += tl.dot(y, tl.trans(w1))
        acc2 += tl.dot(y, tl.trans(w2))
    return acc1, acc2, squares


@triton.jit
def _split_arrive(part_ptr, count_ptr, tile, split, acc1, acc2, squares,
                  SPLITS: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Split-K: store this split's partial sums of output tile ``tile`` (acc1; with NORM also acc2 and the
    squares) and count it in; true for the split that arrives last, which then sums them all
    (:func:`_split_sum`) and runs the epilogue. A skinny product (51 rows at batch 1) has too few output
    tiles to keep the GPU's memory busy; split over K it has SPLITS times as many programs, each a shorter
    loop, and no extra kernel."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    SLAB: tl.constexpr = 2 * TILE + BLOCK_M if NORM else TILE
    base = part_ptr + (tile * SPLITS + split) * SLAB
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tl.store(base + offs, acc1)
    if NORM:
        tl.store(base + TILE + offs, acc2)
        tl.store(base + 2 * TILE + tl.arange(0, BLOCK_M), squares)
    tl.debug_barrier()  # every thread's stores are made before the count (acq_rel, GPU scope) says so
    return tl.atomic_add(count_ptr + tile, 1) == SPLITS - 1


@triton.jit
def _split_sum(part_ptr, count_ptr, tile,
               SPLITS: tl.constexpr, NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """The sums over the splits of tile ``tile`` (see :func:`_split_arrive`), its count reset for the next
    launch; read past the L1 cache, which is not coherent with the other programs' stores."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_N
    SLAB: tl.constexpr = 2 * TILE + BLOCK_M if NORM else TILE
    tl.atomic_xchg(count_ptr + tile, 0)
    offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(SPLITS):
        base = part_ptr + (tile * SPLITS + split) * SLAB
        acc1 += tl.load(base + offs, cache_modifier=".cg")
        if NORM:
            acc2 += tl.load(base + TILE + offs, cache_modifier=".cg")
            squares += tl.load(base + 2 * TILE + tl.arange(0, BLOCK_M), cache_modifier=".cg")
    return acc1, acc2, squares


@triton.jit
def _qkv_epilogue(acc1, acc2, squares, rows, row_ok, half, head, cos_ptr, sin_ptr, q_ptr, kv_ptr, K, T, eps,
                  kv_stride_b, kv_stride_kv, kv_stride_h, kv_offset, dtype: tl.constexpr,
                  H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """1 / RMS, RoPE on q and k, and the stores of :func:`_norm_qkv_kernel`."""
    rstd = 1.0 / tl.sqrt(squares / K + eps)
    a1 = (acc1 * rstd[:, None]).to(dtype).to(tl.float32)  # the projection's output in the weights' dtype
    a2 = (acc2 * rstd[:, None]).to(dtype).to(tl.float32)
    if head < H + HKV:  # q or k: rotate-half RoPE with the tables of vlaserve.model.policy.rope_tables
        t1 = rows[:, None] * D + half[None, :]
        cos1 = tl.load(cos_ptr + t1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + t1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        cos2 = tl.load(cos_ptr + t1 + D // 2, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + t1 + D // 2, mask=row_ok[:, None], other=0.0).to(tl.float32)
        a1, a2 = a1 * cos1 + a2 * sin1, a2 * cos2 + a1 * sin2
    if head < H:
        dst = q_ptr + rows[:, None] * (H * D) + head * D + half[None, :]
    else:  # k or v of kv head h: into the key/value buffer at the suffix's positions
        is_v = (head - H) // HKV
        h = (head - H) % HKV
        b, t = rows // T, rows % T
        base = b * kv_stride_b + is_v * kv_stride_kv + h * kv_stride_h + (kv_offset + t) * D
        dst = kv_ptr + base[:, None] + half[None, :]
    tl.store(dst, a1.to(dtype), mask=row_ok[:, None])
    tl.store(dst + D // 2, a2.to(dtype), mask=row_ok[:, None])


@triton.jit
def _norm_qkv_kernel(
    x_ptr, nw_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, kv_ptr, part_ptr, count_ptr,
    M, K, T, eps, k_per_split,
    kv_stride_b, kv_stride_kv, kv_stride_h, kv_offset,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (row block x split of K, head, column block): columns c.. of both halves of one q, k or v head,
    so that RoPE (which pairs column j with j + D/2) is applied before anything is stored."""
    pid, head, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid_m, split = pid // SPLITS, pid % SPLITS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns within the first half of the head
    first = head * D + half  # weight rows (output columns) of the first half; the second is + D/2
    k_start = split * k_per_split
    acc1, acc2, squares = _norm_two_products(x_ptr, nw_ptr, w_ptr, rows, row_ok, first, first + D // 2,
                                             half < D // 2, K, k_start, tl.minimum(k_start + k_per_split, K),
                                             BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    if SPLITS == 1:
        _qkv_epilogue(acc1, acc2, squares, rows, row_ok, half, head, cos_ptr, sin_ptr, q_ptr, kv_ptr, K, T, eps,
                      kv_stride_b, kv_stride_kv, kv_stride_h, kv_offset, dtype, H, HKV, D)  # fmt: skip
    else:
        tile = (pid_m * tl.num_programs(1) + head) * tl.num_programs(2) + pid_n
        if _split_arrive(part_ptr, count_ptr, tile, split, acc1, acc2, squares, SPLITS, True, BLOCK_M, BLOCK_N):
            acc1, acc2, squares = _split_sum(part_ptr, count_ptr, tile, SPLITS, True, BLOCK_M, BLOCK_N)
            _qkv_epilogue(acc1, acc2, squares, rows, row_ok, half, head, cos_ptr, sin_ptr, q_ptr, kv_ptr, K, T,
                          eps, kv_stride_b, kv_stride_kv, kv_stride_h, kv_offset, dtype, H, HKV, D)  # fmt: skip


@triton.jit
def _attention_kernel(
    q_ptr, kv_ptr, pmask_ptr, o_ptr, part_ptr,
    T, S, P, scale, keys_per_split,
    kv_stride_b, kv_stride_kv, kv_stride_h,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Program (batch item x kv head, block of folded query rows, split of the keys). A folded row r is
    query token r // G of query head h * G + r % G (G = H / HKV), as vlaserve.model.policy.attention
    folds them. Masking: prefix key j counts if the prefix token is valid; suffix key s = j - P is seen by
    every action token, and by the state token (t = 0) only when s = 0."""
    G: tl.constexpr = H // HKV
    bh, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // HKV, bh % HKV
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < T * G
    t = r // G
    head = h * G + r % G
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (b * T + t)[:, None] * (H * D) + head[:, None] * D + d[None, :], mask=r_ok[:, None], other=0.0)
    k_base = kv_ptr + b * kv_stride_b + h * kv_stride_h
    v_base = k_base + kv_stride_kv
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, S)
    for j0 in range(start, stop, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < stop
        k = tl.load(k_base + j[None, :] * D + d[:, None], mask=j_ok[None, :], other=0.0)  # [D, BLOCK_N]
        s = tl.dot(q, k) * scale
        prefix_ok = tl.load(pmask_ptr + b * P + j, mask=j_ok & (j < P), other=0) != 0
        seen = (j[None, :] < P) & prefix_ok[None, :]
        seen = seen | ((j[None, :] >= P) & ((t[:, None] > 0) | (j[None, :] == P)))
        s = tl.where(seen & j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + j[:, None] * D + d[None, :], mask=j_ok[:, None], other=0.0)  # [BLOCK_N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS == 1:
        out = acc / l_i[:, None]
        dst = o_ptr + (b * T + t)[:, None] * (H * D) + head[:, None] * D + d[None, :]
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=r_ok[:, None])
    else:  # partial results: [B*HKV, SPLITS, T*G, D + 2] (acc, max, sum) in float32
        row = (bh * SPLITS + split) * (T * G) + r
        tl.store(part_ptr + row[:, None] * (D + 2) + d[None, :], acc, mask=r_ok[:, None])
        tl.store(part_ptr + row * (D + 2) + D, m_i, mask=r_ok)
        tl.store(part_ptr + row * (D + 2) + D + 1, l_i, mask=r_ok)


@triton.jit
def _combine_kernel(
    part_ptr, o_ptr, T,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Merge the key splits of :func:`_attention_kernel` (log-sum-exp weights) into the output rows."""
    G: tl.constexpr = H // HKV
    bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < T * G
    d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(SPLITS):
        row = (bh * SPLITS + split) * (T * G) + r
        m = tl.maximum(m, tl.load(part_ptr + row * (D + 2) + D, mask=r_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for split in range(SPLITS):
        row = (bh * SPLITS + split) * (T * G) + r
        w = tl.exp(tl.load(part_ptr + row * (D + 2) + D, mask=r_ok, other=float("-inf")) - m_safe)
        total += w * tl.load(part_ptr + row * (D + 2) + D + 1, mask=r_ok, other=0.0)
        acc += w[:, None] * tl.load(part_ptr + row[:, None] * (D + 2) + d[None, :], mask=r_ok[:, None], other=0.0)
    t = r // G
    head = h * G + r % G
    dst = o_ptr + (b * T + t)[:, None] * (H * D) + head[:, None] * D + d[None, :]
    tl.store(dst, (acc / total[:, None]).to(o_ptr.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _matmul_residual(a_ptr, w_ptr, x_ptr, part_ptr, count_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x [M, N] += a [M, K] @ w [N, K]^T, in place, the product rounded to x's dtype before the sum (as
    the reference's ``x + linear(a)``). Program (row block x split of K, column block)."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    pid_m, split = pid // SPLITS, pid % SPLITS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(w))
    if SPLITS == 1:
        _residual_epilogue(acc, x_ptr, rows, cols, row_ok, col_ok, N)
    else:
        tile = pid_m * tl.num_programs(1) + pid_n
        none = tl.zeros([BLOCK_M], dtype=tl.float32)
        if _split_arrive(part_ptr, count_ptr, tile, split, acc, acc, none, SPLITS, False, BLOCK_M, BLOCK_N):
            acc, _, _ = _split_sum(part_ptr, count_ptr, tile, SPLITS, False, BLOCK_M, BLOCK_N)
            _residual_epilogue(acc, x_ptr, rows, cols, row_ok, col_ok, N)


@triton.jit
def _residual_epilogue(acc, x_ptr, rows, cols, row_ok, col_ok, N):
    dtype = x_ptr.dtype.element_ty
    ptrs = x_ptr + rows[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, (x + acc.to(dtype).to(tl.float32)).to(dtype), mask=ok)


@triton.jit
def _out_proj_kernel(a_ptr, w_ptr, x_ptr, part_ptr, count_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The attention's output projection added to the residual stream (a kernel of its own name, so that a
    profile tells it from the down projection)."""
    _matmul_residual(a_ptr, w_ptr, x_ptr, part_ptr, count_ptr, M, N, K, k_per_split, SPLITS,
                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _down_proj_kernel(a_ptr, w_ptr, x_ptr, part_ptr, count_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The MLP's down projection added to the residual stream."""
    _matmul_residual(a_ptr, w_ptr, x_ptr, part_ptr, count_ptr, M, N, K, k_per_split, SPLITS,
                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip


@triton.jit
def _geglu_epilogue(gate, up, squares, out_ptr, rows, cols, row_ok, col_ok, F, K, eps, dtype: tl.constexpr):
    rstd = 1.0 / tl.sqrt(squares / K + eps)
    g = (gate * rstd[:, None]).to(dtype).to(tl.float32)
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (x + 0.044715 x^3)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    act = (0.5 * g * (1.0 + tanh)).to(dtype).to(tl.float32)
    out = act * (up * rstd[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * F + cols[None, :], out.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _norm_geglu_kernel(
    x_ptr, nw_ptr, w_ptr, out_ptr, part_ptr, count_ptr, M, F, K, eps, k_per_split,
    SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out [M, F] = gelu_tanh(RMSNorm(x) @ gate^T) * (RMSNorm(x) @ up^T), gate and up being the first and
    second F rows of w [2F, K] (the reference's fused gate_up projection, chunked). Program (row block x
    split of K, column block)."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    pid_m, split = pid // SPLITS, pid % SPLITS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < F
    k_start = split * k_per_split
    gate, up, squares = _norm_two_products(x_ptr, nw_ptr, w_ptr, rows, row_ok, cols, cols + F, col_ok, K, k_start,
                                           tl.minimum(k_start + k_per_split, K), BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    if SPLITS == 1:
        _geglu_epilogue(gate, up, squares, out_ptr, rows, cols, row_ok, col_ok, F, K, eps, dtype)
    else:
        tile = pid_m * tl.num_programs(1) + pid_n
        if _split_arrive(part_ptr, count_ptr, tile, split, gate, up, squares, SPLITS, True, BLOCK_M, BLOCK_N):
            gate, up, squares = _split_sum(part_ptr, count_ptr, tile, SPLITS, True, BLOCK_M, BLOCK_N)
            _geglu_epilogue(gate, up, squares, out_ptr, rows, cols, row_ok, col_ok, F, K, eps, dtype)


def _product_tiles(setting) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages, splits of K) of a product's launch setting."""
    return (*setting, 1) if len(setting) == 4 else tuple(setting)


def _block_m(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


# Launch settings per kernel kind: (BLOCK_N, BLOCK_K, num_warps, num_stages[, splits of K]) for the
# products (splits of K: 1 if left out), and (BLOCK_M query rows, BLOCK_N keys, num_warps, num_stages) for
# the attention; "splits" is the attention's key splits (0: enough to keep about `target_programs` programs
# busy). Per row count (batch x 51 tokens): the fastest that benchmarks/fused_decoder.py found for pi0 on
# the H200 at batch 1 (51 rows) and at batch 4 (docs/BENCHMARKS.md).
TILES_BY_ROWS = (
    (64, {"qkv": (32, 64, 4, 4, 4), "attention": (16, 128, 4, 2), "out": (16, 128, 4, 5),
          "geglu": (32, 64, 4, 4, 2), "down": (16, 128, 4, 4, 4), "splits": 0}),
    (None, {"qkv": (64, 64, 4, 3), "attention": (32, 64, 4, 3), "out": (32, 128, 4, 4),
            "geglu": (64, 64, 4, 3), "down": (32, 128, 4, 4), "splits": 0}),
)  # fmt: skip


class FusedDecoder:
    """The decoder (``Policy.decode``) with each expert layer as the five kernels above; the rest of a flow
    step (action-time MLP, final norm, output projection, Euler update) stays in PyTorch.

    ``tiles`` overrides entries of :data:`TILES_BY_ROWS` at every row count."""

    def __init__(self, policy: Policy, tiles: dict | None = None, target_programs: int = 132):
        self.policy, self.cfg = policy, policy.cfg
        e = self.cfg.expert
        if e.head_dim & (e.head_dim - 1) or e.head_dim < 32 or e.num_heads % e.num_kv_heads:
            # 32: each half head is a product of at least 16 columns, the least Triton's dot takes on a GPU
            raise ValueError(f"head_dim {e.head_dim} must be a power of two >= 32, and heads a multiple of kv heads")
        for name, weight in policy.expert_layers.named_parameters():
            if not weight.is_contiguous():
                raise ValueError(f"expert_layers.{name} is not contiguous: the kernels index weights as stored")
        self.overrides = dict(tiles or {})
        self.target_programs = target_programs

    def tiles_for(self, rows: int) -> dict:
        tiles = next(t for limit, t in TILES_BY_ROWS if limit is None or rows <= limit)
        return {**tiles, **self.overrides}

    def _splits(self, tiles: dict, batch: int, row_blocks: int, keys: int) -> int:
        if tiles["splits"]:
            return tiles["splits"]
        programs = batch * self.cfg.expert.num_kv_heads * row_blocks
        return max(1, min(keys // 64, -(-self.target_programs // programs)))

    def layer(self, i: int, x: torch.Tensor, kv: torch.Tensor, cos, sin, prefix_mask, scratch: dict) -> None:
        """Expert layer ``i`` over x [B, T, W] in place; its suffix keys/values go into ``kv``."""
        e, layer = self.cfg.expert, self.policy.expert_layers[i]
        b, t, w = x.shape
        m = b * t
        h, hkv, d = e.num_heads, e.num_kv_heads, e.head_dim
        p = self.cfg.prefix_len
        keys = kv.shape[4]
        kv_i = kv[:, i]  # [B, 2, HKV, S, D]
        bm = _block_m(m)
        tiles = self.tiles_for(m)
        bn, bk, warps, stages, k_splits = _product_tiles(tiles["qkv"])
        bn = min(bn, d // 2)
        n_blocks = (d // 2) // bn
        k_splits, k_per_split, part, counts = self._k_splits(
            "qkv", k_splits, w, bk, triton.cdiv(m, bm) * (h + 2 * hkv) * n_blocks, 2 * bm * bn + bm, scratch, x.device
        )
        q = scratch["q"]
        _norm_qkv_kernel[(triton.cdiv(m, bm) * k_splits, h + 2 * hkv, n_blocks)](
            x, layer.input_norm.weight, layer.qkv_proj.weight, cos, sin, q, kv_i, part, counts,
            m, w, t, RMS_EPS, k_per_split, kv_i.stride(0), kv_i.stride(1), kv_i.stride(2), p,
            H=h, HKV=hkv, D=d, SPLITS=k_splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
            num_stages=stages,
        )  # fmt: skip
        g = h // hkv
        am, an, warps, stages = tiles["attention"]
        am = 16 if t * g <= 16 else am
        row_blocks = triton.cdiv(t * g, am)
        splits = self._splits(tiles, b, row_blocks, keys)
        per_split = triton.cdiv(triton.cdiv(keys, splits), an) * an
        splits = triton.cdiv(keys, per_split)
        attn = scratch["attn"]
        part = attn  # unused with one split
        if splits > 1:
            if ("part", splits) not in scratch:
                size = b * hkv * splits * t * g * (d + 2)
                scratch[("part", splits)] = torch.empty((size,), dtype=torch.float32, device=x.device)
            part = scratch[("part", splits)]
        _attention_kernel[(b * hkv, row_blocks, splits)](
            q, kv_i, prefix_mask, attn, part, t, keys, p, d**-0.5, per_split,
            kv_i.stride(0), kv_i.stride(1), kv_i.stride(2),
            H=h, HKV=hkv, D=d, SPLITS=splits, BLOCK_M=am, BLOCK_N=an, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        if splits > 1:
            _combine_kernel[(b * hkv, row_blocks)](part, attn, t, H=h, HKV=hkv, D=d, SPLITS=splits, BLOCK_M=am)
        bn, bk, warps, stages, k_splits = _product_tiles(tiles["out"])
        k_splits, k_per_split, part, counts = self._k_splits(
            "out", k_splits, h * d, bk, triton.cdiv(m, bm) * triton.cdiv(w, bn), bm * bn, scratch, x.device
        )
        _out_proj_kernel[(triton.cdiv(m, bm) * k_splits, triton.cdiv(w, bn))](
            attn, layer.o_proj.weight, x, part, counts, m, w, h * d, k_per_split,
            SPLITS=k_splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        f = e.mlp_dim
        bn, bk, warps, stages, k_splits = _product_tiles(tiles["geglu"])
        k_splits, k_per_split, part, counts = self._k_splits(
            "geglu", k_splits, w, bk, triton.cdiv(m, bm) * triton.cdiv(f, bn), 2 * bm * bn + bm, scratch, x.device
        )
        hidden = scratch["hidden"]
        _norm_geglu_kernel[(triton.cdiv(m, bm) * k_splits, triton.cdiv(f, bn))](
            x, layer.mlp_norm.weight, layer.gate_up_proj.weight, hidden, part, counts, m, f, w, RMS_EPS, k_per_split,
            SPLITS=k_splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        bn, bk, warps, stages, k_splits = _product_tiles(tiles["down"])
        k_splits, k_per_split, part, counts = self._k_splits(
            "down", k_splits, f, bk, triton.cdiv(m, bm) * triton.cdiv(w, bn), bm * bn, scratch, x.device
        )
        _down_proj_kernel[(triton.cdiv(m, bm) * k_splits, triton.cdiv(w, bn))](
            hidden, layer.down_proj.weight, x, part, counts, m, w, f, k_per_split,
            SPLITS=k_splits, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip

    @staticmethod
    def _k_splits(kind: str, splits: int, k: int, block_k: int, tiles: int, slab: int, scratch: dict, device):
        """The splits of K a product really gets (each a whole number of BLOCK_K steps), the columns per
        split, and its workspace: each split's partial sums per output tile (``slab`` floats), and a count
        per tile that the last split of each resets (zeros, made once per call)."""
        k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
        splits = triton.cdiv(k, k_per_split)
        key = ("k_splits", kind, splits, tiles, slab) if splits > 1 else ("k_splits", "unused")
        tiles, slab = (tiles, slab) if splits > 1 else (1, 1)
        if key not in scratch:
            scratch[key] = (
                torch.empty((tiles * splits * slab,), dtype=torch.float32, device=device),
                torch.zeros((tiles,), dtype=torch.int32, device=device),
            )
        return splits, k_per_split, *scratch[key]

    @torch.no_grad()
    def decode(self, prefix_kv, prefix_mask, state, noise) -> torch.Tensor:
        """What ``Policy.decode`` computes, with the same inputs and output."""
        policy, e = self.policy, self.cfg.expert
        dtype = policy.dtype
        b, depth, _, hkv, p, d = prefix_kv.shape
        t = 1 + ACTION_HORIZON
        keys = p + t
        positions = policy.suffix_positions(prefix_mask)
        cos, sin = (c.reshape(b * t, d).contiguous() for c in rope_tables(positions, d, dtype))
        kv = prefix_kv.new_empty((b, depth, 2, hkv, keys, d), dtype=dtype)
        kv[:, :, :, :, :p] = prefix_kv
        mask = prefix_mask.to(torch.int8).contiguous()
        scratch = {
            "q": torch.empty((b * t, e.num_heads * d), dtype=dtype, device=noise.device),
            "attn": torch.empty((b * t, e.num_heads * d), dtype=dtype, device=noise.device),
            "hidden": torch.empty((b * t, e.mlp_dim), dtype=dtype, device=noise.device),
        }
        state_tok = policy.state_proj(state.to(dtype))[:, None]
        dt = -1.0 / NUM_FLOW_STEPS
        times = (1.0 + dt * torch.arange(NUM_FLOW_STEPS, dtype=torch.float64, device=noise.device)).float()
        w_act, w_time = policy.action_time_mlp_in.weight.chunk(2, dim=1)
        time_in = torch.nn.functional.linear(
            time_embedding(times, e.width).to(dtype), w_time, policy.action_time_mlp_in.bias
        )
        x_t = noise.float()
        for step in range(NUM_FLOW_STEPS):
            act = torch.nn.functional.linear(policy.action_in_proj(x_t.to(dtype)), w_act) + time_in[step]
            act = policy.action_time_mlp_out(torch.nn.functional.silu(act))
            x = torch.cat([state_tok, act], dim=1).contiguous()
            for i in range(depth):
                self.layer(i, x, kv, cos, sin, mask, scratch)
            x_t = x_t + dt * policy.action_out_proj(policy.expert_norm(x)[:, 1:]).float()
        return x_t


@contextlib.contextmanager
def fused_forward(module, tiles: dict | None = None):
    """Within the block, ``module`` (a ``vlaserve.model.policy.Decoder``) computes through :class:`FusedDecoder`:
    a CUDA graph captured inside it keeps the fused kernels. The runtime offers this as one more graph choice
    (spec ``fused_kernels: true``), checked against the artifact and kept per bucket where it is fastest."""
    fused = FusedDecoder(module.policy, tiles)
    module.forward = fused.decode
    try:
        yield
    finally:
        del module.forward  # the class's forward again
