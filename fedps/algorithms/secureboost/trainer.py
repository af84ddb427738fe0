"""The drivers of SecureBoost: per tree, one executor stage beside the level decisions.

Per tree every party starts the stage of :mod:`tasks` and, beside it, runs
its side of each level over whole-node sums only: the host driver adds its
tasks' partial histograms (in its accumulator), applies the sibling trick,
seals and sends them; the guest driver opens them, picks the splits and
publishes its decisions to its tasks. After each tree the guest reports
whether to go on (early stopping) and every party checkpoints: a party
killed at any point resumes at its last finished tree and builds the same model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedps.algorithms.secureboost import goss, protocol
from fedps.algorithms.secureboost.params import SBParams
from fedps.algorithms.secureboost.protocol import NEXT, SEALED, SPLITS, Nodes, scope, split_id
from fedps.algorithms.secureboost.reference import rules
from fedps.algorithms.secureboost.tasks import Plan, guest_tree, host_tree, packer_for
from fedps.algorithms.secureboost.tree import SplitTable, candidates, feature_mask
from fedps.engine.vertical.job import VerticalJob
from fedps.engine.vertical.scores import ScoreSummary
from fedps.messaging.codec import Blob

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint records besides the channel and link positions."""

    tree: int = 0                                   # rounds finished
    trees: list[dict] = field(default_factory=list)  # guest: the tree structures
    splits: dict[str, dict] = field(default_factory=dict)   # this party's split table
    metrics: list[dict] = field(default_factory=list)
    best: int = -1                                  # guest: best round on the validation split
    done: bool = False
    keep: int = 0                                   # rounds kept after early stopping (0: all)


@dataclass
class Trainer:
    job: VerticalJob
    params: SBParams
    plan: Plan
    table: SplitTable
    state: TrainState = field(default_factory=TrainState)
    summary: ScoreSummary | None = None
    secret: bytes = b""        # the host's: its bin shuffles derive from it
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def nodes(self) -> Nodes:
        return Nodes(self.params.max_depth, self.params.classes)

    def run(self) -> TrainState:
        s = self.state
        while s.tree < self.params.trees and not s.done:
            t = s.tree
            self.job.drop(lambda tag, t=t: tag.phase == "setup" or (tag.phase == "tree" and tag.iteration < t))
            plan = dataclasses.replace(self.plan, tree=t)
            work = guest_tree if self.job.is_guest else host_tree
            stage = self.job.stage(functools.partial(work, plan=plan), f"tree-{t}")
            try:
                if self.job.is_guest:
                    self._guest_tree(plan)
                else:
                    self._host_tree(plan)
            except BaseException:
                if not stage.settle(10.0):
                    stage.join()   # the stage's own error says more
                raise
            results = stage.join()
            self._end_tree(plan, results)
            s.tree = t + 1
            self.save()
        return s

    def save(self) -> None:
        self.state.splits = self.table.to_json()
        self.job.save(self.state.tree, dataclasses.asdict(self.state))

    # ------------------------------------------------------------------ guest
    def _guest_tree(self, plan: Plan) -> None:
        from fedps.algorithms.secureboost.cipher import SealedHistograms, open_histograms
        from fedps.engine.crypto import Decryptor

        job, params, nodes, t = self.job, self.params, self.nodes, plan.tree
        rule, packer = rules(params), packer_for(plan)
        decryptor, key = Decryptor(job.private_key), job.private_key.public_key
        own = candidates(plan.bins, feature_mask(len(plan.bins.cuts), params.colsample_bytree, params.seed, t,
                                                 job.me))
        trees = [{"class": k, "nodes": {}} for k in range(params.classes)]
        if goss.enabled(params):
            self._goss_threshold(plan)
        frontier, leaves, previous = nodes.roots(), {}, {}
        for level in range(params.max_depth + 1):
            may_split = level < params.max_depth
            mine = job.total(t, f"hist{level}")
            port = scope(job.job, t, level)
            opened = {}
            if may_split:
                for host in job.hosts:
                    blob = SEALED.check(job.channels[host].recv(port.tag(SEALED.name)))
                    got = open_histograms(decryptor, SealedHistograms.from_bytes(blob.data, key), packer,
                                          quantized=True)
                    opened[host] = got if level == 0 else protocol.derive_siblings(got, previous[host], frontier,
                                                                                   nodes, host)
                previous = opened
            decisions = []
            for i, node in enumerate(frontier):
                k = nodes.klass(node) if params.classes > 1 else None
                hosts = {h: protocol.shown_left_sums(opened[h][node], k) for h in opened}
                decisions.append(protocol.guest_choose(
                    node, mine["totals"][i], mine["hist"][i] if may_split else None, own, self.table, hosts, rule,
                    params.max_bin, split_id(t, node), params.learning_rate, may_split))
            split = [d for d in decisions if d.party is not None]
            next_frontier = sorted(c for d in split for c in nodes.children(d.node))
            if may_split:
                for host in job.hosts:
                    won = {str(d.node): [list(x) for x in d.tied] for d in split if d.party == host}
                    job.channels[host].send(port.tag(SPLITS.name), SPLITS.check(
                        {"split": [d.node for d in split], "won": won}))
            for d in decisions:
                tree = trees[nodes.klass(d.node)]["nodes"]
                if d.party is None:
                    leaves[d.node] = d.leaf
                    tree[str(nodes.local(d.node))] = {"leaf": d.leaf}
                else:
                    tree[str(nodes.local(d.node))] = {"party": d.party, "split": split_id(t, d.node),
                                                      "gain": d.gain}
            job.publish(t, f"split{level}", {"split": {d.node: {"party": d.party, "spec": d.spec} for d in split},
                                             "frontier": next_frontier})
            frontier = next_frontier
            if not frontier:
                break
        job.publish(t, "leaves", leaves)
        self.state.trees.extend(trees)

    def _goss_threshold(self, plan: Plan) -> int:
        """GOSS: pick the K-th largest gradient size digit by digit from the tasks' counts (goss.py)."""
        job, params, t = self.job, self.params, plan.tree
        n_rounds, prefix, k_left = goss.rounds(goss.size_bits(params, plan.g_bound)), 0, 0
        for r in range(n_rounds):
            total = job.total(t, f"goss{r}")
            if r == 0:
                k_left = goss.top_count(params, int(total["rows"][0]))
            prefix, k_left = goss.choose_digit(np.asarray(total["counts"]), prefix, k_left)
            job.publish(t, f"goss{r}", {"prefix": prefix})
        return prefix

    # ------------------------------------------------------------------ host
    def _host_tree(self, plan: Plan) -> None:
        from fedps.algorithms.secureboost.cipher import BinPermutation, EncryptedHistograms
        from fedps.engine.crypto import PublicKey

        job, params, nodes, t = self.job, self.params, self.nodes, plan.tree
        guest_key = PublicKey(plan.guest_n)
        selected = np.flatnonzero(feature_mask(len(plan.bins.cuts), params.colsample_bytree, params.seed, t,
                                               job.me))
        cands = candidates(plan.bins, feature_mask(len(plan.bins.cuts), params.colsample_bytree, params.seed, t,
                                                   job.me))
        index = protocol.candidate_index(cands)
        n_bins = [plan.bins.present_bins(j) + 1 for j in selected]
        cumulative = [not plan.bins.is_categorical(j) for j in selected]   # categorical: each category's own sums
        frontier, parents = nodes.roots(), None
        # one shuffle per class tree and feature, for all its nodes: the guest subtracts shown entries in place
        shuffle = BinPermutation.draw(nodes.roots(), n_bins, protocol.permutation_rng(self.secret, t, 0))
        for level in range(params.max_depth):
            port = scope(job.job, t, level)
            if level == 0:
                build = list(frontier)
            else:
                counts = job.total(t, f"counts{level}")["counts"]
                build = [frontier[i] if counts[i] <= counts[i + 1] else frontier[i + 1]
                         for i in range(0, len(frontier), 2)]
            job.publish(t, f"build{level}", build)
            built = EncryptedHistograms.from_bytes(job.total(t, f"hist{level}", n=plan.guest_n), guest_key)
            pieces = [built]
            if level > 0:   # the sibling trick: parent minus the built child, under encryption
                for i in range(0, len(frontier), 2):
                    left, right = frontier[i], frontier[i + 1]
                    done, other = (left, right) if left in build else (right, left)
                    parent = (nodes.klass(left) * nodes.span) + (nodes.local(left) - 1) // 2
                    pieces.append(parents.select([parent]).subtract(built.select([done]), nodes=[other]))
            full = EncryptedHistograms.concat(pieces).select(frontier)
            permutation = BinPermutation({n: shuffle.orders[nodes.klass(n) * nodes.span] for n in frontier})
            shown = full if level == 0 else built   # below the roots the guest derives each larger sibling
            job.channels[job.guest].send(port.tag(SEALED.name),
                                         SEALED.check(Blob(protocol.SEALED_KIND,
                                                         shown.seal(permutation, cumulative).to_bytes())))
            answer = SPLITS.check(job.channels[job.guest].recv(port.tag(SPLITS.name)))
            split = sorted(int(k) for k in answer["split"])
            mine = {}
            for key, tied in sorted(answer.get("won", {}).items()):
                node = int(key)
                best = protocol.host_resolve(tied, selected, cands, index, permutation, node, plan.bins.has_missing)
                mine[str(node)] = self.table.record(cands, best, split_id(t, node))
            next_frontier = sorted(c for n in split for c in nodes.children(n))
            job.publish(t, f"split{level}", {"split": split, "mine": mine, "frontier": next_frontier})
            if not split:
                break
            parents, frontier = full.select(split), next_frontier

    # ------------------------------------------------------------------ after a tree
    def _end_tree(self, plan: Plan, results: list[dict[str, Any]]) -> None:
        s, params, job = self.state, self.params, self.job
        port = scope(job.job, plan.tree, params.max_depth + 1)
        if not job.is_guest:
            answer = NEXT.check(job.channels[job.guest].recv(port.tag(NEXT.name)))
            s.done, s.keep = bool(answer["stop"]), int(answer.get("keep", 0))
            if s.keep:
                self._truncate(s.keep)
            return
        total = {"train_loss": 0.0, "train_rows": 0, "valid_loss": 0.0, "valid_rows": 0, "valid_correct": 0}
        summary = ScoreSummary() if params.objective == "binary:logistic" else None
        for part in results:
            for name in total:
                total[name] += part[name]
            if summary is not None and part.get("summary") is not None:
                summary.merge(part["summary"])
        entry = {"tree": plan.tree + 1, "train_loss": total["train_loss"] / max(total["train_rows"], 1)}
        if total["valid_rows"]:
            entry["valid_loss"] = total["valid_loss"] / total["valid_rows"]
            if summary is not None:
                entry.update({f"valid_{k}": v for k, v in summary.metrics().items() if k != "rows"})
                self.summary = summary
            elif params.objective == "multi:softmax":
                entry["valid_accuracy"] = total["valid_correct"] / total["valid_rows"]
            else:
                entry["valid_rmse"] = float(np.sqrt(2 * entry["valid_loss"]))
        s.metrics.append(entry)
        keep = 0
        if params.early_stopping_rounds and "valid_loss" in entry:
            losses = [m["valid_loss"] for m in s.metrics]
            s.best = int(np.argmin(losses))
            keep = rounds_to_keep(losses, params.early_stopping_rounds)
            if keep:
                s.trees = s.trees[: keep * params.classes]
                log.info("early stopping after round %d: the best was round %d", plan.tree + 1, keep)
        stop = keep > 0
        for host in job.hosts:
            job.channels[host].send(port.tag(NEXT.name), NEXT.check({"stop": stop, "keep": keep}))
        s.done, s.keep = stop, keep
        if keep:
            self._truncate(keep)
        log.info("tree %d: %s", plan.tree + 1, ", ".join(f"{k} {v:.5f}" for k, v in entry.items() if k != "tree"))

    def _truncate(self, rounds: int) -> None:
        for sid in [sid for sid in self.table.splits if int(sid.split(".")[0]) >= rounds]:
            del self.table.splits[sid]


def rounds_to_keep(valid_losses: list[float], patience: int) -> int:
    """Early stopping: 0 to go on, else the rounds to keep (up to the best) after ``patience`` without a gain."""
    best = int(np.argmin(valid_losses))
    return best + 1 if len(valid_losses) - 1 - best >= patience else 0
