"""The README's Python API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the README's `## {section}` heading."""
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", body, re.S)
    assert match, f"README section {section!r} has no python block"
    return match.group(1)


def test_the_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(python_block("Python API"), "README.md", "exec"), {})
    printed = capsys.readouterr().out.split()  # frames, seconds, "s", MiB, "MiB"
    assert printed[0] == "4" and float(printed[1]) > 0 and int(printed[3]) > 0
    from zoo.components.video_io import probe_video

    info = probe_video(tmp_path / "x4.mp4")
    assert (info.width, info.height, info.num_frames, info.fps) == (128, 96, 4, 8)
