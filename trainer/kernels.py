"""The GPU kernels behind trainer.ops: sliding-window attention on cuDNN's band mask (through the
cuDNN frontend) and the ReLU² MLP's up projection with its square fused (Triton, TMA, Hopper).

Trusted code: train.py and the scorer call these only through the registered ops in trainer/ops.py,
so an exported model names the op and the scorer runs this same implementation. Moved here from
gpt-climbmix's train.py (issue 18); figures in programs/gpt-climbmix/GPU_RUNS.md.
"""

from __future__ import annotations

import functools

import torch

try:
    import cudnn  # the cuDNN frontend's graph API (pyproject's `gpu` extra)
except ImportError:
    cudnn = None


def cudnn_usable(q: torch.Tensor) -> bool:
    return cudnn is not None and q.is_cuda and q.dtype == torch.bfloat16


cudnn_graphs = {}  # (backward, shape, window) -> (built graph, its tensors in call order)


def cudnn_window_graph(backward, shape, window):
    """cuDNN attention graph for bf16 (B, T, H, D) tensors (cuDNN sees them as (B, H, T, D) with
    these strides, so nothing is copied): query i sees keys i - window < j <= i."""
    key = (backward, shape, window)
    if key not in cudnn_graphs:
        B, T, H, D = shape
        g = cudnn.pygraph(io_data_type=cudnn.data_type.BFLOAT16, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=cudnn_handle())
        layout = dict(dim=[B, H, T, D], stride=[T * H * D, D, H * D, 1])
        stats = dict(dim=[B, H, T, 1], stride=[H * T, T, 1, 1])  # log-sum-exp per query, fp32
        band = dict(attn_scale=D**-0.5, diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT,
                    diagonal_band_left_bound=window, diagonal_band_right_bound=0)
        q, k, v = (g.tensor(data_type=cudnn.data_type.BFLOAT16, **layout) for _ in range(3))
        if backward:
            o, do = (g.tensor(data_type=cudnn.data_type.BFLOAT16, **layout) for _ in range(2))
            lse = g.tensor(data_type=cudnn.data_type.FLOAT, **stats)
            grads = g.sdpa_backward(q=q, k=k, v=v, o=o, dO=do, stats=lse, **band)
            for t in grads:
                t.set_output(True).set_dim(layout["dim"]).set_stride(layout["stride"])
            tensors = (q, k, v, o, lse, do, *grads)
        else:
            o, lse = g.sdpa(q=q, k=k, v=v, generate_stats=True, **band)
            o.set_output(True).set_dim(layout["dim"]).set_stride(layout["stride"])
            lse.set_output(True).set_data_type(cudnn.data_type.FLOAT)  # laid out as `stats`
            tensors = (q, k, v, o, lse)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        cudnn_graphs[key] = g, tensors
    return cudnn_graphs[key]


@functools.cache
def cudnn_device_handle(device_index):
    return cudnn.create_handle()


def cudnn_handle():
    """The cuDNN handle of the current device, on torch's current stream."""
    handle = cudnn_device_handle(torch.cuda.current_device())
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    return handle


def cudnn_run(backward, window, *tensors):
    g, graph_tensors = cudnn_window_graph(backward, tuple(tensors[0].shape), window)
    workspace = torch.empty(g.get_workspace_size(), device=tensors[0].device, dtype=torch.uint8)
    g.execute(dict(zip(graph_tensors, tensors)), workspace, handle=cudnn_handle())


def attention_outputs(q):
    """Contiguous (output, log-sum-exp) buffers for (B, T, H, D) queries, as cuDNN writes them."""
    B, T, H, D = q.shape
    return q.new_empty(B, T, H, D), q.new_empty(B, H, T, 1, dtype=torch.float32)


# -----------------------------------------------------------------------------
# The ReLU² MLP's fused kernels: the square rides in the epilogue of the up projection's matmul, its
# derivative in the epilogue of the matmul that makes the up projection's gradient, so the 4x-wide
# hidden activation is neither written nor read an extra time (2.6 % more tokens/s on an H100). Each
# epilogue first rounds the matmul's sum to bf16, as the plain MLP's cuBLAS output is, so at the
# baseline's shapes the output and all three gradients are bit-identical to the plain MLP's.

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def _relu2_matmul(a_desc, b_desc, c_desc, y_desc, M, N, K_TILES: tl.constexpr, B_NK: tl.constexpr,
                      BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """C = relu(A B)^2, or when BACKWARD, C = (A B) * 2 sqrt(Y) with Y that forward's C (so sqrt(Y)
        is relu of the pre-activation); A (M, K); B as (N, K) when B_NK, else (K, N); fp32 sums."""
        pid = tl.program_id(0)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * num_n)  # tiles in groups of GROUP_M rows keep B's columns in L2
        first_m = group * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        off_m = (first_m + (pid % (GROUP_M * num_n)) % group_m) * BLOCK_M
        off_n = ((pid % (GROUP_M * num_n)) // group_m) * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(K_TILES):
            a = a_desc.load([off_m, kt * BLOCK_K])
            b = b_desc.load([off_n, kt * BLOCK_K]).T if B_NK else b_desc.load([kt * BLOCK_K, off_n])
            acc = tl.dot(a, b, acc)
        acc = acc.to(tl.bfloat16).to(tl.float32)  # rounded as cuBLAS's bf16 output is, then the pointwise op
        if BACKWARD:
            relu = tl.sqrt(y_desc.load([off_m, off_n]).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
            out = acc * 2.0 * relu
        else:
            out = tl.maximum(acc, 0.0)
            out = out * out
        c_desc.store([off_m, off_n], out.to(c_desc.dtype))


# tile shape: the fastest of a sweep on an H100 at the baseline's shapes (GPU_RUNS.md, ninth pass)
MLP_TILES = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)


def relu2_matmul(a, b, y=None, b_nk=False):
    """relu(a @ B)^2, or given y: (a @ B) * 2 sqrt(y); B = b.T when b_nk, else b; bf16, contiguous."""
    bm, bn, bk = MLP_TILES["BLOCK_M"], MLP_TILES["BLOCK_N"], MLP_TILES["BLOCK_K"]
    (M, K), N = a.shape, b.shape[0] if b_nk else b.shape[1]
    c = a.new_empty(M, N)
    descs = (TensorDescriptor.from_tensor(a, [bm, bk]),
             TensorDescriptor.from_tensor(b, [bn, bk] if b_nk else [bk, bn]),
             TensorDescriptor.from_tensor(c, [bm, bn]), TensorDescriptor.from_tensor(c if y is None else y, [bm, bn]))
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)  # edges: TMA reads zeros, drops writes
    _relu2_matmul[grid](*descs, M, N, K_TILES=triton.cdiv(K, bk), B_NK=b_nk, BACKWARD=y is not None, **MLP_TILES)
    return c


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def fused_mlp_usable(x: torch.Tensor, hidden: int) -> bool:
    """Triton with TMA (Hopper or newer), bf16, widths that TMA's 16-byte alignment allows."""
    return (triton is not None and x.is_cuda and x.dtype == torch.bfloat16 and x.size(-1) % 8 == 0
            and hidden % 8 == 0 and _capability(x.device.index or 0) >= (9, 0))
