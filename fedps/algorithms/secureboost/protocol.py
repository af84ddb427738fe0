"""SecureBoost without a third party: one tree level, every role (docs/protocols.md, "SecureBoost").

The guest holds the labels; hosts hold features. Only the guest owns a
Paillier key. Per tree (per class for softmax, all class trees grown together):

0. (guest tasks) g, h per row from the margins, fixed-point, packed in one
   plaintext per row (all classes), encrypted: ``[[g, h]]`` → host task p.

Per level, for the nodes of the level (the *frontier*):

1. (host tasks) encrypted per-(node, feature, bin) sums of their partition's
   rows, for the smaller child of each split pair; the host adds the
   partitions' partials inside its accumulator and derives the sibling as
   parent minus child (all under encryption).
2. (host driver) shuffled prefix sums (a permutation only the host knows,
   one per class tree and feature), packed and re-randomised → guest
   (``SEALED``): of the roots, then of the smaller child of each split pair
   only; the guest derives the larger one as its parent minus the smaller.
3. (guest driver) decrypts, computes the gains of every party's candidates
   (its own in plaintext) and tells each host which of its candidates won
   (``SPLITS``: the split nodes of the level, and for the host's own wins the
   tied shown candidates); the host records (feature, threshold) behind the
   id ``"<tree>.<node>"``; the guest's tree keeps only the host and the id.
4. (tasks) the owner of each split sends its rows' directions, partition by
   partition (``HOST_LEFT``); the guest task merges them with its own and
   sends every host task the directions of all rows of split nodes (``ROUTE``).

After the last level the guest computes the leaf weights from its own sums
and updates the margins of its rows. Everything here is integer-exact, so the
trees equal :mod:`reference` split for split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedps.algorithms.secureboost.tree import Candidates, Rules, SplitTable, left_sums, pick
from fedps.messaging.codec import Blob
from fedps.messaging.tags import Message, Scope

# Between the tasks of one partition (links), scoped by tree and level.
ROW_GH = Message("row_gh", "guest", "host", Blob)             # 0: packed [[g, h]] of every row
HOST_LEFT = Message("host_left", "host", "guest", np.ndarray)  # 4: left bits of the host's split nodes' rows
ROUTE = Message("route", "guest", "host", np.ndarray)         # 4: left bits of every split node's rows
# Between the drivers, scoped by tree and level.
SEALED = Message("sealed_hist", "host", "guest", Blob)        # 2: shuffled, packed, re-randomised sums
SPLITS = Message("splits", "guest", "host", dict)             # 3: split nodes, the host's winning candidates
NEXT = Message("next_tree", "guest", "host", dict)            # after a tree: go on or stop early

HIST_KIND = "sb.histograms/1"
SEALED_KIND = "sb.sealed/1"
#: Accumulator kind that adds a host's partial encrypted histograms inside its Ray actor.
REDUCE_HIST = "reduce:fedps.algorithms.secureboost.protocol:add_histograms"


def scope(job: str, tree: int, level: int = 0) -> Scope:
    return Scope(job, "tree").at(iteration=tree, batch=level)


# --------------------------------------------------------------------------- node keys
@dataclass(frozen=True)
class Nodes:
    """Node keys of the class trees of one round: ``class * span + heap index``."""

    max_depth: int
    classes: int

    @property
    def span(self) -> int:
        return 1 << (self.max_depth + 1)

    def roots(self) -> list[int]:
        return [k * self.span for k in range(self.classes)]

    def klass(self, key: int) -> int:
        return key // self.span

    def local(self, key: int) -> int:
        return key % self.span

    def children(self, key: int) -> tuple[int, int]:
        base, n = self.klass(key) * self.span, self.local(key)
        return base + 2 * n + 1, base + 2 * n + 2


def split_id(tree: int, node: int) -> str:
    return f"{tree}.{node}"


def rows_of(node_of_row: np.ndarray, nodes: Nodes, keys: list[int]) -> np.ndarray:
    """Row indices of the nodes ``keys`` (sorted), node after node: the order of every bit message."""
    parts = [np.flatnonzero(node_of_row[:, nodes.klass(k)] == k) for k in sorted(keys)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def apply_route(node_of_row: np.ndarray, nodes: Nodes, keys: list[int], bits: np.ndarray) -> None:
    """Move the rows of the split nodes ``keys`` to their children (``bits``: left, in message order)."""
    start = 0
    for key in sorted(keys):
        k = nodes.klass(key)
        at = np.flatnonzero(node_of_row[:, k] == key)
        left, right = nodes.children(key)
        node_of_row[at, k] = np.where(bits[start:start + len(at)], left, right)
        start += len(at)


# --------------------------------------------------------------------------- host partials
def add_histograms(values: list[bytes], n: int) -> bytes:
    """Sum of a host's partial encrypted histograms (runs in the host's accumulator actor)."""
    from fedps.algorithms.secureboost.cipher import EncryptedHistograms
    from fedps.engine.crypto import PublicKey

    key = PublicKey(n)
    total = EncryptedHistograms.from_bytes(values[0], key)
    for value in values[1:]:
        total = total.add(EncryptedHistograms.from_bytes(value, key))
    return total.to_bytes()


def permutation_rng(secret: bytes, tree: int, level: int) -> np.random.Generator:
    """The host's bin shuffle of a level, from its secret: a replayed level shuffles alike."""
    digest = hashlib.sha256(secret + f"sb-permutation/{tree}/{level}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest, "big"))


# --------------------------------------------------------------------------- guest: step 2
def derive_siblings(got: dict, parents: dict, frontier: list[int], nodes: Nodes, host: str) -> dict:
    """A level's opened sums of every frontier node from the built children's: sibling = parent - built.

    The host seals, below the roots, only the smaller child of each split pair, shuffled like its parent
    (one shuffle per class tree and feature), so shown entries subtract position by position.
    """
    from fedps.algorithms.secureboost.cipher import BinSums
    from fedps.errors import ProtocolError

    if set(got) - set(frontier):
        raise ProtocolError(f"{host} sealed nodes {sorted(set(got) - set(frontier))} that are not being split")
    out = {}
    for i in range(0, len(frontier), 2):
        left, right = frontier[i], frontier[i + 1]
        if (left in got) == (right in got):
            raise ProtocolError(f"{host} must seal exactly one of the children {left}, {right}")
        built, other = (left, right) if left in got else (right, left)
        parent = nodes.klass(left) * nodes.span + (nodes.local(left) - 1) // 2
        out[built] = got[built]
        out[other] = [BinSums(p.G - b.G, p.H - b.H) for p, b in zip(parents[parent], got[built])]
    return out


# --------------------------------------------------------------------------- guest: step 3
def shown_left_sums(sums: list, k: int | None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A host node's candidates from its opened sums: left (G, H) ints and ``(feature, position, left)``.

    Per host feature (in the order it sent them): every shown prefix sum with
    missing values right, then every one with missing values left.
    """
    lefts, shown = [], []
    for i, bin_sums in enumerate(sums):
        g, h = np.asarray(bin_sums.G), np.asarray(bin_sums.H)
        if k is not None and g.ndim == 2:
            g, h = g[:, k], h[:, k]
        g, h = g.astype(np.int64), h.astype(np.int64)
        cum = np.stack([g[:-1], h[:-1]], axis=1)
        missing = np.array([g[-1], h[-1]])
        positions = len(cum)
        lefts += [cum, cum + missing]
        shown += [(i, pos, 0) for pos in range(positions)] + [(i, pos, 1) for pos in range(positions)]
    if not lefts:
        return np.zeros((0, 2), dtype=np.int64), []
    return np.concatenate(lefts), shown


@dataclass
class Decision:
    """The guest's choice for one node: a split (by party) or a leaf."""

    node: int
    party: str | None = None
    gain: float = 0.0
    spec: dict | None = None                    # guest-owned split: its rule
    tied: list[tuple[int, int, int]] | None = None   # host-owned: the host's tied shown candidates
    leaf: float | None = None


def guest_choose(node: int, total: np.ndarray, own_hist: np.ndarray, own: Candidates, table: SplitTable,
                 hosts: dict[str, tuple[np.ndarray, list]], rule: Rules, max_bin: int, sid: str,
                 learning_rate: float, may_split: bool) -> Decision:
    """Best split of ``node`` over the guest's and every host's candidates (guest first, then hosts)."""
    if may_split:
        gains = [rule.gains(left_sums(own_hist, own, max_bin), total)]
        names = list(hosts)
        gains += [rule.gains(hosts[name][0], total) for name in names]
        found = pick(gains)
        if found is not None:
            party, gain, tied = found
            if party == 0:
                spec = table.record(own, int(tied.min()), sid)
                return Decision(node, table.party, gain, spec=spec)
            name = names[party - 1]
            shown = hosts[name][1]
            return Decision(node, name, gain, tied=[shown[int(i)] for i in tied])
    return Decision(node, leaf=rule.leaf(total, learning_rate))


# --------------------------------------------------------------------------- host: step 3
def host_resolve(tied: list, selected: np.ndarray, cands: Candidates, index: dict, permutation, node: int,
                 has_missing: tuple[bool, ...]) -> int:
    """The canonical candidate behind the guest's tied shown candidates (the lowest one)."""
    best = None
    for feature, position, left in tied:
        j = int(selected[int(feature)])
        b = permutation.true_bin(node, int(feature), int(position))
        key = (j, b, bool(left) and has_missing[j])
        found = index.get(key)
        if found is not None and (best is None or found < best):
            best = found
    if best is None:
        from fedps.errors import ProtocolError

        raise ProtocolError(f"the guest chose a split of node {node} that is not one of this host's candidates")
    return best


def candidate_index(cands: Candidates) -> dict[tuple[int, int, bool], int]:
    return {(int(j), int(b), bool(d)): i for i, (j, b, d) in
            enumerate(zip(cands.feature, cands.bin, cands.default_left))}
