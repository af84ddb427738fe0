"""SecureBoost models as served: one host call answers every node of the forest.

A SecureBoost job leaves, in each party's output folder, a ``model.json``
(``fedps/algorithms/secureboost``): the guest's holds the trees, whose split
nodes name the party that owns them and a split id (``"<round>.<node>"``)
but, for a host's split, neither its feature nor its threshold; plus the
guest's own split table. A host's holds its split table only.

Serving one batch: each host evaluates **every** split of its table on the
rows (a row its store does not hold goes the way each split sends missing
values) and answers, in one call, one bit per (split, row): 1 where the row
goes to the right child (:func:`pack_directions`). The guest evaluates its own
splits the same way, then walks every tree with all the bits at hand
(:meth:`TreeModel.margins`), exactly as the batch prediction
(``secureboost/predict.py``, ``margins_of``) routes a row. So a forest costs
one round trip per host, whatever its depth or size.

A split id ``"<t>.<m>"`` travels as the integer ``(t << 32) | m``
(``TreePart.nodes``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedps.errors import ConfigError, DataError
from fedps.serving.model import feature_columns

OBJECTIVES = ("binary:logistic", "multi:softmax", "reg:squarederror")


def node_id(split: str) -> int:
    """The wire id of split id ``"<t>.<m>"``."""
    tree, _, node = split.partition(".")
    if not tree.isdigit() or not node.isdigit() or int(tree) >= 1 << 32 or int(node) >= 1 << 32:
        raise DataError(f"split id {split!r} is not '<round>.<node>'")
    return (int(tree) << 32) | int(node)


@dataclass(frozen=True)
class SplitRules:
    """A party's split table as arrays, in the order of ``ids`` (sorted split ids)."""

    ids: tuple[str, ...]
    wire: np.ndarray          # uint64 wire ids, in order
    column: np.ndarray        # index into the party's features
    threshold: np.ndarray     # left: value <= threshold (+inf: every present value goes left)
    default_left: np.ndarray  # where missing values go
    category: np.ndarray      # a categorical split: left when value == category (NaN: not categorical)

    @classmethod
    def of(cls, splits: dict, features: int, path: Path) -> "SplitRules":
        ids = tuple(sorted(splits))
        column, threshold, left, category = [], [], [], []
        for sid in ids:
            spec = splits[sid]
            if not isinstance(spec, dict):
                raise DataError(f"{path}: split {sid} is not a split record")
            if "categories" in spec:   # a form secureboost does not write (one category against the rest)
                raise ConfigError(f"{path}: split {sid} sends a set of categories one way, which serving does not "
                                  "know; it serves one-category splits (\"categorical\" with \"category\")")
            try:
                j, t, d = int(spec["index"]), spec["threshold"], bool(spec["default_left"])
                c = float(spec["category"]) if spec.get("categorical") else np.nan
            except (KeyError, TypeError, ValueError) as exc:
                raise DataError(f"{path}: split {sid} is unreadable: {type(exc).__name__}: {exc}") from None
            if not 0 <= j < features:
                raise DataError(f"{path}: split {sid} uses feature {j}, but the model has {features}")
            if spec.get("categorical") and not np.isfinite(c):
                raise DataError(f"{path}: categorical split {sid} has no finite category")
            column.append(j)
            threshold.append(np.inf if t is None else float(t))
            left.append(d)
            category.append(c)
        return cls(ids, np.array([node_id(s) for s in ids], dtype=np.uint64), np.array(column, dtype=np.int64),
                   np.array(threshold, dtype=np.float64), np.array(left, dtype=bool),
                   np.array(category, dtype=np.float64))

    def right(self, x: np.ndarray) -> np.ndarray:
        """(splits, rows) bools: True where the row goes to the right child (``tree.go_left_raw``'s rule:
        ``value <= threshold``, or ``value == category`` for a categorical split; NaN to its default side)."""
        values = x[:, self.column].T
        with np.errstate(invalid="ignore"):
            present = values <= self.threshold[:, None]
            categorical = ~np.isnan(self.category)
            if categorical.any():
                present[categorical] = values[categorical] == self.category[categorical, None]
            left = np.where(np.isnan(values), self.default_left[:, None], present)
        return ~left


def pack_directions(right: np.ndarray) -> bytes:
    """``TreePart.directions``: (nodes, rows) bits node-major, packed little bit order, zero-padded at the end."""
    return np.packbits(right.ravel(), bitorder="little").tobytes()


def unpack_directions(data: bytes, nodes: int, rows: int) -> np.ndarray:
    need = (nodes * rows + 7) // 8
    if len(data) != need:
        raise DataError(f"{len(data)} bytes of directions for {nodes} nodes x {rows} rows (expected {need})")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=nodes * rows, bitorder="little")
    return bits.reshape(nodes, rows).astype(bool)


@dataclass(frozen=True)
class Forest:
    """The guest's trees as heap-indexed arrays (one row per tree)."""

    column: np.ndarray   # (trees, heap): the direction row of a split node, -1 at a leaf or no node
    leaf: np.ndarray     # (trees, heap): leaf values
    klass: np.ndarray    # (trees,)
    depth: int


@dataclass(frozen=True)
class TreeModel:
    """One party's part of a SecureBoost model."""

    version: str
    party: str
    features: tuple[str, ...]
    digest: str
    rules: SplitRules                                       # this party's own splits
    objective: str = ""                                     # guest only, from here on
    classes: int = 1
    base_margin: float = 0.0
    hosts: tuple[str, ...] = ()
    needs: dict[str, np.ndarray] = field(default_factory=dict)   # host -> wire ids its trees use
    forest: Forest | None = None
    kind: str = "tree"
    _picks: dict = field(default_factory=dict, repr=False, compare=False)   # host's wire ids -> pick

    def columns(self, available: tuple[str, ...], where: str) -> np.ndarray:
        return feature_columns(self, available, where)

    def margins(self, x: np.ndarray, hosts: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Margins (rows x classes) of rows with the guest's features ``x`` and each host's
        ``(wire ids, (nodes, rows) right bits)``."""
        forest, rows = self.forest, len(x)
        assert forest is not None
        blocks = [self.rules.right(x)]
        for host in self.hosts:
            wire, bits = hosts[host]
            blocks.append(bits[self._pick(host, wire)])
        right = np.vstack(blocks)    # (columns, rows): the guest's splits, then each host's the trees use
        trees, heap = forest.column.shape
        base = (np.arange(trees, dtype=np.int64) * heap)[:, None]
        node = np.zeros((trees, rows), dtype=np.int64)
        row = np.arange(rows)[None, :]
        column = forest.column.ravel()
        for _ in range(forest.depth):
            col = column[node + base]
            split = col >= 0
            if not split.any():
                break
            node = np.where(split, 2 * node + 1 + right[np.where(split, col, 0), row], node)
        values = forest.leaf.ravel()[node + base]          # (trees, rows): each tree's leaf value
        margins = np.empty((rows, self.classes))
        for k in range(self.classes):   # base + the class's trees in order, added one by one (cumsum),
            # as the batch prediction adds them
            mine = values[forest.klass == k]
            margins[:, k] = np.cumsum(np.vstack([np.full((1, rows), self.base_margin), mine]), axis=0)[-1]
        return margins

    def _pick(self, host: str, wire: np.ndarray) -> np.ndarray:
        """Rows of ``host``'s bits (in the order it sent ``wire``) that the trees use, in their order."""
        key = (host, wire.tobytes())
        pick = self._picks.get(key)
        if pick is None:
            at = {int(w): i for i, w in enumerate(wire)}
            try:
                pick = np.array([at[int(w)] for w in self.needs[host]], dtype=np.int64)
            except KeyError as exc:
                raise DataError(f"host {host} sent no direction for node {int(exc.args[0]) >> 32}."
                                f"{int(exc.args[0]) & 0xFFFFFFFF} of model {self.version}") from None
            if len(self._picks) > 16:
                self._picks.clear()
            self._picks[key] = pick
        return pick


def load_tree_model(saved: dict, path: Path, me: str, version: str, text: str) -> TreeModel:
    """A SecureBoost ``model.json`` (already parsed) as served."""
    if saved.get("party") != me:
        raise ConfigError(f"{path} is the model of party {saved.get('party')!r}, and this is {me!r}")
    features, splits = saved.get("features"), saved.get("splits")
    if not isinstance(features, list) or not isinstance(splits, dict):
        raise DataError(f"{path} is a SecureBoost model without its features and split table")
    rules = SplitRules.of(splits, len(features), path)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    base = dict(version=version, party=me, features=tuple(map(str, features)), digest=digest, rules=rules)
    if "trees" not in saved:
        return TreeModel(**base)
    objective = saved.get("objective")
    if objective not in OBJECTIVES:
        raise DataError(f"{path}: objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    try:
        classes, margin = int(saved["num_class"]), float(saved["base_margin"])
        hosts = tuple(map(str, saved["hosts"]))
        forest, needs = _forest(saved["trees"], me, hosts, rules, classes, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable trees: {type(exc).__name__}: {exc}") from None
    return TreeModel(**base, objective=objective, classes=classes, base_margin=margin, hosts=hosts, needs=needs,
                     forest=forest)


def _forest(trees: list, me: str, hosts: tuple[str, ...], rules: SplitRules, classes: int,
            path: Path) -> tuple[Forest, dict[str, np.ndarray]]:
    owned = {me: set(rules.ids)}
    used: dict[str, set[str]] = {h: set() for h in hosts}
    for tree in trees:
        for spec in tree["nodes"].values():
            party = spec.get("party")
            if "leaf" in spec:
                continue
            if party == me:
                if spec["split"] not in owned[me]:
                    raise DataError(f"{path}: split {spec['split']} is not in the guest's split table")
            elif party in used:
                used[party].add(spec["split"])
            else:
                raise DataError(f"{path}: a node is split by {party!r}, which is not a party of the model")
    needs = {h: np.array(sorted(node_id(s) for s in used[h]), dtype=np.uint64) for h in hosts}
    columns = {(me, _canonical(sid)): i for i, sid in enumerate(rules.ids)}
    start = len(rules.ids)
    for h in hosts:
        for i, wire in enumerate(needs[h]):
            columns[(h, f"{int(wire) >> 32}.{int(wire) & 0xFFFFFFFF}")] = start + i
        start += len(needs[h])
    heap = 1 + max((int(n) for tree in trees for n in tree["nodes"]), default=0)
    depth = max(1, heap.bit_length())
    column = np.full((len(trees), heap), -1, dtype=np.int64)
    leaf = np.zeros((len(trees), heap))
    klass = np.zeros(len(trees), dtype=np.int64)
    for t, tree in enumerate(trees):
        klass[t] = int(tree["class"])
        if not 0 <= klass[t] < classes:
            raise DataError(f"{path}: tree {t} is of class {klass[t]}, the model has {classes}")
        for n, spec in tree["nodes"].items():
            n = int(n)
            if "leaf" in spec:
                leaf[t, n] = float(spec["leaf"])
            else:
                if 2 * n + 2 >= heap:
                    raise DataError(f"{path}: tree {t} node {n} is split but has no children")
                column[t, n] = columns[(spec["party"], _canonical(spec["split"]))]
    return Forest(column, leaf, klass, depth), needs


def _canonical(split: str) -> str:
    wire = node_id(split)
    return f"{wire >> 32}.{wire & 0xFFFFFFFF}"


def scores_of(model: TreeModel, margins: np.ndarray) -> dict[str, Any]:
    """What the reply carries: binary: margin and probability; multi-class: per-class margins
    and probabilities (row-major); regression: the value (as the score, no probability)."""
    from fedps.algorithms.secureboost import objective

    if model.objective == "binary:logistic":
        return {"scores": margins[:, 0], "probabilities": objective.sigmoid(margins[:, 0]), "classes": 1}
    if model.objective == "multi:softmax":
        return {"scores": margins.ravel(), "probabilities": objective.softmax(margins).ravel(),
                "classes": model.classes}
    return {"scores": margins[:, 0], "probabilities": (), "classes": 1}
