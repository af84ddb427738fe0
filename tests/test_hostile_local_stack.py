"""The local stack a party starts is its own: loopback sockets, a private token, private checkpoints."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np

from fedps.ps import ParameterServer, PSConfig, TableSpec

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

PARTY = textwrap.dedent("""
    import json, os, sys
    from fedps.engine.config import RayConfig
    from fedps.engine import session
    from fedps.ps import ParameterServer, PSConfig, TableSpec

    gcs = session.start_ray(RayConfig(object_store_mb=96, num_cpus=1))
    ps = ParameterServer.start(PSConfig("probe", (TableSpec("w", width=1),), num_shards=1))
    started = session._ray_processes()
    token = os.environ["RAY_AUTH_TOKEN_PATH"]
    modes = [os.stat(token).st_mode & 0o777, os.stat(os.path.dirname(token)).st_mode & 0o777]
    print(json.dumps({"gcs": gcs, "token": token, "modes": modes}), flush=True)
    sys.stdin.readline()                     # the test reads the sockets meanwhile
    ps.stop()
    session.stop_ray()
    print(json.dumps([pid for pid, start in started if session._started(pid) == start]), flush=True)
""")


def _listening() -> dict[int, str]:
    """Socket inode -> local address of every listening TCP socket on this machine."""
    found = {}
    for name, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not os.path.exists(name):
            continue
        for line in Path(name).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":   # LISTEN
                continue
            address = fields[1].split(":")[0]
            words = [int(address[i:i + 8], 16) for i in range(0, len(address), 8)]
            found[int(fields[9])] = socket.inet_ntop(family, struct.pack(f"<{len(words)}I", *words))
    return found


def _tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(parent, []).append(int(entry))
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(parents.get(pid, []))
    return pids


def _sockets(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def test_local_ray_listens_on_loopback_with_a_private_token_and_stops_without_orphans():
    party = subprocess.Popen([sys.executable, "-c", PARTY], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        started = json.loads(party.stdout.readline())
        listening = _listening()
        bound = [(_name(pid), listening[i]) for pid in _tree(party.pid) for i in _sockets(pid) if i in listening]
        party.stdin.write("\n")
        party.stdin.flush()
        leftovers = json.loads(party.stdout.readline())
        party.wait(30)
    finally:
        if party.poll() is None:
            party.kill()
            party.wait(30)
    names = {name for name, _ in bound}
    assert {"gcs_server", "raylet"} <= names and any("Shard" in n for n in names), bound
    assert all(address in LOOPBACK for _, address in bound), bound
    assert started["gcs"].startswith("127.0.0.1:")
    token = Path(started["token"])
    assert token.parent != Path.home() / ".ray" and started["modes"] == [0o600, 0o700]
    assert not token.exists(), "the private folder is removed when the party exits"
    assert leftovers == [], f"Ray processes outlived a clean stop: {leftovers}"


def test_every_party_on_a_machine_gets_its_own_token():
    from fedps.engine.session import local_ray_env

    local_ray_env()                                  # this process's, inherited by the parties below
    probe = "from fedps.engine.session import local_ray_env; import os; local_ray_env(); " \
            "p = os.environ['RAY_AUTH_TOKEN_PATH']; print(p, oct(os.stat(p).st_mode & 0o777))"
    tokens = [subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                             timeout=60).stdout.split() for _ in range(2)]
    paths = {path for path, _ in tokens} | {os.environ["RAY_AUTH_TOKEN_PATH"]}
    assert len(paths) == 3
    assert all(mode == "0o600" for _, mode in tokens)


def test_checkpoint_tree_is_private(ray_address, tmp_path):
    root = tmp_path / "ps" / "checkpoints"
    config = PSConfig(f"private-{uuid.uuid4().hex[:8]}", (TableSpec("w", width=2),), num_shards=2,
                      checkpoint_dir=str(root))
    server = ParameterServer.start(config)
    try:
        server.table("w").push(np.arange(10), np.ones((10, 2)), worker=0)
        server.end_step()
        server.checkpoint()
    finally:
        server.stop()
    entries = [root, *root.rglob("*")]
    assert any(p.suffix == ".parquet" for p in entries) and any(p.name == "manifest.json" for p in entries)
    for path in entries:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:o}"
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {mode:o}"
