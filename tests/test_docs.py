"""Every ```python block of README.md and docs/*.md runs as its own script, after ``tests/docs_prelude.py``
(``MyModel`` and friends), in a fresh directory: with ``python`` (Lightning's launcher starts the other
process of ``devices=2``), or under ``torchrun --nproc_per_node=2`` when it initialises the process group
itself. A snippet that stops working fails here, so none can rot."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def snippets() -> list[tuple[str, str]]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def test_the_docs_have_snippets_and_pages() -> None:
    names = {page.name for page in PAGES}
    assert {"stages.md", "trainer.md", "fabric.md", "precision.md", "checkpoints.md", "offload.md",
            "multi-node.md", "faults.md", "benchmarks.md"} <= names
    assert len(snippets()) >= 7
    assert len((ROOT / "README.md").read_text()) < 8000  # a front door, not the manual


@pytest.mark.parametrize(("where", "code"), snippets(), ids=[where for where, _ in snippets()])
def test_snippet_runs(tmp_path, where: str, code: str) -> None:
    script = tmp_path / "snippet.py"
    script.write_text((ROOT / "tests" / "docs_prelude.py").read_text() + "\n# ---- " + where + "\n" + code)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    if "init_process_group" in code:
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        command = [torchrun, "--standalone", "--nproc_per_node=2", str(script)]
    else:
        command = [sys.executable, str(script)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "Traceback" not in output, f"{where}:\n{output[-4000:]}"
