"""Multi-process runs (``jax.distributed``) from command-line flags, environment variables or
the cluster's own environment.

Where the settings come from, first match wins per setting:

1. flags ``--coordinator HOST:PORT --num-processes N --process-id I --dist-timeout S``;
2. the project's variables ``TFM_JAX_COORDINATOR``, ``TFM_JAX_NUM_PROCESSES``,
   ``TFM_JAX_PROCESS_ID``, ``TFM_JAX_DIST_TIMEOUT`` (and jax's own ``JAX_COORDINATOR_ADDRESS``
   for the coordinator);
3. with ``--cluster auto|slurm|ompi|...`` (or ``TFM_JAX_CLUSTER``): jax's cluster detection
   (``jax._src.clusters``: SLURM steps, Open MPI, mpi4py, Kubernetes, Cloud TPU) fills what is
   still unset. It is opt-in: Kubernetes and Cloud TPU detection fire inside any pod or TPU VM,
   and a plain single-process run must not start waiting for peers.

The settings are launch facts, not run facts, so they are flags and variables rather than a
``dist.*`` config section: every process of one run has a different ``process_id``, the run's
saved ``config.yaml`` must be the same for all of them, and a checkpoint written by N processes
resumes under M (the orbax checkpoint is global; see ``tests/integration/test_distributed.py``).

**Security.** jax's coordinator service (process 0) has no authentication: anyone who can reach
its port can join or disturb the run. It listens on the ``--coordinator`` address itself (or
``--bind HOST:PORT``), not on jax's default of every interface; keep that port behind a
firewall, reachable only from the run's machines.

A peer that never arrives must not hang the run: a watchdog thread ends the process with exit
code :data:`EXIT_MISSING_PEER` and one message naming the coordinator, the expected processes
and the timeout setting, ``GRACE_S`` seconds before jax's own deadline (which aborts the process
from C++ with a bare ``DEADLINE_EXCEEDED``).

This module imports jax only inside :func:`initialize` and :func:`_detect` (``tfm-jax config
show`` stays light).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import threading
from typing import Mapping, Optional

from tfm_jax.config import ConfigError

ENV_COORDINATOR = "TFM_JAX_COORDINATOR"
JAX_ENV_BIND = "JAX_COORDINATOR_BIND_ADDRESS"     # jax's own variable
ENV_NUM_PROCESSES = "TFM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "TFM_JAX_PROCESS_ID"
ENV_TIMEOUT = "TFM_JAX_DIST_TIMEOUT"
ENV_CLUSTER = "TFM_JAX_CLUSTER"
JAX_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"      # read by jax.distributed itself too

DEFAULT_TIMEOUT_S = 300          # jax.distributed.initialize's own default
GRACE_S = 5                      # jax's deadline is this much later than the watchdog's
EXIT_MISSING_PEER = 3            # the CLI's exit code when a peer never connected

_FLAGS = {"coordinator": "--coordinator", "num_processes": "--num-processes",
          "process_id": "--process-id", "timeout_s": "--dist-timeout", "cluster": "--cluster"}
_ENVS = {"coordinator": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
         "process_id": ENV_PROCESS_ID, "timeout_s": ENV_TIMEOUT, "cluster": ENV_CLUSTER}


@dataclasses.dataclass(frozen=True)
class DistSettings:
    """One process's view of a multi-process run; ``sources`` says where each value came from
    (a flag, a variable or a cluster), for messages."""

    coordinator: str
    num_processes: int
    process_id: int
    timeout_s: int = DEFAULT_TIMEOUT_S
    local_device_ids: Optional[tuple[int, ...]] = None
    sources: tuple[tuple[str, str], ...] = ()
    bind: Optional[str] = None        # --bind: where process 0's coordinator listens

    def bind_address(self, environ: Optional[Mapping[str, str]] = None) -> str:
        """Where process 0's coordinator service listens: ``--bind``, else jax's own
        ``$JAX_COORDINATOR_BIND_ADDRESS``, else the coordinator address itself -- never jax's
        default of every interface (``[::]:PORT``)."""
        env = os.environ if environ is None else environ
        return self.bind or env.get(JAX_ENV_BIND, "").strip() or self.coordinator

    def source(self, field: str) -> str:
        return dict(self.sources).get(field, "default")

    def describe(self) -> str:
        return (f"process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator} (from {self.source('coordinator')})")


def add_args(p: argparse.ArgumentParser) -> None:
    """The multi-process flags of ``tfm-jax train`` / ``eval``."""
    g = p.add_argument_group("multi-process (jax.distributed; README 'Multi-process / clusters')")
    g.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                   help=f"process 0's address, the same for all processes (or ${ENV_COORDINATOR})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"processes in the run (or ${ENV_NUM_PROCESSES})")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process, 0..N-1 (or ${ENV_PROCESS_ID})")
    g.add_argument("--cluster", default=None, metavar="METHOD",
                   help="fill unset values from the cluster environment with jax's detection: "
                   f"auto, slurm, ompi, mpi4py, ... (jax's names; or ${ENV_CLUSTER})")
    g.add_argument("--bind", metavar="HOST:PORT", default=None,
                   help="process 0: the address its coordinator listens on (default: the "
                   "--coordinator address itself; jax's coordinator has no authentication, so "
                   "keep it off untrusted networks)")
    g.add_argument("--dist-timeout", type=int, default=None, metavar="S",
                   help=f"seconds to wait for all processes to connect (default "
                   f"{DEFAULT_TIMEOUT_S}; or ${ENV_TIMEOUT})")


def from_args(args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None
              ) -> Optional[DistSettings]:
    """:func:`resolve` with the values of :func:`add_args`' flags."""
    s = resolve(coordinator=getattr(args, "coordinator", None),
                num_processes=getattr(args, "num_processes", None),
                process_id=getattr(args, "process_id", None),
                cluster=getattr(args, "cluster", None),
                timeout_s=getattr(args, "dist_timeout", None), environ=environ)
    bind = getattr(args, "bind", None)
    if bind is not None:
        host, sep, port = bind.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"--bind {bind!r}: HOST:PORT, the address process 0's coordinator "
                              "listens on (e.g. 10.0.0.1:12355)")
        if s is None:
            raise ConfigError("--bind given but no multi-process setting: add "
                              f"{_how('coordinator')}, {_how('num_processes')} and "
                              f"{_how('process_id')}")
        s = dataclasses.replace(s, bind=bind)
    return s


def _how(field: str) -> str:
    return f"{_FLAGS[field]} or ${_ENVS[field]}"


def _int(field: str, raw: str, source: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{source}={raw!r}: {_FLAGS[field].lstrip('-')} must be an integer "
                          f"(set it with {_how(field)})") from None


def resolve(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, cluster: Optional[str] = None,
            timeout_s: Optional[int] = None, environ: Optional[Mapping[str, str]] = None
            ) -> Optional[DistSettings]:
    """The run's multi-process settings, or None for a single-process run (nothing given).

    Raises :class:`ConfigError` naming the setting, where it came from and how to fix it: a
    setting missing when others are given, a bad ``HOST:PORT``, ``process_id`` outside
    ``0..N-1``, a non-positive timeout, an unknown or absent cluster environment.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    given = {"coordinator": coordinator, "num_processes": num_processes,
             "process_id": process_id, "cluster": cluster, "timeout_s": timeout_s}
    for field, value in given.items():
        if value is not None:
            values[field], sources[field] = value, _FLAGS[field]
        elif env.get(_ENVS[field], "").strip():
            raw = env[_ENVS[field]].strip()
            values[field] = (_int(field, raw, f"${_ENVS[field]}")
                             if field in ("num_processes", "process_id", "timeout_s") else raw)
            sources[field] = f"${_ENVS[field]}"
    if "coordinator" not in values and env.get(JAX_ENV_COORDINATOR, "").strip() and (
            "num_processes" in values or "process_id" in values or "cluster" in values):
        values["coordinator"] = env[JAX_ENV_COORDINATOR].strip()
        sources["coordinator"] = f"${JAX_ENV_COORDINATOR}"
    if not any(f in values for f in ("coordinator", "num_processes", "process_id", "cluster")):
        if "timeout_s" in values:
            raise ConfigError(f"{sources['timeout_s']} given but no multi-process setting: "
                              f"add {_how('coordinator')}, {_how('num_processes')} and "
                              f"{_how('process_id')} (or {_how('cluster')})")
        return None

    timeout = values.get("timeout_s", DEFAULT_TIMEOUT_S)
    if not isinstance(timeout, int) or timeout < 1:
        raise ConfigError(f"{sources.get('timeout_s')}={timeout}: the connect timeout must be a "
                          "positive number of seconds")
    local_ids = None
    if "cluster" in values:
        detected, method = _detect(str(values["cluster"]), values, int(timeout))
        for field in ("coordinator", "num_processes", "process_id"):
            if field not in values and detected[field] is not None:
                values[field], sources[field] = detected[field], f"cluster {method}"
        if detected["local_device_ids"] is not None:
            local_ids = tuple(int(i) for i in detected["local_device_ids"])

    missing = [f for f in ("coordinator", "num_processes", "process_id") if f not in values]
    if missing:
        have = ", ".join(f"{f}={values[f]} (from {sources[f]})" for f in
                         ("coordinator", "num_processes", "process_id", "cluster") if f in values)
        raise ConfigError(
            f"multi-process run incomplete: {have} given, but "
            + " and ".join(f"{f} is not set ({_how(f)})" for f in missing)
            + ". All processes need the same coordinator and process count and their own "
            "process id; or let jax read them from the cluster with --cluster auto")

    coord = str(values["coordinator"])
    host, sep, port = coord.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{sources['coordinator']}={coord!r}: the coordinator must be HOST:PORT "
                          "(process 0's host name or address and a free TCP port, e.g. "
                          "10.0.0.1:12355), the same on every process")
    n, i = values["num_processes"], values["process_id"]
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{sources['num_processes']}={n}: the number of processes must be >= 1")
    if not isinstance(i, int) or not 0 <= i < n:
        raise ConfigError(f"{sources['process_id']}={i}: the process id must be in 0..{n - 1} "
                          f"for {n} processes ({sources['num_processes']}={n}); each process "
                          "gets its own")
    return DistSettings(coord, n, i, int(timeout), local_ids, tuple(sorted(sources.items())))


def _cluster_types() -> list:
    """jax's cluster environments (``ClusterEnv`` subclasses), or [] where this jax has none."""
    try:
        from jax._src import clusters
    except ImportError:
        return []
    return list(getattr(clusters.ClusterEnv, "_cluster_types", []))


def _detect(method: str, values: Mapping[str, object], timeout: int
            ) -> tuple[dict[str, object], str]:
    """jax's own cluster detection for the settings not given (``method``: ``auto`` or one of
    jax's cluster names). Returns (the detected values, the environment's name)."""
    types = _cluster_types()
    names = sorted({t.name for t in types if getattr(t, "name", "")})
    if not types:
        raise ConfigError(f"--cluster {method}: this jax has no cluster detection "
                          "(jax._src.clusters); pass --coordinator, --num-processes and "
                          "--process-id instead")
    if method == "auto":
        env = next((t for t in types if not getattr(t, "opt_in_only_method", False)
                    and t.is_env_present()), None)
        if env is None:
            raise ConfigError(f"--cluster auto: no cluster environment found (jax knows "
                              f"{', '.join(names)}; SLURM counts only inside an srun step). "
                              "Launch under the cluster's launcher, or pass --coordinator, "
                              "--num-processes and --process-id")
    else:
        env = next((t for t in types if t.name == method), None)
        if env is None:
            raise ConfigError(f"--cluster {method}: unknown; jax's cluster detection knows "
                              f"auto, {', '.join(names)}")
        if not env.is_env_present():
            raise ConfigError(f"--cluster {method}: jax's {env.__name__} found no such "
                              "environment here (for slurm: run inside an srun step, which sets "
                              "SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID)")
    coord, n, i, local = env.auto_detect_unset_distributed_params(
        values.get("coordinator"), values.get("num_processes"), values.get("process_id"), None,
        env.name, timeout)
    return ({"coordinator": coord, "num_processes": n, "process_id": i,
             "local_device_ids": local}, env.name)


def missing_peer_message(s: DistSettings) -> str:
    return (f"tfm-jax: error: multi-process start timed out after {s.timeout_s} s: this is "
            f"{s.describe()}, and not all {s.num_processes} processes connected to the "
            f"coordinator {s.coordinator}. Start every process (ids 0..{s.num_processes - 1}, "
            f"each with the same coordinator and --num-processes {s.num_processes}); check that "
            f"process 0 runs on that host and its port is reachable from this one. To wait "
            f"longer, raise the timeout (from {s.source('timeout_s')}): --dist-timeout SECONDS "
            f"or ${ENV_TIMEOUT}\n")


def initialize(s: Optional[DistSettings]) -> None:
    """Start ``jax.distributed`` as ``s`` says (no-op for None or a 1-process run). Must run
    before anything touches a jax backend. A peer missing after ``s.timeout_s`` seconds ends
    the process with :func:`missing_peer_message` and exit code :data:`EXIT_MISSING_PEER`."""
    if s is None or s.num_processes == 1:
        return
    import jax

    if jax.distributed.is_initialized():
        raise ConfigError(f"jax.distributed is already initialized in this process; "
                          f"drop the multi-process settings ({s.describe()}) or the script's own "
                          "jax.distributed.initialize call")
    done = threading.Event()

    def watchdog() -> None:
        if not done.wait(s.timeout_s):
            sys.stdout.flush()
            sys.stderr.write(missing_peer_message(s))
            sys.stderr.flush()
            os._exit(EXIT_MISSING_PEER)

    threading.Thread(target=watchdog, name="tfm-jax-dist-watchdog", daemon=True).start()
    import inspect

    # jax's coordinator listens on every interface ([::]:PORT) unless told otherwise, and it
    # has no authentication: bind it to the given address (jax 0.10 .. 0.12 take
    # coordinator_bind_address).
    bind = ({"coordinator_bind_address": s.bind_address()}
            if "coordinator_bind_address" in inspect.signature(
                jax.distributed.initialize).parameters else {})
    try:
        jax.distributed.initialize(
            s.coordinator, num_processes=s.num_processes, process_id=s.process_id, **bind,
            local_device_ids=list(s.local_device_ids) if s.local_device_ids else None,
            # resolve() already ran the detection that was asked for (none without --cluster)
            cluster_detection_method="deactivate",
            initialization_timeout=s.timeout_s + GRACE_S)
    except RuntimeError as err:      # e.g. a jax backend was already initialized
        raise ConfigError(f"multi-process start failed ({s.describe()}): {err}") from err
    finally:
        done.set()


def shutdown(s: Optional[DistSettings]) -> None:
    """Leave the run cleanly (a barrier with the other processes) after a successful command."""
    if s is None or s.num_processes == 1:
        return
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
