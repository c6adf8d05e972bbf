"""Capturing ``nn.LSTM`` and ``nn.GRU``, whose fused kernels module hooks cannot look inside.

The module runs as it always does: nothing of its forward changes. A forward hook keeps its input
and initial state, and hooks on its outputs keep their gradients. Once the backward pass is done, the
layer is run again from those, step by step, with the same parameters (:func:`unroll`), and the output
gradients are carried back through that run to the gate pre-activations of every step. Each weight's
per-sample gradient is then ``Σ_t d_t a_tᵀ``: for ``weight_ih`` the gates' input part and the layer
input, for ``weight_hh`` their hidden part and the previous hidden state. Each is stored as a linear
layer of its own, ``<name>.ih_l<k>[_reverse]`` and ``<name>.hh_l<k>[_reverse]``.

The step-by-step run uses PyTorch's reference cell equations. They are what the fused kernels compute,
but not in their order of operations (oneDNN on the CPU, cuDNN on CUDA): outputs agree to float32
rounding, not bit for bit, which is why the module's own forward is left alone and only the gradients
come from the re-run. Layers with dropout between them (random masks the re-run cannot see),
``proj_size``, or packed sequences are reported, not captured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATES = {"LSTM": 4, "GRU": 3}


def supported(module: nn.Module) -> str | None:
    """Why ``module``'s parameters cannot be captured, or ``None``."""
    kind = type(module).__name__ if isinstance(module, (nn.LSTM, nn.GRU)) else None
    if kind is None:
        return f"no extractor is registered for {type(module).__name__}"
    if getattr(module, "proj_size", 0):
        return "an LSTM with proj_size is not captured"
    if module.dropout and module.num_layers > 1:
        return (
            "dropout between recurrent layers draws masks inside the fused kernel, which a re-run cannot see"
        )
    return None


def virtual_layers(module: nn.RNNBase) -> list[dict[str, Any]]:
    """The linear layers of ``module``'s trainable weights: ``ih`` and ``hh`` per layer and direction."""
    out = []
    trains = {n for n, p in module.named_parameters(recurse=False) if p.requires_grad}
    for sfx in _suffixes(module):
        for part in ("ih", "hh"):
            roles = {"weight": f"weight_{part}{sfx}", "bias": f"bias_{part}{sfx}"}
            params = [r for r, n in roles.items() if n in trains]
            if not params:
                continue
            w = getattr(module, roles["weight"])
            out.append(
                {
                    "suffix": f"{part}{sfx}",
                    "role": f"{part}{sfx}",
                    "kind": "linear",
                    "hyper": {
                        "in_features": w.shape[1],
                        "out_features": w.shape[0],
                        "params_of": {r: roles[r] for r in params},
                    },
                    "params": params,
                    "param_shapes": {r: list(getattr(module, roles[r]).shape) for r in params},
                    "covers": [roles[r] for r in params],
                }
            )
    return out


def _suffixes(module: nn.RNNBase) -> list[str]:
    dirs = ("", "_reverse") if module.bidirectional else ("",)
    return [f"_l{k}{d}" for k in range(module.num_layers) for d in dirs]


class Call:
    """One call of a recurrent module: its input and initial state; :meth:`rows` re-runs it.

    ``rows(role, grads)`` takes the gradients of the call's outputs ``[out, h_n(, c_n)]`` (``None``
    where none arrived) and returns the input rows ``a (B, T, in)`` and output gradient rows
    ``d (B, T, out)`` of linear part ``role``. The re-run happens once, for every part.
    """

    def __init__(self, module: nn.RNNBase, x: Tensor, hx: Any) -> None:
        self.module, self.x, self.hx = module, x.detach(), _detach(hx)
        self._rows: dict[str, tuple[Tensor, Tensor]] | None = None

    def rows(self, role: str, grads: list[Tensor | None]) -> tuple[Tensor, Tensor]:
        if self._rows is None:
            self._rows = self._unrolled(grads)
        return self._rows[role]

    def _unrolled(self, grads: list[Tensor | None]) -> dict[str, tuple[Tensor, Tensor]]:
        with torch.enable_grad():
            parts, outs = unroll(self.module, self.x, self.hx)
            sources = [v for _, gates in parts.values() for v in gates]
            wanted = [(o, g) for o, g in zip(outs, grads) if g is not None]
            found = torch.autograd.grad(
                [o for o, _ in wanted], sources, [g for _, g in wanted], allow_unused=True
            )
        out: dict[str, tuple[Tensor, Tensor]] = {}
        k = 0
        for role, (inputs, gates) in parts.items():
            gs = [
                g if g is not None else torch.zeros_like(s) for g, s in zip(found[k : k + len(gates)], gates)
            ]
            k += len(gates)
            # Sequence-first (T, B, F), whole or step by step, to rows (B, T, F).
            a = inputs[0] if len(inputs) == 1 and inputs[0].dim() == 3 else torch.stack(inputs)
            d = gs[0] if len(gs) == 1 and gs[0].dim() == 3 else torch.stack(gs)
            out[role] = (a.detach().transpose(0, 1), d.transpose(0, 1))
        return out


def _detach(hx: Any) -> Any:
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(h.detach() for h in hx)
    return hx.detach()


def unroll(
    m: nn.RNNBase, x: Tensor, hx: Any
) -> tuple[dict[str, tuple[list[Tensor], list[Tensor]]], list[Tensor]]:
    """Runs ``m`` step by step from input ``x`` and state ``hx`` with its own (detached) parameters.

    Returns:
        Per role, the inputs and the outputs of each linear part (the ``ih`` part is one call over the
        sequence; the ``hh`` part one call a step, with the previous hidden state), and the module's
        outputs ``[out, h_n(, c_n)]``, sequence-first.
    """
    lstm = isinstance(m, nn.LSTM)
    if m.batch_first:
        x = x.transpose(0, 1)
    steps, batch = x.shape[0], x.shape[1]
    dirs = 2 if m.bidirectional else 1
    zeros = x.new_zeros((m.num_layers * dirs, batch, m.hidden_size))
    if hx is None:
        h0, c0 = zeros, zeros
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    parts: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    h_n, c_n = [], []
    inp = x
    for layer in range(m.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = getattr(m, f"weight_ih{sfx}").detach(), getattr(m, f"weight_hh{sfx}").detach()
            b_ih = getattr(m, f"bias_ih{sfx}").detach() if m.bias else None
            b_hh = getattr(m, f"bias_hh{sfx}").detach() if m.bias else None
            xw = F.linear(inp, w_ih, b_ih).requires_grad_()
            idx = layer * dirs + d
            h, c = h0[idx], c0[idx] if lstm else None
            hs, prev, hws = [], [], []
            for t in range(steps - 1, -1, -1) if d else range(steps):
                hw = F.linear(h, w_hh, b_hh)
                if not hw.requires_grad:  # the first step, from a given state: a leaf of the re-run
                    hw.requires_grad_()
                prev.append(h)
                hws.append(hw)
                if lstm:
                    i, f, g, o = (xw[t] + hw).chunk(4, 1)
                    c = f.sigmoid() * c + i.sigmoid() * g.tanh()
                    h = o.sigmoid() * c.tanh()
                else:
                    ir, iz, i_n = xw[t].chunk(3, 1)
                    hr, hz, h_n_ = hw.chunk(3, 1)
                    r, z = (ir + hr).sigmoid(), (iz + hz).sigmoid()
                    n = (i_n + r * h_n_).tanh()
                    h = (h - n) * z + n
                hs.append(h)
            h_n.append(h)
            if lstm:
                c_n.append(c)
            outs.append(torch.stack(hs[::-1] if d else hs))
            parts[f"ih{sfx}"] = ([inp], [xw])
            parts[f"hh{sfx}"] = (prev, hws)
        inp = torch.cat(outs, -1) if dirs == 2 else outs[0]
    out = inp.transpose(0, 1) if m.batch_first else inp
    result = [out, torch.stack(h_n)] + ([torch.stack(c_n)] if lstm else [])
    return parts, result
