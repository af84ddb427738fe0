"""Binning, split finding and the plaintext reference (no Spark, no crypto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedps.algorithms.secureboost import objective, reference
from fedps.algorithms.secureboost.binning import Bins, merge, sketch
from fedps.algorithms.secureboost.params import SBParams
from fedps.algorithms.secureboost.tree import Rules, candidates, histogram, left_sums, pick
from fedps.errors import ConfigError, DataError

DATA = Path(__file__).parents[2] / "data"


def _bins(x: np.ndarray, max_bin: int = 8) -> Bins:
    return merge([sketch(x)], tuple(f"f{j}" for j in range(x.shape[1])), max_bin, len(x))


def test_missing_values_have_their_own_bin_and_both_directions_are_candidates():
    x = np.array([[1.0], [2.0], [np.nan], [3.0], [2.0]])
    bins = _bins(x, 4)
    assert bins.cuts[0].tolist() == [1.0, 2.0] and bins.has_missing == (True,)
    assert bins.apply(x)[:, 0].tolist() == [0, 1, 4, 2, 1]
    cands = candidates(bins)
    # (b, right) for b < 2, then missing apart (2, right), then (b, left)
    assert list(zip(cands.bin.tolist(), cands.default_left.tolist())) == [
        (0, False), (1, False), (2, False), (0, True), (1, True)]
    gh = np.array([[1, 1], [2, 1], [4, 1], [8, 1], [16, 1]])
    left = left_sums(histogram(bins.apply(x), gh, 4), cands, 4)
    assert left[:, 0].tolist() == [1, 19, 27, 5, 23]


def test_quantile_cuts_split_rows_evenly():
    x = np.arange(1000, dtype=float).reshape(-1, 1)
    counts = np.bincount(_bins(x, 4).apply(x)[:, 0])
    assert counts.tolist() == [250, 250, 250, 250]


@pytest.mark.parametrize("column, problem", [([1.0, 1.0, 1.0, 1.0], "constant"),
                                             ([np.nan] * 4, "missing in every row")])
def test_a_useless_feature_is_refused_by_name(column, problem):
    x = np.c_[np.arange(4.0), column]
    with pytest.raises(DataError, match=f"'f1' of host is {problem}"):
        merge([sketch(x)], ("f0", "f1"), 2, 4, "host")


def test_more_bins_than_rows_is_refused():
    with pytest.raises(ConfigError, match="max_bin = 32 is more bins than the 10 training rows"):
        merge([sketch(np.arange(10.0).reshape(-1, 1))], ("f0",), 32, 10)


def test_a_label_with_one_class_is_refused():
    with pytest.raises(DataError, match="one class only"):
        objective.check_labels("binary:logistic", np.ones(5), 1)


def test_ties_go_to_the_earlier_party_and_the_earlier_candidate():
    rule = Rules(1.0, 0.0, 0.0, 0)
    total = np.array([0, 8])
    left = np.array([[-4, 4], [-4, 4], [1, 1]])
    gains = [rule.gains(left[2:], total), rule.gains(left, total)]
    party, gain, tied = pick(gains)
    assert party == 1 and tied.tolist() == [0, 1]
    party, _, _ = pick([rule.gains(left, total), rule.gains(left, total)])
    assert party == 0


def test_reference_matches_xgboost_on_breast():
    xgb = pytest.importorskip("xgboost")
    from sklearn.metrics import roc_auc_score

    guest, host = pd.read_csv(DATA / "breast_hetero_guest.csv"), pd.read_csv(DATA / "breast_hetero_host.csv")
    joined = guest.merge(host, on="id", suffixes=("_g", "_h"))
    gcols = [c for c in joined.columns if c.endswith("_g") or (c.startswith("x") and c in guest.columns
                                                                and c not in host.columns)]
    hcols = [c for c in joined.columns if c.endswith("_h")]
    y = joined["y"].to_numpy(float)
    rng = np.random.default_rng(0)
    test = rng.random(len(y)) < 0.3
    params = SBParams(trees=10, max_depth=3, max_bin=32, key_bits=2048)
    parties = {}
    for name, cols in (("guest", gcols), ("host", hcols)):
        x = joined[cols].to_numpy(float)[~test]
        parties[name] = (merge([sketch(x)], tuple(cols), 32, len(x)), x)
    model = reference.train(parties, y[~test], np.arange(int((~test).sum())), params)
    margins = reference.predict(model, {"guest": joined[gcols].to_numpy(float)[test],
                                        "host": joined[hcols].to_numpy(float)[test]}, 0.0, 1)
    ours = roc_auc_score(y[test], margins[:, 0])
    x_all = joined[gcols + hcols].to_numpy(float)
    booster = xgb.train({"objective": "binary:logistic", "tree_method": "hist", "max_bin": 32, "max_depth": 3,
                         "eta": 0.3, "lambda": 1.0, "min_child_weight": 1.0, "base_score": 0.5, "nthread": 1},
                        xgb.DMatrix(x_all[~test], label=y[~test]), 10)
    theirs = roc_auc_score(y[test], booster.predict(xgb.DMatrix(x_all[test])))
    assert ours > theirs - 0.005, (ours, theirs)
    assert all(b <= a + 1e-12 for a, b in zip(model.losses, model.losses[1:]))   # training loss falls


def test_early_stopping_keeps_the_rounds_up_to_the_best():
    from fedps.algorithms.secureboost.trainer import rounds_to_keep

    assert rounds_to_keep([0.5, 0.4, 0.41], 2) == 0
    assert rounds_to_keep([0.5, 0.4, 0.41, 0.42], 2) == 2
    assert rounds_to_keep([0.5, 0.4, 0.4], 1) == 2      # no gain is no improvement


def test_goss_radix_selection_over_partitions_finds_the_kth_largest_gradient():
    from fedps.algorithms.secureboost import goss

    params = SBParams(goss_top_rate=0.2, goss_other_rate=0.1, key_bits=2048)
    rng = np.random.default_rng(3)
    n_rounds = goss.rounds(goss.size_bits(params, 1.0))
    for trial in range(20):
        sizes = [np.where(rng.random(n) < 0.8, rng.integers(0, 1 << 25, n) // rng.choice([1, 4096]), -1)
                 for n in rng.integers(0, 50, 4)]
        sizes[0][:3] = 1 << 24 if len(sizes[0]) >= 3 else sizes[0][:3]     # ties at the top
        rows = sum(int(np.sum(s >= 0)) for s in sizes)
        k = goss.top_count(params, rows)
        prefix, k_left = 0, k
        for r in range(n_rounds):
            counts = sum(goss.digit_counts(s, prefix, r, n_rounds) for s in sizes)
            prefix, k_left = goss.choose_digit(counts, prefix, k_left)
        if rows:
            assert prefix == goss.kth_largest(np.concatenate(sizes), k), trial
            assert int(sum(np.sum(s >= prefix) for s in sizes)) >= k


def test_goss_keeps_the_largest_gradients_and_amplifies_a_sample_of_the_others():
    from fedps.algorithms.secureboost import goss

    params = SBParams(goss_top_rate=0.2, goss_other_rate=0.2, key_bits=2048)
    size = np.r_[np.arange(1000), -np.ones(100, dtype=np.int64)]
    threshold = goss.kth_largest(size, goss.top_count(params, 1000))
    w = goss.weights(params, size, threshold, np.arange(1100) * 7919, 0)
    assert threshold == 800 and (w[800:1000] == 1).all() and (w[1000:] == 0).all()
    sampled = w[:800] > 0
    assert 150 < sampled.sum() < 250 and np.allclose(w[:800][sampled], 4.0)
    with pytest.raises(ConfigError, match="GOSS needs"):
        SBParams(goss_top_rate=0.5, goss_other_rate=0.6)
    with pytest.raises(ConfigError, match="replaces subsample"):
        SBParams(goss_top_rate=0.2, goss_other_rate=0.1, subsample=0.5)


def test_a_categorical_feature_has_a_bin_per_category_and_splits_one_against_the_rest():
    from fedps.algorithms.secureboost.tree import SplitTable, go_left_raw

    x = np.array([[30.0, 1.0], [10.0, 2.0], [np.nan, 3.0], [20.0, 4.0], [30.0, 5.0], [10.0, 6.0]])
    bins = merge([sketch(x)], ("colour", "f1"), 4, len(x), categorical=("colour",))
    assert bins.cuts[0].tolist() == [10.0, 20.0, 30.0] and bins.categorical == (True, False)
    assert bins.apply(x)[:, 0].tolist() == [2, 0, 4, 1, 2, 0]
    assert bins.apply(np.array([[15.0, 1.0]]))[0, 0] == 4          # not a training category: as missing
    cands = candidates(bins, np.array([True, False]))
    assert list(zip(cands.bin.tolist(), cands.default_left.tolist())) == [
        (0, False), (1, False), (2, False), (0, True), (1, True), (2, True)]
    gh = np.array([[1, 1], [2, 1], [4, 1], [8, 1], [16, 1], [32, 1]])
    left = left_sums(histogram(bins.apply(x), gh, 4), cands, 4)
    assert left[:, 0].tolist() == [34, 8, 17, 38, 12, 21]             # the category alone (+ missing)
    table = SplitTable(bins, "host")
    spec = table.record(cands, 4, "0.0")
    assert spec == {"feature": "colour", "index": 0, "bin": 1, "threshold": None, "categorical": True,
                    "category": 20.0, "default_left": True}
    assert table.go_left_bins("0.0", bins.apply(x)).tolist() == [False, False, True, True, False, False]
    assert go_left_raw(spec, x).tolist() == [False, False, True, True, False, False]
    assert Bins.from_json(bins.to_json()).categorical == (True, False)
    assert Bins.from_json(_bins(x[:, 1:], 4).to_json()).categorical == ()    # numeric bins keep their old form
    with pytest.raises(DataError, match="categorical feature 'f1' has more than max_bin = 4 categories"):
        merge([sketch(x)], ("colour", "f1"), 4, len(x), categorical=("f1",))
    with pytest.raises(ConfigError, match="names 'size', which is not a feature"):
        merge([sketch(x)], ("colour", "f1"), 4, len(x), categorical=("size",))
