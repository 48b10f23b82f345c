"""
gpt-climbmix: pretrain a small GPT on ClimbMix web text for a fixed 5-minute budget on one GPU.

This is the file to edit. It is run by the harness (python -m trainer.run), which owns the
clock and the metric: call trainer.step(loss) once per optimizer step, stop when it returns
False, then trainer.submit(model). The harness scores the submitted model on held-out data
(val_bpb, lower is better), sealed: the submitted model is exported and scored by trusted code, so
its forward may use torch ops and trainer.ops only. Imports: torch and trainer.

Baseline recipe: GPT with RoPE, QK-norm, weightless RMSNorm, ReLU² MLP (fused on Hopper), value
embeddings on alternating layers, per-layer residual/x0 scalars, logit soft-cap, sliding-window attention
"SSSL"; Muon (polar-express orthogonalisation) for matrices, AdamW for the rest; ~524K tokens
per optimizer step; linear warmdown over the second half of the budget; bf16; torch.compile.
"""

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
SCALAR_LR = 0.1             # AdamW, per-layer scalars and gates (0.5 spiked: GPU_RUNS.md, issue 20)
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
# Attention and MLP kernels: trainer.ops, the trusted ops (cuDNN's band mask for sliding windows,
# PyTorch's fused SDPA for full ones, a fused Triton ReLU² MLP on Hopper). The model you submit must
# be made of torch ops and these, so that the scorer can run it; train with kernels of your own if
# you like, but submit a forward the scorer knows (program.md).

ops = trainer.ops


def window_sizes(depth, seq_len):
    short, full = seq_len // 2, seq_len
    sizes = [short if WINDOW_PATTERN[i % len(WINDOW_PATTERN)] == "S" else full for i in range(depth)]
    sizes[-1] = full
    return sizes


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

    def forward(self, x, ve, cos, sin, window):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_head, self.head_dim)
        if ve is not None:  # value embedding, mixed in by an input-dependent gate per head
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1).to(v.dtype) * ve.view(B, T, self.n_head, self.head_dim).to(v.dtype)
        q, k = norm(rotate(q, cos, sin)), norm(rotate(k, cos, sin))  # QK-norm
        y = ops.window_attention(q.to(v.dtype), k.to(v.dtype), v, window)
        return self.c_proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        # ReLU², fused on Hopper; to try another activation: self.c_proj(act(self.c_fc(x)))
        return ops.relu2_mlp(x, self.c_fc.weight, self.c_proj.weight)


class Block(nn.Module):
    def __init__(self, dim, n_head, has_ve):
        super().__init__()
        self.attn = Attention(dim, n_head, has_ve)
        self.mlp = MLP(dim)

    def forward(self, x, ve, cos, sin, window):
        x = x + self.attn(norm(x), ve, cos, sin, window)
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

    def forward(self, idx, targets=None):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = x0 = norm(self.wte(idx).to(ACTIVATION_DTYPE))  # bf16 residual stream on the GPU
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            window = self.windows[i]
            x = block(x, ve, cos, sin, window)
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
adam, muon = build_optimizers(raw_model)
model = torch.compile(raw_model, dynamic=False) if COMPILE else raw_model

tokens_per_micro = DEVICE_BATCH_SIZE * SEQ_LEN
grad_accum = max(TOTAL_BATCH_TOKENS // tokens_per_micro, 1)
loader = trainer.train_loader(DEVICE_BATCH_SIZE, SEQ_LEN)
autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
n_params = sum(p.numel() for p in raw_model.parameters())
print(f"model: {n_params / 1e6:.1f}M parameters, depth {DEPTH}, dim {MODEL_DIM}, heads {N_HEAD}, "
      f"windows {raw_model.windows}, attention {ops.attention_kind(device)}, MLP {ops.mlp_kind(device)}")
print(f"batch: {grad_accum} x {DEVICE_BATCH_SIZE} x {SEQ_LEN} = {grad_accum * tokens_per_micro:,} tokens/step")
print(f"setup s: model {t_model - t_setup:.2f}, optimizers + loader {time.perf_counter() - t_model:.2f}")

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
