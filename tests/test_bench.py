"""The benchmark harness runs end to end on a tiny workload and writes a result for every workload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.env import missing_tools
from bench.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    bool(missing_tools()), reason=f"the benchmark needs nginx and wrk; missing: {', '.join(missing_tools())}"
)
def test_quick_bench_writes_every_workload(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (result,) = tmp_path.glob("*-quick.json")
    doc = json.loads(result.read_text())
    assert sorted(doc["workloads"]) == sorted(str(w) for w in WORKLOADS)
    assert {row["workload"] for row in doc["rows"]} == set(WORKLOADS)
    for number, workload in doc["workloads"].items():
        assert workload["rows"], f"workload {number} has no rows"
        assert all(runs for runs in workload["runs"].values()), f"workload {number} has a config without runs"
    assert doc["machine"]["cpu_model"] and doc["versions"]["nginx"] and doc["versions"]["wrk"]
    assert doc["workloads"]["5"]["params"]["all_200"], "the large body was not answered 200 by every configuration"
    _several_engines_and_workers(doc["workloads"])


def _several_engines_and_workers(workloads: dict[str, dict[str, object]]) -> None:
    """Workloads 8-10 (issues 13 and 15) produced their rows from real runs: every request of the kill run is
    counted in exactly one outcome, each routing and worker configuration ran, and both workers served."""
    (kill,) = workloads["8"]["runs"]["gateway"]  # type: ignore[index]
    assert kill["requests"] > 0 and kill["in_flight_at_kill"] > 0
    failed = kill["failed_before_first_byte"] + kill["cut_mid_stream"]
    assert kill["completed"] + failed == kill["requests"]
    assert kill["failed_not_forwarded_at_kill"] <= kill["not_forwarded_at_kill"] <= kill["requests"]
    assert [row["metric"].split(":")[0] for row in workloads["8"]["rows"]][:3] == ["engine killed"] * 3  # type: ignore[index]
    assert set(workloads["9"]["runs"]) == {"direct", "one", "gateway", "session", "prefix", "routing_step"}  # type: ignore[arg-type]
    runs = workloads["10"]["runs"]
    assert all(run[0]["requests"] > 0 for run in runs.values())  # type: ignore[attr-defined]
    assert {key.split(":")[1] for key in runs} == {"direct", "sim", "w1", "w2"}  # type: ignore[attr-defined]
    served = workloads["10"]["params"]["w2_admitted_per_worker"]  # type: ignore[index]
    assert len(served) == 2


def test_missing_tools_are_reported_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench import env, run

    monkeypatch.setattr(env, "find_tool", lambda name: None)
    installed: list[list[str]] = []
    monkeypatch.setattr(env, "install", lambda names: installed.append(names) or 1)
    assert run.main(["--quick"]) == 3
    err = capsys.readouterr().err
    assert "apt-get install -y --no-install-recommends nginx wrk" in err
    assert installed == []


@pytest.mark.skipif(bool(missing_tools()), reason="the benchmark needs nginx and wrk")
def test_missing_litellm_is_reported_not_installed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from bench import env, run

    installed: list[bool] = []
    monkeypatch.setattr(env, "install_litellm", lambda: installed.append(True) or 1)
    assert run.main(["--quick", "--litellm", str(tmp_path / "litellm")]) == 3
    err = capsys.readouterr().err
    assert "The LiteLLM row needs LiteLLM's proxy" in err
    assert "install -q 'litellm[proxy]'" in err
    assert installed == []
