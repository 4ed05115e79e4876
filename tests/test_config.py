"""Misconfiguration as an operator meets it, with ``glm-gateway serve`` run as a process: a bad value stops the
start in one line naming the flag or the variable and the value (exit 2); what starts says at once how each
engine stands, and every change of it; credentials in an upstream URL are never shown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.harness import CHAT, HELLO, MODEL, free_port, wait_http, wait_until


def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``serve`` with a bad setting: exit 2, one line on stderr, no traceback; that line."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert out.returncode == 2, out
    assert "Traceback" not in out.stderr and out.stdout == ""
    (line,) = out.stderr.splitlines()
    return line


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        ([], {"GATEWAY_GLM_STOP_TOKENS": "maybe"}, ["GATEWAY_GLM_STOP_TOKENS", "'maybe'", "true or false"]),
        ([], {"GATEWAY_LOG_LEVEL": "verbose"}, ["GATEWAY_LOG_LEVEL", "'verbose'", "debug, info, warning, error"]),
        ([], {"GATEWAY_MAX_CONCURRENCY": "-1"}, ["GATEWAY_MAX_CONCURRENCY must be at least 1", "'-1'"]),
        (["--max-concurrency", "0"], {}, ["--max-concurrency must be at least 1", "'0'"]),
        ([], {"GATEWAY_MAX_QUEUE": "lots"}, ["GATEWAY_MAX_QUEUE='lots' is not a valid int"]),
        (["--upstream", "http://"], {}, ["--upstream must be", "'http://' has no host"]),
        ([], {"GATEWAY_UPSTREAM": "http://a:1,vllm:8000"}, ["GATEWAY_UPSTREAM must be", "'vllm:8000' is not an http"]),
        (["--upstream", "http://a:1?key=s3cret"], {}, ["has a ?query", "'http://a:1'"]),
        (["--upstream", "http://a:1/v 1"], {}, ["--upstream must be", "'http://a:1/v 1' has whitespace"]),
        (["--upstream", "a=http://x:1", "--upstream", "a=http://y:1"], {}, ["a is given twice"]),
        (["--log-level", "verbose"], {}, ["--log-level", "'verbose'"]),
        (["--workers", "0"], {}, ["--workers must be auto or at least 1", "'0'"]),
        ([], {"GATEWAY_WORKERS": "²"}, ["GATEWAY_WORKERS must be auto or at least 1", "'²'"]),  # a digit, not a number
        (["--upstream", "http://u:s3cret@a:1", "--upstream-api-key", "k"], {}, ["user:password@", "one or the other"]),
    ],
)
def test_a_bad_value_stops_the_start_in_one_line(args: list[str], env: dict[str, str], names: list[str]) -> None:
    line = refused(*args, env=env)
    for name in names:
        assert name in line, line
    assert "s3cret" not in line
    if env:  # named by the variable it came from, not by a flag the operator never typed
        assert "--" not in line.partition(" error: ")[2], line


class Gateway:
    """``glm-gateway serve`` as a process, its stdout and stderr apart; stopped by the fixture."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--health-interval", "0.2", "--health-fail-threshold", "1", "--access-log", "off", *args],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr or ()), daemon=True).start()
        wait_http(self.url + "/health/live")

    def read_log(self) -> str:
        return "".join(list(self.lines))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Sim:
    def __init__(self, port: int | None = None, *args: str) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "sim", "--port", str(self.port), "--ttft", "0", "--itl", "0", *args],
            stdout=subprocess.DEVNULL,
        )
        wait_http(self.url + "/health")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for p in reversed(started):
        p.stop()


def get(url: str, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_comma_separated_upstreams_on_the_command_line(procs: list[Any]) -> None:
    a, b = Sim(), Sim()
    procs.extend([a, b])
    gw = Gateway("--upstream", f"{a.url}, {b.url}")
    procs.append(gw)
    wait_http(gw.url + "/health/ready")
    status, _, body = get(gw.url + "/status")
    assert status == 200
    assert [u["name"] for u in json.loads(body)["upstreams"]] == [a.url, b.url]
    assert get(gw.url + CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})[0] == 200


def test_a_v1_base_url_is_accepted_with_a_warning(procs: list[Any]) -> None:
    sim = Sim()
    procs.append(sim)
    gw = Gateway("--upstream", sim.url + "/v1/")
    procs.append(gw)
    wait_http(gw.url + "/health/ready")
    status, _, body = get(gw.url + CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert status == 200 and json.loads(body)["model"] == MODEL
    assert "the /v1 at the end of its URL was removed" in gw.read_log()


def test_engine_state_is_logged_at_start_and_on_every_change(procs: list[Any]) -> None:
    port = free_port()
    gw = Gateway("--upstream", f"http://127.0.0.1:{port}", "--health-success-threshold", "1")
    procs.append(gw)
    wait_until(lambda: "is not ready: cannot connect" in gw.read_log(), "the first failed check logged")
    assert f"upstream http://127.0.0.1:{port} at http://127.0.0.1:{port}: checking it" in gw.read_log()
    sim = Sim(port)
    wait_until(lambda: "is up, serving glm-4-9b-chat-1m (max_model_len 1048576)" in gw.read_log(), "up logged")
    sim.stop()
    wait_until(lambda: "is down after 1 failed checks: cannot connect" in gw.read_log(), "down logged")


def test_a_variable_that_sets_no_option_is_named_at_start(procs: list[Any]) -> None:
    env = {"GATEWAY_UPSTREAMS": "http://a:1", "GATEWAY_SIM_ITL": "0.1"}  # a typo; the sim's own is not ours
    gw = Gateway("--upstream", f"http://127.0.0.1:{free_port()}", env=env)
    procs.append(gw)
    wait_until(lambda: "GATEWAY_UPSTREAMS is set but is no option" in gw.read_log(), "the warning")
    assert "GATEWAY_SIM_ITL" not in gw.read_log()


def test_log_choices_in_any_case(procs: list[Any]) -> None:
    gw = Gateway(
        "--upstream", f"http://127.0.0.1:{free_port()}", "--log-level", "DEBUG", env={"GATEWAY_LOG_FORMAT": "JSON"}
    )
    procs.append(gw)
    entries = wait_until(lambda: [json.loads(line) for line in gw.read_log().splitlines()], "log lines")
    assert {e["level"] for e in entries} >= {"info"} and all("message" in e for e in entries)
    settings = json.loads(get(gw.url + "/status")[2])["settings"]
    assert (settings["log_level"], settings["log_format"]) == ("debug", "json")


def test_credentials_in_an_upstream_url_are_never_shown(procs: list[Any]) -> None:
    sim, dead = Sim(), free_port()
    procs.append(sim)
    secret = "s3cret-pw"
    gw = Gateway(
        "--upstream", f"engine-a=http://user:{secret}@127.0.0.1:{sim.port}",
        "--upstream", f"http://user:{secret}@127.0.0.1:{dead}",
    )  # fmt: skip
    procs.append(gw)
    wait_http(gw.url + "/health/ready")
    pages = [get(gw.url + path)[2] for path in ("/status", "/health", "/metrics", "/health/ready")]
    assert get(gw.url + CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})[0] == 200
    status = json.loads(pages[0])
    assert [(u["name"], u["url"]) for u in status["upstreams"]] == [
        ("engine-a", f"http://127.0.0.1:{sim.port}"), (f"http://127.0.0.1:{dead}", f"http://127.0.0.1:{dead}"),
    ]  # fmt: skip
    assert status["settings"]["upstream"] == [f"engine-a=http://127.0.0.1:{sim.port}", f"http://127.0.0.1:{dead}"]
    assert b'gateway_upstream_up{upstream="engine-a"} 1.0' in pages[2]
    assert b'vllm:num_requests_running{upstream="engine-a"' in pages[2]
    sim.stop()  # now both are down: the readiness reasons and the 502 name them
    wait_until(lambda: get(gw.url + "/health/ready")[0] == 503, "not ready")
    pages.append(get(gw.url + "/health/ready")[2])
    status, _, body = get(gw.url + CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert status == 502 and b"engine-a" in body
    pages.append(body)
    time.sleep(0.5)  # let the last log lines out
    for page in [*pages, gw.read_log().encode()]:
        assert secret.encode() not in page and b"user:" not in page


def test_pages_people_read(procs: list[Any]) -> None:
    sim = Sim()
    procs.append(sim)
    gw = Gateway("--upstream", sim.url)
    procs.append(gw)
    wait_http(gw.url + "/health/ready")
    status, headers, body = get(gw.url + "/status")
    assert body.startswith(b'{\n  "version"') and body.endswith(b"}\n")
    for path in ("/health", "/health/ready", "/health/live", "/nowhere", "/v1/models"):
        status, headers, body = get(gw.url + path)
        assert body.endswith(b"\n"), path
        assert headers["Server"] == "glm-gateway", (path, headers)
    status, headers, body = get(gw.url + CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 2})
    assert status == 200 and headers["Server"] == "glm-gateway"  # the engine's answer too
    status, headers, body = get(gw.url + CHAT, {"model": MODEL, "messages": "Hello"})
    assert status == 400 and body.endswith(b"\n") and headers["Server"] == "glm-gateway"


def test_health_counts_only_what_the_service_failed(procs: list[Any]) -> None:
    sim = Sim()
    procs.append(sim)
    gw = Gateway("--upstream", sim.url, "--max-body-bytes", "100")
    procs.append(gw)
    wait_http(gw.url + "/health/ready")
    assert get(gw.url + CHAT, {"model": MODEL, "messages": "Hello"})[0] == 400
    assert get(gw.url + CHAT, {"model": "gpt-4", "messages": HELLO})[0] == 404
    assert get(gw.url + CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200}]})[0] == 413
    assert get(gw.url + "/nowhere")[0] == 404
    health = json.loads(get(gw.url + "/health")[2])
    assert health["requests"] == {"total": 4, "failed": 0, "success_rate": 1.0}  # the client's mistakes
    faults = urllib.request.Request(sim.url + "/admin/faults", data=b'{"error_rate": 1, "error_status": 500}')
    urllib.request.urlopen(faults, timeout=10).close()
    assert get(gw.url + CHAT, {"model": MODEL, "messages": HELLO})[0] == 500  # the engine's failure
    health = json.loads(get(gw.url + "/health")[2])
    assert health["requests"] == {"total": 5, "failed": 1, "success_rate": 0.8}  # the pages are not counted
