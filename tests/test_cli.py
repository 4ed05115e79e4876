"""The command line: flags and GATEWAY_* variables, --help and --version, and the README's option tables."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__
from gateway.settings import Settings, SimSettings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def _default(f: dataclasses.Field) -> object:
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    return ",".join(value) if isinstance(value, list) else value


@pytest.mark.parametrize("cls", [Settings, SimSettings])
def test_readme_lists_every_option_with_its_default(cls: type) -> None:
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        row = f"| `{flag}`"
        lines = [line for line in README.splitlines() if line.startswith(row) and cls.env_name(f.name) in line]
        assert lines, f"README has no row for {flag} ({cls.env_name(f.name)})"
        default = _default(f)
        expected = "(none)" if default == "" else f"`{default}`"  # an empty string reads as "(none)"
        assert expected in lines[0], f"README's default for {flag} is not {default}"


def test_flags_and_environment() -> None:
    env = {"GATEWAY_MAX_QUEUE": "7", "GATEWAY_UPSTREAM": "http://a:1, http://b:2", "GATEWAY_GLM_STOP_TOKENS": "off"}
    s = Settings.from_args([], env)
    assert (s.max_queue, s.upstream, s.glm_stop_tokens) == (7, ["http://a:1", "http://b:2"], False)
    s = Settings.from_args(["--max-queue", "9", "--upstream", "http://c:3", "--glm-stop-tokens"], env)
    assert (s.max_queue, s.upstream, s.glm_stop_tokens) == (9, ["http://c:3"], True)
    assert Settings.from_args([], {}).upstream == ["http://127.0.0.1:8000"]
    assert SimSettings.from_args([], {"GATEWAY_SIM_ITL": "0.5"}).itl == 0.5


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


def test_version_and_help_show_every_default() -> None:
    assert _run("--version").stdout.strip() == f"glm-gateway {__version__}"
    for command, cls in (("serve", Settings), ("sim", SimSettings)):
        out = _run(command, "--help")
        assert out.returncode == 0
        text = " ".join(out.stdout.split())
        for f in dataclasses.fields(cls):
            assert f"--{f.name.replace('_', '-')}" in text
        assert text.count("default:") >= len(dataclasses.fields(cls))
    assert _run("demo", "--help").returncode == 0


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-concurrency", "0"], {}, "--max-concurrency must be at least 1"),
        (["--upstream", "vllm:8000"], {}, "--upstream must be one or more http:// or https:// URLs"),
        ([], {"GATEWAY_MAX_QUEUE": "lots"}, "GATEWAY_MAX_QUEUE='lots' is not a valid int"),
    ],
)
def test_bad_settings_stop_the_start_with_the_option_named(args: list[str], env: dict[str, str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
