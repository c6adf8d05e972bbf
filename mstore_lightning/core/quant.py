"""How captured rows are stored: lossless floats, reduced floats, or int8 codes with scales.

Each logical array of a layer (``a``, ``d``, ``weight``, ...) is stored as one or more Zarr arrays,
its *parts*, all chunked alike along the row axis. The layer spec lists them, so a reader needs no code
of ours to find them:

=================  ================================================  ==============================
encoding           parts                                             error of one number ``x``
=================  ================================================  ==============================
``float32``        ``<name>`` float32                                none
``float16``        ``<name>`` float16                                ``|x|·2⁻¹¹`` (normal range)
``bfloat16-bits``  ``<name>`` int16 (the raw bits of bfloat16)       ``|x|·2⁻⁸``
``int8``           ``<name>`` int8 codes, ``<name>_scale`` float32   ``s/2``, ``s = max|x_group|/127``
``int64``          ``<name>`` int64 (token ids, exact)               none
=================  ================================================  ==============================

``int8`` is symmetric with one scale per *group*: the smallest block of trailing axes that holds at
least :data:`GROUP_MIN` numbers. That is one scale per row and use for a linear layer, per row and
position for sequences, and per channel for convolution maps. For a group with crest factor
``κ = max|x| / rms(x)``, the relative error ``‖x̂ − x‖ / ‖x‖`` is at most ``κ / 254`` (every error is
at most ``s/2``), and about ``κ / 440`` when rounding errors are uniform. A per-sample gradient
``g = Σ_t d_t a_tᵀ`` built from factors with relative errors ``ε_a, ε_d`` (one use, one position)
has relative error at most ``ε_a + ε_d + ε_a·ε_d``; that bounds ``norms`` the same way, and
``|⟨ĝ, ĥ⟩ − ⟨g, h⟩| ≤ ε_g‖g‖‖ĥ‖ + ε_h‖h‖‖g‖`` bounds ``dot``.

Encoding on the rows' device, and decoding into tensors, is ``core.tensor_codes``'s: this module is
NumPy only, so that reading a store's metadata (``mstore inspect``, ``verify``) needs no torch.

Example:
    >>> spec = array_spec("a", [1, 100], "int8")
    >>> sorted(spec["parts"])
    ['a', 'a_scale']
    >>> x = np.random.default_rng(0).standard_normal((4, 1, 100)).astype(np.float32)
    >>> parts = encode(spec, "a", x)
    >>> bool((np.abs(parts["a"] * parts["a_scale"][..., None] - x)).max() <= np.abs(x).max() / 254 + 1e-7)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

GROUP_MIN = 64  # numbers sharing one int8 scale: a 4-byte scale costs at most 1/16 of a group's bytes

_FLOATS = {
    "fp32": ("float32", "float32"),
    "fp16": ("float16", "float16"),
    "bf16": ("bfloat16-bits", "int16"),
}
PRECISIONS = (*_FLOATS, "int8", "kbit:N", "threshold[:q]")
LOSSLESS = ("float32", "int64")
FIT_SAMPLES = 1 << 16  # values a chunk's bin edges are fitted on; the bin means use every value
LLOYD_STEPS = 3  # refinements of the quantile edges


def check_precision(precision: Any) -> str:
    """Validates a precision string; ``kbit:N`` takes N in 1..8, ``threshold:q`` q in (0, 1)."""
    ok = isinstance(precision, str) and (precision in _FLOATS or precision == "int8")
    if isinstance(precision, str) and precision.startswith("kbit:"):
        n = precision[5:]
        ok = n.isdigit() and 1 <= int(n) <= 8
    elif isinstance(precision, str) and (precision == "threshold" or precision.startswith("threshold:")):
        try:
            q = float(precision[10:]) if ":" in precision else 0.5
            ok = 0.0 < q < 1.0
        except ValueError:
            ok = False
    if not ok:
        raise ValueError(
            f"`precision` can be 'fp32', 'fp16', 'bf16', 'int8', 'kbit:N' (N in 1..8) or 'threshold[:q]' "
            f"(q in (0, 1)); got {precision!r}."
        )
    return precision


def array_spec(name: str, row_shape: list[int], precision: str, *, index: bool = False) -> dict[str, Any]:
    """JSON description of how logical array ``name`` is stored at ``precision``.

    Args:
        name: logical array name, also the name of its main part.
        row_shape: shape of one row (one sample).
        precision: a policy precision (``"fp32"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"kbit:N"``,
            ``"threshold[:q]"``).
        index: the array holds integer ids, which are stored exactly whatever the precision.
    """
    row_shape = [int(s) for s in row_shape]
    if index:
        return _spec(name, row_shape, "int64", {name: (row_shape, "int64")})
    if precision in _FLOATS:
        encoding, dtype = _FLOATS[precision]
        return _spec(name, row_shape, encoding, {name: (row_shape, dtype)})
    lead = scale_axes(row_shape)
    scale = (row_shape[:lead], "float32")
    if precision == "int8":
        spec = _spec(name, row_shape, "int8", {name: (row_shape, "int8"), f"{name}_scale": scale})
        spec["scale_axes"] = lead
        return spec
    codec = ChunkCodec.for_precision(check_precision(precision), row_shape)
    table = f"{name}{TABLE}"
    parts = {
        name: (list(codec.code_shape), "uint8"),
        f"{name}_scale": scale,
        table: ([codec.levels], "float32"),
    }
    spec = _spec(name, row_shape, precision, parts)
    spec["parts"][table]["per"] = "chunk"
    spec["scale_axes"] = lead
    spec["codec"] = codec.to_json()
    return spec


def _spec(name: str, row_shape: list[int], encoding: str, parts: dict[str, tuple]) -> dict[str, Any]:
    return {
        "row_shape": row_shape,
        "encoding": encoding,
        "dtype": parts[name][1],
        "parts": {p: {"row_shape": list(s), "dtype": d} for p, (s, d) in parts.items()},
    }


def scale_axes(row_shape: list[int]) -> int:
    """How many leading row axes index int8 scales; the trailing rest share one scale."""
    size = 1
    for k in range(len(row_shape) - 1, -1, -1):
        size *= row_shape[k]
        if size >= GROUP_MIN:
            return k
    return 0


def row_nbytes(spec: dict[str, Any]) -> int:
    """Uncompressed bytes of one stored row over the array's per-row parts."""
    return sum(
        math.prod(p["row_shape"]) * np.dtype(p["dtype"]).itemsize
        for p in spec["parts"].values()
        if p.get("per", "row") == "row"
    )


def chunk_codec(spec: dict[str, Any], name: str, part: str) -> ChunkCodec | None:
    """The per-chunk codec that writes ``part`` of array ``name``, if its codes are fitted per chunk."""
    return ChunkCodec.from_json(spec["codec"]) if "codec" in spec and part == name else None


def is_lossless(spec: dict[str, Any]) -> bool:
    return spec["encoding"] in LOSSLESS


def handed_parts(spec: dict[str, Any]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """The parts ``tensor_codes.encode_rows`` packs into one handed-over row, in order: ``(name, row shape,
    dtype)``. Empty for encodings handed over as one array of their own dtype."""
    if spec["encoding"] != "int8" and "codec" not in spec:
        return []
    main, scale = (p for p, info in spec["parts"].items() if info.get("per", "row") == "row")
    row_shape = tuple(spec["row_shape"])
    scale_shape = tuple(spec["parts"][scale]["row_shape"])
    # A chunk codec's values are handed over in [-1, 1]; its codes need the whole chunk.
    dtype = np.dtype(np.int8 if spec["encoding"] == "int8" else np.float32)
    return [(main, row_shape, dtype), (scale, scale_shape, np.dtype(np.float32))]


def buffer_dtype(spec: dict[str, Any]) -> np.dtype:
    """The dtype of rows as ``tensor_codes.encode_rows`` hands them over (raw bytes where parts are packed)."""
    if handed_parts(spec):
        return np.dtype(np.uint8)
    return np.dtype(spec["dtype"])


def buffered_nbytes(spec: dict[str, Any]) -> int:
    """Bytes of one row as the training thread hands it to the writer (``tensor_codes.encode_rows``)."""
    packed = handed_parts(spec)
    if packed:
        return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in packed)
    return math.prod(spec["row_shape"]) * buffer_dtype(spec).itemsize


def group_shape(spec: dict[str, Any]) -> tuple[int, ...]:
    """One row's shape as its scale groups: the leading axes, then every number of a group."""
    lead = spec["scale_axes"]
    return (*spec["row_shape"][:lead], math.prod(spec["row_shape"][lead:]))


def split_rows(spec: dict[str, Any], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The stored parts of rows handed over by ``tensor_codes.encode_rows``, keyed by part name (views where
    the bytes allow)."""
    packed = handed_parts(spec)
    if not packed:
        return {spec_name(spec): rows}
    n, at, out = rows.shape[0], 0, {}
    for name, shape, dtype in packed:
        width = math.prod(shape) * dtype.itemsize
        piece = rows[:, at : at + width]
        if dtype.itemsize > 1:  # wider numbers need their own aligned bytes
            piece = np.ascontiguousarray(piece)
        out[name] = piece.view(dtype).reshape(n, *shape)
        at += width
    return out


def spec_name(spec: dict[str, Any]) -> str:
    """The name of ``spec``'s main part."""
    return next(iter(spec["parts"]))


def encode(spec: dict[str, Any], name: str, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The stored parts of float32 rows ``(n, *row_shape)`` held in NumPy, keyed by part name: the
    NumPy twin of ``tensor_codes.encode_rows``, and the reference its codes are checked against.

    For ``kbit``/``threshold`` the main part holds values normalised to ``[-1, 1]``, which the chunk's
    :class:`ChunkCodec` turns into codes once the chunk is whole.
    """
    encoding = spec["encoding"]
    if encoding != "int8" and "codec" not in spec:
        return {name: rows}  # stored as buffered
    n = rows.shape[0]
    groups = np.ascontiguousarray(rows, dtype=np.float32).reshape(n, *group_shape(spec))
    work = np.abs(groups)
    amax = work.max(axis=-1, keepdims=True, initial=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        # NaN or Inf rows keep a NaN/Inf scale, so they read back non-finite (as the capture flags them).
        if encoding == "int8":
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0))  # |x·inv| <= 127: no clamp
            np.multiply(groups, inv, out=work)
            codes = np.rint(work, out=work).astype(np.int8)
            return {name: codes.reshape(rows.shape), f"{name}_scale": (amax / np.float32(127)).squeeze(-1)}
        inv = np.where(amax > 0, np.float32(1) / amax, np.float32(0))
        unit = np.multiply(groups, inv, out=work)
    return {name: unit.reshape(rows.shape), f"{name}_scale": amax.squeeze(-1)}


def decode(spec: dict[str, Any], name: str, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Rows of logical array ``name`` as float32 (int64 for ids) from its stored parts.

    NumPy, single-threaded per call: a scan decodes several chunks at once on its reader threads,
    which torch's own intra-op threads would only contend with.
    """
    values = parts[name]
    encoding = spec["encoding"]
    if "codec" in spec or encoding == "int8":  # codes (or a chunk codec's unit values) times scales
        scale = np.asarray(parts[f"{name}_scale"], dtype=np.float32)
        lead = spec["scale_axes"]
        groups = values.reshape(*values.shape[: lead + 1], -1)
        return np.multiply(groups, scale[..., None], dtype=np.float32).reshape(values.shape)
    if encoding == "bfloat16-bits":  # bfloat16 is the top half of a float32
        return (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if encoding == "float16":
        return values.astype(np.float32)
    return values


TABLE = "_table"


@dataclass(frozen=True)
class ChunkCodec:
    """Codes of ``bits`` bits whose bins are fitted on each chunk (MISTIQUE's k-bit quantiles).

    The writer hands it a whole chunk of values already divided by their group's max magnitude, so
    they lie in ``[-1, 1]``. Bin edges start at the chunk's quantiles (at ``quantiles``) and take a few
    Lloyd-Max steps; each value is replaced by its bin's code, and the chunk's table holds each bin's
    mean, the value it decodes to.
    ``threshold:q`` is the one-bit case with the single edge at quantile ``q``: it keeps which side
    of the chunk's threshold a number lies on, and the mean of each side.

    Codes are bit-packed per row, so a row of ``M`` numbers takes ``ceil(M·bits/8)`` bytes.
    """

    bits: int
    quantiles: tuple[float, ...]
    row_shape: tuple[int, ...]
    refine: bool = True  # Lloyd-Max steps after the quantiles (k-bit); a threshold stays where asked

    @classmethod
    def for_precision(cls, precision: str, row_shape: list[int]) -> ChunkCodec:
        if precision.startswith("kbit:"):
            bits = int(precision[5:])
            return cls(bits, tuple(k / 2**bits for k in range(1, 2**bits)), tuple(row_shape))
        q = float(precision[10:]) if ":" in precision else 0.5
        return cls(1, (q,), tuple(row_shape), refine=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChunkCodec:
        return cls(
            int(data["bits"]),
            tuple(data["quantiles"]),
            tuple(data["row_shape"]),
            bool(data.get("refine", True)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "quantiles": list(self.quantiles),
            "row_shape": list(self.row_shape),
            "refine": self.refine,
        }

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def numbers(self) -> int:
        return math.prod(self.row_shape)

    @property
    def code_shape(self) -> tuple[int]:
        return (math.ceil(self.numbers * self.bits / 8),)

    def encode(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(packed codes (rows, *code_shape), table (levels,))`` of a chunk of unit values.

        All-zero rows (deduplicated references, zero gradients) have scale 0, so any code decodes
        them to zeros: they get code 0, keeping their bytes zero as reference rows and unwritten
        chunks need, and are left out of the fit, which is for the rows that hold data.
        """
        values = np.ascontiguousarray(block, dtype=np.float32).reshape(len(block), -1)
        live = values.any(axis=1)
        flat = values[live].reshape(-1)
        sample = flat
        if flat.size > FIT_SAMPLES:  # a seeded random subset: a stride could hit one column of every row
            sample = flat[np.random.default_rng(flat.size).integers(0, flat.size, FIT_SAMPLES)]
        edges = np.quantile(sample, self.quantiles) if sample.size else np.zeros(0)
        if self.refine and sample.size:
            edges = _refine(sample, edges)
        edges = edges.astype(np.float32)
        # Bin k holds (edge[k-1], edge[k]]: a value repeated across several quantiles (every row's
        # max, at ±1) gets a bin of its own instead of sharing one with the values above it.
        codes = np.searchsorted(edges, values, side="left").astype(np.uint8)
        codes[~live] = 0
        counts = np.bincount(codes[live].reshape(-1), minlength=self.levels)
        sums = np.bincount(codes[live].reshape(-1), weights=flat, minlength=self.levels)
        table = (sums / np.maximum(counts, 1)).astype(np.float32)  # an empty bin is never decoded
        return _pack(codes, self.bits), table

    def decode(self, packed: np.ndarray, tables: np.ndarray) -> np.ndarray:
        """Unit values of rows from their packed codes and each row's chunk table ``(rows, levels)``."""
        codes = _unpack(packed, self.bits, self.numbers)
        return np.take_along_axis(tables, codes.astype(np.int64), axis=1).reshape(
            len(packed), *self.row_shape
        )


def _refine(sample: np.ndarray, edges: np.ndarray, steps: int = LLOYD_STEPS) -> np.ndarray:
    """Lloyd-Max steps from quantile edges: each edge moves to the midpoint of its bins' means.

    Quantile bins alone can pool far-apart values (a tenth of the chunk at -1 and the smallest
    positives in one bin when there are four bins); each step lowers the squared error.
    """
    for _ in range(steps):
        codes = np.searchsorted(edges, sample, side="left")
        counts = np.bincount(codes, minlength=len(edges) + 1)
        sums = np.bincount(codes, weights=sample, minlength=len(edges) + 1)
        means = sums[counts > 0] / counts[counts > 0]
        edges = (means[:-1] + means[1:]) / 2
    return edges.astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes
    planes = np.unpackbits(codes[..., None], axis=-1)[..., 8 - bits :]  # (rows, M, bits), MSB first
    return np.packbits(planes.reshape(len(codes), -1), axis=-1)


def _unpack(packed: np.ndarray, bits: int, numbers: int) -> np.ndarray:
    if bits == 8:
        return packed
    planes = np.unpackbits(packed, axis=-1, count=numbers * bits).reshape(len(packed), numbers, bits)
    return np.packbits(planes, axis=-1, bitorder="big").reshape(len(packed), numbers) >> (8 - bits)


REF = "_ref"  # suffix of a deduplicated array's references: (epoch, rank, row) of each row's source


@dataclass(frozen=True)
class StoredArray:
    """One Zarr array a layer stores, as its arrays' specs say.

    Attributes:
        name: the array's name under the layer's group (``a``, ``a_scale``, ``a_table``, ``a_ref``).
        owner: the logical array it belongs to (``a``).
        role: ``"part"`` (rows of values, codes or scales), ``"table"`` (one row per chunk: a chunk
            codec's bin means) or ``"ref"`` (the rows' dedup references).
        dtype: its stored dtype.
        row_shape: the shape of one row.
        dedup: whether rows of the owner may be references, so a chunk of all references is absent.
    """

    name: str
    owner: str
    role: str
    dtype: str
    row_shape: tuple[int, ...]
    dedup: bool = False


def stored_arrays(arrays: dict[str, dict[str, Any]]) -> list[StoredArray]:
    """Every Zarr array that a layer with these logical ``arrays`` (``{name: array_spec}``) stores:
    the one place that says so for the writer, the reader, ``verify`` and the recompute cost model.

    Example:
        >>> [s.name for s in stored_arrays({"a": {**array_spec("a", [70], "int8"), "dedup": True}})]
        ['a', 'a_scale', 'a_ref']
    """
    out = []
    for owner, spec in arrays.items():
        dedup = bool(spec.get("dedup"))
        for part, info in spec["parts"].items():
            per_row = info.get("per", "row") == "row"
            out.append(
                StoredArray(
                    part,
                    owner,
                    "part" if per_row else "table",
                    info["dtype"],
                    tuple(info["row_shape"]),
                    dedup and per_row,
                )
            )
        if dedup:
            out.append(StoredArray(f"{owner}{REF}", owner, "ref", "int32", (3,), True))
    return out
