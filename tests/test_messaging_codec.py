"""Values on the wire: round trips, refusals, and no pickle."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedps.errors import DataError, ProtocolError
from fedps.messaging.codec import Blob, decode, encode
from fedps.messaging.tags import Message, Scope, Tag

dtypes = st.sampled_from([np.int8, np.int32, np.int64, np.uint16, np.float32, np.float64, np.bool_])


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_arrays_round_trip_with_dtype_and_shape(array):
    got = decode(encode(array))
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(json_values)
def test_scalars_lists_and_dicts_round_trip(value):
    assert decode(encode(value)) == value


def test_blob_round_trips_opaquely():
    blob = Blob("paillier.vector/1", bytes(range(256)) * 3)
    assert decode(encode(blob)) == blob


@pytest.mark.parametrize("value", [object(), {1: "int key"}, np.array(["text"]), {"s": {1, 2}}])
def test_unsupported_values_are_refused_by_name(value):
    with pytest.raises(DataError, match="cannot be sent|non-string key"):
        encode(value)


def test_pickle_from_the_network_is_never_loaded():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle was loaded')",))

    for prefix in (b"", b"A", b"J", b"B"):
        with pytest.raises(ProtocolError):
            decode(prefix + pickle.dumps(Boom()))


def test_scope_builds_distinct_tags_per_round():
    scope = Scope("job1", "train")
    first, second = scope.at(iteration=1, batch=0).tag("grad"), scope.at(iteration=1, batch=1).tag("grad")
    assert first != second
    assert Tag.decode(first.encode()) == first
    assert str(first) == "job1/train/it1/b0/grad"


def test_declared_message_checks_its_type():
    message = Message("gradient", "guest", "host", np.ndarray)
    assert message.check(np.zeros(2)) is not None
    with pytest.raises(ProtocolError, match="gradient.*guest -> host.*ndarray"):
        message.check([1.0, 2.0])
