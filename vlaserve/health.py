"""``python -m vlaserve.health`` (``make health``): is the server really healthy? Exit 0 if so, else 1 and why.

Healthy means both: Triton answers ``/v2/health/ready``, and the launcher's supervisor (see
:mod:`vlaserve.supervisor`) saw, within the last few check intervals, a live tritonserver whose model
instance processes are all alive. Readiness alone stays 200 while a dead instance fails every request
routed to it, so a container or Kubernetes health check should call this instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from vlaserve import interface as io
from vlaserve.supervisor import HEALTH_FILE, mps_daemon_problem


def check(workdir: Path, url: str, timeout: float = 3.0, mps_pipe: str | None = None) -> str:
    """Why the server is not healthy, or "" when it is (``mps_pipe``: also the MPS daemon answering there)."""
    if mps_pipe:
        problem = mps_daemon_problem(mps_pipe)
        if problem:
            return problem
    path = Path(workdir) / HEALTH_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return f"no supervisor health at {path} (is `python -m vlaserve.server` running with this --workdir?)"
    age = (datetime.datetime.now() - datetime.datetime.fromisoformat(state["checked"])).total_seconds()
    if age > max(10.0, 5 * state.get("interval_s", 2.0)):
        return f"the supervisor's last check is {age:.0f} s old (is the launcher still running?)"
    if not state["healthy"]:
        return state["problem"] + (" (recovering)" if state.get("recovering") else "")
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=timeout) as resp:
            if resp.status != 200:
                return f"{url}/v2/health/ready answered {resp.status}"
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return f"{url}/v2/health/ready: {exc}"
    return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlaserve.health", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=io.DEFAULT_WORKDIR, help="the server's --workdir (default: .vlaserve)")
    parser.add_argument(
        "--url",
        default=f"http://{io.DEFAULT_HOST}:{io.HTTP_PORT}",
        help="the server's HTTP address (default: %(default)s)",
    )
    parser.add_argument(
        "--mps-pipe", help="also require the MPS control daemon to answer on this pipe directory (a GPU under MPS)"
    )
    args = parser.parse_args(argv)
    problem = check(Path(args.workdir), args.url.rstrip("/"), mps_pipe=args.mps_pipe)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
