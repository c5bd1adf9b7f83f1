# ruff: noqa: N803, N806  (Triton's convention: upper-case sizes and compile-time constants)
"""The action expert's layer as five fused Triton kernels, for the decoder at small batches.

At batch 1 the decoder runs 10 Euler steps x 18 expert layers over 51 tokens: its matrix products are
skinny (51 rows) and each layer's norms, RoPE, key/value writes, masks, softmax, residuals and GeGLU were
about 19 kernels of a few microseconds each, so the GPU spent most of a call between kernels. Here one
expert layer is five kernels:

1. :func:`_norm_qkv_kernel`: RMSNorm, the q/k/v projection, RoPE on q and k, and the write of k and v into
   the decoder's key/value buffer.
2. :func:`_attention_kernel`: attention of the folded query heads over the prefix and suffix keys, the
   mask made from the prefix validity and the suffix's fixed structure (no bias tensor), split over the
   keys so that a batch of 1 still fills the GPU; the last split to finish merges them. With an additive
   bias instead, the same kernel is :func:`triton_attention`, which the compiled decoder may use in place
   of SDPA (a graph choice of its own, kept per bucket where it is fastest).
3. :func:`_out_proj_kernel`: the output projection added to the residual stream, in place.
4. :func:`_norm_geglu_kernel`: RMSNorm, the gate and up projections and GeGLU (tanh GELU) in one pass.
5. :func:`_down_proj_kernel`: the down projection added to the residual stream, in place.

Each flow step's own work around the expert is three more kernels (:meth:`FusedDecoder.decode`): the
previous step's velocity (final norm, action output projection) and Euler update with this step's action
input projection (:func:`_step_io_kernel`), and the action-time MLP's two layers, the second writing the
expert's input rows (:func:`_action_time_kernel`, :func:`_action_out_kernel`); in PyTorch they were about
20 kernels a step.

What keeps the products near the speed of a bare product (benchmarks/decoder_kernels.py measures both):
the residual stream goes from memory straight into the products, with no work on it in between, so Triton
pipelines its loads. For that, each norm's scale (1 + weight) is multiplied into the q/k/v and gate/up
weights (the final norm's into the action output weight) once per set of expert layers, and each norm's 1 / RMS is applied to the products' outputs from per-row sums of
squares that the kernel which last wrote the residual stream added up in its epilogue (the output and down
projections; the first layer's, :func:`_action_out_kernel`; the final norm's, the last down projection). The output and down projections split K over programs
whose partial products add up atomically; the last to arrive finishes the tile.

The arithmetic is the reference model's (vlaserve.model.policy) up to rounding: float32 accumulation, the
products' outputs rounded to the weights' dtype where the reference rounds them, and RMSNorm's 1 / RMS
applied after the product, its scale multiplied into the weights in their dtype (the reference rounds the
normalized input to bfloat16 instead). Results are checked against the reference by whoever uses them
(tests, the runtime's start-up check, benchmarks/decoder_kernels.py); they are close, not bit-equal, and
the order of the atomic additions may change the last bit from one call to the next.

Triton runs these on a CUDA GPU; with ``TRITON_INTERPRET=1`` it runs them on the CPU (float32 only:
the interpreter's bfloat16 products are wrong), which is how the tests check them here.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch: Triton 3.4 and later (FusedDecoder refuses pdl without it)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_PDL = True
except ImportError:
    HAS_PDL = False

    @triton.jit
    def gdc_wait():  # never called: only in branches of PDL=True, which FusedDecoder refuses here
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


from vlaserve.interface import ACTION_HORIZON, NUM_FLOW_STEPS
from vlaserve.model.policy import RMS_EPS, Policy, rope_tables, time_embedding


@triton.jit
def _two_products(x_ptr, w_ptr, rows, row_ok, w_rows1, w_rows2,
                  K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x[rows] @ w[w_rows1]^T and x[rows] @ w[w_rows2]^T, float32 [BLOCK_M, BLOCK_N] each, in one loop over
    K. x goes straight from memory into the products (Triton pipelines such loads through shared memory);
    the norm's scale is already in the weights (:class:`FusedDecoder`) and its 1 / RMS comes after."""
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        w1 = tl.load(w_ptr + w_rows1[:, None] * K + ks[None, :])
        w2 = tl.load(w_ptr + w_rows2[:, None] * K + ks[None, :])
        acc1 += tl.dot(x, tl.trans(w1))
        acc2 += tl.dot(x, tl.trans(w2))
    return acc1, acc2


@triton.jit
def _inv_rms(sq_ptr, rows, row_ok, eps, K: tl.constexpr):
    """1 / RMS of the rows from their sums of squares, which the kernel that wrote them added up
    (:func:`_residual_epilogue`)."""
    return 1.0 / tl.sqrt(tl.load(sq_ptr + rows, mask=row_ok, other=0.0) / K + eps)


@triton.jit
def _prefetch_l2(ptr, rows, rows_ok, row_len, start, stop, LINES: tl.constexpr):
    """Ask the L2 cache for elements [start, stop) of each row ``ptr + row * row_len``, one request per
    128-byte line (at most LINES per row): a kernel's weights, before it waits for the previous kernel
    (programmatic dependent launch, :func:`_wait_for_previous`), so that they stream in meanwhile."""
    per_line: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    cols = start + tl.arange(0, LINES) * per_line
    ok = rows_ok[:, None] & (cols < stop)[None, :]
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + rows[:, None] * row_len + cols[None, :], ok.to(tl.int32)], dtype=tl.int32, is_pure=False,
        pack=1,
    )  # fmt: skip


@triton.jit
def _prefetch_ahead(ptr, lines, LINES: tl.constexpr):
    """Ask the L2 cache for this program's share of ``lines`` 128-byte lines from ``ptr`` (at most LINES):
    the weights a later kernel of the call reads (:data:`AHEAD_SCHEDULES`), so that they stream in while
    this kernel runs, whose own loads leave most of the memory's bandwidth unused. Kept with priority
    (``evict_last``) until read."""
    n0, n1 = tl.num_programs(0), tl.num_programs(1)
    pid = tl.program_id(0) + n0 * (tl.program_id(1) + n1 * tl.program_id(2))
    per = tl.cdiv(lines, n0 * n1 * tl.num_programs(2))
    i = tl.arange(0, LINES)
    line = pid * per + i
    ok = (i < per) & (line < lines)
    per_line: tl.constexpr = 128 // (ptr.dtype.element_ty.primitive_bitwidth // 8)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + line * per_line, ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )  # fmt: skip


@triton.jit
def _wait_for_previous(PDL: tl.constexpr):
    """With programmatic dependent launch, a kernel may start while the previous one still runs: it waits
    here, before its first access to anything another kernel of the call writes or reads, for the previous
    kernel to finish (and that one waited for its own previous one), and then lets the next start."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _norm_qkv_kernel(
    x_ptr, sq_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, kv_ptr, M, T, eps,
    kv_stride_b, kv_stride_kv, kv_stride_h, kv_offset,
    K: tl.constexpr, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, ahead_ptr=None, ahead_lines=0, AHEAD: tl.constexpr = 0,
):  # fmt: skip
    """RMSNorm, the q/k/v projection, RoPE on q and k, and the write of k and v into the key/value buffer at
    the suffix's positions. Program (row block, head, column block): columns c.. of both halves of one q, k
    or v head, so that RoPE (which pairs column j with j + D/2) is applied before anything is stored."""
    pid_m, head, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # columns within the first half of the head
    first = head * D + half  # weight rows (output columns) of the first half; the second is + D/2
    if PREFETCH and pid_m == 0:  # one row block asks for the weights all row blocks read
        _prefetch_l2(w_ptr, first, half >= 0, K, 0, K, PREFETCH)
        _prefetch_l2(w_ptr, first + D // 2, half >= 0, K, 0, K, PREFETCH)
    if AHEAD:
        _prefetch_ahead(ahead_ptr, ahead_lines, AHEAD)
    _wait_for_previous(PDL)
    acc1, acc2 = _two_products(x_ptr, w_ptr, rows, row_ok, first, first + D // 2, K, BLOCK_M, BLOCK_N, BLOCK_K)
    rstd = _inv_rms(sq_ptr, rows, row_ok, eps, K)
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    a1 = (acc1 * rstd[:, None]).to(dtype).to(tl.float32)  # the projection's output in the weights' dtype
    a2 = (acc2 * rstd[:, None]).to(dtype).to(tl.float32)
    if head < H + HKV:  # q or k: rotate-half RoPE with the tables of vlaserve.model.policy.rope_tables,
        # whose second half repeats the first (cos) or negates it (sin): only the first is read
        t1 = rows[:, None] * D + half[None, :]
        cos = tl.load(cos_ptr + t1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t1, mask=row_ok[:, None], other=0.0).to(tl.float32)
        a1, a2 = a1 * cos + a2 * sin, a2 * cos - a1 * sin
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
def _fence_and_gather(token, FENCE: tl.constexpr):
    """Each thread's stores and atomic additions so far made visible GPU-wide (``token``: any int32 value, the
    inline assembly's operand), then every thread of the program waits for the others. FENCE is false only in
    Triton's CPU interpreter, which runs programs one at a time and has no inline assembly."""
    if FENCE:
        tl.inline_asm_elementwise(
            "fence.acq_rel.gpu; mov.u32 $0, $1;", "=r,r", [token], dtype=tl.int32, is_pure=False, pack=1
        )
    tl.debug_barrier()


@triton.jit
def _last_to_arrive(count_ptr, tile, SPLITS: tl.constexpr, FENCE: tl.constexpr):
    """Split-K and split keys: true in the program that arrives last at ``tile``, after every other split
    has made its stores or atomic additions; that program resets the count for the next launch. As in CUDA's
    threadfence reduction, each thread fences its own stores and additions GPU-wide, the barrier waits for
    all of the program's threads (:func:`_fence_and_gather`), and then one thread counts the program in."""
    _fence_and_gather(tile, FENCE)
    last = tl.atomic_add(count_ptr + tile, 1) == SPLITS - 1
    if last:
        tl.atomic_xchg(count_ptr + tile, 0)
    return last


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, bias_ptr, pmask_ptr, o_ptr, part_ptr, count_ptr,
    T, S, P, scale, keys_per_split,
    q_stride_b, q_stride_t, kv_stride_b, kv_stride_h, bias_stride_b, bias_stride_r,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, FENCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BIAS: tl.constexpr = False,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, PREFETCH_KEYS: tl.constexpr = 0,
    MERGE: tl.constexpr = True, ahead_ptr=None, ahead_lines=0, AHEAD: tl.constexpr = 0,
):  # fmt: skip
    """Program (batch item x kv head, block of folded query rows, split of the keys). A folded row r is
    query token r // G of query head h * G + r % G (G = H / HKV), as vlaserve.model.policy.attention
    folds them. q [B, T, H, D] (strides given, head_dim contiguous), k and v [B, HKV, S, D] (the same
    strides, rows of D contiguous), output [B, T, H * D] contiguous.

    Masking, without BIAS (the fused decoder): prefix key j counts if the prefix token is valid; suffix key
    s = j - P is seen by every action token, and by the state token (t = 0) only when s = 0. With BIAS: an
    additive bias [B, 1, R, S] (0 or -inf; R = T * G, or 1 for one row shared by all), as
    vlaserve.model.policy.attention_bias makes it. Each block's values are loaded with its keys, so that
    both are in flight together. Scores are kept in base 2 (exp2). Split over the keys, each split
    stores its partial result and the last to arrive merges them (:func:`_merge_splits`)."""
    G: tl.constexpr = H // HKV
    LOG2E: tl.constexpr = 1.4426950408889634
    bh, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // HKV, bh % HKV
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < T * G
    t = r // G
    head = h * G + r % G
    d = tl.arange(0, D)
    k_base = k_ptr + b * kv_stride_b + h * kv_stride_h
    v_base = v_ptr + b * kv_stride_b + h * kv_stride_h
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, S)
    if PREFETCH and pid_m == 0:  # this split's prefix keys and values (written before the call's first kernel)
        keys = start + tl.arange(0, PREFETCH_KEYS)
        keys_ok = keys < tl.minimum(stop, P)
        _prefetch_l2(k_base, keys, keys_ok, D, 0, D, PREFETCH)
        _prefetch_l2(v_base, keys, keys_ok, D, 0, D, PREFETCH)
    if AHEAD:
        _prefetch_ahead(ahead_ptr, ahead_lines, AHEAD)
    _wait_for_previous(PDL)
    q_rows = q_ptr + b * q_stride_b + t * q_stride_t + head * D
    q = tl.load(q_rows[:, None] + d[None, :], mask=r_ok[:, None], other=0.0)
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for j0 in range(start, stop, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        j_ok = j < stop
        k = tl.load(k_base + j[None, :] * D + d[:, None], mask=j_ok[None, :], other=0.0)  # [D, BLOCK_N]
        v = tl.load(v_base + j[:, None] * D + d[None, :], mask=j_ok[:, None], other=0.0)  # [BLOCK_N, D]
        if BIAS:
            bias = tl.load(bias_ptr + b * bias_stride_b + r[:, None] * bias_stride_r + j[None, :],
                           mask=r_ok[:, None] & j_ok[None, :], other=float("-inf"))  # fmt: skip
            s = tl.dot(q, k) * qk_scale + bias.to(tl.float32) * LOG2E  # -inf past the split (the load's other)
        else:
            s = tl.dot(q, k) * qk_scale
            prefix_ok = tl.load(pmask_ptr + b * P + j, mask=j_ok & (j < P), other=0) != 0
            seen = (j[None, :] < P) & prefix_ok[None, :]
            seen = seen | ((j[None, :] >= P) & ((t[:, None] > 0) | (j[None, :] == P)))
            s = tl.where(seen & j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    dst = o_ptr + (b * T + t)[:, None] * (H * D) + head[:, None] * D + d[None, :]
    if SPLITS == 1:
        tl.store(dst, (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=r_ok[:, None])
    else:  # partial results: [B*HKV, SPLITS, T*G, D + 2] (acc, max, sum) in float32
        row = (bh * SPLITS + split) * (T * G) + r
        tl.store(part_ptr + row[:, None] * (D + 2) + d[None, :], acc, mask=r_ok[:, None])
        tl.store(part_ptr + row * (D + 2) + D, m_i, mask=r_ok)
        tl.store(part_ptr + row * (D + 2) + D + 1, l_i, mask=r_ok)
        if MERGE:  # False with the merge in a kernel of its own, or none (to time the kernel without it)
            if _last_to_arrive(count_ptr, bh * tl.num_programs(1) + pid_m, SPLITS, FENCE):
                _merge_splits(part_ptr, dst, bh, r, r_ok, T, G, D, SPLITS, BLOCK_M)


@triton.jit
def _merge_splits(part_ptr, dst, bh, r, r_ok, T, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_M: tl.constexpr):  # fmt: skip
    """The key splits' partial results of rows r merged with log-sum-exp weights and stored at dst; read
    past the L1 cache, which is not coherent with the other programs' stores. The splits are unrolled, so
    their loads are in flight together."""
    d = tl.arange(0, D)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        row = (bh * SPLITS + split) * (T * G) + r
        m = tl.maximum(m, tl.load(part_ptr + row * (D + 2) + D, mask=r_ok, other=float("-inf"), cache_modifier=".cg"))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for split in tl.static_range(SPLITS):
        row = (bh * SPLITS + split) * (T * G) + r
        m_s = tl.load(part_ptr + row * (D + 2) + D, mask=r_ok, other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(m_s - m_safe)  # the maxima are in base 2 (:func:`_attention_kernel`)
        total += w * tl.load(part_ptr + row * (D + 2) + D + 1, mask=r_ok, other=0.0, cache_modifier=".cg")
        part = tl.load(
            part_ptr + row[:, None] * (D + 2) + d[None, :], mask=r_ok[:, None], other=0.0, cache_modifier=".cg"
        )
        acc += w[:, None] * part
    tl.store(dst, (acc / total[:, None]).to(dst.dtype.element_ty), mask=r_ok[:, None])


@triton.jit
def _merge_kernel(part_ptr, o_ptr, T, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_M: tl.constexpr):  # fmt: skip
    """The key splits' partial results (:func:`_attention_kernel` with MERGE False) merged in a kernel of
    their own (:data:`MERGE_MODES` "kernel"): program (batch item x kv head, block of folded query rows), each
    row's output where :func:`_attention_kernel` puts it. The kernel boundary orders the splits' stores
    before these loads, in place of the fence and arrival count of the last split's merge."""
    G: tl.constexpr = H // HKV
    bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = bh // HKV, bh % HKV
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = r // G
    dst = o_ptr + (b * T + t)[:, None] * (H * D) + (h * G + r % G)[:, None] * D + tl.arange(0, D)[None, :]
    _merge_splits(part_ptr, dst, bh, r, r < T * G, T, G, D, SPLITS, BLOCK_M)


def _launch_merge(part: torch.Tensor, out: torch.Tensor, b: int, hkv: int, t: int, h: int, d: int, splits: int,
                  setting: tuple) -> None:  # fmt: skip
    """:func:`_merge_kernel` over the partial results ``part`` of ``splits`` key splits into out [B, T, H * D];
    ``setting`` is (folded rows per program, warps)."""
    rows, warps = setting
    _merge_kernel[(b * hkv, triton.cdiv(t * (h // hkv), rows))](
        part, out, t, H=h, HKV=hkv, D=d, SPLITS=splits, BLOCK_M=rows, num_warps=warps
    )


@triton.jit
def _matmul_residual(a_ptr, w_ptr, x_ptr, sq_ptr, sum_ptr, count_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr,
                     FENCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr, PREFETCH: tl.constexpr, ahead_ptr, ahead_lines, AHEAD: tl.constexpr):  # fmt: skip
    """x [M, N] += a [M, K] @ w [N, K]^T, in place, the product rounded to x's dtype before the sum (as
    the reference's ``x + linear(a)``). Program (row block x split of K, column block). Split over K (a
    skinny product has too few output tiles to keep the memory busy), each split adds its partial product
    into a float32 tile of ``sum_ptr`` (zeros) atomically, and the last to arrive adds the sum to x and puts
    the zeros back for the next launch. The sums of squares of x's new rows are added into ``sq_ptr`` for
    the next norm."""
    pid, pid_n = tl.program_id(0), tl.program_id(1)
    pid_m, split = pid // SPLITS, pid % SPLITS
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    k_start = split * k_per_split
    k_stop = tl.minimum(k_start + k_per_split, K)
    if PREFETCH and pid_m == 0:
        _prefetch_l2(w_ptr, cols, cols < N, K, k_start, k_stop, PREFETCH)
    if AHEAD:
        _prefetch_ahead(ahead_ptr, ahead_lines, AHEAD)
    _wait_for_previous(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * K + ks[None, :])
        acc += tl.dot(a, tl.trans(w))
    if SPLITS == 1:
        _residual_epilogue(acc, x_ptr, sq_ptr, rows, cols, row_ok, N)
    else:
        tile = pid_m * tl.num_programs(1) + pid_n
        offs = tile * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.atomic_add(sum_ptr + offs, acc, sem="relaxed")
        if _last_to_arrive(count_ptr, tile, SPLITS, FENCE):
            total = tl.load(sum_ptr + offs, cache_modifier=".cg")
            # Every thread has read its part before any writes zeros: Triton may lay the load and the store out
            # over the threads differently. Without this barrier a thread zeroed elements another had not read
            # yet, and on the H200 the decoder's answers were wrong (rel 0.34 against eager PyTorch).
            tl.debug_barrier()
            tl.store(sum_ptr + offs, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
            _residual_epilogue(total, x_ptr, sq_ptr, rows, cols, row_ok, N)


@triton.jit
def _residual_epilogue(acc, x_ptr, sq_ptr, rows, cols, row_ok, N):
    """x[rows, cols] += acc, rounded as the reference rounds; the squares of the new values (as stored) are
    added into their rows' sums at sq_ptr, which the next norm reads (:func:`_inv_rms`): complete once this
    kernel has ended, and no program has to read whole rows of x again."""
    dtype = x_ptr.dtype.element_ty
    ptrs = x_ptr + rows[:, None] * N + cols[None, :]
    x = tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    new = (x + acc.to(dtype).to(tl.float32)).to(dtype)
    tl.store(ptrs, new, mask=row_ok[:, None])
    new32 = new.to(tl.float32)
    tl.atomic_add(sq_ptr + rows, tl.sum(new32 * new32, axis=1), mask=row_ok, sem="relaxed")


@triton.jit
def _out_proj_kernel(a_ptr, w_ptr, x_ptr, sq_ptr, sum_ptr, count_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr,
                     FENCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, ahead_ptr=None, ahead_lines=0,
                     AHEAD: tl.constexpr = 0):  # fmt: skip
    """The attention's output projection added to the residual stream (a kernel of its own name, so that a
    profile tells it from the down projection)."""
    _matmul_residual(a_ptr, w_ptr, x_ptr, sq_ptr, sum_ptr, count_ptr, M, N, K, k_per_split, SPLITS, FENCE,
                     BLOCK_M, BLOCK_N, BLOCK_K, PDL, PREFETCH, ahead_ptr, ahead_lines, AHEAD)  # fmt: skip


@triton.jit
def _down_proj_kernel(a_ptr, w_ptr, x_ptr, sq_ptr, sum_ptr, count_ptr, M, N, K, k_per_split, SPLITS: tl.constexpr,
                      FENCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, ahead_ptr=None, ahead_lines=0,
                      AHEAD: tl.constexpr = 0):  # fmt: skip
    """The MLP's down projection added to the residual stream."""
    _matmul_residual(a_ptr, w_ptr, x_ptr, sq_ptr, sum_ptr, count_ptr, M, N, K, k_per_split, SPLITS, FENCE,
                     BLOCK_M, BLOCK_N, BLOCK_K, PDL, PREFETCH, ahead_ptr, ahead_lines, AHEAD)  # fmt: skip


@triton.jit
def _norm_geglu_kernel(
    x_ptr, sq_ptr, w_ptr, out_ptr, M, F, eps,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0, ahead_ptr=None, ahead_lines=0, AHEAD: tl.constexpr = 0,
    INTERLEAVED: tl.constexpr = False,
):  # fmt: skip
    """out [M, F] = gelu_tanh(RMSNorm(x) @ gate^T) * (RMSNorm(x) @ up^T), gate and up being the first and
    second F rows of w [2F, K] (the reference's fused gate_up projection, chunked), or with INTERLEAVED rows
    2j and 2j + 1 (:func:`_interleaved`: one product of 2 BLOCK_N weight rows instead of two of BLOCK_N, so
    the activations' tile feeds one matrix-multiply instruction stream per step instead of two). Program (row block, column block)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    pairs = pid_n * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)  # with INTERLEAVED, the gate and up rows of cols
    if PREFETCH and pid_m == 0:
        if INTERLEAVED:
            _prefetch_l2(w_ptr, pairs, pairs < 2 * F, K, 0, K, PREFETCH)
        else:
            _prefetch_l2(w_ptr, cols, cols < F, K, 0, K, PREFETCH)
            _prefetch_l2(w_ptr, cols + F, cols < F, K, 0, K, PREFETCH)
    if AHEAD:
        _prefetch_ahead(ahead_ptr, ahead_lines, AHEAD)
    _wait_for_previous(PDL)
    if INTERLEAVED:
        both = _rows_product(x_ptr, rows, row_ok, w_ptr, pairs, K, K, BLOCK_M, 2 * BLOCK_N, BLOCK_K)
        gate, up = tl.split(tl.reshape(both, [BLOCK_M, BLOCK_N, 2]))
    else:
        gate, up = _two_products(x_ptr, w_ptr, rows, row_ok, cols, cols + F, K, BLOCK_M, BLOCK_N, BLOCK_K)
    rstd = _inv_rms(sq_ptr, rows, row_ok, eps, K)
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    g = (gate * rstd[:, None]).to(dtype).to(tl.float32)
    z = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (x + 0.044715 x^3)
    tanh = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    act = (0.5 * g * (1.0 + tanh)).to(dtype).to(tl.float32)
    out = act * (up * rstd[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * F + cols[None, :], out.to(dtype), mask=row_ok[:, None])


@triton.jit
def _step_io_kernel(
    x_ptr, sq_ptr, w_out_ptr, b_out_ptr, xt_ptr, w_in_ptr, b_in_ptr, u_ptr, M, T, dt, eps,
    W: tl.constexpr, A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
    OUT: tl.constexpr, IN: tl.constexpr,
):  # fmt: skip
    """Between two flow steps, per block of action rows (batch item x horizon; M in all): with OUT, the step's
    velocity from the expert's output rows (the final norm, its scale in ``w_out`` and its 1 / RMS from the
    rows' sums of squares, then the action output projection) and the Euler update of x_t [M, A] (float32,
    in place); with IN, the action input projection of x_t for the next step into u [M, W]. Action row m is
    x's row (m // (T - 1)) * T + 1 + m % (T - 1): x holds each item's state token first."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = rows < M
    a = tl.arange(0, A)
    dtype: tl.constexpr = w_in_ptr.dtype.element_ty
    xt = tl.load(xt_ptr + rows[:, None] * A + a[None, :], mask=ok[:, None], other=0.0)
    if OUT:
        x_rows = (rows // (T - 1)) * T + 1 + rows % (T - 1)
        acc = tl.zeros([BLOCK_M, A], dtype=tl.float32)
        for k0 in range(0, W, BLOCK_W):
            ks = k0 + tl.arange(0, BLOCK_W)
            x = tl.load(x_ptr + x_rows[:, None] * W + ks[None, :], mask=ok[:, None], other=0.0)
            acc += tl.dot(x, tl.trans(tl.load(w_out_ptr + a[:, None] * W + ks[None, :])))
        rstd = _inv_rms(sq_ptr, x_rows, ok, eps, W)
        bias = tl.load(b_out_ptr + a).to(tl.float32)
        xt += dt * (acc * rstd[:, None] + bias[None, :]).to(dtype).to(tl.float32)
        tl.store(xt_ptr + rows[:, None] * A + a[None, :], xt, mask=ok[:, None])
    if IN:
        xt_low = xt.to(dtype)
        for n0 in range(0, W, BLOCK_W):
            ns = n0 + tl.arange(0, BLOCK_W)
            u = tl.dot(xt_low, tl.trans(tl.load(w_in_ptr + ns[:, None] * A + a[None, :])))
            u += tl.load(b_in_ptr + ns).to(tl.float32)[None, :]
            tl.store(u_ptr + rows[:, None] * W + ns[None, :], u.to(dtype), mask=ok[:, None])


@triton.jit
def _rows_product(x_ptr, rows, row_ok, w_ptr, cols, w_stride, K: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """x[rows] @ w[cols]^T in float32 [BLOCK_M, BLOCK_N]: x's rows K long and contiguous, w's rows
    ``w_stride`` apart; rows not ``row_ok`` read as zeros."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        acc += tl.dot(x, tl.trans(tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :])))
    return acc


@triton.jit
def _action_time_kernel(
    u_ptr, w_ptr, w_stride, time_ptr, h_ptr, M,
    W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h = silu(u @ w^T + time): the action-time MLP's input layer, ``w`` the action half of its weight (rows
    ``w_stride`` apart) and ``time`` the flow step's row of the time half's product (its bias in), made once
    per call. Rounded as the reference rounds: the product, the sum, the activation."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < M
    acc = _rows_product(u_ptr, rows, ok, w_ptr, cols, w_stride, W, BLOCK_M, BLOCK_N, BLOCK_K)
    dtype: tl.constexpr = h_ptr.dtype.element_ty
    act = (acc.to(dtype).to(tl.float32) + tl.load(time_ptr + cols).to(tl.float32)[None, :]).to(dtype).to(tl.float32)
    h = act / (1.0 + tl.exp(-act))
    tl.store(h_ptr + rows[:, None] * W + cols[None, :], h.to(dtype), mask=ok[:, None])


@triton.jit
def _action_out_kernel(
    h_ptr, w_ptr, b_ptr, state_ptr, x_ptr, sq_ptr, MX, T,
    W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """x's rows [MX = batch x T, W] for the flow step's expert pass: each item's state token [B, W] first
    (row t = 0), then the action-time MLP's output layer over h (h's row b * (T - 1) + t - 1); the rows' sums
    of squares added into ``sq_ptr`` for the first layer's norm."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = rows < MX
    b, t = rows // T, rows % T
    act = ok & (t > 0)
    acc = _rows_product(h_ptr, b * (T - 1) + t - 1, act, w_ptr, cols, W, W, BLOCK_M, BLOCK_N, BLOCK_K)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    out = (acc + tl.load(b_ptr + cols).to(tl.float32)[None, :]).to(dtype)
    state = tl.load(state_ptr + b[:, None] * W + cols[None, :], mask=(ok & (t == 0))[:, None], other=0.0)
    new = tl.where((t == 0)[:, None], state.to(dtype), out)
    tl.store(x_ptr + rows[:, None] * W + cols[None, :], new, mask=ok[:, None])
    new32 = new.to(tl.float32)
    tl.atomic_add(sq_ptr + rows, tl.sum(new32 * new32, axis=1), mask=ok, sem="relaxed")


def _block_m(m: int, most: int = 64) -> int:
    """The rows of a product's row block for m rows: 16 or 32 where those cover them, else ``most``."""
    return 16 if m <= 16 else 32 if m <= 32 else most


KINDS = ("qkv", "attention", "out", "geglu", "down")  # one expert layer's kernels, in order
PRODUCT_KINDS = ("qkv", "out", "geglu", "down")  # those of them that are matrix products
GEGLU_LAYOUTS = ("two", "interleaved")  # gate/up as two products of BLOCK_N rows, or one of 2 BLOCK_N (interleaved)

# Launch settings per kernel kind: (BLOCK_N, BLOCK_K, num_warps, num_stages) for the norm-and-product
# kernels (qkv: BLOCK_N columns of each half of a head; geglu: of gate and of up), the same and the splits of
# K for the products added to the residual stream, and (BLOCK_M folded query rows, BLOCK_N keys, num_warps,
# num_stages) for the attention, whose "splits" of the keys are 0 for enough to keep about
# `target_programs` programs busy; "block_m", the products' row blocks where they are not 64; "geglu_layout"
# (:data:`GEGLU_LAYOUTS`; "two" where it is not named). Per row count
# (batch x 51 tokens), from benchmarks/decoder_kernels.py's sweeps for pi0 on the H200 (docs/BENCHMARKS.md).
# Up to 64 rows (batch 1): the fastest for q/k/v and gate/up and within 5 % of it for the others. Up to 204
# (batch 4), 408 (8), 612 (12) and above: the fastest at batch 4, 8, 12 and 16 (the products' row blocks of 64
# and 128 swept; the attention's of 16, 32 and 64 rows, where the keys not split won each time). Up to 102
# (batch 2): batch 4's, but for the attention, swept at batch 2 (16-row blocks of 64 keys, split in two).
# "bias": what triton_attention (the attention with an additive bias, for the compiled decoder) takes instead
# of "attention" and "splits": above 64 rows the fastest at batches 8 and 16 of benchmarks/attention_bench.py's
# sweep. Loading a bias tile per block of keys, its 64-row blocks took 12-89 % longer than 32-row ones, and with
# 32-row blocks 3 stages fit one program per multiprocessor and took 42 % longer.
# Each flow step's own kernels (:meth:`FusedDecoder.decode`; not swept): "step", BLOCK_N, BLOCK_K, warps and
# stages of the action-time MLP's two products; "step_io", the action rows per program, the column chunk (128
# was quicker than 64 at batch 1) and the warps of :func:`_step_io_kernel`. "merge": folded rows per program
# and warps of :func:`_merge_kernel` (merge "kernel" only).
_ABOVE_64 = {"step": (64, 64, 4, 3), "step_io": (16, 128, 4), "merge": (8, 4),
             "bias": {"attention": (32, 64, 4, 2), "splits": 0}}  # fmt: skip
_UP_TO_204 = {"qkv": (64, 64, 4, 6), "attention": (16, 128, 4, 2), "splits": 1, "out": (32, 128, 4, 6, 1),
              "geglu": (64, 64, 8, 4), "down": (64, 128, 8, 4, 2), "block_m": {"geglu": 128}, **_ABOVE_64}  # fmt: skip
TILES_BY_ROWS = (
    (64, {"qkv": (16, 64, 4, 6), "attention": (16, 128, 4, 2), "out": (32, 128, 4, 4, 4),
          "geglu": (32, 64, 4, 6), "down": (64, 64, 4, 6, 8), "splits": 0, "step": (32, 64, 4, 4),
          "step_io": (16, 128, 4), "merge": (8, 4), "bias": {}}),
    (102, {**_UP_TO_204, "attention": (16, 64, 4, 2), "splits": 2}),
    (204, _UP_TO_204),
    (408, {"qkv": (32, 64, 4, 3), "attention": (32, 128, 8, 2), "splits": 1, "out": (64, 64, 4, 6, 1),
           "geglu": (64, 64, 4, 3), "down": (128, 64, 4, 6, 2), "block_m": {"geglu": 128}, **_ABOVE_64}),
    (612, {"qkv": (64, 64, 4, 4), "attention": (64, 32, 4, 3), "splits": 1, "out": (128, 64, 4, 6, 1),
           "geglu": (64, 64, 4, 3), "down": (64, 64, 4, 4, 2), **_ABOVE_64}),
    (None, {"qkv": (64, 64, 4, 4), "attention": (64, 32, 4, 3), "splits": 1, "out": (128, 128, 4, 4, 1),
            "geglu": (64, 64, 4, 3), "down": (128, 64, 8, 4, 2), "block_m": {"down": 128}, **_ABOVE_64}),
)  # fmt: skip


def attention_launch(batch: int, kv_heads: int, rows: int, keys: int, tiles: dict, target_programs: int) -> tuple:
    """The attention's launch for ``rows`` folded query rows per kv head over ``keys`` keys: (BLOCK_M, BLOCK_N,
    warps, stages, row blocks, splits of the keys, keys per split). ``tiles["splits"]`` 0 splits the keys
    enough to keep about ``target_programs`` programs busy (at least 64 keys per split)."""
    am, an, warps, stages = tiles["attention"]
    am = 16 if rows <= 16 else am
    row_blocks = triton.cdiv(rows, am)
    splits = tiles["splits"]
    if not splits:
        splits = max(1, min(keys // 64, -(-target_programs // (batch * kv_heads * row_blocks))))
    per_split = triton.cdiv(triton.cdiv(keys, splits), an) * an
    return am, an, warps, stages, row_blocks, triton.cdiv(keys, per_split), per_split


def tiles_for(rows: int) -> dict:
    """The launch settings of :data:`TILES_BY_ROWS` for ``rows`` (batch x 51 tokens)."""
    return next(t for limit, t in TILES_BY_ROWS if limit is None or rows <= limit)


FUSED_MERGES = ("last", "kernel")  # how FusedDecoder merges the attention's key splits (``merge``)
MERGE_MODES = (*FUSED_MERGES, "none")  # the same for triton_attention, "none" only to time it without


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                     target_programs: int = 132, tiles: dict | None = None, merge: str = "last") -> torch.Tensor:  # fmt: skip
    """What ``vlaserve.model.policy.attention`` computes (q [B, T, H, D]; k, v [B, Hkv, S, D]; the additive
    bias [B, 1, T * H / Hkv or 1, S] of ``attention_bias``), as :func:`_attention_kernel` with the bias: the
    query heads folded, the keys split so that a small batch still fills the GPU. For the compiled decoder
    (``vlaserve.model.policy.attention_override``): PyTorch's memory-efficient kernel keeps its output in
    global memory for head_dim 256 and took 53 us per call there at batch 16 (docs/BENCHMARKS.md).
    Raises ValueError for shapes or layouts it does not take (head_dim not a power of two >= 16,
    non-contiguous rows). ``tiles`` overrides the "attention" and "splits" it takes from :data:`TILES_BY_ROWS`
    (those under "bias" where there are).
    ``merge`` (one of :data:`MERGE_MODES`): "last", the last split of each row block to finish merges them;
    "kernel", a kernel of its own after the attention's (:func:`_merge_kernel`); "none" leaves them unmerged,
    so that a benchmark can time the kernel without its merge: the output is then not the attention."""
    if merge not in MERGE_MODES:
        raise ValueError(f"triton_attention: merge {merge!r}, one of {MERGE_MODES}")
    b, t, h, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = h // hkv if hkv else 0
    if d & (d - 1) or d < 16 or not g or h % hkv:
        raise ValueError(f"triton_attention: head_dim {d} must be a power of two >= 16, heads a multiple of kv heads")
    if q.stride(3) != 1 or q.stride(2) != d or k.stride() != v.stride() or k.stride(3) != 1 or k.stride(2) != d:
        raise ValueError(
            f"triton_attention: rows of q, k, v must be contiguous (strides {q.stride()}, {k.stride()}, {v.stride()})"
        )
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"triton_attention: k {tuple(k.shape)}, v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    rows = bias.shape[2] if bias.dim() == 4 else 0
    if bias.shape != (b, 1, rows, s) or rows not in (1, t * g) or bias.stride(3) != 1:
        raise ValueError(
            f"triton_attention: bias {tuple(bias.shape)} is not [{b}, 1, {t * g} or 1, {s}] with contiguous rows"
        )
    defaults = tiles_for(b * t)
    settings = {**defaults, **defaults["bias"], **(tiles or {})}  # every entry has "bias"
    am, an, warps, stages, row_blocks, splits, per_split = attention_launch(b, hkv, t * g, s, settings, target_programs)
    out = torch.empty((b, t, h * d), dtype=q.dtype, device=q.device)
    part = (
        torch.empty((b * hkv * splits * t * g * (d + 2),), dtype=torch.float32, device=q.device) if splits > 1 else out
    )
    # arrival counts (the last split resets them); made per call, they are one memset in a captured graph
    counts = (
        torch.zeros((b * hkv * row_blocks,), dtype=torch.int32, device=q.device)
        if splits > 1 and merge == "last"
        else out
    )
    _attention_kernel[(b * hkv, row_blocks, splits)](
        q, k, v, bias, bias, out, part, counts, t, s, 0, d**-0.5, per_split,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), bias.stride(0), bias.stride(2) if rows > 1 else 0,
        H=h, HKV=hkv, D=d, SPLITS=splits, FENCE=_fence(), BLOCK_M=am, BLOCK_N=an, BIAS=True, MERGE=merge == "last",
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    if merge == "kernel" and splits > 1:
        _launch_merge(part, out, b, hkv, t, h, d, splits, settings["merge"])
    return out


_SCALED = weakref.WeakKeyDictionary()  # expert layers, or the action output projection -> weights, norm scales in


def _scaled_weights(policy: Policy) -> list[dict]:
    """Per expert layer, the q/k/v and gate/up weights with their norm's scale (1 + weight) multiplied in,
    made once per set of expert layers (which the served modules' copies of a policy share) and kept as long
    as those layers live: a CUDA graph captured through the fused decoder reads them by address after the
    decoder object itself is gone. Made from the weights as they are then: weights changed later (a
    checkpoint loaded into the same policy) need :func:`release_scaled_weights` first."""
    layers = policy.expert_layers
    if layers not in _SCALED:
        with torch.no_grad():
            _SCALED[layers] = [
                {name: (getattr(layer, name).weight.float() * (1 + getattr(layer, norm).weight.float())).to(policy.dtype)
                 for name, norm in (("qkv_proj", "input_norm"), ("gate_up_proj", "mlp_norm"))}
                for layer in layers
            ]  # fmt: skip
    return _SCALED[layers]


def _interleaved(scaled: dict) -> torch.Tensor:
    """A layer's norm-scaled gate/up weight [2F, K] with gate row j at 2j and up row j at 2j + 1 (the
    ``geglu_layout`` "interleaved"), made on first use and kept beside the other (16 MB a layer for pi0)."""
    if "gate_up_interleaved" not in scaled:
        w = scaled["gate_up_proj"]
        scaled["gate_up_interleaved"] = w.view(2, w.shape[0] // 2, w.shape[1]).transpose(0, 1).reshape(w.shape)
    return scaled["gate_up_interleaved"]


def _scaled_out_weight(policy: Policy) -> torch.Tensor:
    """The action output projection's weight with the final norm's scale (1 + weight) multiplied in, kept
    like :func:`_scaled_weights` (as long as that projection lives)."""
    if policy.action_out_proj not in _SCALED:
        with torch.no_grad():
            scale = 1 + policy.expert_norm.weight.float()
            _SCALED[policy.action_out_proj] = (policy.action_out_proj.weight.float() * scale).to(policy.dtype)
    return _SCALED[policy.action_out_proj]


def release_scaled_weights(policy: Policy) -> None:
    """Forget the policy's norm-scaled weights (about 0.4 GB for pi0): for a runtime whose CUDA graphs do
    not use the fused decoder, or before its weights change. A graph that does use them must not run after."""
    _SCALED.pop(policy.expert_layers, None)
    _SCALED.pop(policy.action_out_proj, None)


class FusedDecoder:
    """The decoder (``Policy.decode``) with each expert layer as the five kernels above and the rest of each
    flow step (action-time MLP, final norm, output projection, Euler update) as three more; what does not
    change between steps (state token, RoPE tables, the time half of the action-time MLP) is made once per
    call in PyTorch.

    The q/k/v, gate/up and action output weights are kept a second time with their norm's scale (1 + weight)
    multiplied in, so that the residual stream goes straight into the products (for pi0 about 0.4 GB more GPU
    memory; 0.3 GB more again once gate/up runs with ``geglu_layout`` "interleaved").
    ``tiles`` overrides entries of :data:`TILES_BY_ROWS` at every row count. ``pdl`` (one of
    :data:`PDL_MODES`) launches the kernels with programmatic dependent launch: "launch" lets each kernel
    start while the previous one still runs and wait for it inside; "prefetch" also has it ask the L2 cache
    for its weights before it waits. On the H200 both were slower than "off" (8.9 and 8.7 against 7.96 ms
    per decoder call at batch 1; docs/BENCHMARKS.md), so nothing serves them: kept to measure again when
    the kernels change. It needs a GPU (the interpreter has neither the launch nor the inline assembly).
    ``ahead`` (one of :data:`AHEAD_SCHEDULES`) has each kernel ask the L2 cache for the weights of a later
    one as it starts (no dependent launch needed); it too needs a GPU. ``merge`` "kernel" merges the
    attention's key splits in a kernel of their own instead of in the last split to finish ("last")."""

    def __init__(self, policy: Policy, tiles: dict | None = None, target_programs: int = 132, pdl: str = "off",
                 ahead: str = "off", merge: str = "last"):  # fmt: skip
        self.policy, self.cfg = policy, policy.cfg
        e = self.cfg.expert
        if e.head_dim & (e.head_dim - 1) or e.head_dim < 32 or e.num_heads % e.num_kv_heads:
            # 32: each half head is a product of at least 16 columns, the least Triton's dot takes on a GPU
            raise ValueError(f"head_dim {e.head_dim} must be a power of two >= 32, and heads a multiple of kv heads")
        step_modules = ("action_in_proj", "action_time_mlp_in", "action_time_mlp_out", "action_out_proj")
        for name, weight in [*policy.expert_layers.named_parameters(prefix="expert_layers"),
                             *((f"{m}.{n}", w) for m in step_modules for n, w in getattr(policy, m).named_parameters())]:  # fmt: skip
            if not weight.is_contiguous():
                raise ValueError(f"{name} is not contiguous: the kernels index weights as stored")
        action_dim = policy.action_in_proj.in_features
        if action_dim & (action_dim - 1) or action_dim < 16:
            raise ValueError(f"action dim {action_dim} must be a power of two >= 16 (a Triton product's least side)")
        _check_tiles(tiles or {})
        self.scaled = _scaled_weights(policy)
        self.out_weight = _scaled_out_weight(policy)
        self.overrides = dict(tiles or {})
        self.target_programs = target_programs
        self.fence = _fence()
        if pdl not in PDL_MODES:
            raise ValueError(f"pdl {pdl!r}: one of {PDL_MODES}")
        if pdl != "off" and not self.fence:
            raise ValueError(f"pdl {pdl!r} needs a GPU: Triton's interpreter has no dependent launch")
        if pdl != "off" and not HAS_PDL:
            raise ValueError(f"pdl {pdl!r} needs Triton 3.4 or later (this is {triton.__version__})")
        device = policy.expert_layers[0].qkv_proj.weight.device
        if pdl != "off" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
            raise ValueError(f"pdl {pdl!r} needs compute capability 9.0 or later (Hopper), not {device}'s")
        self.pdl = pdl
        if ahead not in AHEAD_SCHEDULES:
            raise ValueError(f"ahead {ahead!r}: one of {tuple(AHEAD_SCHEDULES)}")
        if ahead != "off" and not self.fence:
            raise ValueError(f"ahead {ahead!r} needs a GPU: Triton's interpreter has no inline assembly")
        self.ahead = ahead
        if merge not in FUSED_MERGES:
            raise ValueError(f"merge {merge!r}: one of {FUSED_MERGES}")
        if merge == "kernel" and pdl != "off":  # the merge kernel is launched as usual, without dependent launch
            raise ValueError(f"merge 'kernel' with pdl {pdl!r}: not combined")
        self.merge = merge

    def weight(self, kind: str, i: int) -> torch.Tensor:
        """The weight expert layer ``i``'s kernel of ``kind`` reads (q/k/v and gate/up with the norm's scale in;
        gate/up in the default layout: with ``geglu_layout`` "interleaved", ``ahead`` asks for the other copy)."""
        if kind in ("qkv", "geglu"):
            return self.scaled[i]["qkv_proj" if kind == "qkv" else "gate_up_proj"]
        layer = self.policy.expert_layers[i]
        return (layer.o_proj if kind == "out" else layer.down_proj).weight

    def tiles_for(self, rows: int) -> dict:
        """The launch settings at ``rows``: :func:`tiles_for`'s with the overrides in. A product kind whose
        setting is overridden takes the override's row block (``block_m``), or 64 if it names none: the
        default row block belongs to the default setting (which may need the larger block's shared memory)."""
        base = tiles_for(rows)
        block_m = {kind: bm for kind, bm in base.get("block_m", {}).items() if kind not in self.overrides}
        return {**base, **self.overrides, "block_m": {**block_m, **self.overrides.get("block_m", {})}}

    def layer(self, i: int, x: torch.Tensor, kv: torch.Tensor, cos, sin, prefix_mask, scratch: dict, squares,
              kinds: tuple[str, ...] = KINDS, tiles: dict | None = None) -> None:  # fmt: skip
        """Expert layer ``i`` over x [B, T, W] in place; its suffix keys/values go into ``kv``. ``squares``
        [depth + 1, 2, B * T] holds this flow step's sums of squares of x's rows before each norm: [i, 0]
        before layer i's first norm, [i, 1] before its second (float32; zeros where a kernel adds them up).
        ``kinds`` runs only those of its kernels (benchmarks/decoder_kernels.py times them one kind at a time)
        and ``tiles`` replaces the launch settings of :meth:`tiles_for`."""
        step = _LayerStep(self, i, x, kv, cos, sin, prefix_mask, scratch, squares)
        tiles = _check_tiles(tiles) if tiles else self.tiles_for(step.m)
        for kind in kinds:
            getattr(step, kind)(tiles)

    def prepare(self, prefix_kv, prefix_mask) -> tuple:
        """What every layer of a call reads and writes besides the residual stream: the key/value buffer
        (the prefix's, then room for the suffix's), RoPE tables of the suffix positions, the prefix
        validity as bytes, the scratch tensors (q, attention output, MLP hidden), and zeros for every flow
        step's sums of squares before each norm (:meth:`layer`)."""
        e, dtype = self.cfg.expert, self.policy.dtype
        b, depth, _, hkv, p, d = prefix_kv.shape
        t = 1 + ACTION_HORIZON
        positions = self.policy.suffix_positions(prefix_mask)
        cos, sin = (c.reshape(b * t, d).contiguous() for c in rope_tables(positions, d, dtype))
        kv = prefix_kv.new_empty((b, depth, 2, hkv, p + t, d), dtype=dtype)
        kv[:, :, :, :, :p] = prefix_kv
        mask = prefix_mask.to(torch.int8).contiguous()
        scratch = {
            name: torch.empty((b * t, width), dtype=dtype, device=prefix_kv.device)
            for name, width in (("q", e.num_heads * d), ("attn", e.num_heads * d), ("hidden", e.mlp_dim))
        }
        squares = torch.zeros((NUM_FLOW_STEPS, depth + 1, 2, b * t), dtype=torch.float32, device=prefix_kv.device)
        return kv, cos, sin, mask, scratch, squares

    @torch.no_grad()
    def decode(self, prefix_kv, prefix_mask, state, noise) -> torch.Tensor:
        """What ``Policy.decode`` computes, with the same inputs and output. Besides the expert layers, each
        flow step is three kernels: the previous step's velocity and Euler update with this step's action
        input projection (:func:`_step_io_kernel`), and the action-time MLP's two layers, the second writing
        the expert's input rows and their sums of squares (:func:`_action_time_kernel`,
        :func:`_action_out_kernel`); what does not change between steps is made once per call."""
        policy, e = self.policy, self.cfg.expert
        dtype = policy.dtype
        depth = prefix_kv.shape[1]
        kv, cos, sin, mask, scratch, squares = self.prepare(prefix_kv, prefix_mask)
        b, horizon, action_dim = noise.shape
        t, m, w = 1 + horizon, b * horizon, e.width
        state_tok = policy.state_proj(state.to(dtype)).contiguous()  # [B, W]
        dt = -1.0 / NUM_FLOW_STEPS
        times = (1.0 + dt * torch.arange(NUM_FLOW_STEPS, dtype=torch.float64, device=noise.device)).float()
        w_act, w_time = policy.action_time_mlp_in.weight.chunk(2, dim=1)
        time_in = torch.nn.functional.linear(
            time_embedding(times, w).to(dtype), w_time, policy.action_time_mlp_in.bias
        ).contiguous()  # fmt: skip
        x_t = noise.to(torch.float32, copy=True).contiguous()  # [B, H, A], updated in place
        x = torch.empty((b, t, w), dtype=dtype, device=noise.device)
        u, h = (torch.empty((m, w), dtype=dtype, device=noise.device) for _ in range(2))
        tiles = self.tiles_for(b * t)
        bn, bk, warps, stages = tiles["step"]
        bn, bk = _fit(bn, w, "step BLOCK_N"), _fit(bk, w, "step BLOCK_K")
        io_rows, io_chunk, io_warps = tiles["step_io"]
        io_chunk = _fit(io_chunk, w, "step_io BLOCK_W")
        bm, w_out, w_in = _block_m(m), self.out_weight, policy.action_in_proj.weight

        def step_io(step: int, out: bool, into: bool) -> None:
            _step_io_kernel[(triton.cdiv(m, io_rows),)](
                x, squares[max(step - 1, 0), depth, 0], w_out, policy.action_out_proj.bias, x_t, w_in,
                policy.action_in_proj.bias, u, m, t, dt, RMS_EPS,
                W=w, A=action_dim, BLOCK_M=io_rows, BLOCK_W=io_chunk, OUT=out, IN=into, num_warps=io_warps,
            )  # fmt: skip

        for step in range(NUM_FLOW_STEPS):
            step_io(step, out=step > 0, into=True)
            _action_time_kernel[(triton.cdiv(m, bm), w // bn)](
                u, w_act, w_act.stride(0), time_in[step], h, m,
                W=w, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            _action_out_kernel[(triton.cdiv(b * t, _block_m(b * t)), w // bn)](
                h, policy.action_time_mlp_out.weight, policy.action_time_mlp_out.bias, state_tok, x, squares[step, 0, 0],
                b * t, t, W=w, BLOCK_M=_block_m(b * t), BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            for i in range(depth):
                self.layer(i, x, kv, cos, sin, mask, scratch, squares[step])
        step_io(NUM_FLOW_STEPS, out=True, into=False)
        return x_t


PDL_MODES = ("off", "launch", "prefetch")

# What each kernel kind asks the L2 cache for as it starts (FusedDecoder's ``ahead``): (kind, layer offset)
# of the weights a later kernel of the call reads; offset 1 is the next expert layer (after the last, the
# first of the next flow step). The attention has no weights of its own and leaves the memory idle for 11 µs
# at batch 1; the products read theirs at a fraction of the memory's bandwidth (docs/BENCHMARKS.md).
AHEAD_SCHEDULES = {
    "off": {},
    "next": {"qkv": ("out", 0), "attention": ("geglu", 0), "out": ("down", 0), "geglu": ("qkv", 1)},
    "early": {"qkv": ("geglu", 0), "attention": ("down", 0), "out": ("qkv", 1), "geglu": ("out", 1)},
}


def _lines(elements: int, dtype: torch.dtype) -> int:
    """The 128-byte lines that ``elements`` of ``dtype`` span, up to a power of two (a ``tl.arange`` size)."""
    return triton.next_power_of_2(max(1, -(-elements * dtype.itemsize // 128)))


def _check_tiles(tiles: dict) -> dict:
    merge = tiles.get("merge", (1, 1))
    if len(merge) != 2 or merge[0] < 1 or merge[0] & (merge[0] - 1):
        raise ValueError(f"merge takes (folded rows per program, a power of two; warps), got {merge}")
    if tiles.get("geglu_layout", "two") not in GEGLU_LAYOUTS:
        raise ValueError(f"geglu_layout: one of {GEGLU_LAYOUTS}, got {tiles['geglu_layout']!r}")
    block_m = tiles.get("block_m", {})
    if not isinstance(block_m, dict) or any(k not in PRODUCT_KINDS or r not in (64, 128) for k, r in block_m.items()):
        raise ValueError(f"block_m maps product kinds of {PRODUCT_KINDS} to row blocks of 64 or 128, got {block_m!r}")
    for kind, setting in tiles.items():
        if kind in ("qkv", "geglu", "step") and len(setting) != 4:
            raise ValueError(f"{kind} takes (BLOCK_N, BLOCK_K, warps, stages), got {setting}: it does not split K")
    return tiles


def _fence() -> bool:
    """Whether the kernels fence before counting a split in: everywhere but in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True")


def _fit(block: int, size: int, what: str) -> int:
    """The block, cut to ``size``, which it must divide (the kernels mask no columns)."""
    block = min(block, size)
    if size % block:
        raise ValueError(f"{what}: block {block} does not divide {size}")
    return block


class _LayerStep:
    """One expert layer's launches (:meth:`FusedDecoder.layer`): a method per kernel kind, each taking the
    layer's launch settings."""

    def __init__(self, fused: FusedDecoder, i: int, x, kv, cos, sin, prefix_mask, scratch: dict, squares):
        self.fused, self.e, self.layer, self.i = fused, fused.cfg.expert, fused.policy.expert_layers[i], i
        self.squares_in, self.squares_mid, self.squares_out = squares[i, 0], squares[i, 1], squares[i + 1, 0]
        self.scaled = fused.scaled[i]
        self.x, self.cos, self.sin, self.mask, self.scratch = x, cos, sin, prefix_mask, scratch
        self.b, self.t, self.w = x.shape
        self.m = self.b * self.t
        self.kv_i = kv[:, i]  # [B, 2, HKV, S, D]
        self.keys = kv.shape[4]

    def _bm(self, kind: str, tiles: dict) -> int:
        """The row block of ``kind``'s product: ``tiles["block_m"]``'s for the kind (64 if it names none)."""
        return _block_m(self.m, tiles.get("block_m", {}).get(kind, 64))

    def _pdl(self, row_elements: int, **extra) -> dict:
        """The launch's dependent-launch arguments (:attr:`FusedDecoder.pdl`): none when off; with "prefetch"
        the lines of each weight row (``row_elements`` long) the kernel asks the L2 cache for."""
        if self.fused.pdl == "off":
            return {}
        if self.fused.pdl == "launch":
            return {"PDL": True, "launch_pdl": True}
        return {"PDL": True, "launch_pdl": True, "PREFETCH": _lines(row_elements, self.x.dtype), **extra}

    def _ahead(self, kind: str, grid: tuple) -> dict:
        """The launch's arguments for asking the L2 cache for a later kernel's weights (:data:`AHEAD_SCHEDULES`),
        shared out over the ``grid``'s programs; none when the schedule has nothing for ``kind``."""
        target = AHEAD_SCHEDULES[self.fused.ahead].get(kind)
        if target is None:
            return {}
        weight = self.fused.weight(target[0], (self.i + target[1]) % len(self.fused.scaled))
        lines = -(-weight.numel() * weight.element_size() // 128)
        programs = math.prod(grid)
        return {"ahead_ptr": weight, "ahead_lines": lines, "AHEAD": triton.next_power_of_2(-(-lines // programs))}

    def _counts(self, key, tiles: int) -> torch.Tensor:
        """Arrival counts per tile (zeros; the last to arrive at a tile resets it), made once per call."""
        if (key, tiles) not in self.scratch:
            self.scratch[(key, tiles)] = torch.zeros((tiles,), dtype=torch.int32, device=self.x.device)
        return self.scratch[(key, tiles)]

    def qkv(self, tiles: dict) -> None:
        e, m, bm, kv_i = self.e, self.m, self._bm("qkv", tiles), self.kv_i
        h, hkv, d = e.num_heads, e.num_kv_heads, e.head_dim
        bn, bk, warps, stages = tiles["qkv"]
        bn, bk = _fit(bn, d // 2, "qkv BLOCK_N"), _fit(bk, self.w, "qkv BLOCK_K")
        grid = (triton.cdiv(m, bm), h + 2 * hkv, (d // 2) // bn)
        _norm_qkv_kernel[grid](
            self.x, self.squares_in, self.scaled["qkv_proj"], self.cos, self.sin, self.scratch["q"], kv_i, m, self.t, RMS_EPS,
            kv_i.stride(0), kv_i.stride(1), kv_i.stride(2), self.fused.cfg.prefix_len,
            K=self.w, H=h, HKV=hkv, D=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            **self._pdl(self.w), **self._ahead("qkv", grid),
        )  # fmt: skip

    def attention(self, tiles: dict) -> None:
        e, b, t, kv_i, scratch = self.e, self.b, self.t, self.kv_i, self.scratch
        h, hkv, d = e.num_heads, e.num_kv_heads, e.head_dim
        am, an, warps, stages, row_blocks, splits, per_split = attention_launch(
            b, hkv, t * (h // hkv), self.keys, tiles, self.fused.target_programs
        )
        attn = scratch["attn"]
        part = attn  # unused with one split
        if splits > 1:
            if ("part", splits) not in scratch:
                size = b * hkv * splits * t * (h // hkv) * (d + 2)
                scratch[("part", splits)] = torch.empty((size,), dtype=torch.float32, device=self.x.device)
            part = scratch[("part", splits)]
        k, v = kv_i[:, 0], kv_i[:, 1]
        grid = (b * hkv, row_blocks, splits)
        _attention_kernel[grid](
            scratch["q"], k, v, self.mask, self.mask, attn, part, self._counts("attention", b * hkv * row_blocks),
            t, self.keys, self.fused.cfg.prefix_len, d**-0.5, per_split, t * h * d, h * d, k.stride(0), k.stride(1), 0, 0,
            H=h, HKV=hkv, D=d, SPLITS=splits, FENCE=self.fused.fence, BLOCK_M=am, BLOCK_N=an,
            MERGE=self.fused.merge == "last", num_warps=warps, num_stages=stages,
            **self._pdl(d, PREFETCH_KEYS=triton.next_power_of_2(per_split)), **self._ahead("attention", grid),
        )  # fmt: skip
        if self.fused.merge == "kernel" and splits > 1:
            _launch_merge(part, attn, b, hkv, t, h, d, splits, tiles["merge"])

    def _residual(self, kernel, kind: str, tiles: dict, a, weight, squares) -> None:
        """x += a @ weight^T through ``kernel`` (:func:`_matmul_residual`), K split as ``tiles[kind]`` says,
        the new rows' sums of squares added into ``squares``."""
        m, bm, n = self.m, self._bm(kind, tiles), self.w
        k = a.shape[1]
        bn, bk, warps, stages, splits = (*tiles[kind], 1) if len(tiles[kind]) == 4 else tiles[kind]
        bn, bk = _fit(bn, n, f"{kind} BLOCK_N"), _fit(bk, k, f"{kind} BLOCK_K")
        k_per_split = triton.cdiv(triton.cdiv(k, splits), bk) * bk
        splits = triton.cdiv(k, k_per_split)  # the last may be shorter
        out_tiles = triton.cdiv(m, bm) * (n // bn)
        sums, counts = a, a  # unused with one split
        if splits > 1:
            if ("sums", kind, out_tiles, bm * bn) not in self.scratch:
                sums = torch.zeros((out_tiles * bm * bn,), dtype=torch.float32, device=self.x.device)
                self.scratch[("sums", kind, out_tiles, bm * bn)] = sums
            sums, counts = self.scratch[("sums", kind, out_tiles, bm * bn)], self._counts(kind, out_tiles)
        grid = (triton.cdiv(m, bm) * splits, n // bn)
        kernel[grid](
            a, weight, self.x, squares, sums, counts, m, n, k, k_per_split,
            SPLITS=splits, FENCE=self.fused.fence, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            **self._pdl(k_per_split), **self._ahead(kind, grid),
        )  # fmt: skip

    def out(self, tiles: dict) -> None:
        self._residual(_out_proj_kernel, "out", tiles, self.scratch["attn"], self.layer.o_proj.weight, self.squares_mid)

    def geglu(self, tiles: dict) -> None:
        m, bm, f = self.m, self._bm("geglu", tiles), self.e.mlp_dim
        bn, bk, warps, stages = tiles["geglu"]
        bn, bk = _fit(bn, f, "geglu BLOCK_N"), _fit(bk, self.w, "geglu BLOCK_K")
        grid = (triton.cdiv(m, bm), f // bn)
        interleaved = tiles.get("geglu_layout", "two") == "interleaved"
        weight = _interleaved(self.scaled) if interleaved else self.scaled["gate_up_proj"]
        _norm_geglu_kernel[grid](
            self.x, self.squares_mid, weight, self.scratch["hidden"], m, f, RMS_EPS,
            K=self.w, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
            **self._pdl(self.w), **self._ahead("geglu", grid), INTERLEAVED=interleaved,
        )  # fmt: skip

    def down(self, tiles: dict) -> None:
        self._residual(
            _down_proj_kernel, "down", tiles, self.scratch["hidden"], self.layer.down_proj.weight, self.squares_out
        )


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
