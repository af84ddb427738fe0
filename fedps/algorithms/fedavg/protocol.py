"""FedAvg with secure aggregation: the coordinator's and a party's role, step by step.

Every message goes over the sealed channel between a party and the
coordinator (parties never talk to each other directly: what one party sends
another is sealed for it and only forwarded). Round ``r`` (docs/protocols.md,
"FedAvg"):

1. coordinator -> all: the global model theta_r, written once to its broadcast
   topic (:mod:`fedps.messaging.broadcast`), and ``start`` on each pair channel
   with the broadcast's ticket (its key and digest), so each party checks that
   the model it reads is the coordinator's of this round.
2. party -> coordinator: ``advertise``: its evaluation of theta_r on its own
   validation rows and two fresh X25519 public keys (shares, masks). U1 = those in
   by the deadline.
3. coordinator -> U1: ``keys`` (everyone's public keys); party -> coordinator:
   ``shares``: Shamir shares of its self-mask seed and mask private key, sealed for
   each member of U1. U2 = those in by the deadline.
4. coordinator -> U2: ``forward`` (the shares sealed for each); the party trains
   E local epochs from theta_r and sends ``masked``: its sample-weighted update,
   fixed point, plus its self mask and pair masks with U2, in slices that the
   coordinator adds to the sum as they arrive (:mod:`.stream`; a stream that
   stops is taken back out of the sum). U3 = those whose update came whole.
5. coordinator -> U3: ``survivors``; each survivor sends ``unmask``: its shares of
   the survivors' self-mask seeds and of the dropped parties' mask keys (never
   both for one party). The coordinator recovers the plain sum from >= t answers.
6. coordinator: theta_{r+1} = theta_r + server_lr * sum(n_u * delta_u) / sum(n_u), into its PS, checkpoint.

A party missing a deadline is told ``dropped`` at its next step and waits for
the next round; fewer than ``min_parties`` left stops every side with the reason.
With ``secure = false`` steps 2-5 carry only the evaluation and the plain update.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from fedps.algorithms.fedavg import secagg, shamir, stream
from fedps.algorithms.fedavg.params import FedAvgParams
from fedps.errors import DataError, FedpsError, PeerError, ProtocolError
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

JOIN = Message("join", "party", "coordinator", dict)
SETUP = Message("setup", "coordinator", "party", dict)
START = Message("start", "coordinator", "party", dict)
#: The global model: on the broadcast topic, announced by the ticket in ``start["model"]``.
MODEL = Message("model", "coordinator", "party", np.ndarray)
#: Record size of the model's broadcast: the coordinator holds about three records at once.
BROADCAST_CHUNK_BYTES = 512 * 1024
ADVERTISE = Message("advertise", "party", "coordinator", dict)
KEYS = Message("keys", "coordinator", "party", dict)
SHARES = Message("shares", "party", "coordinator", dict)
FORWARD = Message("forward", "coordinator", "party", dict)
#: A party's update in slices of ``params.slice_values``, slice i at batch i (:mod:`.stream`).
MASKED = Message(stream.NAME, "party", "coordinator", np.ndarray)
SURVIVORS = Message("survivors", "coordinator", "party", dict)
UNMASK = Message("unmask", "party", "coordinator", dict)
FINAL = Message("final_eval", "party", "coordinator", dict)
#: Where a party may be waiting during round r, in order: an abort is sent to all of them.
_WAIT_POINTS = (KEYS, FORWARD, SURVIVORS)


class Link(Protocol):
    """What the protocol needs of a channel (fedps.messaging.transport.Transport)."""

    def send(self, tag: Any, value: Any) -> None: ...

    def recv(self, tag: Any, timeout: float | None = None) -> Any: ...

    def flush(self) -> None: ...

    def position(self) -> Any:
        """Where reading stands (the coordinator rewinds there to take a broken update back out)."""

    def rewind(self, position: Any) -> None: ...


class Broadcast(Protocol):
    """The coordinator's broadcast topic (fedps.messaging.broadcast): written once, read by every party."""

    def publish(self, tag: Any, value: Any) -> dict: ...

    def fetch(self, tag: Any, ticket: Any, timeout: float | None = None) -> Any: ...


class LocalData(Protocol):
    """A party's side of training: its feature names, evaluation and E local epochs."""

    features: tuple[str, ...]

    def evaluate(self, theta: np.ndarray, round_: int | None = None) -> dict[str, float]:
        """Metrics of ``theta`` on the validation rows (``round_``: the round about to train from it)."""

    def train(self, theta: np.ndarray, round_: int) -> tuple[int, np.ndarray]: ...


def weighted_metrics(evals: dict[str, dict[str, float]]) -> dict[str, float]:
    """Sample-weighted averages of the parties' validation metrics (NaN ones left out)."""
    out: dict[str, float] = {"rows": float(sum(e.get("rows", 0) for e in evals.values())),
                             "parties": float(len(evals))}
    for name in ("auc", "ks", "loss", "accuracy"):
        pairs = [(e["rows"], e[name]) for e in evals.values()
                 if isinstance(e.get(name), (int, float)) and np.isfinite(e[name]) and e.get("rows", 0) > 0]
        weight = sum(w for w, _ in pairs)
        out[name] = float(sum(w * v for w, v in pairs) / weight) if weight else float("nan")
    return out


def _hex(data: bytes) -> str:
    return data.hex()


def _unhex(text: Any, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except (TypeError, ValueError):
        raise ProtocolError(f"{what} is not hex") from None


def _abort_if(value: dict, where: str) -> dict:
    if value.get("status") == "abort":
        raise ProtocolError(f"the coordinator stopped the job at {where}: {value.get('reason', 'no reason given')}")
    return value


# =============================================================================== coordinator
@dataclass
class RoundResult:
    round: int
    participants: list[str]
    dropped: list[str]
    samples: int
    seconds: float
    evaluation: dict[str, float] = field(default_factory=dict)


class ModelStore(Protocol):
    """Where the coordinator keeps the global model (its PS in a job; a dict in maths tests)."""

    def current(self) -> tuple[int, np.ndarray | None]: ...

    def apply(self, round_: int, step: np.ndarray) -> np.ndarray:
        """theta_{round_} = theta_{round_ - 1} + step (theta_{-1} = 0); returns theta_{round_} as stored.

        ``step`` may be the coordinator's sum buffer, reused next round: keep a copy, not ``step``.
        """


class Coordinator:
    """The coordinator's role; ``channels`` has one link per party."""

    def __init__(self, job: str, channels: dict[str, Link], params: FedAvgParams, store: ModelStore,
                 journal: Any = None, on_round: Callable[[RoundResult], None] | None = None,
                 initial: Callable[[tuple[str, ...]], np.ndarray] | None = None, *,
                 broadcast: Broadcast) -> None:
        self.job, self.channels, self.params, self.store = job, channels, params, store
        self.broadcast = broadcast
        self.parties = sorted(channels)
        self.scope = Scope(job, "fedavg")
        self.journal = journal if journal is not None else MemoryJournal()
        self.on_round = on_round or (lambda result: None)
        self.initial = initial
        self.results: list[RoundResult] = []
        self.final_evaluation: dict[str, float] = {}
        self.evaluations: dict[int, dict[str, dict[str, float]]] = {}
        self._sum: np.ndarray | None = None
        if len(self.parties) < params.min_parties:
            raise ProtocolError(f"{len(self.parties)} parties are configured, fewer than "
                                f"params.min_parties = {params.min_parties}")

    # ------------------------------------------------------------------ steps
    def run(self) -> np.ndarray:
        first, theta = self.store.current()
        if theta is not None and hasattr(self.journal, "rewind"):
            if self.journal.rewind(first, self.channels):
                log.info("fedavg: resumed inside round %d; replaying it as journaled", first)
        if theta is None:
            theta = self._setup()
            first = 0
        for r in range(first, self.params.rounds):
            started = time.perf_counter()
            self.journal.begin(r, self.channels)
            for party in self.parties:
                self._forget(party, r)
            self._broadcast(self.scope.at(iteration=r), {"status": "go", "round": r}, theta)
            size = theta.size
            del theta   # the store keeps the model; the coordinator holds the sum and a few slices
            theta = self._round(r, size, started)
        self._finish(theta)
        return theta

    def _setup(self) -> np.ndarray:
        """Join: the parties' columns must agree; the initial model is stored before anyone is told."""
        scope = self.scope
        joined = self._gather(JOIN, scope, self.parties, "setup", wait_s=self.params.join_deadline_s)
        features = {tuple(v.get("features", ())) for v in joined.values()}
        if len(joined) < self.params.min_parties:
            self._abort(scope, SETUP, self.parties, f"only {len(joined)} of {len(self.parties)} parties joined "
                        f"({', '.join(sorted(joined)) or 'none'}); params.min_parties = {self.params.min_parties}")
        if len(features) != 1:
            self._abort(scope, SETUP, self.parties, "the parties' data have different columns: "
                        + "; ".join(f"{p}: {len(v.get('features', ()))} features" for p, v in sorted(joined.items())))
        if self.initial is None:
            raise ProtocolError("the coordinator has no initial model")
        theta = self.store.apply(0, self.initial(features.pop()))
        for party in self.parties:
            self.channels[party].send(scope.tag(SETUP.name), {
                "status": "go", "parties": self.parties, "threshold": self.params.min_parties,
                "secure": self.params.secure, "frac_bits": self.params.frac_bits})
        return theta

    def _round(self, r: int, size: int, started: float) -> np.ndarray:
        """Steps 2-6 of round ``r`` (step 1, the model's broadcast, is done): returns theta_{r+1}."""
        scope = self.scope.at(iteration=r)
        if self.params.secure:
            adverts = self._gather(ADVERTISE, scope, self.parties, "advertise")
            self.evaluations[r] = {p: a.get("evaluation", {}) for p, a in adverts.items()}
            active = self._require(scope, sorted(adverts), r, "advertise")
            total, active, dropped = self._secure_sum(scope, r, adverts, active, size + 1)
        else:
            total, adverts = self._plain_sum(scope, size + 1)
            self.evaluations[r] = {p: a.get("evaluation", {}) for p, a in adverts.items()}
            active = self._require(scope, sorted(adverts), r, "update")
            dropped = sorted(set(self.parties) - set(active))
        samples = float(total[-1])
        if samples <= 0:
            raise ProtocolError(f"round {r}: the parties reported no training rows")
        step = total[:-1]
        del total
        step /= samples
        if self.params.server_learning_rate != 1.0:
            step *= self.params.server_learning_rate
        theta = self.store.apply(r + 1, step)
        del step
        result = RoundResult(r, active, dropped, int(round(samples)), time.perf_counter() - started,
                             weighted_metrics(self.evaluations[r]))
        self.results.append(result)
        self.on_round(result)
        log.info("fedavg round %d: %d parties, %d rows, %.2fs, validation AUC of theta_%d %.4f",
                 r, len(active), result.samples, result.seconds, r, result.evaluation.get("auc", float("nan")))
        return theta

    def _plain_sum(self, scope: Scope, size: int) -> tuple[np.ndarray, dict[str, dict]]:
        """Each party's advertisement, then its update added slice by slice (:mod:`.stream`).

        (A party sends both at once; read step by step, every party's update
        would wait in its channel while the others' advertisements are read.)
        """
        total = self._zeroed_sum(size, np.float64)

        def read(party: str, wait: Callable[[], float]) -> dict:
            advert = ADVERTISE.check(self.channels[party].recv(scope.tag(ADVERTISE.name), timeout=wait()))
            self._add_stream(party, scope, total, wait)
            return advert

        return total, self._gather(ADVERTISE, scope, self.parties, "update", read=read)

    def _zeroed_sum(self, size: int, dtype: type) -> np.ndarray:
        """The job's one sum buffer, zeroed, seen as ``dtype`` (zero bits are 0 in uint64 and float64).

        One buffer for every round: a round's sum is never a fresh allocation
        that a reference cycle (kafka-python's timeouts keep frames alive until
        the next garbage collection) could keep beside the next round's.
        """
        if self._sum is None or self._sum.size != size:
            self._sum = np.zeros(size, dtype=np.uint64)
        else:
            self._sum.fill(0)
        return self._sum.view(dtype)

    def _add_stream(self, party: str, scope: Scope, total: np.ndarray, wait: Callable[[], float]) -> None:
        """``total += party's update``; a stream that stops is taken back out and its rest dropped unread."""
        try:
            stream.add(self.channels[party], scope, total, wait, party)
        except stream.SumSpoiled:
            raise
        except FedpsError:
            self._forget(party, scope.iteration, also=stream.NAME)
            raise

    def _secure_sum(self, scope: Scope, r: int, adverts: dict[str, dict], u1: list[str],
                    size: int) -> tuple[np.ndarray, list[str], list[str]]:
        keys = {p: (_unhex(adverts[p].get("share_key"), "share key"), _unhex(adverts[p].get("mask_key"), "mask key"))
                for p in u1}
        self._tell_dropped(scope, KEYS, set(self.parties) - set(u1))
        table = {p: [_hex(a), _hex(b)] for p, (a, b) in keys.items()}
        for party in u1:
            self.channels[party].send(scope.tag(KEYS.name), {"status": "go", "keys": table})
        shares = self._gather(SHARES, scope, u1, "shares",
                              check=lambda p, v: set(v.get("sealed", {})) == set(u1) - {p})
        u2 = self._require(scope, sorted(shares), r, "shares")
        self._tell_dropped(scope, FORWARD, set(u1) - set(u2))
        for v in u2:
            sealed = {u: shares[u]["sealed"][v] for u in u2 if u != v}
            self.channels[v].send(scope.tag(FORWARD.name), {"status": "go", "shares": sealed})
        total = self._zeroed_sum(size, np.uint64)

        def read(party: str, wait: Callable[[], float]) -> bool:
            self._add_stream(party, scope, total, wait)
            return True

        u3 = self._require(scope, sorted(self._gather(MASKED, scope, u2, "masked", read=read)), r, "masked")
        self._tell_dropped(scope, SURVIVORS, set(u2) - set(u3))
        for party in u3:
            self.channels[party].send(scope.tag(SURVIVORS.name), {"status": "go", "survivors": u3})
        answers = self._gather(UNMASK, scope, u3, "unmask")
        dropped = sorted(set(u2) - set(u3))
        if len(answers) < self.params.min_parties:
            self._abort(scope, None, self.parties, f"round {r}: only {len(answers)} parties sent their shares "
                        f"to unmask the sum, fewer than the threshold {self.params.min_parties}")
        index = {p: i + 1 for i, p in enumerate(self.parties)}
        self_shares = {v: self._shares(answers, "self", v, index) for v in u3}
        key_shares = {v: self._shares(answers, "key", v, index) for v in dropped}
        plain = secagg.remove_masks(total, survivors=u3, dropped=dropped, self_shares=self_shares,
                                    key_shares=key_shares, mask_publics={p: keys[p][1] for p in u2},
                                    threshold=self.params.min_parties, job=self.job, round_=r)
        return secagg.dequantise_in_place(plain, self.params.frac_bits), u3, sorted(set(self.parties) - set(u3))

    @staticmethod
    def _shares(answers: dict[str, dict], kind: str, owner: str, index: dict[str, int]) -> dict[int, int]:
        found = {}
        for holder, answer in answers.items():
            text = answer.get(kind, {}).get(owner)
            if text is not None:
                found[index[holder]] = int(text, 16)
        return found

    def _finish(self, theta: np.ndarray) -> None:
        scope = self.scope.at(iteration=self.params.rounds)
        self._broadcast(scope, {"status": "done", "round": self.params.rounds}, theta)
        finals = self._gather(FINAL, scope, self.parties, "final evaluation")
        self.evaluations[self.params.rounds] = finals
        self.final_evaluation = weighted_metrics(finals)

    # ------------------------------------------------------------------ helpers
    def _broadcast(self, scope: Scope, start: dict, theta: np.ndarray) -> None:
        """The model once on the broadcast topic, then ``start`` with its ticket to every party."""
        ticket = self.broadcast.publish(scope.tag(MODEL.name), theta)
        for party in self.parties:
            self.channels[party].send(scope.tag(START.name), {**start, "model": ticket})
            self.channels[party].flush()

    def _gather(self, message: Message, scope: Scope, parties: list[str], step: str,
                check: Callable[[str, Any], bool] | None = None, wait_s: float | None = None,
                read: Callable[[str, Callable[[], float]], Any] | None = None) -> dict[str, Any]:
        """Each party's ``message``, read one party at a time, until one deadline for all.

        A party whose message is late (beyond the deadline and a short grace),
        malformed or refused by ``check`` is left out (dropped for the round).
        ``read(party, wait)`` reads a party's answer instead of one ``recv``
        (an update, added to the sum as it streams in; ``wait()`` is how long
        the next message may take), and its channel is then committed. A
        replayed round reads exactly the parties its journal recorded.
        """
        decided = self.journal.decided(scope.iteration, step)
        wanted = decided if decided is not None else parties
        wait_s = self.params.deadline_s if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s

        def wait() -> float:
            left = max(deadline - time.monotonic(), self.params.grace_s)
            return max(left, wait_s) if decided is not None else left

        got: dict[str, Any] = {}
        for party in wanted:
            try:
                if read is None:
                    value = message.check(self.channels[party].recv(scope.tag(message.name), timeout=wait()))
                else:
                    value = read(party, wait)
                    commit = getattr(self.channels[party], "commit", None)
                    if commit is not None:   # the position past what was read, kept for a resume
                        commit()
                if check is not None and not check(party, value):
                    raise ProtocolError(f"{party}'s {message.name} is malformed")
                got[party] = value
            except stream.SumSpoiled as exc:
                self._abort(scope, None, self.parties, str(exc))
            except (PeerError, ProtocolError, DataError) as exc:
                if decided is not None:
                    raise ProtocolError(f"replaying round {scope.iteration}: {party}'s {message.name} "
                                        f"is no longer readable ({exc})") from exc
                log.warning("fedavg %s: %s dropped at step %s: %s", scope, party, step, exc)
        self.journal.decide(scope.iteration, step, sorted(got))
        return got

    def _forget(self, party: str, round_: int, also: str | None = None) -> None:
        """Drop unread, on ``party``'s channel, messages of rounds before ``round_`` (and ``also`` of it).

        So a late party's answers (a dropped stream's rest) are not kept for nobody.
        """
        drop = getattr(self.channels[party], "drop", None)
        if drop is not None:
            drop(lambda tag: tag.phase == self.scope.phase and 0 <= tag.iteration <= round_
                 and (tag.iteration < round_ or tag.name == also))

    def _require(self, scope: Scope, active: list[str], r: int, step: str) -> list[str]:
        if len(active) < self.params.min_parties:
            self._abort(scope, None, self.parties, f"round {r}: only {len(active)} parties are left after step "
                        f"{step} ({', '.join(active) or 'none'}), fewer than params.min_parties = "
                        f"{self.params.min_parties}")
        return active

    def _tell_dropped(self, scope: Scope, message: Message, parties: set[str]) -> None:
        for party in sorted(parties):
            self.channels[party].send(scope.tag(message.name), {"status": "dropped"})

    def _abort(self, scope: Scope, message: Message | None, parties: list[str], reason: str) -> None:
        """Tell every party at every point it may be waiting, then raise."""
        points = [message] if message is not None else list(_WAIT_POINTS)
        nxt = scope.at(iteration=scope.iteration + 1)
        for party in parties:
            for point in points:
                self._try_send(party, scope.tag(point.name), reason)
            self._try_send(party, nxt.tag(START.name), reason)
        raise ProtocolError(reason)

    def _try_send(self, party: str, tag: Any, reason: str) -> None:
        try:
            self.channels[party].send(tag, {"status": "abort", "reason": reason})
        except FedpsError as exc:
            log.warning("could not tell %s that the job stopped: %s", party, exc)


class MemoryJournal:
    """A journal that forgets (maths tests, and a coordinator that never resumes)."""

    def begin(self, round_: int, channels: dict[str, Link]) -> None:
        pass

    def decided(self, round_: int, step: str) -> list[str] | None:
        return None

    def decide(self, round_: int, step: str, parties: list[str]) -> None:
        pass


# =============================================================================== party
class Party:
    """A party's role: ``link`` is its channel to the coordinator."""

    def __init__(self, job: str, me: str, link: Link, params: FedAvgParams, data: LocalData,
                 first_round: int = 0, parties: list[str] | None = None,
                 on_round_done: Callable[[int], None] | None = None, *, broadcast: Broadcast) -> None:
        self.job, self.me, self.link, self.params, self.data = job, me, link, params, data
        self.broadcast = broadcast
        self.scope = Scope(job, "fedavg")
        self.round = first_round
        self.parties = list(parties or [])
        self.on_round_done = on_round_done or (lambda r: None)
        self.final_model: np.ndarray | None = None
        self.final_evaluation: dict[str, float] = {}
        self.dropped_rounds: list[int] = []

    def _recv(self, message: Message, scope: Scope) -> Any:
        return message.check(self.link.recv(scope.tag(message.name), timeout=self.params.party_wait))

    def run(self) -> np.ndarray:
        if not self.parties:
            self._join()
            self.on_round_done(self.round)
        while True:
            scope = self.scope.at(iteration=self.round)
            start = _abort_if(self._recv(START, scope), f"round {self.round}")
            theta = MODEL.check(self.broadcast.fetch(scope.tag(MODEL.name), start.get("model"),
                                                     timeout=self.params.party_wait))
            if start.get("status") == "done":
                self.final_evaluation = self.data.evaluate(theta)
                self.link.send(scope.tag(FINAL.name), self.final_evaluation)
                self.final_model = theta
                return theta
            completed = self._round(scope, theta)
            if not completed:
                self.dropped_rounds.append(self.round)
            self.round += 1
            self.on_round_done(self.round)
            done = self.round
            drop = getattr(self.link, "drop", None)
            if drop is not None:   # copies of earlier rounds' messages (a resumed coordinator replays)
                drop(lambda tag: tag.phase == "fedavg" and 0 <= tag.iteration < done)

    def _join(self) -> None:
        self.link.send(self.scope.tag(JOIN.name), {"features": list(self.data.features)})
        setup = _abort_if(self._recv(SETUP, self.scope), "setup")
        self.parties = list(setup["parties"])
        if self.me not in self.parties:
            raise ProtocolError(f"the coordinator's party list {self.parties} does not hold {self.me}")
        if setup.get("secure") != self.params.secure:
            raise ProtocolError(f"the coordinator runs secure = {setup.get('secure')}, this party "
                                f"params.secure = {self.params.secure}; both must agree")
        if int(setup["threshold"]) < self.params.min_parties or setup.get("frac_bits") != self.params.frac_bits:
            raise ProtocolError(f"the coordinator's threshold {setup['threshold']} / frac_bits {setup.get('frac_bits')} "
                                f"differ from this party's min_parties {self.params.min_parties} / frac_bits "
                                f"{self.params.frac_bits}")

    def _round(self, scope: Scope, theta: np.ndarray) -> bool:
        """One round; False when the coordinator dropped this party from it."""
        evaluation = self.data.evaluate(theta, scope.iteration)
        if not self.params.secure:
            self.link.send(scope.tag(ADVERTISE.name), {"evaluation": evaluation})
            stream.send(self.link, scope, self._update(theta, scope.iteration), self.params.slice_values)
            return True
        secrets_ = secagg.RoundSecrets.fresh()
        share_public, mask_public = secrets_.public()
        self.link.send(scope.tag(ADVERTISE.name), {"evaluation": evaluation, "share_key": _hex(share_public),
                                                   "mask_key": _hex(mask_public)})
        keys = _abort_if(self._recv(KEYS, scope), f"round {scope.iteration} keys")
        if keys["status"] == "dropped":
            return False
        table = {p: (_unhex(a, "share key"), _unhex(b, "mask key")) for p, (a, b) in keys["keys"].items()}
        self._check_enough(table, "keys")
        mine = self._send_shares(scope, secrets_, table)
        forward = _abort_if(self._recv(FORWARD, scope), f"round {scope.iteration} shares")
        if forward["status"] == "dropped":
            return False
        held = self._open_shares(scope, secrets_, table, forward["shares"], mine)
        u2 = sorted(held)
        self._check_enough(u2, "shares")
        quantised = secagg.quantise(self._update(theta, scope.iteration), self.params.frac_bits, self._bound())
        peers = {p: table[p][1] for p in u2 if p != self.me}
        stream.send(self.link, scope, secagg.mask(quantised, secrets_, peers, self.job, scope.iteration, self.me),
                    self.params.slice_values)
        survivors = _abort_if(self._recv(SURVIVORS, scope), f"round {scope.iteration} survivors")
        if survivors["status"] == "dropped":
            return False
        alive = list(survivors["survivors"])
        if not set(alive) <= set(u2) or self.me not in alive:
            raise ProtocolError(f"round {scope.iteration}: the survivors {alive} are not a subset of the "
                                f"parties that shared keys {u2}")
        self._check_enough(alive, "survivors")
        # Shares of the survivors' self-mask seeds, of the dropped ones' mask keys: never both for one party.
        self.link.send(scope.tag(UNMASK.name), {
            "self": {v: format(held[v][0], "x") for v in alive},
            "key": {v: format(held[v][1], "x") for v in u2 if v not in alive}})
        return True

    def _update(self, theta: np.ndarray, round_: int) -> np.ndarray:
        rows, trained = self.data.train(theta, round_)
        return np.concatenate([rows * (trained - theta), [float(rows)]])

    def _bound(self) -> float:
        """The largest |value| whose sum over every party stays inside the signed 64-bit ring."""
        return float(2 ** 62) / float(1 << self.params.frac_bits) / len(self.parties)

    def _check_enough(self, parties: Any, step: str) -> None:
        if len(parties) < self.params.min_parties:
            raise ProtocolError(f"only {len(parties)} parties are left at step {step}, fewer than "
                                f"params.min_parties = {self.params.min_parties}")

    def _send_shares(self, scope: Scope, secrets_: secagg.RoundSecrets,
                     table: dict[str, tuple[bytes, bytes]]) -> tuple[int, int]:
        index = {p: i + 1 for i, p in enumerate(self.parties)}
        members = sorted(table)
        xs = [index[p] for p in members]
        t = self.params.min_parties
        self_shares = shamir.split(secrets_.self_seed, xs, t)
        key_shares = shamir.split(secrets_.mask_key, xs, t)
        sealed = {}
        for peer in members:
            if peer != self.me:
                cipher = secagg.share_cipher(secrets_.share_key, table[peer][0], self.job, scope.iteration)
                sealed[peer] = _hex(secagg.seal_share(cipher, self.me, peer, self.job, scope.iteration,
                                                      self_shares[index[peer]], key_shares[index[peer]]))
        self.link.send(scope.tag(SHARES.name), {"sealed": sealed})
        return self_shares[index[self.me]], key_shares[index[self.me]]

    def _open_shares(self, scope: Scope, secrets_: secagg.RoundSecrets, table: dict[str, tuple[bytes, bytes]],
                     forwarded: dict[str, str], mine: tuple[int, int]) -> dict[str, tuple[int, int]]:
        held = {self.me: mine}
        for sender, text in forwarded.items():
            if sender not in table:
                raise ProtocolError(f"shares forwarded from {sender}, who did not announce keys")
            cipher = secagg.share_cipher(secrets_.share_key, table[sender][0], self.job, scope.iteration)
            held[sender] = secagg.open_share(cipher, sender, self.me, self.job, scope.iteration,
                                             _unhex(text, "sealed share"))
        return held
