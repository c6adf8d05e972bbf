"""``nn.Embedding``: the prefix is the token ids, never one-hot vectors.

``∇W[v] = Σ_{t: id_t = v} d_t``, and between samples
``⟨G_x, G_y⟩ = Σ_{t,s} [id_x,t = id_y,s] (d_x,t · d_y,s)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mstore_lightning.core.families.kron import as_float
from mstore_lightning.core.families.registry import Extractor, Hyper, Rows, register

_BLOCK_ELEMS = 1 << 23


@register(nn.Embedding)
class EmbeddingExtractor(Extractor):
    kind = "embedding"

    @classmethod
    def hyper(cls, module: nn.Module) -> Hyper:
        return {
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
        }

    @classmethod
    def param_names(cls, module: nn.Module) -> list[str]:
        return ["weight"]

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        if module.scale_grad_by_freq:
            return "scale_grad_by_freq=True scales each gradient by token counts over the whole batch"
        return None

    @classmethod
    def _flat(cls, hyper: Hyper, rows: Rows) -> tuple[Tensor, Tensor]:
        ids = rows["a"].reshape(rows["a"].shape[0], -1).long()
        d = as_float(rows["d"]).reshape(ids.shape[0], ids.shape[1], hyper["embedding_dim"])
        if hyper["padding_idx"] is not None:  # the padding row never receives gradient
            d = d * (ids != hyper["padding_idx"]).unsqueeze(-1)
        return ids, d

    @classmethod
    def restore(cls, hyper: Hyper, params: list[str], rows: Rows) -> Rows:
        ids, d = cls._flat(hyper, rows)
        b, v = ids.shape[0], hyper["num_embeddings"]
        out = d.new_zeros((b * v, hyper["embedding_dim"]))
        offset = torch.arange(b, device=ids.device).unsqueeze(1) * v
        out.index_add_(0, (ids + offset).reshape(-1), d.reshape(-1, d.shape[-1]))
        return {"weight": out.reshape(b, v, -1)}

    @classmethod
    def gram(cls, hyper: Hyper, params: list[str], x: Rows, y: Rows) -> Tensor:
        ix, dx = cls._flat(hyper, x)
        iy, dy = cls._flat(hyper, y)
        n, t = ix.shape
        m, s = iy.shape
        out = dx.new_zeros((n, m))
        step = max(1, _BLOCK_ELEMS // max(1, m * t * s))
        for lo in range(0, n, step):
            same = ix[lo : lo + step, None, :, None] == iy[None, :, None, :]
            dd = torch.einsum("nte,mse->nmts", dx[lo : lo + step], dy)
            out[lo : lo + step] = (dd * same).sum((2, 3))
        return out

    @classmethod
    def sqnorm(cls, hyper: Hyper, params: list[str], x: Rows) -> Tensor:
        # A sample's gradient has one row per distinct id: the sum of its positions' d. Summing by
        # (sample, id) costs B·T·D, where comparing every pair of positions costs B·T²·D.
        ids, d = cls._flat(hyper, x)
        b, t = ids.shape
        key = (ids + torch.arange(b, device=ids.device).unsqueeze(1) * hyper["num_embeddings"]).reshape(-1)
        distinct, which = torch.unique(key, return_inverse=True)
        rows = d.new_zeros((len(distinct), d.shape[-1])).index_add_(0, which, d.reshape(b * t, -1))
        sample = torch.div(distinct, hyper["num_embeddings"], rounding_mode="floor")
        return d.new_zeros(b).index_add_(0, sample, rows.pow(2).sum(1))

    @classmethod
    def input_width(cls, hyper: Hyper, a_shape: list[int]) -> int:
        return int(hyper["num_embeddings"])

    @classmethod
    def input_features(cls, hyper: Hyper, a: Tensor) -> Tensor:
        # The bag of ids: how often each row of the table is read. Padding is left out, as the
        # gradient leaves it out; a sample's length then does not make it near others of that length.
        ids = a.reshape(a.shape[0], -1).long()
        bag = torch.zeros(ids.shape[0], hyper["num_embeddings"]).scatter_add_(
            1, ids, torch.ones(ids.shape, dtype=torch.float32)
        )
        if hyper["padding_idx"] is not None:
            bag[:, hyper["padding_idx"]] = 0
        return bag

    @classmethod
    def factor_bytes(cls, a: Tensor, d: Tensor, itemsize: int) -> int:
        return a[0].numel() * 8 + d[0].numel() * itemsize

    @classmethod
    def prefix_is_index(cls) -> bool:
        return True
