"""The README's printed examples, run as a user runs them: from the repository's folder, in a shell, against a
running ``glm-gateway demo`` (on free ports here: the README's 8080 and 8000 are swapped for them)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import free_port, wait_http, wait_until

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- run against the demo -->"
BLOCKS = re.findall(re.escape(MARK) + r"\n```sh\n(.*?)```", (ROOT / "README.md").read_text(encoding="utf-8"), re.S)
VENV_BIN = str(Path(sys.executable).parent) + "/"  # the README's .venv/bin/, wherever this suite's venv is


class Demo:
    def __init__(self) -> None:
        self.port, self.sim_port = free_port(), free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(self.port), "--sim-port", str(self.sim_port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout or ()), daemon=True).start()

    def as_here(self, block: str) -> str:
        """The block with the demo's ports and this suite's venv in place of the README's."""
        block = block.replace("127.0.0.1:8080", f"127.0.0.1:{self.port}")
        block = block.replace("127.0.0.1:8000", f"127.0.0.1:{self.sim_port}")
        return block.replace(".venv/bin/", VENV_BIN)


@pytest.fixture(scope="module")
def demo() -> Iterator[Demo]:
    d = Demo()
    try:
        wait_http(f"http://127.0.0.1:{d.port}/health/ready")
        yield d
    finally:
        d.proc.terminate()
        d.proc.wait(30)


def test_the_readme_marks_its_examples() -> None:
    assert len(BLOCKS) >= 3, BLOCKS
    assert any("openai" in b for b in BLOCKS) and any("/admin/faults" in b for b in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.split()[0] + str(i) for i, b in enumerate(BLOCKS)])
def test_each_example_works_as_printed(demo: Demo, block: str) -> None:
    out = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", demo.as_here(block)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, (block, out.stdout, out.stderr)
    assert out.stdout.strip(), block
    assert "error" not in out.stdout.lower() or "/admin/faults" in block, out.stdout


def test_the_banner_names_the_engine_and_the_install_line(demo: Demo) -> None:
    banner = wait_until(lambda: "".join(demo.lines) if "Ctrl-C stops both" in "".join(demo.lines) else "", "banner")
    assert f"engine on http://127.0.0.1:{demo.sim_port}" in banner
    assert f"curl -s http://127.0.0.1:{demo.sim_port}/admin/faults" in banner
    assert f"{sys.executable} -m pip install -q openai" in banner
    assert f"{sys.executable} -c" in banner and " python -c" not in banner
