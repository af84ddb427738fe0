"""SecureBoost's encrypted histograms against a numpy oracle (512-bit keys, tiny arrays)."""

from __future__ import annotations

import numpy as np
import pytest

from fedps.algorithms.secureboost.cipher import (
    BinPermutation, EncryptedHistograms, GHPacker, SealedHistograms, build_histograms, open_histograms,
)
from fedps.engine.crypto import CipherVector, Decryptor, generate_keypair
from fedps.errors import CryptoError, DataError

BITS = 512
PRECISION = 20


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(BITS)


def oracle(gq: np.ndarray, hq: np.ndarray, bins: np.ndarray, node_of_row: np.ndarray, node: int,
           n_bins: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per feature: (G, H) integer sums per bin, in true bin order (last = missing)."""
    gq, hq = gq.reshape(len(gq), -1), hq.reshape(len(hq), -1)
    out = []
    for f, nb in enumerate(n_bins):
        rows = [(node_of_row == node) & (bins[:, f] == b) for b in range(nb)]
        out.append((np.array([gq[r].sum(0) for r in rows]), np.array([hq[r].sum(0) for r in rows])))
    return out


def shown(true_sums: tuple[np.ndarray, np.ndarray], order: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """What the guest should see: prefix sums in the host's order, then the missing bin."""
    g, h = true_sums
    cg, ch = np.cumsum(g[:-1], 0), np.cumsum(h[:-1], 0)
    return (np.concatenate([cg[list(order)], g[-1:]]), np.concatenate([ch[list(order)], h[-1:]]))


def random_problem(rng: np.random.Generator, rows: int, n_bins: list[int], classes: int = 1):
    g = rng.uniform(-1, 1, (rows, classes))
    h = rng.uniform(0, 0.25, (rows, classes))
    if classes == 1:
        g, h = g[:, 0], h[:, 0]
    bins = np.stack([rng.integers(0, b, rows) for b in n_bins], axis=1)
    return g, h, bins


def check_opened(opened, packer, g, h, bins, node_of_row, nodes, n_bins, perm) -> None:
    gq, hq = packer.quantize(g, h)
    for node in nodes:
        for f, want in enumerate(oracle(gq, hq, bins, node_of_row, node, n_bins)):
            exp_g, exp_h = shown(want, perm.order(node, f))
            got = opened[node][f]
            np.testing.assert_array_equal(got.G.reshape(exp_g.shape), exp_g)
            np.testing.assert_array_equal(got.H.reshape(exp_h.shape), exp_h)


def test_histograms_from_two_partitions_equal_numpy(keys):
    pub, priv = keys
    rng = np.random.default_rng(1)
    n_bins = [4, 3, 5, 2]
    g, h, bins = random_problem(rng, 60, n_bins)
    g[:5] = -1.0                                   # negative g at the bound
    bins[:, 1] = 0                                 # all rows in one bin; the others (and missing) empty
    node_of_row = rng.choice([-1, 0, 3, 4], size=60)
    nodes = [0, 3, 4, 9]                           # node 9 has no rows
    packer = GHPacker(pub, rows_max=60, precision_bits=PRECISION, private_key=priv)
    halves = [slice(0, 25), slice(25, 60)]
    partials = []
    for part in halves:
        # guest task -> host task through bytes, as on the per-partition topics
        blob = GHPacker(pub, rows_max=60, precision_bits=PRECISION, private_key=priv).encrypt(g[part], h[part]).to_bytes()
        cipher = CipherVector.from_bytes(blob, pub)
        hist = build_histograms(cipher, bins[part], node_of_row[part], nodes, n_bins)
        partials.append(EncryptedHistograms.from_bytes(hist.to_bytes(), pub))
    total = partials[0].add(partials[1])
    assert total.rows == tuple(int(np.sum(node_of_row == n)) for n in nodes)
    perm = BinPermutation.draw(total.nodes, total.n_bins, np.random.default_rng(7))
    sealed = SealedHistograms.from_bytes(total.seal(perm).to_bytes(), pub)
    assert len(sealed.ciphertexts) < len(total.ciphertexts) / 3   # many bins per ciphertext
    opened = open_histograms(Decryptor(priv), sealed, packer, quantized=True)
    check_opened(opened, packer, g, h, bins, node_of_row, nodes, n_bins, perm)
    floats = open_histograms(Decryptor(priv), sealed, packer)
    np.testing.assert_array_equal(floats[0][0].G, opened[0][0].G / 2.0 ** PRECISION)
    # the float sums are within rows * 2^-(precision+1) of the float oracle
    true_missing = g[(node_of_row == 0) & (bins[:, 0] == 3)].sum()
    assert abs(floats[0][0].G[-1] - true_missing) <= 60 * 2.0 ** -(PRECISION + 1)


def test_multiclass_rows_span_several_plaintexts(keys):
    pub, priv = keys
    rng = np.random.default_rng(2)
    n_bins = [3, 4]
    packer = GHPacker(pub, rows_max=20, precision_bits=PRECISION, classes=12, private_key=priv)
    assert packer.plains_per_row == 2 and packer.classes_per_plain < 12
    g, h, bins = random_problem(rng, 20, n_bins, classes=12)
    node_of_row = rng.choice([0, 1], size=20)
    hist = build_histograms(packer.encrypt(g, h), bins, node_of_row, [0, 1], n_bins)
    perm = BinPermutation.draw(hist.nodes, hist.n_bins, rng)
    opened = open_histograms(Decryptor(priv), hist.seal(perm), packer, quantized=True)
    assert opened[0][1].G.shape == (4, 12)
    check_opened(opened, packer, g, h, bins, node_of_row, [0, 1], n_bins, perm)


def test_sibling_is_parent_minus_built_child(keys):
    pub, priv = keys
    rng = np.random.default_rng(3)
    n_bins = [5, 3]
    g, h, bins = random_problem(rng, 40, n_bins)
    packer = GHPacker(pub, rows_max=40, precision_bits=PRECISION, private_key=priv)
    cipher = packer.encrypt(g, h)
    parent = build_histograms(cipher, bins, np.zeros(40, dtype=np.int64), [0], n_bins)
    children = np.where(rng.random(40) < 0.3, 1, 2)
    small = build_histograms(cipher, bins, children, [1], n_bins)
    other = parent.subtract(small, nodes=[2])
    assert other.nodes == (2,)
    direct = build_histograms(cipher, bins, children, [2], n_bins)
    dec = Decryptor(priv)
    got = packer.decode_sums(dec.raw.decrypt(other.ciphertexts), quantized=True)
    want = packer.decode_sums(dec.raw.decrypt(direct.ciphertexts), quantized=True)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0].min() < 0                      # a negative G sum survived the subtraction


def test_overflow_and_bad_input_are_refused(keys):
    pub, priv = keys
    with pytest.raises(CryptoError, match="rows_max"):
        GHPacker(pub, rows_max=2**250, precision_bits=40)
    packer = GHPacker(pub, rows_max=4, precision_bits=PRECISION, private_key=priv)
    g, h = np.full(10, 0.5), np.full(10, 0.1)
    bins = np.zeros((10, 1), dtype=np.int64)
    with pytest.raises(CryptoError, match="raise rows_max"):
        build_histograms(packer.encrypt(g, h), bins, np.zeros(10, dtype=np.int64), [0], [2])
    with pytest.raises(DataError, match="g_bound"):
        packer.encrypt(np.array([1.5]), np.array([0.1]))
    with pytest.raises(DataError, match="h must lie"):
        packer.encrypt(np.array([0.5]), np.array([-0.1]))
    with pytest.raises(DataError, match="outside"):
        build_histograms(packer.encrypt(g[:3], h[:3]), np.array([[0], [2], [1]]), np.zeros(3, np.int64), [0], [2])
    ok = build_histograms(packer.encrypt(g[:3], h[:3]), bins[:3], np.zeros(3, np.int64), [0], [2])
    with pytest.raises(CryptoError, match="other settings"):
        perm = BinPermutation.draw([0], [2], np.random.default_rng(0))
        open_histograms(Decryptor(priv), ok.seal(perm), GHPacker(pub, rows_max=4, precision_bits=PRECISION + 1))
    with pytest.raises(CryptoError, match="row count"):
        packer.decode_sums(Decryptor(priv).raw.decrypt(ok.ciphertexts[:1]), counts=[1])
    with pytest.raises(CryptoError, match="another party"):
        EncryptedHistograms.from_bytes(ok.to_bytes(), generate_keypair(BITS)[0])
    with pytest.raises(CryptoError, match="malformed"):
        EncryptedHistograms.from_bytes(ok.to_bytes()[:40], pub)


def test_sealing_shuffles_and_rerandomises(keys):
    pub, priv = keys
    rng = np.random.default_rng(4)
    n_bins = [9, 9]
    g, h, bins = random_problem(rng, 80, n_bins)
    packer = GHPacker(pub, rows_max=80, precision_bits=PRECISION, private_key=priv)
    hist = build_histograms(packer.encrypt(g, h), bins, np.zeros(80, dtype=np.int64), [0], n_bins)
    perm_a = BinPermutation.draw([0], n_bins, np.random.default_rng(10))
    perm_b = BinPermutation.draw([0], n_bins, np.random.default_rng(11))
    assert perm_a.order(0, 0) != tuple(range(8)) and perm_a.order(0, 0) != perm_b.order(0, 0)
    sealed_a, sealed_b = hist.seal(perm_a), hist.seal(perm_a)
    assert not set(sealed_a.ciphertexts) & set(sealed_b.ciphertexts)         # fresh randomness each time
    dec = Decryptor(priv)
    a = open_histograms(dec, sealed_a, packer, quantized=True)[0][0]
    assert np.array_equal(a.H, open_histograms(dec, sealed_b, packer, quantized=True)[0][0].H)
    b = open_histograms(dec, hist.seal(perm_b), packer, quantized=True)[0][0]
    assert not np.array_equal(a.H[:-1], np.sort(a.H[:-1]))                   # not in true (monotone) order
    assert np.array_equal(np.sort(a.H[:-1]), np.sort(b.H[:-1]))               # same sums, other order
    gq, hq = packer.quantize(g, h)
    cum_h = np.cumsum([hq[bins[:, 0] == k].sum() for k in range(8)])
    for pos in range(8):                                                        # the host maps back
        assert a.H[pos] == cum_h[perm_a.true_bin(0, 0, pos)]
    restored = BinPermutation.from_json(perm_a.to_json())
    assert restored.order(0, 1) == perm_a.order(0, 1)
    with pytest.raises(DataError, match="not a threshold"):
        perm_a.true_bin(0, 0, 8)
    with pytest.raises(DataError, match="no bin permutation"):
        hist.seal(BinPermutation.draw([5], n_bins, rng))


def test_a_categorical_feature_is_sealed_as_its_bins_own_sums(keys):
    pub, priv = keys
    rng = np.random.default_rng(5)
    n_bins = [6, 5]
    g, h, bins = random_problem(rng, 70, n_bins)
    packer = GHPacker(pub, rows_max=70, precision_bits=PRECISION, private_key=priv)
    hist = build_histograms(packer.encrypt(g, h), bins, np.zeros(70, dtype=np.int64), [0], n_bins)
    perm = BinPermutation.draw([0], n_bins, np.random.default_rng(12))
    opened = open_histograms(Decryptor(priv), hist.seal(perm, [True, False]), packer, quantized=True)[0]
    gq, hq = packer.quantize(g, h)
    own = [hq[bins[:, 1] == k].sum() for k in range(5)]
    for pos in range(4):   # feature 1: a category's own sum (not a prefix sum), shuffled; then missing
        assert opened[1].H[pos] == own[perm.true_bin(0, 1, pos)]
    assert opened[1].H[4] == own[4]
    cum = np.cumsum([hq[bins[:, 0] == k].sum() for k in range(5)])
    assert all(opened[0].H[pos] == cum[perm.true_bin(0, 0, pos)] for pos in range(5))


def test_the_guest_derives_the_larger_sibling_from_the_parent_and_the_smaller_one(keys):
    from fedps.algorithms.secureboost.protocol import Nodes, derive_siblings
    from fedps.errors import ProtocolError

    pub, priv = keys
    rng = np.random.default_rng(6)
    n_bins = [5, 4]
    g, h, bins = random_problem(rng, 50, n_bins)
    node_of_row = np.where(bins[:, 0] <= 1, 1, 2)
    packer = GHPacker(pub, rows_max=50, precision_bits=PRECISION, private_key=priv)
    cts = packer.encrypt(g, h)
    tree = BinPermutation.draw([0], n_bins, np.random.default_rng(13))   # one shuffle for every node of the tree
    perm = BinPermutation({n: tree.orders[0] for n in (0, 1, 2)})
    dec = Decryptor(priv)
    root = open_histograms(dec, build_histograms(cts, bins, np.zeros(50, np.int64), [0], n_bins).seal(perm),
                           packer, quantized=True)
    both = build_histograms(cts, bins, node_of_row, [1, 2], n_bins)
    small = open_histograms(dec, both.select([1]).seal(perm), packer, quantized=True)
    derived = derive_siblings(small, root, [1, 2], Nodes(2, 1), "host")
    direct = open_histograms(dec, both.seal(perm), packer, quantized=True)
    for node in (1, 2):
        for f in range(2):
            np.testing.assert_array_equal(np.asarray(derived[node][f].G), np.asarray(direct[node][f].G))
            np.testing.assert_array_equal(np.asarray(derived[node][f].H), np.asarray(direct[node][f].H))
    with pytest.raises(ProtocolError, match="exactly one of the children 1, 2"):
        derive_siblings(direct, root, [1, 2], Nodes(2, 1), "host")
