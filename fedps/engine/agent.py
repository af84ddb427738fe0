"""The issuer's agent: runs ticketed jobs of its peers unattended; and the peer's side of a request.

Transport. A peer that starts a ticketed job opens a fresh :class:`Channel` to the
issuer under a one-off job id ``tk-<20 hex>`` (so its topics are
``<prefix>.tk-<hex>.<peer>.<issuer>`` and back). The agent lists the broker's topics every
``poll_s``, and for each new request topic addressed to it opens the other end of that
channel, pinning the requester's key from its party template (or the ticket it issued
to that name). The channel's signed key exchange authenticates both sides by their
pinned identities and seals every message, exactly as for a job; one channel per request
needs no long-lived channel state that either side could lose, and a replayed or copied
request topic is either already handled or fails the key exchange (the job id is signed).

Messages, on the request channel (phase ``ticket``):

1. ``request`` (peer -> issuer): the ticket, the job id and algorithm, the issuer's data set
   by name, and the peer's agreed settings.
2. ``decision`` (issuer -> peer): accepted (and the issuer's side started), or refused with
   the reason's code and sentence.

The issuer's side runs as ``fedps run`` on the issuer's party template, with overrides the
agent builds: the job id and algorithm of the request, the algorithm's parameters from the
agent's own template with the data set's path and columns filled in (never a path from
the request), the ticket's peer as the only peer, and output and state folders under
``jobs_dir``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from fedps.engine import config as config_module
from fedps.engine.agreement import agreed_settings, schema_hash
from fedps.engine.tickets import Request, Ticket, TicketRefused, TicketStore, check_request
from fedps.errors import ConfigError, FedpsError, PeerError
from fedps.messaging.channel import Channel
from fedps.messaging.config import ChannelConfig, check_name
from fedps.messaging.identity import load_identity, public_text
from fedps.messaging.tags import Message, Scope

log = logging.getLogger(__name__)

REQUEST = Message("request", "peer", "issuer", dict)
DECISION = Message("decision", "issuer", "peer", dict)
PHASE = "ticket"
#: A job is started only if its requester will still be waiting this much longer for the decision.
_DECIDE_MARGIN_S = 5.0


# ---------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class Dataset:
    path: str
    columns: tuple[str, ...]
    id_column: str = "id"
    format: str = "auto"


@dataclass(frozen=True)
class AlgorithmTemplate:
    role: str = "host"
    params: Mapping[str, Any] = field(default_factory=dict)
    #: Dotted keys of ``params`` a requester's agreed settings may set (scalars only).
    requester_may_set: tuple[str, ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    source: Path
    party_conf: Path
    party: config_module.FedpsConfig
    jobs_dir: Path
    state_dir: Path
    datasets: Mapping[str, Dataset]
    algorithms: Mapping[str, AlgorithmTemplate]
    poll_s: float = 1.0
    request_timeout_s: float = 60.0
    max_concurrent: int = 1
    #: A request found later than this after it was made is refused as stale (its requester gave up).
    max_request_age_s: float = 600.0

    @property
    def me(self) -> str:
        return self.party.party.name

    def store(self) -> TicketStore:
        return TicketStore(self.state_dir)

    def schemas(self) -> dict[str, str | None]:
        return {name: schema_hash(list(d.columns)) for name, d in self.datasets.items()}


_AGENT_KEYS = {"party", "jobs_dir", "state_dir", "poll_s", "request_timeout_s", "max_concurrent",
               "max_request_age_s"}


def load_agent(path: str | Path) -> AgentConfig:
    """Read the issuer's agent TOML: ``[agent]``, ``[datasets.<name>]``, ``[algorithms.<name>]``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"agent configuration {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    _known(data, {"agent", "datasets", "algorithms"}, "", path)
    agent = dict(data.get("agent") or {})
    _known(agent, _AGENT_KEYS, "agent.", path)
    if "party" not in agent:
        raise ConfigError(f"missing key agent.party (the issuer's party TOML) in {path}")
    base = path.parent.resolve()
    party_conf = (base / str(agent["party"])).resolve()
    raw = _read_toml(party_conf)
    raw.setdefault("job", {}).setdefault("id", "agent-template")
    party = config_module.from_mapping(raw, source=str(party_conf), base=party_conf.parent)
    channel_state = Path(party.channel_config().state_dir)
    datasets = {name: _dataset(name, table, base, path) for name, table in (data.get("datasets") or {}).items()}
    algorithms = {name: _algorithm(name, table, path) for name, table in (data.get("algorithms") or {}).items()}
    try:
        return AgentConfig(
            source=path, party_conf=party_conf, party=party,
            jobs_dir=(base / str(agent.get("jobs_dir", "agent-jobs"))).resolve(),
            state_dir=(base / str(agent["state_dir"])).resolve() if agent.get("state_dir")
            else channel_state / "tickets",
            datasets=datasets, algorithms=algorithms,
            poll_s=float(agent.get("poll_s", 1.0)), request_timeout_s=float(agent.get("request_timeout_s", 60.0)),
            max_concurrent=int(agent.get("max_concurrent", 1)),
            max_request_age_s=float(agent.get("max_request_age_s", 600.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[agent] in {path}: {exc}") from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"the agent's party configuration {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None


def _known(table: Any, keys: set[str], where: str, path: Path) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the top level'} in {path} must be a table")
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"unknown key {', '.join(where + k for k in unknown)} in {path}; "
                          f"known keys: {', '.join(sorted(keys))}")


def _dataset(name: str, table: Any, base: Path, path: Path) -> Dataset:
    check_name("data set", name)
    _known(table, {"path", "columns", "id_column", "format"}, f"datasets.{name}.", path)
    columns = table.get("columns")
    if not table.get("path") or not isinstance(columns, list) or not columns \
            or not all(isinstance(c, str) for c in columns):
        raise ConfigError(f"datasets.{name} in {path} needs a path and its columns (a list of names)")
    where = str(table["path"])
    where = where if "://" in where else str((base / where).resolve())
    return Dataset(where, tuple(columns), str(table.get("id_column", "id")), str(table.get("format", "auto")))


def _algorithm(name: str, table: Any, path: Path) -> AlgorithmTemplate:
    check_name("algorithm", name)
    _known(table, {"role", "params", "requester_may_set"}, f"algorithms.{name}.", path)
    params, allowed = table.get("params", {}), table.get("requester_may_set", [])
    if not isinstance(params, dict) or not isinstance(allowed, list):
        raise ConfigError(f"algorithms.{name} in {path}: params is a table, requester_may_set a list of keys")
    return AlgorithmTemplate(str(table.get("role", "host")), params, tuple(str(k) for k in allowed))


# ---------------------------------------------------------------------- the issuer's side of one job
def run_overrides(agent: AgentConfig, request: Request) -> list[str]:
    """The ``--set`` overrides of the party template that make the issuer's side of ``request``."""
    template = agent.algorithms.get(request.algorithm)
    if template is None:
        raise TicketRefused("no-template", f"this party's agent runs no {request.algorithm} jobs")
    dataset = agent.datasets.get(request.dataset)
    if dataset is None:
        raise TicketRefused("other-dataset", f"this party's agent serves no data set {request.dataset}")
    params = _fill(template.params, dataset)
    applied = []
    for key, value in sorted(request.settings.items()):
        if key in template.requester_may_set and isinstance(value, (bool, int, float, str)):
            _set_dotted(params, key, value)
            applied.append(key)
    ignored = sorted(set(request.settings) - set(applied))
    if ignored:
        log.info("%s: job %s: the issuer's own values of %s are kept", agent.me, request.job, ", ".join(ignored))
    folder = agent.jobs_dir / request.job
    return [
        f"job.id={_toml(request.job)}",
        f"job.algorithm={_toml(request.algorithm)}",
        f"job.params={_toml(params)}",
        f"party.role={_toml(template.role)}",
        f"party.output_dir={_toml(str(folder))}",
        f"party.state_dir={_toml(str(folder / 'state'))}",
        f"peers={_toml({request.ticket.peer: request.ticket.peer_key})}",
    ]


def _fill(value: Any, dataset: Dataset) -> Any:
    """The template's params with ``"{dataset.<field>}"`` strings replaced by the data set's field."""
    if isinstance(value, dict):
        return {k: _fill(v, dataset) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, dataset) for v in value]
    if isinstance(value, str) and value.startswith("{dataset.") and value.endswith("}"):
        name = value[len("{dataset."):-1]
        if name not in Dataset.__dataclass_fields__:
            raise ConfigError(f"agent template placeholder {value!r}: a data set has {', '.join(Dataset.__dataclass_fields__)}")
        found = getattr(dataset, name)
        return list(found) if isinstance(found, tuple) else found
    return value


def _set_dotted(params: dict, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _toml(value: Any) -> str:
    """An inline TOML value (what ``--set`` reads)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {type(value).__name__} {value!r} into a configuration")


# ---------------------------------------------------------------------- the agent
class Agent:
    """Accepts ticketed job requests addressed to this party and runs its side of each."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = config.store()
        identity = load_identity(config.party.party.identity_key)
        self.own_key = public_text(identity.public_key())
        self.stop = threading.Event()
        self._slots = threading.Semaphore(config.max_concurrent)
        self._admission = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._handled_path = config.state_dir / "requests.json"
        self._handled: set[str] = set(json.loads(self._handled_path.read_text())) if self._handled_path.exists() else set()

    def serve(self) -> None:
        """Poll for request topics until :attr:`stop` is set; then wait for the jobs in progress."""
        from kafka.admin import KafkaAdminClient

        kafka = self.config.party.kafka
        pattern = re.compile(rf"^{re.escape(kafka.topic_prefix)}\.(tk-[0-9a-f]{{20}})\."
                             rf"([A-Za-z0-9_-]{{1,64}})\.{re.escape(self.config.me)}$")
        admin = KafkaAdminClient(**kafka.client_options())
        log.warning("agent of %s: serving %d ticket(s) on %s (state in %s)", self.config.me,
                    len(self.store.all_issued()), kafka.bootstrap_servers, self.config.state_dir)
        try:
            while not self.stop.is_set():
                for topic in sorted(admin.list_topics()):
                    found = pattern.match(topic)
                    if found and found.group(1) not in self._handled:
                        self._start(found.group(1), found.group(2))
                self.stop.wait(self.config.poll_s)
        finally:
            admin.close()
            for thread in self._threads:
                thread.join()

    def _start(self, request_job: str, peer: str) -> None:
        self._handled.add(request_job)
        self.store._write(self._handled_path, json.dumps(sorted(self._handled)))
        thread = threading.Thread(target=self.handle, args=(request_job, peer), name=request_job, daemon=True)
        self._threads.append(thread)
        thread.start()

    def pinned_key(self, peer: str) -> str | None:
        """The requester's identity: pinned in the party template, else in a ticket issued to that name."""
        if peer in self.config.party.peers:
            return self.config.party.peers[peer]
        keys = [t.peer_key for t in self.store.all_issued() if t.peer == peer]
        return keys[-1] if keys else None

    def handle(self, request_job: str, peer: str) -> None:
        """Serve one request channel: decide, and run this party's side if the ticket allows it."""
        key = self.pinned_key(peer)
        if key is None:
            log.warning("agent of %s: ignored request %s from %s: no identity key of %s is pinned or ticketed",
                        self.config.me, request_job, peer, peer)
            return
        party = self.config.party
        channel_config = ChannelConfig(
            kafka=party.kafka, identity_key=party.party.identity_key, peers={peer: key},
            state_dir=str(self.config.state_dir / "channels"), handshake_timeout_s=self.config.request_timeout_s,
            recv_timeout_s=self.config.request_timeout_s)
        scope = Scope(request_job, PHASE)
        proc = None
        try:
            with Channel(request_job, self.config.me, peer, channel_config) as channel:
                value = REQUEST.check(channel.recv(scope.tag(REQUEST.name)))
                try:
                    request = Request.from_value(value)
                    proc = self._admit(request, peer, key)
                except TicketRefused as exc:
                    self._refused(channel, scope, request_job, value, peer, exc)
                    return
                channel.send(scope.tag(DECISION.name), {"accepted": True, "ticket": request.ticket.id,
                                                        "run": self.store.runs(request.ticket.id)}, wait=True)
        except FedpsError as exc:
            log.warning("agent of %s: request %s from %s failed: %s", self.config.me, request_job, peer, exc)
            if proc is None:
                return
        self._finish(request, proc)

    def _admit(self, request: Request, peer: str, key: str) -> subprocess.Popen:
        """Check the request, wait for a free slot, check revocation again, start this party's side."""
        def check() -> None:
            check_request(request, own_key=self.own_key, own_name=self.config.me, requester=peer,
                          requester_key=key, store=self.store, schemas=self.config.schemas(),
                          max_age_s=self.config.max_request_age_s)

        check()
        overrides = run_overrides(self.config, request)
        try:
            config_module.load(self.config.party_conf, overrides)   # a bad template fails here, not in the job
        except ConfigError as exc:
            log.error("agent of %s: the template for job %s is invalid: %s", self.config.me, request.job, exc)
            raise TicketRefused("issuer-template", "the issuer's template for this job is invalid "
                                                   "(its agent log says why)") from None
        ticket = request.ticket
        with self._admission:   # two requests at once cannot both take a ticket's last run
            check()
            self.store.record(ticket.id, request.job, "accepted")
        self._slots.acquire()
        try:
            revoked = self.store.revoked(ticket.id)
            if request.wait_s and time.time() > request.requested_at + request.wait_s - _DECIDE_MARGIN_S:
                self.store.record(ticket.id, request.job, "refused", "stale")
                raise TicketRefused("stale", f"job {request.job} waited for a free slot longer than its "
                                             f"requester waits ({request.wait_s:g}s): request it again")
            if revoked is not None or self.stop.is_set():
                self.store.record(ticket.id, request.job, "refused", "revoked" if revoked else "agent stopping")
                raise TicketRefused("revoked" if revoked else "agent-stopping",
                                    f"the ticket {ticket.id} was revoked at {revoked['at']}" if revoked
                                    else "the issuer's agent is stopping")
            try:
                proc = self._spawn(request, overrides)
            except OSError as exc:
                log.error("agent of %s: could not start job %s: %s", self.config.me, request.job, exc)
                raise TicketRefused("issuer-failed", "the issuer could not start its side") from None
        except BaseException:
            self._slots.release()
            raise
        self.store.record(ticket.id, request.job, "started")
        log.info("agent of %s: started job %s (%s on data set %s) for %s under ticket %s, run %d of %d",
                 self.config.me, request.job, request.algorithm, request.dataset, peer, ticket.id,
                 self.store.runs(ticket.id), ticket.max_runs)
        return proc

    def _spawn(self, request: Request, overrides: list[str]) -> subprocess.Popen:
        folder = self.config.jobs_dir / request.job
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(self.config.party_conf)]
        for item in overrides:
            command += ["--set", item]
        (folder / "command.json").write_text(json.dumps({"ticket": request.ticket.id, "command": command}, indent=1))
        with open(folder / "run.log", "ab") as out:
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder)

    def _finish(self, request: Request, proc: subprocess.Popen) -> None:
        try:
            code = proc.wait()
        finally:
            self._slots.release()
        log_path = self.config.jobs_dir / request.job / "run.log"
        outcome, reason = ("done", "") if code == 0 else ("failed", f"exit code {code}, see {log_path}")
        self.store.record(request.ticket.id, request.job, outcome, reason)
        (log.info if code == 0 else log.warning)("agent of %s: job %s %s%s", self.config.me, request.job, outcome, f" ({reason})" if reason else "")

    def _refused(self, channel: Channel, scope: Scope, request_job: str, value: Any, peer: str,
                 exc: TicketRefused) -> None:
        job = value.get("job") if isinstance(value, dict) else None
        log.warning("agent of %s: refused job %s from %s (%s): %s", self.config.me, job or request_job, peer,
                    exc.reason, exc)
        try:
            ticket_id = Ticket.from_json(value.get("ticket") or {}).id
        except TicketRefused:
            ticket_id = None
        if ticket_id is not None and self.store.issued(ticket_id) is not None:
            self.store.record(ticket_id, str(job or request_job), "refused", f"{exc.reason}: {exc}")
        channel.send(scope.tag(DECISION.name), {"accepted": False, "reason": exc.reason, "detail": str(exc)},
                     wait=True)


# ---------------------------------------------------------------------- the peer's side
def request_run(config: config_module.FedpsConfig, ticket_path: str | Path, dataset: str | None = None) -> None:
    """Ask the ticket's issuer to run its side of ``config``'s job; TicketRefused says why not."""
    try:
        ticket = Ticket.from_json(Path(ticket_path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"ticket {ticket_path} does not exist") from None
    except TicketRefused as exc:
        raise ConfigError(f"ticket {ticket_path}: {exc}") from None
    issuer = ticket.issuer
    if issuer not in config.peers:
        raise ConfigError(f"the ticket's issuer {issuer!r} is not a peer in {config.source}; pin its key there")
    if config.peers[issuer] != ticket.issuer_key:
        log.warning("the ticket names %s's key %s, but %s pins %s", issuer, ticket.issuer_key, config.source,
                    config.peers[issuer])
    if dataset is None:
        if len(ticket.datasets) != 1:
            raise ConfigError(f"the ticket names the data sets {', '.join(ticket.datasets)}: choose one "
                              "with --ticket-dataset")
        (dataset,) = ticket.datasets
    request = Request(ticket, config.job.id, config.job.algorithm, dataset, agreed_settings(config),
                      wait_s=config.channel.recv_timeout_s)
    request_job = f"tk-{secrets.token_hex(10)}"
    scope = Scope(request_job, PHASE)
    channel_config = replace(config.channel_config(), peers={issuer: config.peers[issuer]})
    try:
        with Channel(request_job, config.party.name, issuer, channel_config) as channel:
            channel.send(scope.tag(REQUEST.name), REQUEST.check(request.to_value()), wait=True)
            decision = DECISION.check(channel.recv(scope.tag(DECISION.name)))
    except PeerError as exc:
        raise PeerError(f"{issuer}'s agent did not decide on the ticketed job {config.job.id}: is `fedps agent` "
                        f"running there, and is its queue short? ({exc})") from None
    if not decision.get("accepted"):
        reason = str(decision.get("reason") or "refused")
        detail = f"{issuer} refused the ticketed job {config.job.id}: {decision.get('detail') or reason}"
        log.error("%s: %s", config.party.name, detail)
        raise TicketRefused(reason, detail)
    log.info("%s: %s accepted job %s under ticket %s (run %s of %d); starting this side",
                config.party.name, issuer, config.job.id, ticket.id, decision.get("run"), ticket.max_runs)


# ---------------------------------------------------------------------- commands
def add_parsers(commands: Any) -> dict[str, Any]:
    """``fedps ticket issue|revoke``, ``fedps tickets``, ``fedps agent``; returns their handlers."""
    ticket = commands.add_parser("ticket", help="issue or revoke a pre-authorised ticket for a peer")
    actions = ticket.add_subparsers(dest="ticket_action", required=True)
    issue = actions.add_parser("issue", help="sign a ticket that lets a peer start jobs within its scope")
    issue.add_argument("--conf", required=True, help="this party's agent TOML")
    issue.add_argument("--peer", required=True, help="the peer's party name")
    issue.add_argument("--peer-key", help="its public identity key (default: the key the party file pins)")
    issue.add_argument("--algorithm", action="append", required=True, help="an allowed algorithm (repeatable)")
    issue.add_argument("--dataset", action="append", required=True,
                       help="an allowed data set of the agent TOML (repeatable)")
    issue.add_argument("--expires", default="30d", help="30d, 12h, 90m or an ISO 8601 time (default: 30d)")
    issue.add_argument("--max-runs", type=int, default=1, help="runs the ticket allows (default: 1)")
    issue.add_argument("--out", required=True, help="where to write the ticket (hand it to the peer)")
    revoke = actions.add_parser("revoke", help="revoke a ticket: jobs not yet started are refused")
    revoke.add_argument("--conf", required=True, help="this party's agent TOML")
    revoke.add_argument("id", help="the ticket's id (see `fedps tickets`)")
    revoke.add_argument("--reason", default="", help="a note kept with the revocation")
    listed = commands.add_parser("tickets", help="the tickets this party issued, and their uses")
    listed.add_argument("--conf", required=True, help="this party's agent TOML")
    agent = commands.add_parser("agent", help="run ticketed jobs of this party's peers unattended")
    agent.add_argument("--conf", required=True, help="this party's agent TOML")
    return {"ticket": _ticket_command, "tickets": _tickets_command, "agent": _agent_command}


def _ticket_command(args: Any) -> int:
    from fedps.engine import tickets

    agent = load_agent(args.conf)
    store = agent.store()
    if args.ticket_action == "revoke":
        store.revoke(args.id, args.reason)
        print(f"revoked {args.id}; jobs not yet started under it will be refused")
        return 0
    peer_key = args.peer_key or agent.party.peers.get(args.peer)
    if not peer_key:
        raise ConfigError(f"{args.peer} has no pinned key in {agent.party_conf}; pass --peer-key")
    unknown = sorted(set(args.dataset) - set(agent.datasets))
    if unknown:
        raise ConfigError(f"data set {', '.join(unknown)} is not in {agent.source} (known: "
                          f"{', '.join(sorted(agent.datasets)) or 'none'})")
    ticket = tickets.issue(load_identity(agent.party.party.identity_key), agent.me, args.peer, peer_key,
                           args.algorithm, {d: agent.schemas()[d] for d in args.dataset},
                           tickets.parse_expiry(args.expires), args.max_runs)
    store.add(ticket)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(ticket.to_json())
    print(f"issued {ticket.id} to {args.peer}; wrote {out}")
    return 0


def _tickets_command(args: Any) -> int:
    from fedps.engine.tickets import listing

    print(listing(load_agent(args.conf).store()))
    return 0


def _agent_command(args: Any) -> int:
    agent = Agent(load_agent(args.conf))
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    try:
        agent.serve()
    except KeyboardInterrupt:
        agent.stop.set()
    return 0
