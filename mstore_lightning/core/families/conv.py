"""``nn.Conv1d/2d/3d`` with stride, padding (``'same'`` and every padding mode), dilation and groups.

The store keeps the raw layer input and output gradient; the unfolded input (``im2col``) is
recomputed on read, since it is ``∏ kernel`` times larger. Full per-sample gradients are formed
either from it (``restore``) or as the weight gradient of one convolution whose groups are the
samples (``grouped_conv``), which never materialises ``im2col``; the capture times both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mstore_lightning.core.families.kron import KroneckerExtractor, as_float
from mstore_lightning.core.families.registry import Hyper, register


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvExtractor(KroneckerExtractor):
    kind = "conv"
    full_methods = ("restore", "grouped_conv")

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        k, dil = list(module.kernel_size), list(module.dilation)
        if isinstance(module.padding, str):
            if module.padding == "same":
                total = [di * (ki - 1) for di, ki in zip(dil, k)]
                pads = [[t // 2, t - t // 2] for t in total]  # torch's split for 'same'
            else:  # 'valid'
                pads = [[0, 0] for _ in k]
        else:
            pads = [[p, p] for p in module.padding]
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": k,
            "stride": list(module.stride),
            "padding": pads,
            "dilation": dil,
            "groups": module.groups,
            "padding_mode": module.padding_mode,
        }

    @classmethod
    def prefix(cls, hyper: Hyper, inputs: tuple) -> Tensor:
        x = inputs[0]
        if x.ndim != len(hyper["kernel_size"]) + 2:
            raise ValueError(
                f"Capture needs batched convolution inputs of {len(hyper['kernel_size']) + 2} dims, "
                f"got shape {tuple(x.shape)}."
            )
        return x.detach()

    @classmethod
    def input_width(cls, hyper: Hyper, a_shape: list[int]) -> int:
        return math.prod(a_shape[1:])

    @classmethod
    def input_features(cls, hyper: Hyper, a: Tensor) -> Tensor:
        # A feature map's positions are one grid in every sample, so they keep their places.
        return as_float(a).mean(1).reshape(a.shape[0], -1)

    @classmethod
    def matrices(cls, hyper: Hyper, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
        b, u = a.shape[:2]
        g = hyper["groups"]
        cols = unfold(as_float(a).flatten(0, 1), hyper)  # (B*U, C*K, L)
        cols = cols.reshape(b, u, g, cols.shape[1] // g, cols.shape[2])
        a_m = cols.permute(0, 2, 1, 4, 3).reshape(b, g, -1, cols.shape[3])
        dd = as_float(d).reshape(b, u, g, hyper["out_channels"] // g, -1)
        d_m = dd.permute(0, 2, 1, 4, 3).reshape(b, g, -1, dd.shape[3])
        return a_m, d_m

    @classmethod
    def weight_from(cls, hyper: Hyper, g: Tensor) -> Tensor:
        c_in = hyper["in_channels"] // hyper["groups"]
        return g.reshape(g.shape[0], hyper["out_channels"], c_in, *hyper["kernel_size"])

    @classmethod
    def full_rows(
        cls, hyper: Hyper, params: list[str], a: Tensor, d: Tensor, method: str = "restore"
    ) -> dict[str, Tensor]:
        if method != "grouped_conv":
            return super().full_rows(hyper, params, a, d)
        uses = a.shape[1]
        out: dict[str, Tensor] = {}
        if "weight" in params:
            weight = None
            for u in range(uses):
                g = grouped_weight_grad(as_float(a[:, u]), as_float(d[:, u]), hyper)
                weight = g if weight is None else weight.add_(g)
            out["weight"] = weight
        if "bias" in params:
            out["bias"] = as_float(d).sum(1).flatten(2).sum(-1)
        return out


_WEIGHT_GRAD = {
    1: torch.nn.grad.conv1d_weight,
    2: torch.nn.grad.conv2d_weight,
    3: torch.nn.grad.conv3d_weight,
}


def grouped_weight_grad(x: Tensor, d: Tensor, hyper: Hyper) -> Tensor:
    """Per-sample weight gradients ``(B, O, I/G, *k)`` of inputs ``x (B, I, *S)`` and output
    gradients ``d (B, O, *L)``: one convolution's weight gradient, its ``B·G`` groups the samples'."""
    b, nd = x.shape[0], len(hyper["kernel_size"])
    padding = [lo for lo, _ in hyper["padding"]]
    even = all(lo == hi for lo, hi in hyper["padding"])
    if any(lo or hi for lo, hi in hyper["padding"]) and (hyper["padding_mode"] != "zeros" or not even):
        # Padded here: 'same' may be uneven, and other modes are not zeros.
        pads = [p for pair in reversed(hyper["padding"]) for p in pair]
        mode = "constant" if hyper["padding_mode"] == "zeros" else hyper["padding_mode"]
        x, padding = F.pad(x, pads, mode=mode), [0] * nd
    c_out, groups = hyper["out_channels"], hyper["groups"]
    shape = (b * c_out, hyper["in_channels"] // groups, *hyper["kernel_size"])
    g = _WEIGHT_GRAD[nd](
        x.reshape(1, -1, *x.shape[2:]),
        shape,
        d.reshape(1, -1, *d.shape[2:]),
        stride=hyper["stride"],
        padding=padding,
        dilation=hyper["dilation"],
        groups=b * groups,
    )
    return g.reshape(b, c_out, *shape[1:])


def unfold(x: Tensor, hyper: Hyper) -> Tensor:
    """``im2col`` for any number of spatial dims: ``(N, C, *S)`` to ``(N, C·∏k, ∏L)``."""
    nd = len(hyper["kernel_size"])
    pads = [p for pair in reversed(hyper["padding"]) for p in pair]  # F.pad wants the last dim first
    if any(pads):
        mode = "constant" if hyper["padding_mode"] == "zeros" else hyper["padding_mode"]
        x = F.pad(x, pads, mode=mode)
    for j, (k, s, dl) in enumerate(zip(hyper["kernel_size"], hyper["stride"], hyper["dilation"])):
        x = x.unfold(2 + j, dl * (k - 1) + 1, s)
        if dl > 1:
            x = x[..., ::dl]
    # (N, C, L_1..L_nd, k_1..k_nd) -> (N, C, k_1..k_nd, L_1..L_nd)
    perm = [0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd)]
    x = x.permute(perm)
    n, c = x.shape[:2]
    return x.reshape(n, c * math.prod(hyper["kernel_size"]), -1)
