"""The gated hierarchical context aggregation of a focal modulation, fused into Triton kernels.

``FocalModulation.aggregate`` computes, on a context map x and gates g (L + 1 per pixel):

    x_l = GELU(dwconv_l(x_{l-1}))                      for the levels l = 1..L
    out = sum_l g_{l-1} * x_l + g_L * GELU(mean_hw(x_L))    (divided by L + 1 if normalised)

The plain PyTorch version (kept in ``FocalModulation.aggregate`` as the reference and the CPU path)
writes every convolution output, activation, product and partial sum to memory and keeps several of
them for the backward pass. Here one kernel per level does the depth-wise convolution, GELU, gating,
accumulation and the global sum in registers, on (B, H, W, C) memory of any strides (the context is a
strided slice of the ``f`` projection and is read in place). The backward pass recomputes each
level's convolution instead of keeping it, so of the activations only the level outputs that feed the
next level (x_1..x_{L-1}) are stored; the convolution's own input and weight gradients come from
``aten.convolution_backward`` (cuDNN on CUDA).

The kernels are in models/kernels/aggregate.py. Used on CUDA when Triton is importable and
``FOCALNET_FUSED=1`` is set in the environment (off by default until they have been measured on a
GPU); ``FocalNet.set_fused_aggregation(False)`` selects the plain path for one model. Under ``torch.compile`` the plain path is used as well, and inductor fuses it. The
kernels also run in Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how the
tests check them against the plain path; the tests also compile them ahead of time for an H100.
"""
import functools
import math
import os
from typing import List

import torch
import torch.fx
import torch.nn.functional as F

__all__ = ['fused_available', 'fused_aggregate', 'triton_importable']

_SQRT1_2 = 1 / math.sqrt(2)
_BLOCK_W, _BLOCK_C = 16, 64


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_available(x: torch.Tensor) -> bool:
    """Whether ``aggregate`` should take the fused path for this input."""
    if torch.jit.is_scripting() or torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy):
        # Compiled models take the plain path, which inductor fuses itself; traced graphs (fx,
        # torch.export) hold the plain operations, which any backend can run.
        return False
    # The kernels index with 32-bit offsets; the projection holding x is about 2x its size.
    small = x.numel() * 3 < 2 ** 31
    # Opt-in until the kernels have been timed and checked on a GPU (only the interpreter and an
    # ahead-of-time compile have run them so far): FOCALNET_FUSED=1 turns them on.
    return x.is_cuda and small and os.environ.get('FOCALNET_FUSED', '0') == '1' and triton_importable()


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels (imported on first use)."""
    from .kernels import aggregate
    return aggregate.level_fwd, aggregate.global_fwd, aggregate.level_bwd


def _grid(B: int, H: int, W: int, C: int):
    return (B * H, -(-W // _BLOCK_W), -(-C // _BLOCK_C))


def _bhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def _gelu_grad(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(z * _SQRT1_2)) + z * torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


class _FusedAggregate(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, gates, normalize: bool, *weights):
        level_fwd, global_fwd, _ = _kernels()
        B, C, H, W = x.shape
        L = len(weights)
        xb, gb = _bhwc(x), _bhwc(gates)
        acc = torch.empty(B, H, W, C, device=x.device, dtype=torch.float32)
        sums = torch.zeros(B, C, device=x.device, dtype=torch.float32)
        grid = _grid(B, H, W, C)
        levels = [xb]
        for level, w in enumerate(weights):
            last = level == L - 1
            y = x.new_empty(B, H, W, C) if not last else acc  # acc stands in for an unused pointer
            src, g = levels[-1], gb[..., level]
            level_fwd[grid](
                src, w.contiguous(), g, acc, y, sums, H, W, C, *src.stride(), *g.stride(),
                K=w.shape[-1], HAS_ACC=level > 0, STORE_Y=not last, DO_SUM=last,
                BLOCK_W=_BLOCK_W, BLOCK_C=_BLOCK_C)
            if not last:
                levels.append(y)
        mean = sums / (H * W)
        glob = F.gelu(mean)
        out = x.new_empty(B, H, W, C)
        g = gb[..., L]
        scale = 1.0 / (L + 1) if normalize else 1.0
        global_fwd[grid](acc, g, glob, out, H, W, C, *g.stride(), scale,
                         BLOCK_W=_BLOCK_W, BLOCK_C=_BLOCK_C)
        ctx.save_for_backward(gates, mean, glob, *weights, *levels)
        ctx.normalize = normalize
        return out.permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, dout):
        _, _, level_bwd = _kernels()
        gates, mean, glob, *rest = ctx.saved_tensors
        L = len(rest) // 2
        weights, levels = rest[:L], rest[L:]
        B, H, W, C = levels[0].shape
        gb = _bhwc(gates)
        d = _bhwc(dout).float()
        if ctx.normalize:
            d = d / (L + 1)
        d = d.contiguous()
        dgates = torch.zeros(B, H, W, L + 1, device=d.device, dtype=torch.float32)
        # The global context: out += g_L * GELU(mean_hw(x_L)).
        gL = gb[..., L].float()
        dgates[..., L] = torch.einsum('bhwc,bc->bhw', d, glob)
        dglob = torch.einsum('bhwc,bhw->bc', d, gL)
        upvec = (dglob * _gelu_grad(mean) / (H * W)).contiguous()
        grid = _grid(B, H, W, C)
        dtype = levels[0].dtype
        up = None
        dweights: List[torch.Tensor] = [None] * L
        dx = None
        for level in reversed(range(L)):
            w = weights[level]
            src, g, dg = levels[level], gb[..., level], dgates[..., level]
            dz = torch.empty(B, H, W, C, device=d.device, dtype=dtype)
            level_bwd[grid](
                src, w.contiguous(), g, d, up if up is not None else d, upvec, dz, dg, H, W, C,
                *src.stride(), *g.stride(), *dg.stride(),
                K=w.shape[-1], HAS_UP=up is not None, HAS_UPVEC=level == L - 1,
                BLOCK_W=_BLOCK_W, BLOCK_C=_BLOCK_C)
            k = w.shape[-1]
            dx, dw, _ = torch.ops.aten.convolution_backward(
                dz.permute(0, 3, 1, 2), src.permute(0, 3, 1, 2), w.to(dtype), None,
                [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], C,
                [True, ctx.needs_input_grad[3 + level], False])
            dweights[level] = None if dw is None else dw.to(w.dtype)
            up = _bhwc(dx).contiguous()  # read with (B, H, W, C) offsets
        return (dx, dgates.permute(0, 3, 1, 2).to(gates.dtype), None, *dweights)


def fused_aggregate(x: torch.Tensor, gates: torch.Tensor, weights: List[torch.Tensor],
                    normalize: bool = False) -> torch.Tensor:
    """The fused ``FocalModulation.aggregate``: x (B, C, H, W), gates (B, L + 1, H, W), the L depth-wise
    weights (C, 1, k, k); returns (B, C, H, W) over channels-last memory, in x's dtype."""
    if gates.shape[1] != len(weights) + 1:
        raise ValueError(f'{gates.shape[1]} gates for {len(weights)} focal levels; expected L + 1')
    return _FusedAggregate.apply(x, gates, normalize, *weights)
