"""Step 03 (deploy) through the runner and papermill, against the same deploy as a bare Python script
(`flow.from_source(...).deploy(...)` with the same source, entrypoint, pool, job variables, parameters,
tags and version), against the same sandbox, in turn (A B A B ...), with the ratio pair by pair.

A: `runbook run --only 03_deploy --confirm` (the runner's wall time: a kernel, the imports, the checks,
the plan, the deploy, the records). B: `python deploy.py` (its wall time: the imports and the deploy).
Goal (issue 14): A/B <= 1.5x.

Usage: python bench/deploy_overhead.py [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import begin, fmt, record, runbook_cli, sandbox, sandbox_env, stats  # noqa: E402
from runbook import _at, step_phases  # noqa: E402

STEP = "03_deploy"

BARE = '''\
import sys
from prefect import flow
from prefect.runner.storage import GitRepository

spec = {spec!r}
source = GitRepository(url=spec["repository"], **spec["ref"])
deployment_id = flow.from_source(source, spec["entrypoint"]).deploy(
    name=spec["name"], work_pool_name=spec["work_pool_name"], job_variables=spec["job_variables"],
    parameters=spec["parameters"], tags=spec["tags"], description=spec["description"], version=spec["version"],
    build=False, push=False, print_next_steps=False,
)
print(deployment_id)
'''


def deployment_spec(env: dict, values: dict) -> dict:
    """What step 03 deployed, read back from Prefect through the gateway (as a user's script would say it)."""
    import httpx

    with httpx.Client(base_url=env["PREFECT_API_URL"] + "/", timeout=30, trust_env=False,
                      headers={"Authorization": f"Bearer {env['PREFECT_API_KEY']}"}) as api:
        dep = api.get(f"deployments/{values['deployment_id']}").json()
    ref = {"commit_sha": values["commit_sha"]} if values.get("pinned") else {"branch": values["branch"]}
    return {
        "repository": values["repository"], "ref": ref, "entrypoint": dep["entrypoint"],
        "name": dep["name"], "work_pool_name": dep["work_pool_name"], "job_variables": dep["job_variables"],
        "parameters": dep["parameters"], "tags": dep["tags"], "description": dep["description"],
        "version": dep["version"],
    }


def runner_phases(seconds: float, ended: float, manifest: dict, step: dict, run_dir: Path) -> dict[str, float]:
    """Where the runner's wall time went: `start` (the runner's start and imports -> the step due),
    the step's phases (see bench/runbook.py's step_phases; `wait_warm` is the prewarm left when it was
    due), `records` (the verdict -> the run's end: HTML, the step process stopping its kernel, the
    Secret blocks' read, the scan, index), `exit` (the run's end -> the process gone)."""
    launched = ended - seconds
    began, done = _at(step["started_at"]), _at(step["ended_at"])
    run_end = _at(manifest["ended_at"])
    if began is None or done is None or run_end is None:
        return {}
    return {"start": round(began.timestamp() - launched, 3), **step_phases(run_dir, step),
            "records": round((run_end - done).total_seconds(), 3), "exit": round(ended - run_end.timestamp(), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    begin()
    outputs = Path(tempfile.mkdtemp(prefix="runbook-bench-deploy-"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    step_walls, step_durations, bare_walls, ratios = [], [], [], []
    phases: dict[str, list[float]] = {}
    with sandbox() as state:
        env = {**sandbox_env(state), "RUNBOOK_SANDBOX_DIR": str(state)}

        def run_step(run_id: str) -> tuple[float, dict]:
            seconds, proc = runbook_cli("run", "--profile", "sandbox", "--confirm", "--only", STEP, "--run-id", run_id,
                                        "--outputs-dir", str(outputs), env=env, timeout=900)
            ended = time.time()
            manifest = json.loads((outputs / run_id / "manifest.json").read_text())
            record_ = next(s for s in manifest["steps"] if s["step"] == STEP)
            if proc.returncode != 0:
                raise SystemExit(f"step 03 failed; see {outputs / run_id}:\n{proc.stdout[-3000:]}")
            record_["runner_phases"] = runner_phases(seconds, ended, manifest, record_, outputs / run_id)
            return seconds, record_

        _, first = run_step(f"deploy-{stamp}-warmup")  # deploys (or finds deployed) what the bare script repeats
        script = outputs / "deploy.py"
        script.write_text(BARE.format(spec=deployment_spec(env, first["results"])))
        subprocess.run([sys.executable, str(script)], env={**env}, capture_output=True, timeout=600, check=True)
        for i in range(args.pairs):
            seconds, rec = run_step(f"deploy-{stamp}-{i}")
            step_walls.append(seconds)
            step_durations.append(rec["duration_seconds"])
            for phase, value in rec["runner_phases"].items():
                phases.setdefault(phase, []).append(value)
            began = time.monotonic()
            proc = subprocess.run([sys.executable, str(script)], env={**env}, capture_output=True, text=True, timeout=600)
            bare = time.monotonic() - began
            if proc.returncode != 0:
                raise SystemExit(f"the bare deploy failed:\n{proc.stderr[-3000:]}")
            bare_walls.append(bare)
            ratios.append(seconds / bare)
    s_step, s_dur, s_bare, s_ratio = stats(step_walls), stats(step_durations), stats(bare_walls), stats(ratios)
    print(f"step 03 through the runner vs the bare deploy script, {args.pairs} pairs in turn")
    print(f"  runbook run --only 03_deploy (wall)   {fmt(s_step)}")
    print(f"    of which the step (manifest)        {fmt(s_dur)}")
    for phase, values in phases.items():
        print(f"      {phase:<33} {fmt(stats(values), 's', 2)}")
    print(f"  bare flow.from_source().deploy()      {fmt(s_bare)}")
    print(f"  ratio, pair by pair                   {fmt(s_ratio, 'x', 2)}   goal <= 1.5x")
    record("deploy_overhead", [
        {"figure": "step 03 via runner+papermill", "stats": s_step, "unit": "s"},
        {"figure": "bare deploy script", "stats": s_bare, "unit": "s"},
        {"figure": "step 03 / bare deploy", "stats": s_ratio, "unit": "x", "goal": "<= 1.5x"},
    ])


if __name__ == "__main__":
    main()
