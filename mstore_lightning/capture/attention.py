"""Capturing ``nn.MultiheadAttention``, whose projections module hooks never see.

The module keeps its in-projection as bare parameters and applies it, and its ``out_proj``, inside
``F.multi_head_attention_forward``. While a capture is active, each such module gets a forward of its
own for the capture's lifetime: it runs the module's own ``forward`` under a torch function mode that
routes ``F.multi_head_attention_forward`` to :func:`attend`. That function computes what torch's does,
with the same operations in the same order, so outputs and gradients are the same bit for bit; it only
hands each projection's input and output to the capture's :class:`Feed`. Nothing else changes, and
removing the handle leaves the module as it was.

Each planned piece is a layer of its own (see :func:`virtual_layers`): ``<name>.in_proj`` (the packed
``in_proj_weight``/``in_proj_bias``, family ``attention_in``), or ``<name>.q_proj``/``k_proj``/``v_proj``
when ``kdim``/``vdim`` differ; ``<name>.bias_k``/``bias_v``; and the real submodule ``<name>.out_proj``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


class Feed(Protocol):
    """Where :func:`attend` hands the projections (inputs sequence-first, ``(T, N, features)``)."""

    def enabled(self) -> bool: ...

    def linear(self, role: str, x: Tensor | None, out: Tensor, seq: tuple[int, int] | None = None) -> None:
        """One linear call: ``out = x Wᵀ + b`` (``x=None``: a bias alone); ``seq=(T, N)`` when its
        rows are flattened ``(T·N, features)``."""

    def packed(self, inputs: list[Tensor], outputs: list[Tensor], groups: list[list[int]]) -> None:
        """The packed in-projection: ``outputs[i]``'s column blocks are groups ``groups[i]``."""


def virtual_layers(module: nn.MultiheadAttention) -> list[dict[str, Any]]:
    """The layers a capture plans for ``module``'s own trainable parameters.

    Each is ``{"suffix", "role", "kind", "hyper", "params", "param_shapes", "covers"}``: ``params``
    are the family's roles (``weight``, ``bias``), ``hyper["params_of"]`` names the module parameter
    (and rows, for a slice) each one is, and ``covers`` the module parameters it accounts for.
    """
    e = module.embed_dim
    trains = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    bias = "in_proj_bias" in trains
    out = []
    if module._qkv_same_embed_dim:
        params = [r for r, n in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")) if n in trains]
        if params:
            out.append(
                _layer(
                    "in_proj",
                    "attention_in",
                    {"embed_dim": e},
                    {"weight": ("in_proj_weight", [3 * e, e]), "bias": ("in_proj_bias", [3 * e])},
                    params,
                )
            )
    else:
        for i, g in enumerate("qkv"):
            w = getattr(module, f"{g}_proj_weight")
            params = (["weight"] if f"{g}_proj_weight" in trains else []) + (["bias"] if bias else [])
            if params:
                out.append(
                    _layer(
                        f"{g}_proj",
                        "linear",
                        {"in_features": w.shape[1], "out_features": e},
                        {
                            "weight": (f"{g}_proj_weight", list(w.shape)),
                            "bias": (f"in_proj_bias[{i * e}:{(i + 1) * e}]", [e]),
                        },
                        params,
                    )
                )
    for g in ("bias_k", "bias_v"):
        if g in trains:
            out.append(
                _layer(g, "linear", {"in_features": 1, "out_features": e}, {"bias": (g, [e])}, ["bias"])
            )
    return out


def _layer(
    role: str, kind: str, hyper: dict[str, Any], roles: dict[str, tuple[str, list[int]]], params: list[str]
) -> dict[str, Any]:
    covers = sorted({roles[p][0].partition("[")[0] for p in params})
    return {
        "suffix": role,
        "role": role,
        "kind": kind,
        "hyper": {**hyper, "params_of": {p: roles[p][0] for p in params}},
        "params": params,
        "param_shapes": {p: roles[p][1] for p in params},
        "covers": covers,
    }


class _Route(TorchFunctionMode):
    """Sends ``F.multi_head_attention_forward`` to :func:`attend`; everything else runs as called."""

    def __init__(self, feed: Feed) -> None:
        super().__init__()
        self.feed = feed

    def __torch_function__(
        self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func is F.multi_head_attention_forward:
            return attend(*args, feed=self.feed, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class Routed:
    """A handle on one module's capture-time forward; :meth:`remove` restores the module's own.

    While ``enabled()``, the module's own forward runs under the torch function mode ``mode()``
    (:class:`_Route` for attention, ``broadcast.Watch`` for broadcast parameters). The forward is a
    method bound to the module, so a deep copy made during capture (an EMA or SWA model) is bound to
    the copy and runs the copy's own forward, never the original's.
    """

    def __init__(
        self, module: nn.Module, enabled: Callable[[], bool], mode: Callable[[], TorchFunctionMode]
    ) -> None:
        cls_forward = type(module).forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self is not module or not enabled():
                return cls_forward(self, *args, **kwargs)
            with mode():
                return cls_forward(self, *args, **kwargs)

        self._module, self._forward = module, types.MethodType(forward, module)
        module.forward = self._forward

    @classmethod
    def attention(cls, module: nn.Module, feed: Feed) -> Routed:
        """``module`` (an ``nn.MultiheadAttention``) with its projections handed to ``feed``."""
        return cls(module, feed.enabled, lambda: _Route(feed))

    def remove(self) -> None:
        if self._module.__dict__.get("forward") is self._forward:
            del self._module.__dict__["forward"]


def attend(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    embed_dim_to_check: int,
    num_heads: int,
    in_proj_weight: Tensor | None,
    in_proj_bias: Tensor | None,
    bias_k: Tensor | None,
    bias_v: Tensor | None,
    add_zero_attn: bool,
    dropout_p: float,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor | None,
    training: bool = True,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    use_separate_proj_weight: bool = False,
    q_proj_weight: Tensor | None = None,
    k_proj_weight: Tensor | None = None,
    v_proj_weight: Tensor | None = None,
    static_k: Tensor | None = None,
    static_v: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    feed: Feed,
) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward``, operation for operation, handing the projections to ``feed``."""
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    src_len = key.shape[0]
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask,
        mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask",
        target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != embed_dim_to_check or embed_dim % num_heads:
        raise AssertionError(
            f"embed_dim {embed_dim} must be {embed_dim_to_check} and divisible by {num_heads}"
        )
    head_dim = embed_dim // num_heads

    if not use_separate_proj_weight:
        q, k, v = _packed(query, key, value, in_proj_weight, in_proj_bias, feed)
    else:
        b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (
            _linear(feed, role, x, w, b)
            for role, x, w, b in (
                ("q_proj", query, q_proj_weight, b_q),
                ("k_proj", key, k_proj_weight, b_k),
                ("v_proj", value, v_proj_weight, b_v),
            )
        )

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(
                    f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                )
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")

    if bias_k is not None and bias_v is not None:
        rk, rv = bias_k.repeat(1, bsz, 1), bias_v.repeat(1, bsz, 1)
        if rk.requires_grad:
            feed.linear("bias_k", None, rk)
        if rv.requires_grad:
            feed.linear("bias_v", None, rv)
        k = torch.cat([k, rk])
        v = torch.cat([v, rv])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))

    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if static_k is None else static_k
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if static_v is None else static_v
    if add_zero_attn:
        zero_attn_shape = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zero_attn_shape, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zero_attn_shape, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        key_padding_mask = (
            key_padding_mask.view(bsz, 1, 1, src_len)
            .expand(-1, num_heads, -1, -1)
            .reshape(bsz * num_heads, 1, src_len)
        )
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    if need_weights:
        _, _, e = q.shape
        q_scaled = q * math.sqrt(1.0 / float(e))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attn_output = torch.bmm(weights, v)
        attn_output = attn_output.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        attn_output = _linear(feed, "out_proj", attn_output, out_proj_weight, out_proj_bias, (tgt_len, bsz))
        attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            attn_output, weights = attn_output.squeeze(1), weights.squeeze(0)
        return attn_output, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    attn_output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    attn_output = attn_output.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    attn_output = _linear(feed, "out_proj", attn_output, out_proj_weight, out_proj_bias, (tgt_len, bsz))
    attn_output = attn_output.view(tgt_len, bsz, attn_output.size(1))
    if not is_batched:
        attn_output = attn_output.squeeze(1)
    return attn_output, None


def _linear(
    feed: Feed, role: str, x: Tensor, w: Tensor, b: Tensor | None, seq: tuple[int, int] | None = None
) -> Tensor:
    out = F.linear(x, w, b)
    if out.requires_grad:
        feed.linear(role, x, out, seq)
    return out


def _packed(
    q: Tensor, k: Tensor, v: Tensor, w: Tensor, b: Tensor | None, feed: Feed
) -> tuple[Tensor, Tensor, Tensor]:
    # The three cases of torch's _in_projection_packed, with the same calls.
    e = q.size(-1)
    if k is v and q is k:
        proj = F.linear(q, w, b)
        if proj.requires_grad:
            feed.packed([q], [proj], [[0, 1, 2]])
        proj = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return proj[0], proj[1], proj[2]
    if k is v:
        w_q, w_kv = w.split([e, e * 2])
        b_q, b_kv = (None, None) if b is None else b.split([e, e * 2])
        q_proj, kv_proj = F.linear(q, w_q, b_q), F.linear(k, w_kv, b_kv)
        if q_proj.requires_grad or kv_proj.requires_grad:
            feed.packed([q, k], [q_proj, kv_proj], [[0], [1, 2]])
        kv_proj = kv_proj.unflatten(-1, (2, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return q_proj, kv_proj[0], kv_proj[1]
    w_q, w_k, w_v = w.chunk(3)
    b_q, b_k, b_v = (None,) * 3 if b is None else b.chunk(3)
    outs = [F.linear(q, w_q, b_q), F.linear(k, w_k, b_k), F.linear(v, w_v, b_v)]
    if any(o.requires_grad for o in outs):
        feed.packed([q, k, v], outs, [[0], [1], [2]])
    return outs[0], outs[1], outs[2]


def packed_inputs(inputs: list[Tensor], groups: list[list[int]]) -> Tensor:
    """Per-sample input rows of the packed in-projection (layouts in ``core.families.attention``)."""
    if len(inputs) == 1:
        return inputs[0].detach().transpose(0, 1)
    first = inputs[0]
    t = max(x.shape[0] for x in inputs)
    a = first.new_zeros((first.shape[1], 3, t, first.shape[2]))
    for x, gs in zip(inputs, groups):
        for g in gs:
            a[:, g, : x.shape[0]] = x.detach().transpose(0, 1)
    return a


def packed_grads(grads: list[Tensor | None], inputs: list[Tensor], groups: list[list[int]]) -> Tensor:
    """Per-sample output gradient rows of the packed in-projection, in :func:`packed_inputs`' layout;
    a part whose gradient never came (``None``) is zero."""
    if len(inputs) == 1:
        return grads[0].transpose(0, 1)
    first = inputs[0]
    e, t = first.shape[2], max(x.shape[0] for x in inputs)
    d = first.new_zeros((first.shape[1], 3, t, e), dtype=torch.float32)
    for grad, x, gs in zip(grads, inputs, groups):
        if grad is None:
            continue
        for j, g in enumerate(gs):
            d[:, g, : x.shape[0]] = grad[..., j * e : (j + 1) * e].transpose(0, 1)
    return d
