"""Benchmark the crypto layer against plain ``phe`` (value by value), side by side in one run.

    .venv/bin/python bench/crypto.py [--bits 2048] [--n 400] [--phe-n 40] [--rounds 5] [--wall]
                                     [--no-spark | --spark-only] [--heu-python /tmp/heuenv/bin/python]

Prints a markdown report for docs/benchmarks.md. The comparisons that give the
headline ratios run *interleaved*: each round times every contender once
(``--phe-n`` values for phe and HEU, ``--n`` for the fast paths) and the best
round of each counts, so load drifting on a shared machine hits all alike.
Times are CPU seconds of the measuring process (``time.process_time``; HEU
measures its own the same way): per-core cost, robust against other load on a
shared machine. ``--wall`` switches to wall-clock time. The Spark speed-up is
always wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import gmpy2
import numpy as np
import scipy.sparse as sp

from fedps.engine.crypto import (
    Decryptor, Encryptor, FixedPoint, PackingLayout, compress, generate_keypair, seal_for_owner, xt_d,
)

SHORT_EXPONENT = 448
CLOCK: Callable[[], float] = time.process_time
FIX = FixedPoint(frac_bits=16, int_bits=8)
HEU_SCRIPT = r"""
import json, sys, time
from heu import phe
bits, n, rounds = (int(a) for a in sys.argv[1:4])
clock = time.perf_counter if sys.argv[4] == "wall" else time.process_time
kit = phe.setup(phe.SchemaType.ZPaillier, bits)
enc, dec = kit.encryptor(), kit.decryptor()
enc.encrypt_raw(1)
for _ in range(rounds):
    line = sys.stdin.readline()
    t = clock(); cts = [enc.encrypt_raw(i) for i in range(n)]; e = (clock() - t) / n
    t = clock(); ms = [dec.decrypt_raw(c) for c in cts]; d = (clock() - t) / n
    assert ms == list(range(n))
    print(json.dumps({"enc": e, "dec": d}), flush=True)
"""


class Race:
    """Interleaved timing: each round runs every entry once; an entry's best round counts."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[Callable[[], Any], int]] = {}
        self.best: dict[str, float] = {}

    def add(self, name: str, fn: Callable[[], Any], count: int) -> None:
        self.entries[name] = (fn, count)

    def run(self, rounds: int, clock: Callable[[], float] | None = None) -> dict[str, float]:
        clock = clock or CLOCK
        for _ in range(rounds):
            for name, (fn, count) in self.entries.items():
                start = clock()
                fn()
                per = (clock() - start) / count
                self.best[name] = min(self.best.get(name, float("inf")), per)
        return self.best


class Heu:
    """SecretFlow HEU ZPaillier in its own virtualenv, driven one round at a time."""

    def __init__(self, python: str, bits: int, count: int, rounds: int) -> None:
        clock = "wall" if CLOCK is time.perf_counter else "cpu"
        self.proc = subprocess.Popen([python, "-c", HEU_SCRIPT, str(bits), str(count), str(rounds), clock],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.enc = self.dec = float("inf")

    def round(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        res = json.loads(self.proc.stdout.readline())
        self.enc, self.dec = min(self.enc, res["enc"]), min(self.dec, res["dec"])


def timed(fn: Callable[[], Any], count: int, rounds: int = 3) -> tuple[float, Any]:
    """Best seconds per item over ``rounds`` calls of ``fn``, and the last result."""
    best, out = float("inf"), None
    for _ in range(rounds):
        start = CLOCK()
        out = fn()
        best = min(best, (CLOCK() - start) / count)
    return best, out


class Report:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str]] = []

    def add(self, what: str, seconds: float | None = None, note: str = "", text: str | None = None) -> None:
        shown = text if text is not None else f"{seconds * 1e3:.4f} ms"
        self.rows.append((what, shown, note))

    def markdown(self) -> str:
        lines = ["| measurement | per value | ratio |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.rows]
        return "\n".join(lines)


def x_over(baseline: float, ours: float) -> str:
    return f"{baseline / ours:.1f}x phe"


def encryption_race(pub: Any, priv: Any, args: argparse.Namespace, rep: Report) -> dict[str, float]:
    """phe, raw powmod, HEU and the four fast settings, interleaved."""
    rng = np.random.default_rng(0)
    phe_vals = rng.uniform(-100, 100, args.phe_n).tolist()
    vals = rng.uniform(-100, 100, args.n)
    nsq, rs = pub.nsquare, [gmpy2.mpz(secrets.randbelow(pub.n)) for _ in range(args.phe_n)]
    settings = {"public table, default": {}, "CRT (key owner), default": {"private_key": priv},
                f"public table, {SHORT_EXPONENT}-bit": {"exponent_bits": SHORT_EXPONENT},
                f"CRT, {SHORT_EXPONENT}-bit": {"private_key": priv, "exponent_bits": SHORT_EXPONENT},
                "public table, 10-bit window (4x the table memory), default": {"window": 10}}
    encs, built = {}, {}
    for name, kw in settings.items():
        start = time.perf_counter()
        encs[name] = Encryptor(pub, **kw)
        built[name] = time.perf_counter() - start
    packed_layout = PackingLayout.plan(pub.n.bit_length(), FixedPoint(frac_bits=16, int_bits=4), additions=1023)
    gh_fix = FixedPoint(frac_bits=24, int_bits=4)
    gh_layout = PackingLayout.plan(pub.n.bit_length(), gh_fix, additions=2**20, slots=2)
    gh = np.column_stack([vals / 100, np.abs(vals) / 100])
    race = Race()
    race.add("phe", lambda: [pub.encrypt(v) for v in phe_vals], args.phe_n)
    race.add("powmod", lambda: [gmpy2.powmod(r, pub.n, nsq) for r in rs], args.phe_n)
    for name, enc in encs.items():
        race.add(name, lambda e=enc: e.encrypt(vals, FIX), args.n)
    owner = encs["CRT (key owner), default"]
    race.add("packed", lambda: owner.encrypt_packed(vals / 100, packed_layout, FixedPoint(16, 4)), args.n)
    race.add("gh", lambda: owner.encrypt_packed(gh, gh_layout, gh_fix), 2 * args.n)
    heu = Heu(args.heu_python, args.bits, args.phe_n, args.rounds) if os.path.exists(args.heu_python) else None
    if heu:
        race.add("heu", heu.round, 1)
    best = race.run(args.rounds)
    phe = best["phe"]
    rep.add(f"phe `encrypt`, value by value ({args.phe_n * args.rounds} values)", phe, "1x")
    rep.add("raw `gmpy2.powmod(r, n, n^2)` (the naive floor)", best["powmod"],
            f"{x_over(phe, best['powmod'])}; {1 / best['powmod']:.0f}/s")
    for name, enc in encs.items():
        bits = enc.raw.obfuscator.exponent_bits
        rep.add(f"fast encrypt, {name.replace('default', f'{bits}-bit exponent (default)')} "
                f"(table built in {built[name]:.2f} s)", best[name], x_over(phe, best[name]))
    rep.add(f"packed encrypt, {packed_layout.slots} slots x {packed_layout.slot_bits} bits "
            "(16 frac bits, 1023 additions, 40-bit mask room), CRT", best["packed"], x_over(phe, best["packed"]))
    rep.add("packed encrypt, SecureBoost (g, h) in 2 slots, CRT", best["gh"], x_over(phe, best["gh"]))
    if heu:
        best["heu"] = heu.enc
        best["heu_dec"] = heu.dec
        rep.add("HEU ZPaillier `encrypt_raw` (sf-heu 0.5.2b0, own venv)", heu.enc, x_over(phe, heu.enc))
        rep.add("fast CRT default vs HEU ZPaillier", text="",
                note=f"{heu.enc / best['CRT (key owner), default']:.2f}x HEU")
        rep.add("fast public-table default vs HEU ZPaillier", text="",
                note=f"{heu.enc / best['public table, default']:.2f}x HEU")
    else:
        rep.add("HEU ZPaillier", text="not run", note=f"{args.heu_python} not found")
    return best


def decryption_race(pub: Any, priv: Any, args: argparse.Namespace, rep: Report, heu_dec: float | None) -> None:
    """phe decryption value by value against batch, compressed-masked and compressed-unmasked."""
    bits = pub.n.bit_length()
    peer, dec = Encryptor(pub), Decryptor(priv)
    rng = np.random.default_rng(2)
    phe_nums = [pub.encrypt(v) for v in rng.uniform(-100, 100, args.phe_n).tolist()]
    unpacked = peer.encrypt(rng.uniform(-100, 100, args.phe_n), FIX)
    grad_bound = FixedPoint(16, 4).bound * 1024 * 2  # d at 16 frac bits times binary X, 1024-row batch
    hist_bound = 2**33
    grad = peer.encrypt_ints(rng.integers(-grad_bound, grad_bound, args.n).tolist(), grad_bound, 16)
    hist = peer.encrypt_ints(rng.integers(-hist_bound, hist_bound, args.n).tolist(), hist_bound, 16)
    grad_layout = PackingLayout.for_bound(bits, grad_bound)
    hist_layout = PackingLayout.for_bound(bits, hist_bound, mask_bits=0)
    send_grad, (sealed, _) = timed(lambda: seal_for_owner(grad, peer, grad_layout), args.n)
    send_hist, packed_hist = timed(lambda: peer.rerandomize(compress(hist, hist_layout)), args.n)
    race = Race()
    race.add("phe", lambda: [priv.decrypt(c) for c in phe_nums], args.phe_n)
    race.add("batch", lambda: dec.decrypt(unpacked), args.phe_n)
    race.add("grad", lambda: dec.decrypt_exact(sealed), args.n)
    race.add("hist", lambda: dec.decrypt_exact(packed_hist), args.n)
    best = race.run(args.rounds)
    phe = best["phe"]
    rep.add(f"phe `decrypt`, value by value ({args.phe_n * args.rounds} values)", phe, "1x")
    rep.add("fast batch decrypt, one value per ciphertext (bound < p/2: one prime)", best["batch"],
            x_over(phe, best["batch"]))
    rep.add(f"owner decrypts compressed LR gradients, masked (bound 2^32, 40-bit mask), "
            f"{grad_layout.slots} slots", best["grad"], x_over(phe, best["grad"]))
    rep.add(f"owner decrypts compressed SecureBoost histograms, unmasked (bound 2^33), "
            f"{hist_layout.slots} slots", best["hist"], x_over(phe, best["hist"]))
    rep.add("sender: compress + mask + re-randomise gradients", send_grad)
    rep.add("sender: compress + re-randomise histograms", send_hist)
    if heu_dec is not None:
        rep.add("HEU ZPaillier `decrypt_raw`", heu_dec, x_over(phe, heu_dec))


def operations(pub: Any, args: argparse.Namespace, rep: Report) -> None:
    """Addition, plaintext multiplication and X^T [[d]] against phe's operators."""
    peer = Encryptor(pub)
    rows = args.phe_n * 5
    rng = np.random.default_rng(4)
    phe_nums = [pub.encrypt(v) for v in rng.uniform(-1, 1, args.phe_n).tolist()]
    x = rng.normal(size=(rows, 10))
    per_phe_mul, _ = timed(lambda: [a * float(b) for a, b in zip(phe_nums, x[:, 0])], args.phe_n)
    per_phe_add, _ = timed(lambda: [a + a for a in phe_nums], args.phe_n)
    d = peer.encrypt(rng.uniform(-1, 1, rows), FixedPoint(16, 4))
    per_add, _ = timed(lambda: d + d, rows)
    per_mul, _ = timed(lambda: d.mul_plain(x[:, 0], FIX), rows)
    rep.add("add two ciphertexts", per_add, f"{per_phe_add / per_add:.1f}x phe `+`")
    rep.add("multiply by a plaintext (16 frac bits)", per_mul, f"{per_phe_mul / per_mul:.1f}x phe `* float`")
    per_dense, _ = timed(lambda: xt_d(x, d, FIX), x.size)
    rep.add(f"X^T [[d]] dense real {x.shape}, bucket method, per non-zero", per_dense,
            f"{per_phe_mul / per_dense:.1f}x phe `* float`")
    xs = sp.random(rows, 200, density=0.05, random_state=6, data_rvs=lambda k: np.ones(k)).tocsr()
    per_bin, _ = timed(lambda: xt_d(xs, d, FixedPoint(frac_bits=0, int_bits=1)), xs.nnz)
    rep.add(f"X^T [[d]] sparse binary ({xs.nnz} non-zeros), per non-zero", per_bin,
            f"{per_phe_mul / per_bin:.1f}x phe `* float`")


def wire(pub: Any, args: argparse.Namespace, rep: Report) -> None:
    """Bytes on the wire per value against phe's decimal-text serialisation."""
    nums = [pub.encrypt(v) for v in np.linspace(-4, 4, args.phe_n).tolist()]
    text = sum(len(json.dumps({"v": str(c.ciphertext()), "e": c.exponent})) for c in nums) / len(nums)
    vec = Encryptor(pub).encrypt(np.linspace(-4, 4, args.n), FixedPoint(16, 4))
    grad_layout = PackingLayout.for_bound(pub.n.bit_length(), FixedPoint(16, 4).bound * 2048)
    rep.add("wire: phe ciphertext as decimal text (JSON `{v, e}`)", text=f"{text:.0f} B")
    for label, v in [("one value per ciphertext", vec),
                     (f"compressed, {grad_layout.slots} slots (LR gradient layout)", compress(vec, grad_layout))]:
        size = len(v.to_bytes()) / args.n
        rep.add(f"wire: CipherVector bytes, {label}", text=f"{size:.1f} B", note=f"{size / text:.3f} of phe")


def _timed_encrypt_task(n: int, pq: tuple[int, int]) -> Callable[[np.ndarray], tuple[bytes, float]]:
    """What ``encrypt_on_spark`` runs per partition, also returning the task's CPU seconds."""
    from fedps.engine.crypto.spark import _worker_encryptor

    def work(chunk: np.ndarray) -> tuple[bytes, float]:
        start = time.process_time()
        blob = _worker_encryptor(n, pq, None).encrypt(chunk).to_bytes()
        return blob, time.process_time() - start

    return work


def spark_speedup(pub: Any, priv: Any, args: argparse.Namespace, rep: Report) -> None:
    """Encryption over 1 and 2 Spark partitions (local[2]), warm workers, wall clock.

    Also reports the tasks' own CPU time, so the split of the work is visible
    even when other load on the machine blurs the wall-clock ratio.
    """
    from pyspark.sql import SparkSession

    from fedps.engine.crypto.spark import encrypt_on_spark, run_partitions

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    count = 4 * args.n
    values = np.random.default_rng(7).normal(size=count)
    work = _timed_encrypt_task(int(pub.n), (int(priv.p), int(priv.q)))
    try:
        for _ in range(2):  # build the tables in both Python workers
            encrypt_on_spark(spark, values[:64], pub, private_key=priv, partitions=2)
        race = Race()
        race.add("one", lambda: encrypt_on_spark(spark, values, pub, private_key=priv, partitions=1), count)
        race.add("two", lambda: encrypt_on_spark(spark, values, pub, private_key=priv, partitions=2), count)
        best = race.run(3, clock=time.perf_counter)
        cpu_one = min(sum(c for _, c in run_partitions(spark, work, [values])) for _ in range(3))
        cpu_two = min(max(c for _, c in run_partitions(spark, work, np.array_split(values, 2))) for _ in range(3))
    finally:
        spark.stop()
    rep.add(f"Spark encrypt (CRT) of {count} values, 1 partition (wall)", best["one"])
    rep.add("Spark encrypt (CRT), 2 partitions on local[2] (wall)", best["two"],
            f"{best['one'] / best['two']:.2f}x over 1 partition")
    rep.add("Spark tasks' CPU: 1 partition / slowest of 2 partitions", cpu_two / count,
            f"{cpu_one / cpu_two:.2f}x critical-path speed-up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2048)
    parser.add_argument("--n", type=int, default=400, help="values per round for the fast paths")
    parser.add_argument("--phe-n", type=int, default=40, help="values per round for phe and HEU")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-spark", action="store_true")
    parser.add_argument("--spark-only", action="store_true", help="only the Spark speed-up")
    parser.add_argument("--heu-python", default="/tmp/heuenv/bin/python")
    parser.add_argument("--wall", action="store_true", help="wall-clock instead of CPU time")
    args = parser.parse_args()
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter

    start = time.perf_counter()
    pub, priv = generate_keypair(args.bits)
    keygen = time.perf_counter() - start
    rep = Report()
    if not args.spark_only:
        best = encryption_race(pub, priv, args, rep)
        decryption_race(pub, priv, args, rep, best.get("heu_dec"))
        operations(pub, args, rep)
        wire(pub, args, rep)
    if not args.no_spark:
        spark_speedup(pub, priv, args, rep)
    load = os.getloadavg()
    print(f"{args.bits}-bit key (keygen {keygen:.2f} s); {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, gmpy2 {gmpy2.version()}, {gmpy2.mp_version()}; "
          f"{'wall-clock' if args.wall else 'CPU'} time per value; load average at the end {load[0]:.2f}\n")
    print(rep.markdown())


if __name__ == "__main__":
    main()
