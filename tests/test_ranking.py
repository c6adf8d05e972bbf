"""Running sums by sample id and the ``k`` best per row (``mstore_lightning.analytics.ranking``)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mstore_lightning.analytics.ranking import RunningSum, best

# One epoch: sample ids, repeats allowed (a sampler with replacement), in any order.
EPOCH_IDS = st.lists(st.integers(0, 40), max_size=30)


@settings(max_examples=80, deadline=None)
@given(
    queries=st.sampled_from([0, 1, 3]), epochs=st.lists(EPOCH_IDS, max_size=6), seed=st.integers(0, 2**32 - 1)
)
def test_running_sum_equals_a_dictionary_sum_over_random_epochs(queries, epochs, seed):
    rng = np.random.default_rng(seed)
    lead = (queries,) if queries else ()
    run, want = RunningSum(), {}
    for e, ids in enumerate(epochs):
        # Whole numbers: every order of summing them is exact, so equality is exact.
        values = rng.integers(-1000, 1000, size=(*lead, len(ids))).astype(np.float64)
        run.add(np.array(ids, dtype=np.int64), values, epochs=[e])
        for j, sid in enumerate(ids):
            want[sid] = want.get(sid, np.zeros(lead)) + values[..., j]
    assert run.ids.tolist() == sorted(want)
    assert run.epochs == set(range(len(epochs)))
    got = run.scores()
    for pos, sid in enumerate(run.ids):
        np.testing.assert_array_equal(got[..., pos], want[sid])


@settings(max_examples=80, deadline=None)
@given(
    scores=st.lists(st.sampled_from([0.0, 1.0, 2.0, -1.0, np.nan, 0.5, -np.inf, np.inf]), max_size=25),
    k=st.integers(1, 30),
)
def test_best_is_a_sort_by_score_then_position_with_nan_last(scores, k):
    values = np.array(scores, dtype=np.float64)
    key = sorted(range(len(values)), key=lambda i: (np.isnan(values[i]), -np.nan_to_num(values[i]), i))
    assert best(values, k).tolist() == key[:k]
    np.testing.assert_array_equal(best(np.stack([values, values[::-1]]), k)[0], key[:k])


def test_best_ranks_nan_below_minus_infinity_as_a_descending_sort_did():
    scores = np.array([np.nan, -np.inf, 1.0, -np.inf])
    assert best(scores, 4).tolist() == np.argsort(-scores, kind="stable").tolist() == [2, 1, 3, 0]
