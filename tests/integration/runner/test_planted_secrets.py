"""The planted-secrets proof: every secret the sandbox issues (runbook_sandbox/config.py), planted in the
live deployment's env and job variables, a Secret block, exception text, a DSN whose password holds
special characters and a Basic-auth header, is found in ZERO files under outputs/ after a run that
ends, a run that fails and a run that is killed (SIGTERM; SIGKILL, found by the next run).

The notebooks here write the values straight into their records, bypassing every redaction hook, so
only the runner's secret scan stands between them and the records. Every form a record can hold
(raw, URL-encoded, JSON, HTML entities, base64 in a Basic-auth header) is written, and looked for afterwards."""

from __future__ import annotations

import base64
import json
import signal
import uuid
from pathlib import Path
from urllib.parse import quote

import nbformat
import pytest

from runbook_lib.core.profiles import load_settings
from runbook_lib.systems.prefect import PrefectApi
from tests.integration.runner.test_run import cli, make_notebooks, manifest, wait_for

# A notebook cell planting every issued secret, in every encoding, into its run directory (and into its
# output and exception text): the values come from the sandbox's config.json and the live deployment.
PLANT = '''
import json, os, base64
from pathlib import Path
cfg = json.loads(Path(os.environ["RUNBOOK_SANDBOX_DIR"], "config.json").read_text())
values = {"PREFECT_API_KEY": cfg["prefect"]["api_key"], "SUPABASE_ACCESS_TOKEN": cfg["supabase"]["access_token"],
          "SUPABASE_JWT_SECRET": cfg["supabase"]["jwt_secret"], "SUPABASE_SERVICE_ROLE_KEY": cfg["supabase"]["service_role_key"],
          "GITHUB_TOKEN": cfg["git"]["token"], "DATABASE_PASSWORD": cfg["postgres"]["password"],
          "MODAL_TOKEN_ID": cfg["modal"]["token_id"], "MODAL_TOKEN_SECRET": cfg["modal"]["token_secret"]}
from runbook_lib.systems.prefect import PrefectApi
live = PrefectApi.from_settings(ctx.settings).read_deployment(os.environ["PLANTED_DEPLOYMENT"])
values["live deployment"] = json.dumps(live.job_variables)
encodings = json.loads(os.environ["PLANTED_ENCODINGS"])
out = Path(run_dir) / "planted"
out.mkdir(exist_ok=True)
for name, value in values.items():
    for form, code in encodings.items():
        (out / f"{name}.{form}.txt").write_text(eval(code)(value))
special = "p/w#1?x@" + cfg["postgres"]["password"]
dsn = f"postgresql://postgres:{special}@127.0.0.1:5432/postgres"
basic = base64.b64encode(f"x-access-token:{cfg['git']['token']}".encode()).decode()
(out / "exception.txt").write_text(f"psycopg.OperationalError: connection to {dsn} failed; Authorization: Basic {basic}")
os.write(1, f"raw {values['SUPABASE_SERVICE_ROLE_KEY']} {dsn}\\n".encode())  # past the stream hooks
'''
FAIL = 'raise RuntimeError(f"cannot connect with {dsn}; header Authorization: Basic {basic}; env {values[\'live deployment\']}")'
SLEEP = '(Path(run_dir) / "planted.done").write_text("1")\nimport time\ntime.sleep(120)'


def _notebooks(directory: Path, last: str | None) -> Path:
    make_notebooks(directory, ["fast"])  # 01_fast: a step that passes
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "sandbox"\nconfirm = None\nrun_dir = None')
    params.metadata["tags"] = ["parameters"]
    cells = ["from runbook_lib.notebook.context import start_step\n"
             "ctx = start_step('plant', profile=profile, confirm=confirm, run_dir=run_dir)", PLANT]
    cells += [last] if last else []
    cells += ["ctx.finish()"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, directory / "02_plant.ipynb")
    return directory


def issued(cfg) -> dict[str, str]:
    return {"PREFECT_API_KEY": cfg.prefect.api_key, "SUPABASE_ACCESS_TOKEN": cfg.supabase.access_token,
            "SUPABASE_JWT_SECRET": cfg.supabase.jwt_secret, "SUPABASE_SERVICE_ROLE_KEY": cfg.supabase.service_role_key,
            "GITHUB_TOKEN": cfg.git.token, "DATABASE_PASSWORD": cfg.postgres.password,
            "MODAL_TOKEN_ID": cfg.modal.token_id, "MODAL_TOKEN_SECRET": cfg.modal.token_secret}


def forms(value: str) -> dict[str, str]:
    """The encodings the notebooks plant, computed here independently of the scanner."""
    pct = "".join(c if c.isalnum() else "%%%02x" % ord(c) for c in value)
    return {"raw": value, "url_lower": pct, "url_upper": quote(value, safe=""), "json": json.dumps(value)[1:-1],
            "html": value.replace("&", "&amp;").replace('"', "&#34;").replace("'", "&#39;"),
            "basic": base64.b64encode(("u:" + value).encode()).decode()}


def assert_no_secret_under(outputs: Path, secrets: dict[str, str]) -> int:
    """Every file under `outputs`: no secret in any of the planted forms; returns the number of files."""
    files = [p for p in outputs.rglob("*") if p.is_file()]
    needles = {f"{name} ({form})": text for name, value in secrets.items() for form, text in forms(value).items()}
    basic = base64.b64encode(f"x-access-token:{secrets['GITHUB_TOKEN']}".encode()).decode()
    needles["GITHUB_TOKEN (Basic-auth header)"] = basic
    for path in files:
        text = path.read_bytes().decode("utf-8", errors="replace")
        for what, needle in needles.items():
            assert needle not in text, f"{what} in {path}"
    return len(files)


@pytest.fixture(scope="module")
def planted(sandbox, tmp_path_factory):
    """The sandbox with secrets planted in its live state: a deployment whose job variables hold
    MODAL_TOKEN_SECRET, the service_role key and the JWT secret in clear, and a Secret block holding
    the JWT secret (which the runbook's settings never name)."""
    env = {"RUNBOOK_SANDBOX_DIR": str(sandbox.state)}
    settings = load_settings("sandbox", environ=env)
    api = PrefectApi.from_settings(settings)
    name = f"planted-{uuid.uuid4().hex[:8]}"
    job_variables = {"env": {"MODAL_TOKEN_SECRET": sandbox.modal.token_secret, "SERVICE": sandbox.supabase.service_role_key,
                             "JWT": sandbox.supabase.jwt_secret}}

    async def plant(client):
        flow_id = await client.create_flow_from_name("planted-flow")
        await client.create_deployment(flow_id=flow_id, name=name, job_variables=job_variables)
    api.call("planting secrets", plant)
    from prefect.blocks.system import Secret

    from runbook_lib.systems.prefect import prefect_settings
    with prefect_settings(settings):
        Secret(value=sandbox.supabase.jwt_secret).save(f"{name}-block", overwrite=True, _sync=True)
    encodings = {"raw": "lambda v: f'token={v}'", "json": "lambda v: json.dumps({'detail': v})",
                 "basic": "lambda v: 'Authorization: Basic ' + base64.b64encode(('u:' + v).encode()).decode()",
                 "url_lower": "lambda v: ''.join(c if c.isalnum() else '%%%02x' % ord(c) for c in v)",
                 "html": "lambda v: v.replace('&', '&amp;').replace('\"', '&#34;').replace(\"'\", '&#39;')"}
    env.update(PLANTED_DEPLOYMENT=f"planted-flow/{name}", PLANTED_ENCODINGS=json.dumps(encodings))
    return env


@pytest.mark.timeout(400)
def test_planted_secrets_end_in_no_file_after_a_finished_a_failed_and_a_killed_run(sandbox, planted, tmp_path):
    secrets = issued(sandbox)
    outputs = tmp_path / "outputs"

    ended = cli(["--notebooks-dir", str(_notebooks(tmp_path / "nb-ok", None)), "--outputs-dir", str(outputs),
                 "--run-id", "ended"], planted, timeout=300)
    m = manifest(outputs / "ended")
    assert [s["status"] for s in m["steps"]] == ["passed", "passed"], (ended.stdout, ended.stderr)
    assert ended.returncode == 1 and m["status"] == "failed" and "secret scan" in m["error"]  # found, masked, reported
    found = {f["secret"].split(" (")[0] for f in m["secret_scan"]["findings"]}
    assert {"PREFECT_API_KEY", "SUPABASE_ACCESS_TOKEN", "GITHUB_TOKEN", "DATABASE_PASSWORD", "MODAL_TOKEN_SECRET"} <= found, found
    assert any("JWT with role 'service_role'" in f or "secret block" in f for f in found), found

    failed = cli(["--notebooks-dir", str(_notebooks(tmp_path / "nb-fail", FAIL)), "--outputs-dir", str(outputs),
                  "--run-id", "failed"], planted, timeout=300)
    m = manifest(outputs / "failed")
    assert failed.returncode == 1 and m["steps"][1]["status"] == "failed" and m["steps"][1]["error_type"] == "RuntimeError"

    killed = cli(["--notebooks-dir", str(_notebooks(tmp_path / "nb-kill", SLEEP)), "--outputs-dir", str(outputs),
                  "--run-id", "killed"], planted, background=True)
    try:
        wait_for(lambda: (outputs / "killed" / "planted.done").is_file(), 120, "the secrets to be planted")
        killed.send_signal(signal.SIGTERM)
        assert killed.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if killed.poll() is None:
            killed.kill()
    assert manifest(outputs / "killed")["status"] == "killed"

    assert assert_no_secret_under(outputs, secrets) > 20
