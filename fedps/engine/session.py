"""Spark and Ray sessions: embedded by default, a real cluster when configured.

``spark_session`` starts ``local[2]`` unless the process runs under
``spark-submit``, in which case it uses the master it was given. ``ray_session``
starts a local Ray with a small object store unless ``ray.address`` names a
cluster. Both are quiet by default and shut down cleanly as context managers.

A local Ray is private to its party (:func:`local_ray_env`): every Ray
process listens on 127.0.0.1 only, requires a token that this process wrote
(mode 0600, in a folder of its own that also holds Ray's session files), and
Spark executors of the same party join it with that token. Stopping it waits
for every Ray process it started, agents included, and kills stragglers.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fedps.engine.config import RayConfig, SparkConfig
from fedps.errors import ConfigError, FedpsError

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

_LOG4J = Path(__file__).with_name("resources") / "log4j2.properties"


def under_spark_submit() -> bool:
    """True when this Python driver was launched by ``spark-submit``."""
    return "PYSPARK_GATEWAY_PORT" in os.environ or "SPARK_SUBMIT_OPTS" in os.environ


def start_spark(config: SparkConfig | None = None, ray: RayConfig | None = None,
                jvm_log: str | os.PathLike[str] | None = None) -> SparkSession:
    """Start (or join) a SparkSession configured for fedps.

    ``ray`` is the party's Ray settings (a local Ray when omitted): executors
    of a local Ray's party get its token and loopback settings. With
    ``jvm_log`` the JVM's own output (its banners and warnings, and what its
    Python workers print) goes to that file instead of this process's stderr.
    """
    config = config or SparkConfig()
    local_ray = ray is None or not ray.address
    if local_ray and not under_spark_submit():
        local_ray_env()   # before the JVM starts: its Python workers inherit the environment
    # Executors must run the driver's interpreter, or they miss the virtualenv.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise ConfigError("pyspark is not installed; `pip install fedps` brings it") from exc
    builder = SparkSession.builder.appName(config.app_name)
    if not under_spark_submit():
        builder = builder.master(config.master)
        defaults = {
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false",
            "spark.sql.shuffle.partitions": "4",
            "spark.driver.bindAddress": "127.0.0.1",
            "spark.driver.host": "127.0.0.1",
            "spark.python.worker.reuse": "true",
            "spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={_LOG4J}",
        }
        for key, value in {**defaults, **config.conf}.items():
            builder = builder.config(key, value)
    else:
        for key, value in config.conf.items():
            builder = builder.config(key, value)
    with _stderr_to(jvm_log):   # the JVM inherits this process's stderr when it starts
        spark = builder.getOrCreate()
    if local_ray and not under_spark_submit():
        _share_with_executors(spark.sparkContext)
    spark.sparkContext.setLogLevel(config.log_level)
    log.info("spark session on %s", spark.sparkContext.master)
    return spark


@contextmanager
def _stderr_to(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """File descriptor 2 goes to ``path`` while inside (nothing changes without a path)."""
    if path is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    saved = os.dup(2)
    sys.stderr.flush()
    os.dup2(target, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(target)


def stop_spark(spark: SparkSession) -> None:
    spark.stop()


@contextmanager
def spark_session(config: SparkConfig | None = None) -> Iterator[SparkSession]:
    spark = start_spark(config)
    try:
        yield spark
    finally:
        stop_spark(spark)


def start_ray(config: RayConfig | None = None) -> str:
    """Connect to Ray (starting a private local one by default); returns the GCS address.

    Spark executors on the same machine reach the local cluster with
    ``ray.init(address=<returned address>)``.
    """
    config = config or RayConfig()
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    options: dict = {
        "namespace": config.namespace,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "configure_logging": True,
    }
    if config.address:
        _forget_local_ray_env()
        options["address"] = config.address
    else:
        folder = local_ray_env()
        _refresh_ray_config()
        options.update(
            include_dashboard=False,
            object_store_memory=config.object_store_mb * 1024 * 1024,
            _temp_dir=str(folder / "ray"),
        )
        if config.num_cpus:
            options["num_cpus"] = config.num_cpus
        _share_with_executors(None)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _init_ray(ray, options, local=not config.address)
    address = ray.get_runtime_context().gcs_address
    log.info("ray connected at %s", address)
    return address


#: A local Ray whose raylet does not register within Ray's fixed 30 s (an overloaded machine) is started again.
LOCAL_RAY_ATTEMPTS = 3


def _init_ray(ray, options: dict, local: bool) -> None:
    """``ray.init``, with a local start retried on Ray's start-up timeout; any failure is a FedpsError."""
    attempts = LOCAL_RAY_ATTEMPTS if local else 1
    for attempt in range(1, attempts + 1):
        started = _ray_processes() if local else []
        try:
            ray.init(**options)
            return
        except Exception as exc:   # Ray raises bare Exceptions (node start-up) and ConnectionErrors
            ray.shutdown()
            if local:
                _reap([p for p in _ray_processes() if p not in started], 10.0)
            busy = f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
            if local and "timed out during startup" in str(exc) and attempt < attempts:
                log.warning("the local Ray did not start in time (%s); starting it again (%d of %d)",
                            busy, attempt + 1, attempts)
                continue
            where = "a local Ray" if local else f"Ray at {options.get('address')!r}"
            raise FedpsError(f"could not start {where}: {str(exc).strip().splitlines()[0]} ({busy}; "
                             f"{'tried ' + str(attempt) + ' times' if local else 'check [ray] address'})") from None


def stop_ray(timeout_s: float = 10.0) -> None:
    """Disconnect from Ray; a local Ray is shut down with all its processes (agents included)."""
    import ray

    if not ray.is_initialized():
        return
    started = _ray_processes() if _LOCAL_MARK in os.environ else []
    ray.shutdown()
    _reap(started, timeout_s)


# ---------------------------------------------------------------------- a private local Ray

_LOCAL_MARK = "FEDPS_LOCAL_RAY"   # "<pid>:<folder>" of the process that set up the variables below
_TOKEN = "RAY_AUTH_TOKEN_PATH"
_LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # "0": Ray takes 127.0.0.1 as the node's address


def local_ray_env() -> Path:
    """Prepare this process's environment for a local Ray of its own; returns its private folder.

    - token authentication (``RAY_AUTH_MODE=token``) with a fresh token in a
      0700 folder, file mode 0600, instead of Ray's ``~/.ray/auth_token``
      (shared by every job of the OS user, mode 0644). A process that
      inherited another fedps process's settings (a party started by a test
      or a script) gets a token of its own. A ``RAY_AUTH_TOKEN`` or
      ``RAY_AUTH_TOKEN_PATH`` set by the user is kept.
    - loopback: with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` Ray uses
      127.0.0.1 as the node's address, so the GCS, raylet, workers (the PS
      shards) and agents listen on 127.0.0.1 only.
    """
    pid, _, folder = os.environ.get(_LOCAL_MARK, "").partition(":")
    if pid == str(os.getpid()) and Path(folder).is_dir():
        return Path(folder)
    inherited = bool(pid)
    base = tempfile.gettempdir()
    if len(base) > 40 and os.path.isdir("/tmp"):   # Ray's Unix socket paths must stay short
        base = "/tmp"
    private = Path(tempfile.mkdtemp(prefix="fedps-ray-", dir=base))   # mode 0700
    atexit.register(shutil.rmtree, private, True)
    user_token = "RAY_AUTH_TOKEN" in os.environ or (_TOKEN in os.environ and not inherited)
    if not user_token:
        token = private / "auth_token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        os.environ[_TOKEN] = str(token)
    mode = os.environ.get("RAY_AUTH_MODE", "token") if not inherited else "token"
    if mode != "token":
        log.warning("RAY_AUTH_MODE=%s: this party's Ray accepts any local process that reaches "
                    "its loopback ports", mode)
    os.environ["RAY_AUTH_MODE"] = mode
    os.environ[_LOOPBACK] = "0"
    os.environ[_LOCAL_MARK] = f"{os.getpid()}:{private}"
    return private


def _forget_local_ray_env() -> None:
    """A cluster ``ray.address``: drop local-Ray settings this or a parent fedps process set."""
    pid, _, folder = os.environ.pop(_LOCAL_MARK, "").partition(":")
    if not pid:
        return
    if os.environ.get(_TOKEN, "").startswith(folder + os.sep):
        os.environ.pop(_TOKEN)
    if os.environ.get(_LOOPBACK) == "0":
        os.environ.pop(_LOOPBACK)
    _refresh_ray_config()


def _refresh_ray_config() -> None:
    """Make an already imported Ray see the variables above (it reads some of them on import)."""
    try:
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config

        ray_constants.ENABLE_RAY_CLUSTER = os.environ.get(_LOOPBACK, "1") not in ("0", "false", "False")
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError) as exc:
        log.warning("could not refresh Ray's settings (%s); start Ray before importing it", exc)


def _share_with_executors(context: object | None) -> None:
    """Give the executors of this process's SparkContext the local Ray's settings.

    Python workers take their environment from the JVM, which may have been
    started before this process's Ray; ``SparkContext.environment`` reaches
    the workers of every job submitted afterwards.
    """
    if context is None:
        try:
            from pyspark import SparkContext
        except ImportError:
            return
        context = SparkContext._active_spark_context
        if context is None:
            return
    for name in (_TOKEN, "RAY_AUTH_MODE", _LOOPBACK):
        if name in os.environ:
            context.environment[name] = os.environ[name]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            tree.setdefault(parent, []).append(int(entry))
    return tree


def _ray_processes() -> list[tuple[int, str]]:
    """``(pid, start time)`` of the local Ray's processes this one started, and their descendants (Linux)."""
    if not os.path.isdir("/proc"):
        return []
    import ray

    package = os.path.dirname(ray.__file__)
    tree = _children()
    found: list[tuple[int, str]] = []
    for child in tree.get(os.getpid(), []):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                if package.encode() not in cmdline.read():
                    continue
        except OSError:
            continue
        stack = [child]
        while stack:
            pid = stack.pop()
            start = _started(pid)
            if start:
                found.append((pid, start))
            stack.extend(tree.get(pid, []))
    return found


def _started(pid: int) -> str:
    """The start time of a running process ("" when it is gone or a zombie); tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def _reap(processes: list[tuple[int, str]], timeout_s: float) -> None:
    """Wait for the processes to exit; kill those still there after ``timeout_s`` (orphaned agents)."""
    deadline = time.monotonic() + timeout_s
    alive = list(processes)
    while alive and time.monotonic() < deadline:
        alive = [(pid, start) for pid, start in alive if _started(pid) == start]
        if alive:
            time.sleep(0.1)
    for pid, _ in alive:
        log.warning("killing Ray process %d, left over after Ray's shutdown", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@contextmanager
def ray_session(config: RayConfig | None = None) -> Iterator[str]:
    address = start_ray(config)
    try:
        yield address
    finally:
        stop_ray()
