"""
gpt-climbmix: pretrain a small GPT on ClimbMix web text for a fixed 5-minute budget on one GPU.

This is the file to edit. It is run by the harness (python -m trainer.run), which owns the
clock and the metric: call trainer.step(loss) once per optimizer step, stop when it returns
False, then trainer.submit(model). The harness scores the submitted model on held-out data
(val_bpb, lower is better). Imports: torch (with the Triton it ships for CUDA) and trainer;
FA3 or the cuDNN frontend when installed.

Baseline recipe: GPT with RoPE, QK-norm, weightless RMSNorm, ReLU² MLP (fused kernels on H100), value
embeddings on alternating layers, per-layer residual/x0 scalars, logit soft-cap, sliding-window attention
"SSSL"; Muon (polar-express orthogonalisation) for matrices, AdamW for the rest; ~524K tokens
per optimizer step; linear warmdown over the second half of the budget; bf16; torch.compile.
"""

import functools
import gc
import time

import torch
import torch._functorch.config
import torch.nn as nn
import torch.nn.functional as F

import trainer

cfg = trainer.program()  # fixed by the program: budget_s, seq_len, vocab_size, device, seed

# -----------------------------------------------------------------------------
# Hyperparameters

DEPTH = 8                   # transformer blocks
ASPECT_RATIO = 64           # model_dim = DEPTH * ASPECT_RATIO, rounded up to a multiple of HEAD_DIM
HEAD_DIM = 128              # attention head width
WINDOW_PATTERN = "SSSL"     # per layer, cycled: S = half context, L = full; the last layer is L
VE_GATE_CHANNELS = 32       # input channels that drive the value-embedding gate
SOFTCAP = 15.0              # logits = SOFTCAP * tanh(logits / SOFTCAP)
SEQ_LEN = cfg.seq_len       # train at the evaluation length
TOTAL_BATCH_TOKENS = 2**19  # ~524K tokens per optimizer step
DEVICE_BATCH_SIZE = 128     # rows per forward/backward; the rest is gradient accumulation
EMBEDDING_LR = 0.6          # AdamW, token and value embeddings
UNEMBEDDING_LR = 0.004      # AdamW, lm_head
SCALAR_LR = 0.5             # AdamW, per-layer scalars and gates
MATRIX_LR = 0.04            # Muon, all 2-D weights inside the blocks
WEIGHT_DECAY = 0.2          # Muon weight decay, decayed linearly to 0 with progress
ADAM_BETAS = (0.8, 0.95)
MUON_MOMENTUM = (0.85, 0.95, 300)  # start, end, warm-up steps
WARMUP_FRAC = 0.0           # fraction of the budget spent warming the learning rate up
WARMDOWN_FRAC = 0.5         # linear decay over the last half of the budget
FINAL_LR_FRAC = 0.0         # learning rate at the very end, as a fraction of the peak
COMPILE = cfg.device == "cuda"
ACTIVATION_DTYPE = torch.bfloat16 if cfg.device == "cuda" else torch.float32  # weights stay fp32

MODEL_DIM = -(-DEPTH * ASPECT_RATIO // HEAD_DIM) * HEAD_DIM
N_HEAD = MODEL_DIM // HEAD_DIM

# -----------------------------------------------------------------------------
# Attention: FlashAttention-3 when installed; else sliding windows on cuDNN's band mask (through
# the cuDNN frontend, in the GPU image) or FlexAttention, full windows on PyTorch's fused SDPA.
# Nothing is ever downloaded.

try:
    from flash_attn_interface import flash_attn_func  # FA3, Hopper only
except ImportError:
    flash_attn_func = None
try:
    import cudnn  # the cuDNN frontend's graph API
except ImportError:
    cudnn = None
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def window_sizes(depth, seq_len):
    short, full = seq_len // 2, seq_len
    sizes = [short if WINDOW_PATTERN[i % len(WINDOW_PATTERN)] == "S" else full for i in range(depth)]
    sizes[-1] = full
    return sizes


def sliding_window_mask(window, seq_len, device):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


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


@torch.library.custom_op("gpt::window_attention", mutates_args=())
def cudnn_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp per query); a custom op, so torch.compile calls it as one kernel."""
    out, lse = attention_outputs(q)
    cudnn_run(False, window, q.contiguous(), k.contiguous(), v.contiguous(), out, lse)
    return out, lse


cudnn_window_attention.register_fake(lambda q, k, v, window: attention_outputs(q))


@torch.library.custom_op("gpt::window_attention_backward", mutates_args=())
def cudnn_window_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                                    lse: torch.Tensor, grad: torch.Tensor, window: int
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv from the forward's inputs and outputs (all contiguous) and the output's gradient."""
    dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
    cudnn_run(True, window, q, k, v, out, lse, grad.contiguous(), dq, dk, dv)
    return dq, dk, dv


cudnn_window_attention_backward.register_fake(
    lambda q, k, v, out, lse, grad, window: tuple(x.new_empty(x.shape) for x in (q, k, v)))


def _save_for_backward(ctx, inputs, output):
    q, k, v, ctx.window = inputs
    ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous(), *output)


def _window_attention_grad(ctx, grad, _grad_lse):
    return *cudnn_window_attention_backward(*ctx.saved_tensors, grad, ctx.window), None


cudnn_window_attention.register_autograd(_window_attention_grad, setup_context=_save_for_backward)


def attention(q, k, v, window, block_mask):
    """q, k, v: (B, T, H, D); causal attention over the last `window` positions."""
    if flash_attn_func is not None and q.is_cuda:
        out = flash_attn_func(q, k, v, causal=True, window_size=(window - 1, 0))
        return out[0] if isinstance(out, tuple) else out
    if cudnn is not None and q.is_cuda and q.dtype == torch.bfloat16 and window < q.size(1):
        return cudnn_window_attention(q, k, v, window)[0]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if not q.is_cuda:  # FlexAttention has no CPU backward: a dense mask is fine for CPU trials
        T = q.size(2)
        pos = torch.arange(T, device=q.device)
        dist = pos[:, None] - pos[None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=(dist >= 0) & (dist < window))
    elif window >= q.size(2):  # full causal: PyTorch's fused kernels (cuDNN / flash) beat Flex here
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        y = flex_attention(q, k, v, block_mask=block_mask)
    return y.transpose(1, 2)


# -----------------------------------------------------------------------------
# The ReLU² MLP's fused kernels (Triton on Hopper; MLP.forward falls back to plain PyTorch): the
# square rides in the epilogue of the up projection's matmul, its derivative in the epilogue of the
# matmul that makes the up projection's gradient, so the 4x-wide hidden activation is neither
# written nor read an extra time (2.6 % more tokens/s on an H100). Each epilogue first rounds the
# matmul's sum to bf16, as the plain MLP's cuBLAS output is, so at the baseline's shapes the output
# and all three gradients are bit-identical to the plain MLP's (unrounded, it was 1.3 % faster still
# and scored worse in 7 runs of 7: GPU_RUNS.md). To change the activation, edit MLP.forward's plain
# branch and delete its fused one.

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


FUSED_MLP = triton is not None and cfg.device == "cuda" and torch.cuda.get_device_capability() >= (9, 0)  # TMA
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


@torch.library.custom_op("gpt::relu2_mlp", mutates_args=())
def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, hidden): hidden = relu(x w_fc^T)^2, output = hidden w_proj^T; x (M, C), w_fc (4C, C),
    w_proj (C, 4C), bf16; a custom op, so torch.compile calls it as it is."""
    hidden = relu2_matmul(x.contiguous(), w_fc.contiguous(), b_nk=True)
    return hidden @ w_proj.t(), hidden


relu2_mlp.register_fake(lambda x, w_fc, w_proj: (x.new_empty(x.size(0), w_proj.size(0)),
                                                 x.new_empty(x.size(0), w_fc.size(0))))


@torch.library.custom_op("gpt::relu2_mlp_backward", mutates_args=())
def relu2_mlp_backward(grad: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                       hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dw_fc, dw_proj from the forward's inputs (contiguous), its hidden and the output's gradient."""
    grad = grad.contiguous()
    grad_pre = relu2_matmul(grad, w_proj, y=hidden)  # gradient of x w_fc^T, the ReLU² derivative fused in
    return grad_pre @ w_fc, grad_pre.t() @ x, grad.t() @ hidden


relu2_mlp_backward.register_fake(
    lambda grad, x, w_fc, w_proj, hidden: tuple(t.new_empty(t.shape) for t in (x, w_fc, w_proj)))


def _save_mlp_for_backward(ctx, inputs, output):
    ctx.save_for_backward(*(t.contiguous() for t in inputs), output[1])


def _relu2_mlp_grad(ctx, grad, _grad_hidden):
    return relu2_mlp_backward(grad, *ctx.saved_tensors)


relu2_mlp.register_autograd(_relu2_mlp_grad, setup_context=_save_mlp_for_backward)


# -----------------------------------------------------------------------------
# Model


def norm(x):
    return F.rms_norm(x, (x.size(-1),))  # no learned weight


def rotary_tables(seq_len, head_dim, base=10000.0):
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def rotate(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, n_head, has_ve):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.c_q = nn.Linear(dim, dim, bias=False)
        self.c_k = nn.Linear(dim, dim, bias=False)
        self.c_v = nn.Linear(dim, dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, n_head, bias=False) if has_ve else None

    def forward(self, x, ve, cos, sin, window, block_mask):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # value embedding, mixed in by an input-dependent gate per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1).to(v.dtype) * ve.view(B, T, self.n_head, self.head_dim).to(v.dtype)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))  # QK-norm
        y = attention(q.to(v.dtype), k.to(v.dtype), v, window, block_mask)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        # the same ReLU² in fused kernels (above); to try another activation, delete this branch
        if FUSED_MLP and x.dtype == torch.bfloat16 and x.size(-1) % 8 == 0 and self.c_fc.out_features % 8 == 0:
            w_fc, w_proj = self.c_fc.weight.to(x.dtype), self.c_proj.weight.to(x.dtype)
            return relu2_mlp(x.flatten(0, -2), w_fc, w_proj)[0].view(x.shape)
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, n_head, has_ve):
        super().__init__()
        self.attn = Attention(dim, n_head, has_ve)
        self.mlp = MLP(dim)

    def forward(self, x, ve, cos, sin, window, block_mask):
        x = x + self.attn(norm(x), ve, cos, sin, window, block_mask)
        return x + self.mlp(norm(x))


def has_value_embedding(layer, depth):
    return layer % 2 == (depth - 1) % 2  # alternating layers, always including the last


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of SOFTCAP * tanh(logits / SOFTCAP), from bf16 logits (rows, vocab).

    The backward keeps only the logits and one log-sum-exp per row and recomputes the softmax;
    compiled, this trains ~1 % faster than F.cross_entropy on the capped float logits."""

    @staticmethod
    def forward(ctx, logits, targets):
        capped = SOFTCAP * torch.tanh(logits.float() / SOFTCAP)
        lse = torch.logsumexp(capped, dim=-1)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - capped.gather(-1, targets[:, None]).squeeze(-1)).mean()

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        t = torch.tanh(logits.float() / SOFTCAP)
        probs = torch.exp(SOFTCAP * t - lse[:, None])
        is_target = torch.arange(logits.size(-1), device=logits.device)[None, :] == targets[:, None]
        grad_logits = (probs - is_target.float()) * (1 - t * t) * (grad / logits.size(0))
        return grad_logits.to(logits.dtype), None


class GPT(nn.Module):
    def __init__(self, vocab_size, dim, depth, n_head, seq_len):
        super().__init__()
        self.depth, self.seq_len = depth, seq_len
        self.windows = window_sizes(depth, seq_len)
        self.wte = nn.Embedding(vocab_size, dim)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(vocab_size, dim)
                                           for i in range(depth) if has_value_embedding(i, depth)})
        self.blocks = nn.ModuleList(Block(dim, n_head, has_value_embedding(i, depth)) for i in range(depth))
        self.resid_lambdas = nn.Parameter(torch.ones(depth))
        self.x0_lambdas = nn.Parameter(torch.full((depth,), 0.1))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rotary_tables(seq_len, dim // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.block_masks = {}

    @torch.no_grad()
    def init_weights(self):
        bound = 3**0.5 * self.wte.embedding_dim**-0.5  # uniform with std dim^-0.5
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for ve in self.value_embeds.values():
            nn.init.uniform_(ve.weight, -bound, bound)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)  # blocks start as the identity
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate starts at 1

    def build_block_masks(self):
        """FlexAttention masks, only where FlexAttention runs: CUDA without FA3 or the cuDNN
        frontend, windows shorter than the context (full windows go to fused SDPA; CPU uses a
        dense mask)."""
        device = self.wte.weight.device
        if device.type != "cuda" or flash_attn_func is not None or cudnn is not None:
            return
        self.block_masks = {w: sliding_window_mask(w, self.seq_len, device)
                            for w in sorted(set(self.windows)) if w < self.seq_len}

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx).to(ACTIVATION_DTYPE))  # bf16 residual stream on the GPU
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            window = self.windows[i]
            x = block(x, ve, cos, sin, window, self.block_masks.get(window))
        logits = self.lm_head(norm(x))
        if targets is None:
            return SOFTCAP * torch.tanh(logits.float() / SOFTCAP)  # what the harness evaluates
        return SoftcappedCrossEntropy.apply(logits.view(-1, logits.size(-1)), targets.view(-1))


# -----------------------------------------------------------------------------
# Optimizer: Muon for block matrices, AdamW for embeddings, lm_head and scalars

# Polar Express (Amsel et al., 2025) coefficients: 5 odd-polynomial steps towards the polar factor.
POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def orthogonalize(G):
    """Approximate U V^T of G = U S V^T for a stack of matrices (..., m, n), in bf16."""
    X = G.bfloat16()
    tall = X.size(-2) > X.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in POLAR_EXPRESS:
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if tall else X


if COMPILE:
    orthogonalize = torch.compile(orthogonalize, dynamic=False)  # one graph per matrix shape


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update is orthogonalised; parameters of one shape are done as a stack."""

    def __init__(self, params, lr, momentum, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                grads = torch.stack([p.grad for p in params])
                state = self.state[params[0]]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(grads)
                buf = state["momentum"]
                buf.lerp_(grads, 1 - group["momentum"])
                update = orthogonalize(grads.lerp_(buf, group["momentum"]))  # Nesterov
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                lr, wd = group["lr"], group["weight_decay"]
                torch._foreach_mul_(params, 1 - lr * wd)  # one launch per shape, not per matrix
                torch._foreach_add_(params, list(update.to(params[0].dtype).unbind(0)), alpha=-lr * scale)


def build_optimizers(model):
    matrices = [p for block in model.blocks for n, p in block.named_parameters()
                if p.ndim == 2 and "ve_gate" not in n]
    gates = [p for block in model.blocks for n, p in block.named_parameters() if "ve_gate" in n]
    embeds = [model.wte.weight, *(ve.weight for ve in model.value_embeds.values())]
    scalars = [model.resid_lambdas, model.x0_lambdas, *gates]
    width_scale = (MODEL_DIM / 768) ** -0.5  # Adam rates were tuned at width 768
    adam = torch.optim.AdamW([
        dict(params=embeds, lr=EMBEDDING_LR * width_scale),
        dict(params=[model.lm_head.weight], lr=UNEMBEDDING_LR * width_scale),
        dict(params=scalars, lr=SCALAR_LR),
    ], betas=ADAM_BETAS, eps=1e-10, weight_decay=0.0, fused=cfg.device == "cuda")
    muon = Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM[0], weight_decay=WEIGHT_DECAY)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return adam, muon


def lr_multiplier(progress):
    if progress < WARMUP_FRAC:
        return (progress + 1e-3) / WARMUP_FRAC
    if progress < 1.0 - WARMDOWN_FRAC:
        return 1.0
    decay = (1.0 - progress) / WARMDOWN_FRAC
    return decay + (1.0 - decay) * FINAL_LR_FRAC


# -----------------------------------------------------------------------------
# Setup

torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
# AOTAutograd's compile cache passes over graphs holding a custom autograd.Function unless told
# otherwise; without this, every run re-traces the training graph (~8 s of a warm start).
torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
device = torch.device(cfg.device)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
t_setup = time.perf_counter()
with device:
    raw_model = GPT(cfg.vocab_size, MODEL_DIM, DEPTH, N_HEAD, SEQ_LEN)
raw_model.init_weights()
sync()
t_model = time.perf_counter()
raw_model.build_block_masks()
sync()
t_masks = time.perf_counter()
adam, muon = build_optimizers(raw_model)
model = torch.compile(raw_model, dynamic=False) if COMPILE else raw_model

tokens_per_micro = DEVICE_BATCH_SIZE * SEQ_LEN
grad_accum = max(TOTAL_BATCH_TOKENS // tokens_per_micro, 1)
loader = trainer.train_loader(DEVICE_BATCH_SIZE, SEQ_LEN)
autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
n_params = sum(p.numel() for p in raw_model.parameters())
attention_kind = "dense mask (CPU)" if device.type != "cuda" else (
    "FA3" if flash_attn_func else "cuDNN band mask" if cudnn else "FlexAttention")
print(f"model: {n_params / 1e6:.1f}M parameters, depth {DEPTH}, dim {MODEL_DIM}, heads {N_HEAD}, "
      f"windows {raw_model.windows}, attention {attention_kind}, MLP {'fused (Triton)' if FUSED_MLP else 'PyTorch'}")
print(f"batch: {grad_accum} x {DEVICE_BATCH_SIZE} x {SEQ_LEN} = {grad_accum * tokens_per_micro:,} tokens/step")
print(f"setup s: model {t_model - t_setup:.2f}, block masks {t_masks - t_model:.2f}, "
      f"optimizers + loader {time.perf_counter() - t_masks:.2f}")

# -----------------------------------------------------------------------------
# Training loop: the harness stops us when the budget is spent

step = 0
while True:
    for _ in range(grad_accum):
        x, y = next(loader)
        with autocast:
            loss = model(x, y)
        (loss / grad_accum).backward()
    progress = trainer.progress()
    lr_mult = lr_multiplier(progress)
    start, end, ramp = MUON_MOMENTUM
    for group in muon.param_groups:
        group["momentum"] = start + (end - start) * min(step / ramp, 1.0)
        group["weight_decay"] = WEIGHT_DECAY * (1.0 - progress)
    for opt in (adam, muon):
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
        opt.step()
    raw_model.zero_grad(set_to_none=True)
    step += 1
    if step == 1:
        gc.collect()
        gc.freeze()  # Python's GC would otherwise stall steps by ~0.5 s now and then
        gc.disable()
    if not trainer.step(loss.detach()):
        break

trainer.submit(model, attention=[(MODEL_DIM, w) for w in raw_model.windows])
