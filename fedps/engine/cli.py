"""The ``fedps`` command: ``demo``, ``run``, ``broker``, ``keygen``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedps.errors import FedpsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedps", description="Federated learning on Spark, Ray and Kafka.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also show the INFO logs of Spark, Ray and Kafka, and the JVM's own output "
                             "(by default in <output_dir>/spark.log)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one party of a job from its TOML configuration")
    run.add_argument("--conf", required=True, help="the party's TOML file")
    run.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a configuration key (repeatable)")
    run.add_argument("--output", choices=("auto", "table", "json"), default="auto",
                     help="the final metrics as a short table or one JSON line; auto: a table on a "
                          "terminal, JSON otherwise (metrics.json has them all either way)")
    run.add_argument("--role", help="this party's role (guest, host, ...); a file that names "
                                    "another party.role is an error")
    run.add_argument("--ticket", help="a ticket from the peer that issued it: its agent runs its side")
    run.add_argument("--ticket-dataset", help="--ticket: the issuer's data set, if the ticket names several")

    demo = commands.add_parser("demo", help="run the demo job locally: embedded broker, two parties")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--job", choices=("hetero_lr", "channel"), default="hetero_lr",
                      help="hetero_lr: PSI then vertical LR on the breast data set (default); "
                           "channel: measure the channel")
    demo.add_argument("--epochs", type=int, default=10, help="hetero_lr: training epochs (default: 10)")
    demo.add_argument("--key-bits", type=int, default=2048, help="hetero_lr: Paillier key size (default: 2048)")
    demo.add_argument("--ciphertexts", type=int, default=100_000,
                      help="channel: 2048-bit ciphertexts (512 bytes each) to send (default: 100000)")

    broker = commands.add_parser("broker", help="run the embedded Kafka-compatible broker in the foreground")
    broker.add_argument("--port", type=int, default=9092)

    keygen = commands.add_parser("keygen", help="create an Ed25519 identity key (mode 0600)")
    keygen.add_argument("path")

    jobs = commands.add_parser("jobs", help="the jobs this machine's parties know, with state and progress")
    jobs.add_argument("--party", help="only this party's jobs")

    topics = commands.add_parser("topics", help="the Kafka topics and permissions a party's job needs")
    topics.add_argument("--conf", required=True, help="the party's TOML file")
    topics.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    topics.add_argument("--strimzi", action="store_true",
                        help="print Strimzi KafkaTopic and KafkaUser resources instead of a list")
    topics.add_argument("--kafka-cluster", default="my-cluster", help="--strimzi: the Kafka resource's name")

    from fedps.serving.cli import add_parser as add_serve_parser   # `fedps serve`: online inference

    add_serve_parser(commands)
    from fedps.engine.agent import add_parsers as add_ticket_parsers   # `fedps ticket|tickets|agent`

    ticket_commands = add_ticket_parsers(commands)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command in ticket_commands:
            return ticket_commands[args.command](args)
        return {"run": _run, "demo": _demo, "broker": _broker, "keygen": _keygen, "topics": _topics, "jobs": _jobs, "serve": _serve}[args.command](args)
    except FedpsError as exc:
        print(f"fedps: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


class _Once(logging.Filter):
    """Drops a warning already shown once (the same text from the same logger)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _setup_logging(verbose: bool) -> None:
    """INFO of fedps's own progress; other libraries' logs only at -v (or when they fail)."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format=("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                else "%(asctime)s %(levelname)s %(message)s"),
        datefmt=None if verbose else "%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Once())
    logging.getLogger("fedps").setLevel(logging.INFO)
    # kafka-python logs every reconnect at ERROR; its failures reach us as exceptions.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    if not verbose:
        for noisy in ("ray", "py4j", "pyspark", "urllib3", "filelock"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def _run(args: argparse.Namespace) -> int:
    from fedps.engine import config as config_module
    from fedps.engine.runner import run_party

    config = config_module.load(args.conf, args.set)
    if args.role:
        config = _with_role(config_module, args, config)
    if args.ticket:   # a ticketed job: the issuer's agent starts its side first (engine/agent.py)
        from fedps.engine.agent import request_run

        request_run(config, args.ticket, args.ticket_dataset)
    metrics = run_party(config)
    if args.output == "table" or (args.output == "auto" and sys.stdout.isatty()):
        output = Path(config.party.output_dir or f"out/{config.job.id}/{config.party.name}")
        print(format_metrics(config.party.name, config.job.algorithm, metrics, output))
    else:
        print(json.dumps({"party": config.party.name, **metrics}, sort_keys=True))
    return 0


def _with_role(config_module, args: argparse.Namespace, config):
    """The configuration with ``--role``; refused when the file (or a ``--set``) names another role."""
    import tomllib

    from fedps.errors import ConfigError

    named = tomllib.loads(Path(args.conf).read_text()).get("party", {}).get("role")
    if any(item.partition("=")[0].strip() == "party.role" for item in args.set):
        named = config.party.role
    if named and named != args.role:
        raise ConfigError(f"--role {args.role} contradicts party.role = {named!r} of {args.conf}")
    return config_module.load(args.conf, [*args.set, f"party.role={json.dumps(args.role)}"])


def _jobs(args: argparse.Namespace) -> int:
    from fedps.engine import jobs

    print(jobs.table(jobs.entries(args.party)), end="")
    return 0


def _topics(args: argparse.Namespace) -> int:
    from fedps.engine import config as config_module
    from fedps.engine import deploy

    config = config_module.load(args.conf, args.set)
    if args.strimzi:
        print(deploy.strimzi_yaml(config, args.kafka_cluster), end="")
        return 0
    for need in deploy.job_topics(config):
        access = "write" if need.direction == "out" else "read"
        print(f"{need.name}  partitions={need.partitions}  {config.party.name}:{access}")
    for group in deploy.consumer_groups(config):
        print(f"{group}  (consumer group)  {config.party.name}:read")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fedps.serving.cli import run

    return run(args)


def format_metrics(party: str, algorithm: str, metrics: dict, output: Path) -> str:
    """The headline figures of a finished job as a short two-column table."""
    rows: list[tuple[str, str]] = [("party", party), ("algorithm", algorithm)]

    def add(label: str, key: str, fmt: str = "{}") -> None:
        if metrics.get(key) is not None:
            rows.append((label, fmt.format(metrics[key])))

    add("PSI intersection", "psi_intersection", "{} ids")
    add("PSI seconds", "psi_seconds", "{:.1f}")
    add("epochs", "epochs")
    add("steps", "steps")
    add("training seconds", "train_seconds", "{:.1f}")
    losses = metrics.get("loss") or []
    if losses:
        rows.append(("loss", f"{losses[0]:.4f} -> {losses[-1]:.4f}"))
    final = metrics.get("final") or {}
    for key, label in (("auc", "AUC"), ("ks", "KS"), ("accuracy", "accuracy"), ("f1", "F1")):
        if isinstance(final.get(key), (int, float)):
            rows.append((f"validation {label}", f"{final[key]:.4f}"))
    if final.get("rows") is not None:
        rows.append(("validation rows", str(final["rows"])))
    predicted = metrics.get("predict")
    if isinstance(predicted, dict) and predicted.get("rows") is not None:
        rows.append(("predicted rows", str(predicted["rows"])))
    add("wall seconds", "wall_s", "{:.1f}")
    rows.append(("report", str(output / "metrics.json")))
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)


def _keygen(args: argparse.Namespace) -> int:
    from fedps.messaging.identity import generate_identity

    public = generate_identity(args.path)
    print(f"wrote {args.path}; pin this public key in your peers' configuration:\n{public}")
    return 0


def _broker(args: argparse.Namespace) -> int:
    from fedps.messaging.broker import EmbeddedBroker

    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Kafka broker on {broker.bootstrap_servers} (memory storage); Ctrl-C stops it",
              flush=True)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while broker.running and not stop:
            time.sleep(0.5)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from fedps.messaging.broker import EmbeddedBroker
    from fedps.messaging.identity import generate_identity

    out = Path(args.out).resolve()
    job = f"demo-{int(time.time())}"
    parties = {"guest": "guest", "host": "host"}
    keys = {}
    for name in parties:
        key = out / "keys" / f"{name}.key"
        if key.exists():
            key.unlink()
        keys[name] = generate_identity(key)
    with EmbeddedBroker() as broker:
        print(f"embedded broker on {broker.bootstrap_servers}; starting the guest and the host", flush=True)
        procs = {}
        for name, role in parties.items():
            conf = out / f"{name}.toml"
            peer = next(p for p in parties if p != name)
            conf.write_text(_demo_toml(args, job, name, role, peer, keys[peer], broker.bootstrap_servers))
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedps.engine.cli", "run", "--conf", str(conf)],
                stdout=subprocess.PIPE, text=True,
            )
        for proc in procs.values():
            proc.communicate(timeout=3600)
    failed = [name for name, proc in procs.items() if proc.returncode != 0]
    if failed:
        print(f"fedps demo: party {', '.join(failed)} failed", file=sys.stderr)
        return 1
    metrics = json.loads((out / "guest" / "metrics.json").read_text())
    if args.job == "channel":
        print(f"sent {metrics['payload_ciphertexts']} ciphertexts ({metrics['payload_bytes'] / 1e6:.1f} MB) "
              f"guest -> host in {metrics['payload_seconds']} s: {metrics['payload_mb_per_s']} MB/s, "
              f"{metrics['ciphertexts_per_s']} ciphertexts/s")
        print(f"round trip of a small message: median {metrics['round_trip_median_ms']} ms, "
              f"p90 {metrics['round_trip_p90_ms']} ms over {metrics['round_trips']} rounds")
    else:
        final = metrics["final"]
        print(f"PSI: {metrics['psi_intersection']} shared ids in {metrics['psi_seconds']} s")
        print(f"trained {metrics['epochs']} epochs in {metrics['train_seconds']} s; loss "
              f"{metrics['loss'][0]:.4f} -> {metrics['loss'][-1]:.4f}")
        print(f"validation ({final['rows']} rows): AUC {final['auc']:.4f}, KS {final['ks']:.4f}, "
              f"accuracy {final['accuracy']:.4f}, F1 {final['f1']:.4f}")
    print(f"report: {out / 'guest'}")
    return 0


def _data_folder() -> Path:
    folder = Path(os.environ.get("FEDPS_DATA", Path(__file__).resolve().parents[2] / "data"))
    if not (folder / "breast_hetero_guest.csv").exists():
        raise FedpsError(f"the demo data is not in {folder}: run the demo from a clone of the "
                         "repository, or set FEDPS_DATA to its data/ folder")
    return folder


def _demo_toml(args: argparse.Namespace, job: str, name: str, role: str, peer: str, peer_key: str,
               servers: str) -> str:
    if args.job == "channel":
        algorithm = "channel_demo"
        params = f"{{ ciphertexts = {args.ciphertexts}, rounds = 50 }}"
    else:
        algorithm = "hetero_lr"
        data = _data_folder() / f"breast_hetero_{role}.csv"
        params = (f'{{ psi = {{ input = "{data}", id_column = "id" }}, epochs = {args.epochs}, '
                  f'key_bits = {args.key_bits} }}')   # the optimiser's defaults (they converge untuned)
    return f"""# generated by `fedps demo`
[job]
id = "{job}"
algorithm = "{algorithm}"
params = {params}

[party]
name = "{name}"
role = "{role}"
identity_key = "keys/{name}.key"
output_dir = "{name}"
state_dir = "{name}/state"

[peers]
{peer} = "{peer_key}"

[kafka]
bootstrap_servers = "{servers}"

[ray]
object_store_mb = 100
num_cpus = 1
"""


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
