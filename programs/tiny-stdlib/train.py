"""
tiny-stdlib: a small GPT trained on the CPU, on the Python standard library's own sources.

This is the file to edit. It is run by the harness (python -m trainer.run), which owns the
clock and the metric: call trainer.step(loss) once per optimizer step, stop when it returns
False, then trainer.submit(model). The harness scores the submitted model (val_bpb, lower is
better). Imports: torch and trainer only.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import trainer

cfg = trainer.program()  # fixed by the program: budget_s, seq_len, vocab_size, device, seed

# -----------------------------------------------------------------------------
# Hyperparameters

DEPTH = 3               # transformer blocks
MODEL_DIM = 128         # residual stream width
N_HEAD = 4              # attention heads (head_dim = MODEL_DIM // N_HEAD)
MLP_RATIO = 4           # MLP hidden = MLP_RATIO * MODEL_DIM
BATCH_SIZE = 8          # rows per step; tokens per step = BATCH_SIZE * SEQ_LEN
SEQ_LEN = cfg.seq_len   # train at the evaluation length
LR = 8e-3               # AdamW peak learning rate
EMBED_LR = 3e-2         # embeddings like a higher rate (sparse gradients)
WEIGHT_DECAY = 0.0
WARMUP_FRAC = 0.02      # linear warm-up, as a fraction of the time budget
WARMDOWN_FRAC = 0.5     # linear decay to zero over the last half of the budget
SOFTCAP = 15.0          # logits = SOFTCAP * tanh(logits / SOFTCAP)

# -----------------------------------------------------------------------------
# Model


def rms_norm(x):
    return F.rms_norm(x, (x.size(-1),))


def rotary(seq_len, head_dim, base=10000.0):
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]


def apply_rotary(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, dim, n_head):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.fc = nn.Linear(dim, MLP_RATIO * dim, bias=False)
        self.out = nn.Linear(MLP_RATIO * dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(rms_norm(x)).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rotary(rms_norm(q), cos, sin), apply_rotary(rms_norm(k), cos, sin)  # QK-norm
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.relu(self.fc(rms_norm(x))).square())  # ReLU² MLP


class GPT(nn.Module):
    def __init__(self, vocab_size, dim, depth, n_head, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, n_head) for _ in range(depth))
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = rotary(max_len, dim // n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.qkv, block.fc):
                nn.init.normal_(lin.weight, std=lin.in_features ** -0.5)
            nn.init.zeros_(block.proj.weight)  # each block starts as the identity
            nn.init.zeros_(block.out.weight)

    def forward(self, idx):
        T = idx.size(1)
        x = rms_norm(self.embed(idx))
        for block in self.blocks:
            x = block(x, self.cos[:, :T], self.sin[:, :T])
        logits = self.lm_head(rms_norm(x)).float()
        return SOFTCAP * torch.tanh(logits / SOFTCAP)


# -----------------------------------------------------------------------------
# Optimizer and schedule

model = GPT(cfg.vocab_size, MODEL_DIM, DEPTH, N_HEAD, SEQ_LEN).to(cfg.device)
embed_params = list(model.embed.parameters())
other_params = [p for n, p in model.named_parameters() if not n.startswith("embed.")]
optimizer = torch.optim.AdamW(
    [{"params": embed_params, "lr": EMBED_LR}, {"params": other_params, "lr": LR}],
    betas=(0.9, 0.95), eps=1e-8, weight_decay=WEIGHT_DECAY,
)
for group in optimizer.param_groups:
    group["initial_lr"] = group["lr"]


def lr_scale(progress):
    if progress < WARMUP_FRAC:
        return (progress + 1e-3) / WARMUP_FRAC
    if progress > 1.0 - WARMDOWN_FRAC:
        return max((1.0 - progress) / WARMDOWN_FRAC, 0.0)
    return 1.0


# -----------------------------------------------------------------------------
# Training loop: the harness stops us when the budget is spent

loader = trainer.train_loader(BATCH_SIZE, SEQ_LEN)
n_params = sum(p.numel() for p in model.parameters())
print(f"model: {n_params / 1e6:.2f}M parameters, {DEPTH} layers, dim {MODEL_DIM}")

while True:
    x, y = next(loader)
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    scale = lr_scale(trainer.progress())
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * scale
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if not trainer.step(loss):
        break

trainer.submit(model, attention=[(MODEL_DIM, SEQ_LEN)] * DEPTH)
