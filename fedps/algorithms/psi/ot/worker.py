"""One bucket's OT PSI in SecretFlow's PSI library: run by the OT venv's python, not by fedps's.

``python worker.py <job.json>`` (the OT venv has spu 0.9.5, numpy < 2 and no
fedps, so this file imports the standard library and ``spu`` only). The job
file says the party's rank and id, the CSV of its staged ids, where the
intersection goes, and the local relay (``transport``) that carries the
library's messages to the peer over fedps's sealed link: the library's link
is ``link_type = "blackbox"`` over HTTP, so it never opens a socket to the
peer. Exit status 0 and ``<output>.json`` (the library's counts) when done;
any failure is one line on stderr and status 2; status 3 when the fedps
process that started it is gone (a cancelled or killed task).
"""

from __future__ import annotations

import json
import os
import sys
import time

#: The library's names for the settings of its blackbox link (read from the environment).
_ENV_TRANSPORT = "system.transport"
_ENV_TOKEN = "config.token"
_ENV_SESSION = "config.session_id"
_ENV_TRACE = "config.trace_id"
_ENV_INST = "config.inst_id."


def load_library() -> tuple:
    """spu's ``libspu`` and ``libpsi`` extension modules, without ``import spu``.

    ``spu/__init__.py`` imports jax and the MPC compiler (seconds, 25 s on a
    loaded machine); the PSI needs only the two compiled modules, loaded
    from the package folder by name.
    """
    import importlib.util

    found = importlib.util.find_spec("spu")     # finds the package without running its __init__
    if found is None or not found.submodule_search_locations:
        raise ImportError("spu is not installed in this python")
    folder = found.submodule_search_locations[0]
    modules = []
    for name in ("libspu", "libpsi"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, name + ".so"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


def run(job: dict) -> dict:
    loading = time.perf_counter()
    libspu, libpsi = load_library()
    loaded = time.perf_counter() - loading

    ids = job["parties"]            # [rank 0 id, rank 1 id]
    rank = int(job["rank"])
    me, peer = ids[rank], ids[1 - rank]
    os.environ[_ENV_TRANSPORT] = job["transport"]
    os.environ[_ENV_TOKEN] = job["token"]
    os.environ[_ENV_SESSION] = job["session"]
    os.environ[_ENV_TRACE] = job["session"]
    os.environ[_ENV_INST + me] = me
    os.environ[_ENV_INST + peer] = peer

    desc = libspu.link.Desc()
    desc.id = job["session"]
    if job.get("direct"):   # bench/psi_ot.py's baseline only: the library's own sockets on loopback
        for party, address in zip(ids, job["direct"]):
            desc.add_party(party, address)
    else:
        for party in ids:
            desc.add_party(party, job["transport"])   # the blackbox link reaches every party through the relay
        desc.link_type = "blackbox"
        desc.brpc_channel_protocol = "http"
    desc.recv_timeout_ms = int(job["recv_timeout_ms"])
    desc.http_timeout_ms = int(job.get("http_timeout_ms", 120_000))
    desc.http_max_payload_size = int(job.get("payload_bytes", 4 << 20))
    desc.connect_retry_times = 3
    link = libspu.link.create_brpc(desc, rank)

    protocol = getattr(libpsi.PsiProtocol, f"PROTOCOL_{job['protocol']}")
    config = libpsi.PsiExecuteConfig(
        protocol_conf=libpsi.PsiProtocolConfig(
            protocol=protocol, receiver_rank=int(job["receiver_rank"]),
            broadcast_result=bool(job["broadcast"]), bucket_size=int(job.get("bucket_size", 1 << 20)),
            rr22_params=libpsi.Rr22Rarams(low_comm_mode=bool(job.get("low_comm", False)))),
        input_params=libpsi.InputParams(path=job["input"], selected_keys=["id"], keys_unique=True),
        output_params=libpsi.OutputParams(path=job["output"], disable_alignment=True),
    )
    started = time.perf_counter()
    report = libpsi.psi_execute(config, link)
    seconds = time.perf_counter() - started
    link.stop_link()
    return {"original": report.original_count, "intersection": report.intersection_count,
            "seconds": round(seconds, 3), "load_s": round(loaded, 3)}


def watch_parent(parent: int) -> None:
    """Exit when the fedps process that started this one is gone (a cancelled or killed task)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: worker.py <job.json>", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as handle:
        job = json.load(handle)
    if job.get("parent"):
        watch_parent(int(job["parent"]))
    try:
        result = run(job)
    except Exception as exc:  # noqa: BLE001 - reported as one line to the fedps side
        print(f"OT PSI failed in the library: {type(exc).__name__}: {' '.join(str(exc).split())[:600]}",
              file=sys.stderr)
        return 2
    with open(job["output"] + ".json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
