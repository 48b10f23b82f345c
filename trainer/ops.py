"""Trusted ops for train.py's models: sliding-window attention and the ReLU² MLP.

    y = trainer.ops.window_attention(q, k, v, window)   # (B, T, H, D), query i sees keys i-window < j <= i
    y = trainer.ops.relu2_mlp(x, w_fc, w_proj)           # relu(x w_fc^T)^2 w_proj^T

Each picks the fastest implementation it can (cuDNN's band mask, a fused Triton MLP on Hopper,
else plain PyTorch: SDPA with a dense band mask, unfused matmuls) and, where that is a kernel of ours, calls it as a registered op
(torch.library: `trainer::...`). An exported model then names the op, and the scorer runs this same
trusted implementation; a model whose forward calls ops of train.py's own is not scorable (issue
18). Plain-PyTorch paths are ordinary aten ops and export as such.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer import kernels

# -- sliding-window attention -------------------------------------------------------------------


def _band_mask(T: int, window: int, device) -> torch.Tensor:
    pos = torch.arange(T, device=device)
    dist = pos[:, None] - pos[None, :]
    return (dist >= 0) & (dist < window)


def _window_reference(q, k, v, window: int) -> torch.Tensor:
    """The band attention without cuDNN: PyTorch's SDPA with a dense band mask."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    y = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_band_mask(q.size(1), window, q.device))
    return y.transpose(1, 2).contiguous()


@torch.library.custom_op("trainer::window_attention", mutates_args=())
def _window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp per query) of band attention on cuDNN; a scorer without the cuDNN frontend
    computes the same band with a dense mask (the lse, only the backward's, is then zeros)."""
    out, lse = kernels.attention_outputs(q)
    if kernels.cudnn_usable(q):
        kernels.cudnn_run(False, window, q.contiguous(), k.contiguous(), v.contiguous(), out, lse)
        return out, lse
    return _window_reference(q, k, v, window), lse.zero_()


_window_attention.register_fake(lambda q, k, v, window: kernels.attention_outputs(q))


@torch.library.custom_op("trainer::window_attention_backward", mutates_args=())
def _window_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                               lse: torch.Tensor, grad: torch.Tensor, window: int
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv: cuDNN's backward, or autograd through the reference (recomputed)."""
    if kernels.cudnn_usable(q):
        dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
        kernels.cudnn_run(True, window, q, k, v, out, lse, grad.contiguous(), dq, dk, dv)
        return dq, dk, dv
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        y = _window_reference(*leaves, window)
        return tuple(g.contiguous() for g in torch.autograd.grad(y, leaves, grad))


_window_attention_backward.register_fake(
    lambda q, k, v, out, lse, grad, window: tuple(x.new_empty(x.shape) for x in (q, k, v)))


def _save_attention(ctx, inputs, output):
    q, k, v, ctx.window = inputs
    ctx.save_for_backward(q.contiguous(), k.contiguous(), v.contiguous(), *output)


def _attention_grad(ctx, grad, _grad_lse):
    return *_window_attention_backward(*ctx.saved_tensors, grad, ctx.window), None


_window_attention.register_autograd(_attention_grad, setup_context=_save_attention)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """Causal attention over the last `window` positions; q, k, v and the output are (B, T, H, D)."""
    T = q.size(1)
    if window >= T:  # full causal: PyTorch's fused kernels (cuDNN / flash) beat a band here
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    if kernels.cudnn_usable(q):
        return _window_attention(q, k, v, window)[0]
    # no cuDNN frontend (or the CPU): a dense band mask, computing the whole square (slower)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    mask = _band_mask(T, window, q.device)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def attention_kind(device: torch.device) -> str:
    if device.type == "cuda" and kernels.cudnn is not None:
        return "cuDNN band mask"
    return "dense band mask (SDPA)"


# -- the ReLU² MLP -------------------------------------------------------------------------------


def _relu2_plain(x, w_fc, w_proj):
    hidden = F.relu(x @ w_fc.t()).square()
    return hidden @ w_proj.t(), hidden


@torch.library.custom_op("trainer::relu2_mlp", mutates_args=())
def _relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, hidden): hidden = relu(x w_fc^T)^2, output = hidden w_proj^T; x (M, C), bf16."""
    if not kernels.fused_mlp_usable(x, w_fc.size(0)):  # a scorer on another GPU: the same math, unfused
        out, hidden = _relu2_plain(x, w_fc, w_proj)
        return out, hidden
    hidden = kernels.relu2_matmul(x.contiguous(), w_fc.contiguous(), b_nk=True)
    return hidden @ w_proj.t(), hidden


_relu2_mlp.register_fake(lambda x, w_fc, w_proj: (x.new_empty(x.size(0), w_proj.size(0)),
                                                  x.new_empty(x.size(0), w_fc.size(0))))


@torch.library.custom_op("trainer::relu2_mlp_backward", mutates_args=())
def _relu2_mlp_backward(grad: torch.Tensor, x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor,
                        hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx, dw_fc, dw_proj from the forward's inputs (contiguous), its hidden and the output's gradient."""
    grad = grad.contiguous()
    if kernels.fused_mlp_usable(x, w_fc.size(0)):
        grad_pre = kernels.relu2_matmul(grad, w_proj, y=hidden)  # the ReLU² derivative fused in
    else:
        grad_pre = (grad @ w_proj) * 2 * hidden.sqrt()
    return grad_pre @ w_fc, grad_pre.t() @ x, grad.t() @ hidden


_relu2_mlp_backward.register_fake(
    lambda grad, x, w_fc, w_proj, hidden: tuple(t.new_empty(t.shape) for t in (x, w_fc, w_proj)))


def _save_mlp(ctx, inputs, output):
    ctx.save_for_backward(*(t.contiguous() for t in inputs), output[1])


def _mlp_grad(ctx, grad, _grad_hidden):
    return _relu2_mlp_backward(grad, *ctx.saved_tensors)


_relu2_mlp.register_autograd(_mlp_grad, setup_context=_save_mlp)


def relu2_mlp(x: torch.Tensor, w_fc: torch.Tensor, w_proj: torch.Tensor) -> torch.Tensor:
    """relu(x w_fc^T)^2 w_proj^T over x's last dim; weights are cast to x's dtype. Fused on Hopper."""
    w_fc, w_proj = w_fc.to(x.dtype), w_proj.to(x.dtype)
    if kernels.fused_mlp_usable(x, w_fc.size(0)):
        return _relu2_mlp(x.flatten(0, -2), w_fc, w_proj)[0].view(*x.shape[:-1], w_proj.size(0))
    return F.linear(F.relu(F.linear(x, w_fc)).square(), w_proj)


def mlp_kind(device: torch.device) -> str:
    probe = torch.empty(8, 8, dtype=torch.bfloat16, device=device) if device.type == "cuda" else torch.empty(1)
    return "fused (Triton)" if kernels.fused_mlp_usable(probe, 8) else "PyTorch"


def trusted_ops() -> set[str]:
    """The `namespace.op` names of the ops above, which the scorer accepts in an exported graph."""
    return {"trainer.window_attention", "trainer.relu2_mlp"}
