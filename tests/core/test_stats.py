"""The statistics engine against a naive NumPy reference (issue 2, item 1).

The reference is written the obvious way, in float64 over the finite entries of the float32 values; the
engine (``tensor_stats`` on the device, ``finalize`` on the host) must agree with it for any shape, dtype,
layout and mix of NaN / ±Inf.
"""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st_

import stethoscope.stats as stats_mod
from stethoscope.stats import RAW_WIDTH, STAT_COLUMNS, Scratch, finalize, is_summarisable, tensor_stats

EPS = 1e-8
SAT = 3.0


@pytest.fixture(autouse=True, params=["host", "device"])
def road(request, monkeypatch):
    """Every test runs on both roads: the CPU one that reads sums back, and the one accelerators take."""
    if request.param == "device":
        monkeypatch.setattr(stats_mod, "reads_host", lambda device: False)
    return request.param


def engine(t: torch.Tensor, eps: float = EPS, sat: float = SAT, features: bool = True,
           chunk: int | None = None) -> dict:
    """Published statistics of ``t``; ``chunk`` forces chunks of about that many elements (merged rows)."""
    row = tensor_stats(t, eps, sat, features=features, scratch=Scratch(chunk) if chunk else None)
    assert row.shape == (RAW_WIDTH,) and row.dtype == torch.float32
    feats = t.shape[-1] if (features and t.dim() >= 2) else 0
    return finalize(row.numpy(), t.numel(), feats).as_dict()


def reference(values: np.ndarray, eps: float = EPS, sat: float = SAT, features: bool = True) -> dict:
    """Statistics of ``values`` (float32 or complex64, any shape) computed the naive way."""
    v = np.abs(values) if np.iscomplexobj(values) else values
    v = np.asarray(v, dtype=np.float32)
    flat = v.reshape(-1)
    finite = flat[np.isfinite(flat)]
    count = flat.size
    out = {"count": count, "nonfinite": count - finite.size}
    nf = v.shape[-1] if (features and v.ndim >= 2) else 0
    out["features"] = nf
    if finite.size == 0:
        for k in ("mean", "std", "min", "max", "absmax", "norm", "zero_fraction", "saturation_fraction"):
            out[k] = math.nan
        out["dead_features"] = math.nan
        return out
    f64 = finite.astype(np.float64)
    mag32 = np.abs(finite)  # comparisons happen in float32, like the engine's
    out["mean"] = f64.mean()
    out["std"] = f64.std(ddof=1) if finite.size > 1 else 0.0
    out["min"], out["max"] = f64.min(), f64.max()
    out["absmax"] = np.abs(f64).max()
    out["norm"] = math.sqrt(float(np.sum(f64 * f64)))
    out["zero_fraction"] = np.mean(mag32 <= np.float32(eps))
    out["saturation_fraction"] = np.mean(mag32 > np.float32(sat))
    if nf:
        mag = np.where(np.isfinite(v), np.abs(v), 0.0).reshape(-1, nf)  # non-finite entries never "live"
        out["dead_features"] = float(np.sum(np.all(mag <= np.float32(eps), axis=0)))
    else:
        out["dead_features"] = math.nan
    return out


def assert_matches(got: dict, ref: dict, rtol: float = 2e-5) -> None:
    assert set(got) == set(STAT_COLUMNS)
    for key in ("count", "nonfinite", "features"):
        assert got[key] == ref[key], key
    scale = ref["absmax"] if ref["absmax"] == ref["absmax"] else 1.0
    for key in ("mean", "std", "norm"):
        g, r = got[key], ref[key]
        if math.isnan(r):
            assert math.isnan(g), (key, g)
            continue
        # float32 accumulation: error relative to the magnitudes summed, not to a cancelling result
        tol = rtol * abs(r) + 1e-6 * scale + 1e-30
        assert abs(g - r) <= tol, (key, g, r)
    for key in ("min", "max", "absmax", "zero_fraction", "saturation_fraction", "dead_features"):
        g, r = got[key], ref[key]
        if isinstance(r, float) and math.isnan(r):
            assert math.isnan(g), (key, g)
        else:
            assert g == pytest.approx(r, rel=1e-6, abs=1e-12), (key, g, r)


# ---------------------------------------------------------------- property tests
# the `road` fixture is parametrized, not per example: hypothesis may reuse it across examples
_SETTINGS = dict(derandomize=True, database=None, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
_special = st_.sampled_from([0.0, -0.0, EPS, -EPS, SAT, -SAT, 1.0, math.nan, math.inf, -math.inf])
_finite = st_.floats(-1e4, 1e4, width=32)
_elements = st_.one_of(_finite, _finite, _finite, _special)


@settings(max_examples=150, **_SETTINGS)
@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7), elements=_elements
    )
)
def test_matches_reference_any_shape_with_nonfinite(values):
    got = engine(torch.from_numpy(values.copy()))
    assert_matches(got, reference(values))


@settings(max_examples=80, **_SETTINGS)
@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7), elements=_elements
    ),
    st_.booleans(),
)
def test_eps_zero_counts_exact_zeros_only(values, features):
    # gradients: only exact zeros (either sign) count, and no |x| pass is needed for that on the host road
    got = engine(torch.from_numpy(values.copy()), eps=0.0, features=features)
    assert_matches(got, reference(values, eps=0.0, features=features))


@settings(max_examples=80, **_SETTINGS)
@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9), elements=_elements
    ),
    st_.sampled_from([1, 5, 16, 40]),
)
def test_chunked_tensors_merge_to_the_reference(values, chunk):
    # tensors longer than a chunk are summarised per chunk (whole rows each) and the rows merged: some
    # chunks all finite, some with NaN / Inf, some with none finite
    got = engine(torch.from_numpy(values.copy()), chunk=chunk)
    assert_matches(got, reference(values))


@settings(max_examples=60, **_SETTINGS)
@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=6), elements=_finite
    ),
    st_.sampled_from(["transpose", "step", "flip_last", "expand"]),
)
def test_matches_reference_on_non_contiguous_views(values, layout):
    base = torch.from_numpy(values.copy())
    if layout == "transpose":
        view = base.transpose(0, -1)
    elif layout == "step":
        view = base[::2, ..., ::2]
    elif layout == "flip_last":
        view = base.flip(-1)[..., 1:]
    else:
        view = base[:1].expand(3, *base.shape[1:])
    got = engine(view)
    assert_matches(got, reference(view.numpy()))
    assert torch.equal(base, torch.from_numpy(values)), "the engine must not modify its input"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@settings(max_examples=40, **_SETTINGS)
@given(
    values=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
        elements=st_.one_of(st_.floats(-60000, 60000, width=32), _special),
    )
)
def test_half_and_double_inputs_match_the_upcast_values(dtype, values):
    t = torch.from_numpy(values.copy()).to(dtype)
    got = engine(t)
    # reference on the values the tensor really holds, upcast to float32
    assert_matches(got, reference(t.to(torch.float32).numpy()))


# ---------------------------------------------------------------- explicit cases
def test_empty_tensor_gives_count_zero_and_nan_statistics():
    for shape in [(0,), (3, 0), (0, 5)]:
        got = engine(torch.empty(shape))
        assert got["count"] == 0 and got["nonfinite"] == 0
        for key in ("mean", "std", "min", "max", "absmax", "norm", "zero_fraction", "saturation_fraction"):
            assert math.isnan(got[key]), key


def test_zero_dim_tensor():
    got = engine(torch.tensor(-2.5))
    assert got["count"] == 1 and got["mean"] == -2.5 and got["min"] == got["max"] == -2.5
    assert got["absmax"] == 2.5 and got["norm"] == 2.5 and got["std"] == 0.0
    assert math.isnan(got["dead_features"]) and got["features"] == 0


def test_all_nan_and_all_inf():
    for fill in (math.nan, math.inf, -math.inf):
        got = engine(torch.full((4, 3), fill))
        assert got["count"] == 12 and got["nonfinite"] == 12
        assert all(math.isnan(got[k]) for k in ("mean", "std", "min", "max", "absmax", "norm"))


def test_positive_values_and_a_nan_min_is_the_finite_min_not_zero():
    t = torch.tensor([[2.0, 5.0, math.nan], [3.0, math.inf, 7.0]])
    got = engine(t)
    assert got["min"] == 2.0 and got["max"] == 7.0 and got["absmax"] == 7.0
    assert got["nonfinite"] == 2 and got["count"] == 6
    assert got["mean"] == pytest.approx(17 / 4) and got["zero_fraction"] == 0.0
    neg = engine(-t)
    assert neg["max"] == -2.0 and neg["min"] == -7.0


def test_large_mean_small_spread_keeps_the_std_accurate():
    g = torch.Generator().manual_seed(0)
    for n in (1000, 200_000):
        t = (1e4 + 1e-2 * torch.randn(n, generator=g)).to(torch.float32)
        ref = t.double().numpy()
        got = engine(t, features=False)
        assert got["std"] == pytest.approx(ref.std(ddof=1), rel=1e-3)
        assert got["mean"] == pytest.approx(ref.mean(), rel=1e-7)
        assert got["norm"] == pytest.approx(float(np.linalg.norm(ref)), rel=1e-6)


def test_boundaries_eps_is_zero_and_saturation_bound_is_not_saturated():
    eps, sat = 2.0**-10, 2.0  # exactly representable in every float type used
    t = torch.tensor([eps, -eps, eps * 1.001, 0.0, sat, -sat, sat * 1.001, -sat * 1.001])
    got = engine(t, eps=eps, sat=sat, features=False)
    assert got["zero_fraction"] == 3 / 8  # eps, -eps, 0 (|x| <= eps)
    assert got["saturation_fraction"] == 2 / 8  # only the ones strictly above the bound
    # the default eps: the float32 value nearest 1e-8 counts as zero
    got = engine(torch.tensor([1e-8, -1e-8, 2e-8]), eps=1e-8, features=False)
    assert got["zero_fraction"] == pytest.approx(2 / 3)


def test_zero_and_saturation_fractions_are_of_finite_entries():
    t = torch.tensor([0.0, 5.0, math.nan, math.nan])
    got = engine(t, features=False)
    assert got["zero_fraction"] == 0.5 and got["saturation_fraction"] == 0.5


def test_dead_features_over_rows():
    t = torch.randn(5, 6)
    t[:, 1] = 0.0
    t[:, 4] = 1e-9
    t[2, 4] = math.nan  # a NaN does not make a feature alive
    got = engine(t)
    assert got["dead_features"] == 2 and got["features"] == 6
    # 3-D: rows are all leading positions
    u = torch.randn(2, 3, 4)
    u[..., 0] = 0
    u[1, 2, 0] = 0.5
    u[..., 3] = 0
    assert engine(u)["dead_features"] == 1
    # features off, or 1-D: not counted
    assert math.isnan(engine(t, features=False)["dead_features"])
    assert math.isnan(engine(torch.zeros(4))["dead_features"])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_is_summarised_by_its_magnitude(dtype):
    g = torch.Generator().manual_seed(3)
    z = torch.complex(torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)).to(dtype)
    z[0, 0] = 0
    got = engine(z)
    assert_matches(got, reference(z.abs().to(torch.float32).numpy()))
    assert got["min"] >= 0.0


def test_integer_bool_and_meta_tensors_are_not_summarisable():
    assert is_summarisable(torch.ones(2)) and is_summarisable(torch.ones(2, dtype=torch.complex64))
    assert is_summarisable(torch.ones(2, dtype=torch.bfloat16))
    for t in (
        torch.ones(2, dtype=torch.int64),
        torch.ones(2, dtype=torch.bool),
        torch.empty(2, device="meta"),
    ):
        assert not is_summarisable(t)
    assert not is_summarisable(3.0) and not is_summarisable(None)


def test_input_is_never_modified_and_autograd_is_not_touched():
    x = torch.tensor([[1.0, math.nan], [math.inf, -4.0]], requires_grad=True)
    before = x.detach().clone()
    row = tensor_stats(x, features=True)
    assert not row.requires_grad
    assert torch.equal(torch.isnan(x.detach()), torch.isnan(before))
    assert torch.equal(torch.nan_to_num(x.detach()), torch.nan_to_num(before))


def test_finalize_single_finite_entry_has_zero_std():
    # ddof=1 is undefined for one value; the engine reports 0.0 (documented choice), not NaN
    got = engine(torch.tensor([math.nan, 4.0, math.inf]), features=False)
    assert got["std"] == 0.0 and got["mean"] == 4.0 and got["nonfinite"] == 2


@pytest.mark.parametrize("scale", [1e20, 1e35, 1e-25, 1e-40])
def test_extreme_magnitudes_keep_std_and_norm(scale):
    # squares of |x| > ~1.8e19 overflow float32 and those of |x| < ~1e-19 underflow: the deviations are
    # scaled by a power of two first, so std and norm stay right at any finite magnitude (subnormals too)
    t = torch.tensor([1.0, -1.0, 3.0, 0.5, 0.0]) * scale
    got = engine(t, features=False)
    ref = reference(t.numpy(), features=False)
    assert math.isfinite(got["std"]) and got["std"] == pytest.approx(ref["std"], rel=1e-5)
    assert math.isfinite(got["norm"]) and got["norm"] == pytest.approx(ref["norm"], rel=1e-5)
    assert got["mean"] == pytest.approx(ref["mean"], rel=1e-5)
    # and merged over chunks
    big = t.repeat(7)
    got = engine(big, features=False, chunk=4)
    ref = reference(big.numpy(), features=False)
    assert got["std"] == pytest.approx(ref["std"], rel=1e-5) and got["norm"] == pytest.approx(ref["norm"], rel=1e-5)


def test_dead_features_with_row_blocks_per_thread_match_the_plain_reduction():
    # on CPU with several threads the per-feature max is reduced per block of rows first (a speed path)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(5)
        t = torch.randn(64, 10, generator=g)
        t[:, 3] = 0.0
        t[:, 7] = 1e-9
        t[5, 7] = math.inf  # ignored, like every non-finite entry
        feats: list[torch.Tensor] = []
        row = tensor_stats(t, features=True, feature_absmax=feats)
        expected = torch.nan_to_num(t, posinf=0.0).abs().amax(0)
        assert torch.equal(feats[0], expected)
        assert finalize(row.numpy(), t.numel(), 10).dead_features == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["gelu", "relu", "offset", "dominant_mean"])
def test_large_tensors_over_several_chunks_keep_float64_accuracy(kind):
    # the CPU road takes the one-pass spread when the mean is small beside the rms (gelu, relu, offset
    # 0.7 rms) and centres otherwise; both, over several chunks, stay within 1e-5 of float64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 1536, generator=g)
    t = {"gelu": torch.nn.functional.gelu(x), "relu": torch.relu(x), "offset": x + 1.0,
         "dominant_mean": x * 0.01 + 100.0}[kind]
    got = engine(t)
    r = t.double().numpy().ravel()
    assert got["std"] == pytest.approx(r.std(ddof=1), rel=1e-5)
    assert got["norm"] == pytest.approx(float(np.linalg.norm(r)), rel=1e-5)
    assert got["mean"] == pytest.approx(r.mean(), rel=1e-7, abs=1e-6 * r.std())
    assert got["zero_fraction"] == pytest.approx(float(np.mean(np.abs(t.numpy()) <= np.float32(EPS))))


def test_entries_at_the_zero_and_saturation_bounds_from_either_side():
    # the host road decides "no entry near zero" from the squares' minimum and counts one-sided saturation
    # on x itself: entries one float32 step either side of eps and of the bound, and squares that fall
    # below float32's normal range, must count exactly as |x| <= eps and |x| > bound do
    eps32 = np.float32(EPS)
    sat32 = np.float32(SAT)
    near = [np.nextafter(eps32, np.float32(0)), eps32, np.nextafter(eps32, np.float32(1)), np.float32(1e-30),
            np.float32(2e-8), np.float32(-1.5)]
    for extra in ([], [np.nextafter(sat32, np.float32(9))], [-np.nextafter(sat32, np.float32(9))], [sat32, -sat32]):
        for pick in range(len(near)):
            values = np.array([near[pick], -0.7, 0.25, 1.1, *extra], dtype=np.float32)
            for sign in (1, -1):
                v = (values * sign).reshape(1, -1)
                assert_matches(engine(torch.from_numpy(v.copy())), reference(v))
                assert_matches(engine(torch.from_numpy(v.copy()), eps=0.0, features=False),
                               reference(v, eps=0.0, features=False))


@pytest.mark.parametrize("sat", [0.1, 2.5, 3.0, 1e-3, 7.0e15])
def test_saturation_counted_on_squares_is_exact_at_any_bound(sat):
    # |x| > bound is counted as fl(x * x) > fl(bound * bound): exact for every float32 (checked here one step
    # either side of the bound, on both signs, among random values)
    b = np.float32(sat)
    around = [np.nextafter(b, np.float32(0)), b, np.nextafter(b, np.float32(np.inf))]
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 2 * sat, 500).astype(np.float32), around, [-v for v in around]])
    v = values.astype(np.float32).reshape(1, -1)
    assert_matches(engine(torch.from_numpy(v.copy()), sat=sat), reference(v, sat=sat))


def test_dead_features_and_zeros_read_on_the_squares_match_max_abs():
    # a signed tensor with entries within eps of zero (dropout, pruned units): the host road counts its zeros
    # and its features' maxima on the squares (no |x| pass); columns at eps exactly, one float32 step above
    # it, and squares below float32's normal range must decide as |x| <= eps does, over several chunks too
    eps32 = np.float32(EPS)
    above = np.nextafter(eps32, np.float32(1))
    g = torch.Generator().manual_seed(11)
    t = torch.randn(64, 12, generator=g)
    t[::3] *= torch.rand(t[::3].shape, generator=g) > 0.5  # exact zeros, as dropout leaves
    t[:, 2] = 0.0
    t[:, 5] = torch.tensor([1e-30, -1e-30, 3e-9, -1e-20] * 16)
    t[:, 7] = torch.tensor([float(eps32), -float(eps32)] * 32)
    t[:, 9] = 0.0
    t[40, 9] = float(-above)
    v = t.numpy()
    for chunk in (None, 96):
        feats: list[torch.Tensor] = []
        row = tensor_stats(t, EPS, SAT, features=True, feature_absmax=feats,
                           scratch=Scratch(chunk) if chunk else None)
        got = finalize(row.numpy(), t.numel(), 12).as_dict()
        assert_matches(got, reference(v))
        assert got["dead_features"] == 3  # columns 2, 5 and 7; column 9 has one entry just above eps
        assert torch.equal(feats[0] <= EPS, torch.from_numpy(np.abs(v).max(0) <= eps32))


def test_published_row_lists_the_columns_in_order():
    # Stats.as_dict hands its fields over as declared: they must be STAT_COLUMNS, in order (metrics rows)
    got = engine(torch.tensor([[1.0, -2.0], [0.0, 4.0]]))
    assert tuple(got) == STAT_COLUMNS
