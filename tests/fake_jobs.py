"""A stand-in training entry point for the launcher and tracker tests.

``python -m tests.fake_jobs --spec SPEC --result RESULT`` behaves as the spec's
``params["behaviour"]`` says, so the tests drive real processes through every path
without torch or MLflow:

* ``succeed``: sleep ``sleep_s``, write a succeeded result with ``model_version``.
* ``fail_exit``: print a traceback-like line, exit 3 without a result.
* ``crash``: print, then SIGKILL itself (no result, no chance to clean up).
* ``hang``: spawn a child in the same process group and sleep forever; with
  ``ignore_term`` the job ignores SIGTERM so only SIGKILL stops it.
* ``report_failed``: write a failed result with a reason, exit 1.

Like ``retrain.job`` under torchrun, only rank 0 (``RANK``) writes the result.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from retrain.spec import JobSpec


def _write_result(path: Path, result: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--result", required=True, type=Path)
    args = parser.parse_args(argv)
    spec = JobSpec.from_json(args.spec.read_text())
    params = spec.params
    behaviour = params.get("behaviour", "succeed")
    rank = int(os.environ.get("RANK", "0"))
    print(f"fake job {spec.job_id} rank {rank}: {behaviour}", flush=True)
    time.sleep(float(params.get("sleep_s", 0.0)))
    if behaviour == "succeed":
        if rank == 0:
            _write_result(args.result, {"status": "succeeded", "job_id": spec.job_id,
                                        "model_version": str(params.get("model_version", "7"))})
        print("done", flush=True)
        return 0
    if behaviour == "fail_exit":
        print("Traceback (most recent call last):\nValueError: the fake job failed on purpose", flush=True)
        return 3
    if behaviour == "crash":
        print("about to be killed", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if behaviour == "report_failed":
        if rank == 0:
            _write_result(args.result, {"status": "failed", "job_id": spec.job_id,
                                        "reason": "only 12 clean rows, at least 1000 needed"})
        return 1
    if behaviour == "hang":
        if params.get("ignore_term"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # A grandchild in the same group: a cancel must take it down too.
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        Path(args.result.with_name("child.pid")).write_text(str(child.pid))
        print(f"hanging with child {child.pid}", flush=True)
        while True:
            time.sleep(3600)
    print(f"unknown behaviour {behaviour!r}", file=sys.stderr, flush=True)
    return 2


if __name__ == "__main__":
    sys.exit(main())
