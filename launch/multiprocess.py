"""Run N local processes of one command as a multi-process JAX job (one machine, CPU or GPUs).

    python launch/multiprocess.py --num_processes 2 --devices_per_process 4 -- \\
        python -m fewstep_jax.main --config=... --workdir=...

Each child gets FEWSTEP_COORDINATOR (127.0.0.1:<free port>), FEWSTEP_NUM_PROCESSES and
FEWSTEP_PROCESS_ID, which `fewstep_jax.parallel.initialize_distributed()` reads. With
--devices_per_process the children simulate that many CPU devices each (XLA_FLAGS). If one
child fails, the others are killed; SIGINT/SIGTERM are forwarded; --timeout bounds the run.
The exit code is the first non-zero child exit code (0 if all succeed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

# Read by fewstep_jax.parallel.initialize_distributed (kept here so this script runs without
# importing jax or installing the package).
ENV_COORDINATOR = "FEWSTEP_COORDINATOR"
ENV_NUM_PROCESSES = "FEWSTEP_NUM_PROCESSES"
ENV_PROCESS_ID = "FEWSTEP_PROCESS_ID"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict[str, str], port: int, n: int, i: int, devices: int | None) -> dict:
    env = dict(base)
    env[ENV_COORDINATOR] = f"127.0.0.1:{port}"
    env[ENV_NUM_PROCESSES] = str(n)
    env[ENV_PROCESS_ID] = str(i)
    if devices is not None:
        flags = [
            f
            for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        ]
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def run(
    cmd: list[str],
    num_processes: int,
    devices_per_process: int | None = None,
    port: int | None = None,
    timeout: float | None = None,
) -> int:
    """Start the processes, wait for all; returns the job's exit code (124 on timeout)."""
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if not cmd:
        raise ValueError("no command given (put it after --)")
    port = port or free_port()
    procs: list[subprocess.Popen] = []

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        for i in range(num_processes):
            env = child_env(dict(os.environ), port, num_processes, i, devices_per_process)
            procs.append(subprocess.Popen(cmd, env=env))
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                print(f"multiprocess: a process exited with {failed[0]}; killing the others", file=sys.stderr)
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"multiprocess: timeout after {timeout} s; killing all", file=sys.stderr)
                return 124
            time.sleep(0.1)
    finally:
        _kill_all(procs)
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument(
        "--devices_per_process",
        type=int,
        default=None,
        help="simulated CPU devices per process (sets XLA_FLAGS)",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds; then kill all")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- command ...")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return run(cmd, args.num_processes, args.devices_per_process, args.port, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
