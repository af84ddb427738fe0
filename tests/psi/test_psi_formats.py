"""Data as users have it: FATE's sparse tag:value files through a PSI, then laid out for training.

Real parts: two PSI parties as threads (psi_pair: the session's Spark, the
embedded broker), then the layout of each party's PSI output.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedps.engine.formats import tag_id
from fedps.engine.layout import build_layout, read_partition


@pytest.mark.timeout(900)   # two PSI parties and two layouts: slow only on a crowded machine
def test_tag_value_files_intersect_and_lay_out_as_sparse_rows(psi_pair, tmp_path, spark):
    guest = tmp_path / "guest.csv"
    host = tmp_path / "host.csv"
    guest.write_text("id,y,features\n" + "".join(f"u{i},{i % 2},a:{i};b:1\n" for i in range(40)))
    host.write_text("id,features\n" + "".join(f"u{i},c:{i / 10};7:2\n" for i in range(20, 70))
                    + "# a comment\n\n")
    outcomes = psi_pair([], [], inputs={"guest": guest, "host": host}, format="tag_value")
    assert not [o.error for o in outcomes.values() if o.error is not None]
    for name, outcome in outcomes.items():
        assert outcome.metrics["psi_intersection"] == 20
        assert outcome.metrics["psi_input"]["removed"] == {"on_null": 0, "on_duplicate": 0}
        assert "tag_value_line" in outcome.rows.columns
        assert set(outcome.rows["id"]) == {f"u{i}" for i in range(20, 40)}
    folder = tmp_path / outcomes["guest"].job
    layouts = {name: build_layout(spark, str(folder / name / "psi"), folder=str(tmp_path / "layout" / name),
                                  partitions=2, label_column="y" if name == "guest" else None)
               for name in outcomes}
    assert layouts["guest"].sparse and layouts["host"].sparse
    assert layouts["guest"].counts == layouts["host"].counts and layouts["guest"].digests == layouts["host"].digests
    rows = [read_partition(layouts["guest"], p) for p in range(2)]
    labels = np.concatenate([r.y for r in rows])
    assert sorted(labels.tolist()) == sorted(i % 2 for i in range(20, 40))
    host_rows = read_partition(layouts["host"], 0)
    assert set(np.asarray(host_rows.feature_keys).tolist()) <= {tag_id("c"), 7}
