"""The multi-agent example (issue 15, part 4): a supervisor delegating to specialists, then a child workflow.

* in-process: each sample ends as documented (succeeded with a brief; needs_human when a claim cannot be verified;
  escalated through the child when the brief cannot be written, linking the child's entry), and answering the
  needs_human entry with the output the demo prints carries the run through its child to the end;
* ``teamster demo --example research``: real worker, embedded Redis, the first run followed live, the summary, and
  the printed resolve command runs as pasted.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from teamster.config.embedded import stop_embedded
from teamster.config.settings import load_settings
from teamster.examples import EXAMPLES
from teamster.examples.research import SAMPLE_TOPICS
from teamster.testing import WorkflowEnvironment

pytestmark = pytest.mark.integration


def test_the_research_example_takes_every_documented_path() -> None:
    with WorkflowEnvironment(["teamster.examples.research"]) as env:
        runs = {t["topic"]: env.run("research_brief", t) for t in SAMPLE_TOPICS}
        ok = runs["solid-state batteries for delivery vans"]
        rumour = runs["a rumour that our supplier is being acquired"]
        embargo = runs["embargoed quarterly earnings"]
        delegated = [e.step for e in env.client.journal(ok.run_id, types=["delegation_result"])]
        child_entry = env.client.dlq.get(embargo.error["dlq_entry"])

        assert ok.status.value == "succeeded"
        assert ok.output["title"] == "Brief: solid-state batteries for delivery vans" and ok.output["approved"]
        assert delegated == ["research/web_researcher#1", "research/fact_checker#1"]
        assert rumour.status.value == "needs_human" and rumour.error["step"] == "research"
        assert "could not verify" in rumour.error["message"]
        assert embargo.status.value == "escalated" and embargo.error["error_type"] == "child_run_failed"
        assert child_entry.details["child_status"] == "escalated"
        assert str(child_entry.details["child_entry"]).endswith(":write:1")

        # the answer the demo prints for the needs_human entry carries the run on, through its child
        approve = EXAMPLES["research"].approve
        assert approve is not None
        env.client.dlq.resolve(rumour.error["dlq_entry"], json.loads(approve), by="tester")
        env.drain()
        final = env.client.status(rumour.run_id)
    assert final.status.value == "succeeded" and final.output["body"].endswith("published as unconfirmed.")


def _embedded_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TEAMSTER_REDIS_URL", "TEAMSTER_MODEL")}
    env.update(TEAMSTER_EMBEDDED_DIR=str(tmp_path / "embedded"), COLUMNS="200", PYTHONUNBUFFERED="1")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "teamster.orchestrator.cli", *args]


def test_demo_example_research_follows_a_run_live_and_its_commands_run_as_pasted(tmp_path: Path) -> None:
    env = _embedded_env(tmp_path)
    try:
        demo = subprocess.run(_cli("demo", "--example", "research"), env=env, capture_output=True, text=True,
                              timeout=180)
        out = demo.stdout
        assert demo.returncode == 0, out + demo.stderr
        assert "submitting 4 topics to research_brief" in out
        live = out[out.index("live (what `Client.events(run_id)` yields"):out.index("done in")]
        for event in ("delegation_start", "delegation_result", "child_started", "child_settled", "run_succeeded"):
            assert event in live, event
        assert live.index("research/web_researcher#1") < live.index("research/fact_checker#1") \
            < live.index("child_started")
        assert "summary: 2 succeeded (0 after a retry), 1 escalated, 1 needs human, 0 failed" in out
        assert re.search(r"embargoed quarterly earnings escalated at step draft: child_run_failed", out)
        resolve = re.search(r"^\s*(teamster dlq resolve .*--wait)$", out, re.M)
        assert resolve, out
        pasted = subprocess.run(_cli(*shlex.split(resolve.group(1))[1:]), env=env, capture_output=True, text=True,
                                timeout=180)
        assert pasted.returncode == 0, pasted.stdout + pasted.stderr
        assert "succeeded" in pasted.stdout and "published as unconfirmed" in pasted.stdout

        unknown = subprocess.run(_cli("demo", "--example", "nope"), env=env, capture_output=True, text=True,
                                 timeout=60)
        assert unknown.returncode == 1 and "unknown example 'nope'" in unknown.stderr
        assert "triage, research" in unknown.stderr
    finally:
        stop_embedded(load_settings(redis_url=None, embedded_dir=tmp_path / "embedded"))
