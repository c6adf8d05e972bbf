"""Quantized storage: round-trip error bounds, and the bounds on restored gradients, norms and dot."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import EXACT, Reference, Task, loader, trainer
from mstore_lightning import GradientCapture, open_store
from mstore_lightning.core import quant, tensor_codes

SETTINGS = settings(max_examples=60, deadline=None)


def round_trip(spec: dict, x: torch.Tensor) -> torch.Tensor:
    parts = quant.split_rows(spec, tensor_codes.encode_rows(spec, x).data.numpy())
    assert set(parts) == set(spec["parts"])
    for k, v in parts.items():
        assert (
            list(v.shape[1:]) == spec["parts"][k]["row_shape"] and str(v.dtype) == spec["parts"][k]["dtype"]
        )
    return tensor_codes.decode(spec, "a", parts)


def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits, rounding to nearest even (finite values)."""
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).view(np.int16)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    n=st.integers(0, 6),
    precision=st.sampled_from(
        ["fp32", "fp16", "bf16", "int8", "kbit:1", "kbit:3", "kbit:8", "threshold:0.3"]
    ),
    exponent=st.integers(-60, 60),
    special=st.sampled_from([None, "zero", "nan", "inf", "tie"]),
    seed=st.integers(0, 2**31),
)
def test_codes_made_in_the_step_equal_the_numpy_reference_bit_for_bit(
    shape, n, precision, exponent, special, seed
):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent
    if special == "tie" and n:  # halfway between codes: both round half to even
        x[0] = torch.arange(x[0].numel()).reshape(x[0].shape) % 254 - 127 + 0.5
        x[0].view(-1)[0] = 127.0
    elif special and n:
        x[0].view(-1)[0] = {"zero": 0.0, "nan": float("nan"), "inf": float("inf")}[special]
        if special == "zero":
            x[0] = 0.0
    spec = quant.array_spec("a", shape, precision)
    encoded = tensor_codes.encode_rows(spec, x)
    handed = encoded.data
    assert handed.dtype == torch.from_numpy(np.empty(0, quant.buffer_dtype(spec))).dtype
    assert handed.shape[1:].numel() * handed.element_size() == quant.buffered_nbytes(spec)
    got = quant.split_rows(spec, handed.numpy())
    values = x.numpy()
    if precision in ("fp32", "fp16"):
        with np.errstate(over="ignore"):  # past fp16's range: Inf in both
            ref = {"a": values.astype(spec["dtype"])}
    elif precision == "bf16":
        ref = {"a": bfloat16_bits(values)}
    else:
        ref = quant.encode(spec, "a", values)
    assert set(got) == set(ref)
    finite = np.isfinite(values).reshape(n, math.prod(shape)).all(axis=1)
    flags = encoded.nonfinite()
    if precision in ("fp32", "fp16", "bf16"):
        assert flags is None
    else:  # the group maxima flag exactly the rows holding NaN or Inf
        assert flags.tolist() == (~finite).tolist()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape
        if k.endswith("_scale"):  # a non-finite row keeps a non-finite scale in both
            np.testing.assert_array_equal(got[k], ref[k])
        elif precision == "bf16":
            assert np.array_equal(got[k][finite], ref[k][finite])
        else:  # the codes of a non-finite row are never read: its scale reads it back non-finite
            assert np.array_equal(got[k][finite].view(np.uint8), ref[k][finite].view(np.uint8))


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    n=st.integers(1, 4),
    exponent=st.integers(-30, 30),
    heavy_tailed=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_int8_error_is_within_half_a_step_and_crest_factor_bound(shape, n, exponent, heavy_tailed, seed):
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed)) * 2.0**exponent
    if heavy_tailed:
        x = x**3
    spec = quant.array_spec("a", shape, "int8")
    lead = spec["scale_axes"]
    assert math.prod(shape[lead:]) >= quant.GROUP_MIN or lead == 0
    groups = x.reshape(n, *shape[:lead], -1).double()
    err = round_trip(spec, x).double().reshape(groups.shape) - groups
    amax = groups.abs().amax(-1)
    slack = 1 + 1e-4  # float32 arithmetic in encode and decode
    assert (err.abs().amax(-1) <= amax / 254 * slack).all()
    norm = groups.norm(dim=-1)
    kappa = amax / (norm / math.sqrt(groups.shape[-1]))
    live = norm > 0
    assert (err.norm(dim=-1)[live] <= (kappa / 254 * norm * slack)[live]).all()


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 20), min_size=1, max_size=3),
    precision=st.sampled_from(["fp32", "fp16", "bf16"]),
    seed=st.integers(0, 2**31),
)
def test_float_precisions_round_to_nearest(shape, precision, seed):
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    bits, subnormal_step = {"fp32": (24, 2.0**-149), "fp16": (11, 2.0**-24), "bf16": (8, 2.0**-133)}[
        precision
    ]
    got = round_trip(quant.array_spec("a", shape, precision), x)
    assert ((got - x).abs() <= torch.clamp_min(x.abs() * 2.0**-bits, subnormal_step / 2)).all()


def test_ids_are_kept_exactly_whatever_the_precision():
    spec = quant.array_spec("a", [1, 5], "int8", index=True)
    ids = torch.randint(0, 2**40, (3, 1, 5))
    assert spec["encoding"] == "int64" and torch.equal(round_trip(spec, ids), ids)


class ConvSeqNet(nn.Module):
    """A conv layer, a linear layer over sequence positions, and two plain linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.seq = nn.Linear(64, 96)  # applied to 32 positions (channels) of 64 pixels
        self.fc1 = nn.Linear(96, 80)
        self.fc2 = nn.Linear(80, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(2)  # (n, 32, 64)
        h = torch.relu(self.seq(h)).mean(1)
        return self.fc2(torch.relu(self.fc1(h)))


LOSSY = ["int8", "kbit:2", "kbit:4", "kbit:8", "threshold"]


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory):
    """One training run captured losslessly and at every lossy precision, with the torch.func reference."""
    path = tmp_path_factory.mktemp("quant")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 16, 8, 8, generator=g), torch.randint(0, 5, (48,), generator=g)
    ref = Reference()
    names = ["fp32", *LOSSY]
    # small chunks: several chunk tables per array. Factors everywhere: routing by measured cost could
    # store a layer as full gradients in one precision's store and as factors in another's, and the
    # precisions' accuracies would then not be compared on the same arrays.
    caps = [
        GradientCapture(
            path / f"{p}.zarr", policy={"precision": p, "representation": "factors"}, chunk_bytes=32 << 10
        )
        for p in names
    ]
    trainer([ref, *caps], max_epochs=2).fit(Task(ConvSeqNet()), loader(x, y, batch_size=16))
    return {p: open_store(path / f"{p}.zarr") for p in names}, ref


@pytest.fixture(scope="module")
def int8_run(quant_run):
    stores, ref = quant_run
    return stores["fp32"], stores["int8"], ref


def median_cosines(store, ref, epoch: int) -> dict[str, float]:
    ids = store.sample_ids(epoch).tolist()
    out = {}
    for layer in store.layers:
        got = torch.cat([g.flatten(1) for g in store.restore(epoch, layer, ids).values()], 1)
        want = torch.cat([ref.stacked(epoch, ids, f"{layer}.{p}").flatten(1) for p in ("weight", "bias")], 1)
        out[layer] = float(torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=1).median())
    return out


def test_int8_is_the_default_and_is_recorded():
    assert GradientCapture("unused.zarr").policy.precision == "int8"


def test_int8_restored_gradients_have_median_cosine_at_least_0999(int8_run):
    _, store, ref = int8_run
    for epoch in store.epochs:
        for layer, cos in median_cosines(store, ref, epoch).items():
            spec = store.layer_spec(layer)
            assert spec["representation"] == "factors" and spec["arrays"]["d"]["encoding"] == "int8"
            assert cos >= 0.999, (layer, cos)


def test_kbit_accuracy_grows_with_bits_and_threshold_keeps_one_bit(quant_run):
    stores, ref = quant_run
    for epoch in (0, 1):
        cos = {p: median_cosines(stores[p], ref, epoch) for p in LOSSY}
        for layer in stores["int8"].layers:
            assert cos["kbit:2"][layer] < cos["kbit:4"][layer] < cos["kbit:8"][layer]
            assert cos["kbit:8"][layer] >= 0.999 and cos["kbit:4"][layer] >= 0.95
            assert cos["threshold"][layer] > 0.2  # a sketch, not a gradient: positively aligned only
    spec = stores["threshold"].layer_spec("net.conv")["arrays"]["a"]
    assert spec["encoding"] == "threshold" and spec["codec"]["bits"] == 1
    # a row lies in one chunk, so its numbers, divided by their channel's scale, take two values
    values = stores["threshold"].factors(0, "net.conv", [0])["a"]
    scale = zarr_scale(stores["threshold"], "net.conv", "a")
    levels = torch.unique((values.reshape(16, -1) / torch.from_numpy(scale).reshape(16, 1)).round(decimals=5))
    assert len(levels) <= 2


def zarr_scale(store, layer: str, name: str) -> np.ndarray:
    import zarr

    group = zarr.open_group(store.uri, mode="r")
    return group[f"epochs/00000/r0/layers/{layer}/{name}_scale"][
        int(np.nonzero(store.sample_ids(0) == 0)[0][0])
    ]


@SETTINGS
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), numbers=st.integers(1, 50), seed=st.integers(0, 2**31))
def test_kbit_codes_pack_and_decode_to_their_bin_means(bits, rows, numbers, seed):
    codec = quant.ChunkCodec.for_precision(f"kbit:{bits}", [numbers])
    unit = torch.rand(rows, numbers, generator=torch.Generator().manual_seed(seed)).numpy() * 2 - 1
    packed, table = codec.encode(unit)
    assert packed.shape == (rows, math.ceil(numbers * bits / 8)) and table.shape == (2**bits,)
    codes = quant._unpack(packed, bits, numbers)
    assert (codes < 2**bits).all()
    np.testing.assert_array_equal(quant._unpack(quant._pack(codes, bits), bits, numbers), codes)
    got = codec.decode(packed, np.broadcast_to(table, (rows, 2**bits)))
    for code in np.unique(codes):  # each value decodes to the mean of its bin, which lies inside the bin
        members = unit[codes == code]
        np.testing.assert_allclose(got[codes == code], members.mean(), rtol=1e-5, atol=1e-6)
    order = np.argsort(unit.reshape(-1), kind="stable")  # bins are intervals: codes grow with the value
    assert (np.diff(codes.reshape(-1)[order].astype(int)) >= 0).all()


@SETTINGS
@given(bits=st.integers(1, 8), rows=st.integers(2, 9), numbers=st.integers(1, 20), seed=st.integers(0, 2**31))
def test_kbit_zero_rows_code_to_zero_bytes_beside_rows_of_data(bits, rows, numbers, seed):
    """A deduplicated reference is a row of zeros (scale 0); mixed into a chunk of data, its codes
    must stay zero bytes, which ``verify`` reads as "no data of its own"."""
    codec = quant.ChunkCodec.for_precision(f"kbit:{bits}", [numbers])
    gen = torch.Generator().manual_seed(seed)
    unit = torch.rand(rows, numbers, generator=gen).numpy() * 2 - 1
    zero = torch.rand(rows, generator=gen).numpy() < 0.5
    zero[0], zero[-1] = True, False
    unit[zero] = 0.0
    packed, table = codec.encode(unit)
    assert not packed[zero].any()
    assert packed[~zero].shape[0] == (~zero).sum()
    got = codec.decode(packed, np.broadcast_to(table, (rows, 2**bits)))
    codes = quant._unpack(packed, bits, numbers)
    data, data_codes = unit[~zero], codes[~zero]
    for code in np.unique(data_codes):  # rows of data decode to the means of their bins, zeros left out
        np.testing.assert_allclose(
            got[~zero][data_codes == code], data[data_codes == code].mean(), rtol=1e-5, atol=1e-6
        )


def crest_error(x: torch.Tensor, spec: dict) -> torch.Tensor:
    """The int8 relative-error bound ``κ/254`` of each row (one group per row here)."""
    flat = x.flatten(1).double()
    assert spec["scale_axes"] <= 1 and x.shape[1] == 1  # one use: one group per row
    rms = flat.norm(dim=1) / math.sqrt(flat.shape[1])
    return flat.abs().amax(1) / rms.clamp_min(1e-300) / 254


def test_int8_linear_gradients_norms_and_dot_stay_within_the_documented_bounds(int8_run):
    exact, store, ref = int8_run
    for epoch in store.epochs:
        ids = store.sample_ids(epoch).tolist()
        for layer in ("net.fc1", "net.fc2"):
            f = exact.factors(epoch, layer, ids)
            spec = store.layer_spec(layer)["arrays"]
            ea, ed = crest_error(f["a"], spec["a"]), crest_error(f["d"], spec["d"])
            eps = ea + ed + ea * ed
            got = torch.cat([g.flatten(1) for g in store.restore(epoch, layer, ids).values()], 1).double()
            want = torch.cat(
                [ref.stacked(epoch, ids, f"{layer}.{p}").flatten(1) for p in ("weight", "bias")], 1
            )
            want = want.double()
            norm = want.norm(dim=1)
            slack = 1e-5 * norm  # float32 rounding of the reference itself
            assert ((got - want).norm(dim=1) <= eps * norm + slack).all()
            norms = torch.from_numpy(store.norms(epoch, layers=[layer]))
            assert ((norms - norm).abs() <= eps * norm + slack).all()
            dot = torch.from_numpy(store.dot(epoch, ids, ids, layers=[layer]))
            got_norm = got.norm(dim=1)
            bound = (
                eps[:, None] * norm[:, None] * got_norm[None, :]
                + eps[None, :] * norm[None, :] * norm[:, None]
            )
            assert ((dot - want @ want.T).abs() <= bound + 1e-5 * norm[:, None] * norm[None, :]).all()


def test_int8_store_is_smaller_than_fp32(int8_run):
    exact, store, _ = int8_run
    for layer in ("net.conv", "net.seq", "net.fc1"):  # net.fc2's few bytes are mostly array metadata
        assert store.nbytes_stored(layer=layer) < 0.5 * exact.nbytes_stored(layer=layer)


def test_layer_precision_overrides_the_policy_precision_per_layer(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 16, 8, 8), torch.randint(0, 5, (16,))
    policy = {"precision": "int8", "layer_precision": {"net.fc2": "fp32", "*seq": "kbit:4"}}
    trainer([GradientCapture(tmp_path / "s.zarr", policy=policy)]).fit(Task(ConvSeqNet()), loader(x, y))
    store = open_store(tmp_path / "s.zarr")
    # Every array of a layer, whichever exact form ("auto" routes by measured cost) stores it.
    encodings = {
        layer: {spec["encoding"] for spec in store.layer_spec(layer)["arrays"].values()} for layer in store.layers
    }
    assert encodings == {"net.conv": {"int8"}, "net.seq": {"kbit:4"}, "net.fc1": {"int8"}, "net.fc2": {"float32"}}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_a_value_repeated_across_quantiles_keeps_a_bin_of_its_own(bits):
    # Every row's largest number is exactly -1 after scaling: 10% of the chunk sits on one value.
    rng = np.random.default_rng(0)
    unit = rng.random((512, 10)).astype(np.float32) * 0.2
    unit[np.arange(512), rng.integers(0, 10, 512)] = -1.0
    codec = quant.ChunkCodec.for_precision(f"kbit:{bits}", [10])
    packed, table = codec.encode(unit)
    got = codec.decode(packed, np.broadcast_to(table, (512, 2**bits)))
    np.testing.assert_array_equal(got[unit == -1], -1.0)
    assert (got[unit > 0] >= 0).all()


@pytest.mark.parametrize("precision", ["int8", "kbit:4"])
def test_large_batches_take_the_two_pass_maximum_and_stay_bit_exact(precision):
    shape = [8, 4096]  # 8 x 4,096 numbers a row: past SPLIT_MAX_NUMBERS with 16 rows
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    assert x.numel() >= tensor_codes.SPLIT_MAX_NUMBERS
    x[2] = 0.0
    x[3, 1, 7], x[4, 0, 0], x[5, 7, 4095] = float("nan"), float("inf"), -float("inf")
    spec = quant.array_spec("a", shape, precision)
    encoded = tensor_codes.encode_rows(spec, x)
    got, ref = quant.split_rows(spec, encoded.data.numpy()), quant.encode(spec, "a", x.numpy())
    finite = [i for i in range(16) if i not in (3, 4, 5)]
    for k in ref:
        assert np.array_equal(got[k][finite].view(np.uint8), ref[k][finite].view(np.uint8))
    assert not encoded.data[2].any()  # a zero row is zero bytes: +0 scales, not -0
    assert encoded.nonfinite().nonzero().flatten().tolist() == [3, 4, 5]
