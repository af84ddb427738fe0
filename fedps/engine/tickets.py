"""Pre-authorised tickets: a party lets one peer start jobs within a signed scope, at any time.

A ticket is a canonical JSON body signed with the issuer's Ed25519 identity key. It names
the issuer and the peer (each by name and public identity key), the algorithms and the
issuer's data sets the peer may use (each data set by name and the schema hash of its
declared columns, :func:`fedps.engine.agreement.schema_hash`), an expiry and a maximum
number of runs. The issuer keeps every ticket it issued, its revocation and each use in
its state folder (``<state>/tickets``, folders 0700, files 0600); its agent
(``fedps.engine.agent``) checks a request against all of that with :func:`check_request`,
which names the first reason to refuse it.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedps.errors import ConfigError, PeerError
from fedps.messaging.config import check_name
from fedps.messaging.identity import parse_public, public_text

VERSION = 1
_CONTEXT = b"fedps/ticket/v1\n"
#: Outcomes of a use that count as a run against ``max_runs``.
COUNTED = ("accepted", "started", "done", "failed")


class TicketRefused(PeerError):
    """The issuer refused a ticketed job; ``reason`` is the short code, the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Ticket:
    """A verified-shape ticket: the signed ``body`` as issued and its ``signature``."""

    body: Mapping[str, Any]
    signature: bytes

    @property
    def id(self) -> str:
        return str(self.body["id"])

    @property
    def issuer(self) -> str:
        return str(self.body["issuer"]["name"])

    @property
    def issuer_key(self) -> str:
        return str(self.body["issuer"]["key"])

    @property
    def peer(self) -> str:
        return str(self.body["peer"]["name"])

    @property
    def peer_key(self) -> str:
        return str(self.body["peer"]["key"])

    @property
    def algorithms(self) -> list[str]:
        return list(self.body["algorithms"])

    @property
    def datasets(self) -> dict[str, str]:
        """Data set name -> schema hash."""
        return {str(d["name"]): str(d["schema"]) for d in self.body["datasets"]}

    @property
    def expires_at(self) -> float:
        return _parse_time(self.body["expires_at"])

    @property
    def max_runs(self) -> int:
        return int(self.body["max_runs"])

    def to_json(self) -> str:
        return json.dumps({"ticket": dict(self.body), "signature": base64.b64encode(self.signature).decode()},
                          indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> Ticket:
        """Parse a ticket file's content; TicketRefused("malformed") names what is wrong."""
        try:
            data = json.loads(text) if isinstance(text, (str, bytes)) else dict(text)
            body, signature = data["ticket"], base64.b64decode(data["signature"], validate=True)
            ticket = cls(body, signature)
            if body.get("version") != VERSION:
                raise ValueError(f"version {body.get('version')!r}, this fedps reads version {VERSION}")
            for name in (ticket.id, ticket.issuer, ticket.peer, *ticket.algorithms, *ticket.datasets):
                check_name("ticket field", name)
            parse_public(ticket.issuer_key, ticket.issuer)
            parse_public(ticket.peer_key, ticket.peer)
            if ticket.max_runs < 1 or ticket.expires_at <= 0:
                raise ValueError("max_runs and expires_at must be positive")
        except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
            raise TicketRefused("malformed", f"the ticket is malformed: {exc}") from None
        return ticket


def canonical(body: Mapping[str, Any]) -> bytes:
    """The signed bytes: a context line, then the body as sorted, compact, ASCII JSON."""
    return _CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def issue(identity: Ed25519PrivateKey, issuer: str, peer: str, peer_key: str, algorithms: list[str],
          datasets: Mapping[str, str], expires_at: float, max_runs: int, now: float | None = None) -> Ticket:
    """A new ticket signed by ``identity``; ``datasets`` maps each data set's name to its schema hash."""
    parse_public(peer_key, peer)
    for name in (issuer, peer, *algorithms, *datasets):
        check_name("ticket field", name)
    if not algorithms or not datasets:
        raise ConfigError("a ticket names at least one algorithm and one data set")
    if any(not schema for schema in datasets.values()):
        raise ConfigError("every data set of a ticket needs its declared columns (a schema hash)")
    now = time.time() if now is None else now
    if max_runs < 1:
        raise ConfigError(f"a ticket's maximum number of runs must be at least 1, got {max_runs}")
    if expires_at <= now:
        raise ConfigError("a ticket's expiry must be in the future")
    body = {
        "version": VERSION,
        "id": f"t-{secrets.token_hex(8)}",
        "issuer": {"name": issuer, "key": public_text(identity.public_key())},
        "peer": {"name": peer, "key": peer_key},
        "algorithms": sorted(set(algorithms)),
        "datasets": [{"name": n, "schema": datasets[n]} for n in sorted(datasets)],
        "issued_at": _format_time(now),
        "expires_at": _format_time(expires_at),
        "max_runs": int(max_runs),
    }
    return Ticket(body, identity.sign(canonical(body)))


def verify_signature(ticket: Ticket, own_key: str) -> None:
    """TicketRefused unless the ticket is signed, unaltered, by the key ``own_key`` (the issuer's own).

    ``re-signed``: validly signed, but by the key the ticket names and that is not ours;
    ``forged``: its signature does not verify under our key (altered, or made up).
    """
    if ticket.issuer_key != own_key:
        if _verifies(ticket.issuer_key, ticket):
            raise TicketRefused("re-signed", f"the ticket {ticket.id} is signed by another key than this "
                                             f"party's identity key: {ticket.issuer_key}")
        raise TicketRefused("forged", f"the ticket {ticket.id} is not signed by this party's identity key: "
                                      "it was forged")
    if not _verifies(own_key, ticket):
        raise TicketRefused("forged", f"the ticket {ticket.id} does not verify under this party's identity "
                                      "key: it was altered or forged")


def _verifies(key_text: str, ticket: Ticket) -> bool:
    try:
        parse_public(key_text, "ticket").verify(ticket.signature, canonical(ticket.body))
    except (InvalidSignature, ConfigError, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Request:
    """What a peer asks the issuer's agent to run (its sealed ``request`` message)."""

    ticket: Ticket
    job: str
    algorithm: str
    dataset: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: When the peer asked (its clock): the agent refuses a request found too late as ``stale``.
    requested_at: float = field(default_factory=time.time)
    #: How long the peer waits for the decision (0: not said); a job that could start only later is ``stale``.
    wait_s: float = 0.0

    def to_value(self) -> dict[str, Any]:
        return {"ticket": json.loads(self.ticket.to_json()), "job": self.job, "algorithm": self.algorithm,
                "dataset": self.dataset, "settings": dict(self.settings), "requested_at": self.requested_at,
                "wait_s": self.wait_s}

    @classmethod
    def from_value(cls, value: Any) -> Request:
        if not isinstance(value, dict):
            raise TicketRefused("bad-request", "the job request is not a table")
        ticket = Ticket.from_json(value.get("ticket") or {})
        try:
            job, algorithm, dataset = (check_name(k, str(value[k])) for k in ("job", "algorithm", "dataset"))
            settings = dict(value.get("settings") or {})
            requested_at, wait_s = float(value.get("requested_at", 0.0)), float(value.get("wait_s", 0.0))
        except (KeyError, ConfigError, TypeError, ValueError) as exc:
            raise TicketRefused("bad-request", f"the job request is malformed: {exc}") from None
        return cls(ticket, job, algorithm, dataset, settings, requested_at, wait_s)


def check_request(request: Request, *, own_key: str, own_name: str, requester: str, requester_key: str,
                  store: TicketStore, schemas: Mapping[str, str | None], now: float | None = None,
                  max_age_s: float | None = None) -> None:
    """TicketRefused naming the first reason the request falls outside its ticket; None if within.

    ``requester``/``requester_key`` are who the channel's key exchange authenticated;
    ``schemas`` maps each data set the agent serves to the schema hash of its columns now;
    a request made more than ``max_age_s`` ago (its requester has stopped waiting) is ``stale``.
    """
    ticket, now = request.ticket, time.time() if now is None else now
    if max_age_s is not None and now - request.requested_at > max_age_s:
        raise TicketRefused("stale", f"the request for job {request.job} is {now - request.requested_at:.0f}s "
                                     f"old (more than {max_age_s:g}s): request it again")
    verify_signature(ticket, own_key)
    if ticket.issuer != own_name or store.issued(ticket.id) is None:
        raise TicketRefused("unknown", f"the ticket {ticket.id} was not issued from this party's state folder")
    revoked = store.revoked(ticket.id)
    if revoked is not None:
        raise TicketRefused("revoked", f"the ticket {ticket.id} was revoked at {revoked['at']}")
    if (requester, requester_key) != (ticket.peer, ticket.peer_key):
        raise TicketRefused("not-the-peer", f"the ticket {ticket.id} was issued to {ticket.peer} "
                                            f"({ticket.peer_key}), not to the requester {requester}")
    if now >= ticket.expires_at:
        raise TicketRefused("expired", f"the ticket {ticket.id} expired at {ticket.body['expires_at']}")
    runs = store.runs(ticket.id)
    if runs >= ticket.max_runs:
        raise TicketRefused("over-run-count", f"the ticket {ticket.id} allows {ticket.max_runs} "
                                              f"run{'s' if ticket.max_runs != 1 else ''} and has had {runs}")
    if request.algorithm not in ticket.algorithms:
        raise TicketRefused("other-algorithm", f"the ticket {ticket.id} allows {', '.join(ticket.algorithms)}, "
                                               f"not {request.algorithm}")
    if request.dataset not in ticket.datasets:
        raise TicketRefused("other-dataset", f"the ticket {ticket.id} allows the data set"
                                             f"{'s' if len(ticket.datasets) > 1 else ''} "
                                             f"{', '.join(ticket.datasets)}, not {request.dataset}")
    if schemas.get(request.dataset) != ticket.datasets[request.dataset]:
        raise TicketRefused("schema-changed", f"the data set {request.dataset} does not have the columns "
                                              f"the ticket {ticket.id} names any more (schema hash)")
    if store.job_used(request.job):
        raise TicketRefused("job-id-used", f"a ticketed job {request.job} was already requested; "
                                           "use a new job id")


class TicketStore:
    """The issuer's record of tickets: ``issued/<id>.json``, ``revoked/<id>.json``, ``uses/<id>.json``."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()

    def add(self, ticket: Ticket) -> Path:
        return self._write(self.folder / "issued" / f"{ticket.id}.json", ticket.to_json())

    def issued(self, ticket_id: str) -> Ticket | None:
        path = self.folder / "issued" / f"{check_name('ticket', ticket_id)}.json"
        return Ticket.from_json(path.read_text()) if path.exists() else None

    def all_issued(self) -> list[Ticket]:
        paths = sorted((self.folder / "issued").glob("*.json"))
        return sorted((Ticket.from_json(p.read_text()) for p in paths), key=lambda t: t.body["issued_at"])

    def revoke(self, ticket_id: str, reason: str = "") -> None:
        if self.issued(ticket_id) is None:
            raise ConfigError(f"no ticket {ticket_id} was issued from {self.folder}")
        self._write(self.folder / "revoked" / f"{ticket_id}.json",
                    json.dumps({"at": _format_time(time.time()), "reason": reason}))

    def revoked(self, ticket_id: str) -> dict[str, str] | None:
        path = self.folder / "revoked" / f"{check_name('ticket', ticket_id)}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def uses(self, ticket_id: str) -> list[dict[str, Any]]:
        path = self.folder / "uses" / f"{check_name('ticket', ticket_id)}.json"
        return json.loads(path.read_text()) if path.exists() else []

    def runs(self, ticket_id: str) -> int:
        return sum(1 for use in self.uses(ticket_id) if use["outcome"] in COUNTED)

    def job_used(self, job: str) -> bool:
        return any(use["job"] == job and use["outcome"] in COUNTED
                   for ticket in self.all_issued() for use in self.uses(ticket.id))

    def record(self, ticket_id: str, job: str, outcome: str, reason: str = "") -> None:
        """Set the outcome of ``job``'s use of the ticket: a new entry, or the latest one if it is this job's."""
        with self._lock:
            uses = self.uses(ticket_id)
            entry = {"job": job, "outcome": outcome, "reason": reason, "at": _format_time(time.time())}
            if uses and uses[-1]["job"] == job and uses[-1]["outcome"] in ("accepted", "started", "refused"):
                uses[-1].update(entry)
            else:
                uses.append(entry)
            self._write(self.folder / "uses" / f"{ticket_id}.json", json.dumps(uses, indent=1))

    def _write(self, path: Path, text: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, path)
        return path


def listing(store: TicketStore, now: float | None = None) -> str:
    """``fedps tickets``: each ticket issued, its scope and state, then its uses."""
    now = time.time() if now is None else now
    lines = []
    for ticket in store.all_issued():
        revoked = store.revoked(ticket.id)
        state = ("revoked" if revoked else "expired" if now >= ticket.expires_at
                 else "used up" if store.runs(ticket.id) >= ticket.max_runs else "valid")
        lines.append(f"{ticket.id}  {state}  peer {ticket.peer}  algorithms {','.join(ticket.algorithms)}  "
                     f"data sets {','.join(ticket.datasets)}  runs {store.runs(ticket.id)}/{ticket.max_runs}  "
                     f"expires {ticket.body['expires_at']}")
        for use in store.uses(ticket.id):
            why = f"  ({use['reason']})" if use.get("reason") else ""
            lines.append(f"    {use['at']}  job {use['job']}  {use['outcome']}{why}")
    return "\n".join(lines) if lines else f"no tickets issued from {store.folder}"


def parse_expiry(text: str, now: float | None = None) -> float:
    """``30d``, ``12h``, ``90m``, ``45s`` from now, or an ISO 8601 time (UTC unless it says otherwise)."""
    now = time.time() if now is None else now
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    if text and text[-1] in units and text[:-1].isdigit():
        return now + int(text[:-1]) * units[text[-1]]
    try:
        return _parse_time(text)
    except ValueError:
        raise ConfigError(f"expiry {text!r} must look like 30d, 12h, 90m, 45s or an ISO 8601 time") from None


def _format_time(epoch: float) -> str:
    return datetime.fromtimestamp(int(epoch), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: Any) -> float:
    stamp = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()
