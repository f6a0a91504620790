"""What every benchmark script does with its report at the end: stamp the machine, versions, date and duration,
write ``NAME.json``, render ``NAME.md`` (and whatever else ``render`` draws) and print the table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmerase.record import machine, versions, write_json


def stamp(report: dict[str, Any], t0: float) -> dict[str, Any]:
    """``report`` with the machine, the versions, the date and the seconds since ``t0`` (``time.perf_counter``)."""
    report.update(machine=machine(), versions=versions(), date=time.strftime("%Y-%m-%d %H:%M %Z"),
                  seconds=time.perf_counter() - t0)
    return report


def finish(report: dict[str, Any], out: Path, name: str, render: Callable[[dict[str, Any], Path], None]) -> int:
    """Write ``out/name.json``, render it into ``out`` and print ``out/name.md``; 0 (the scripts' exit code)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{name}.json", report)
    render(report, out)
    print((out / f"{name}.md").read_text())
    return 0
