"""The reliability report: every chaos test records its figures here; the session writes them as markdown + JSON."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

COLUMNS = (
    ("faults", "faults injected"),
    ("requests_acked", "requests acknowledged (200)"),
    ("events_acked", "events acknowledged"),
    ("events_lost", "events lost"),
    ("duplicates", "duplicates"),
    ("seq_gaps", "seq gaps"),
    ("server_errors", "5xx"),
    ("rss_growth_pct", "RSS growth after warm-up"),
)


@dataclass
class Row:
    test: str
    scenario: str
    figures: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    mode: str
    command: str
    rows: list[Row] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    commit: str = field(default_factory=lambda: _commit())

    def record(self, test: str, scenario: str, details: dict[str, Any] | None = None, **figures: Any) -> None:
        self.rows.append(Row(test, scenario, figures, details or {}))

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        stem = directory / f"reliability-{self.mode}"
        meta = _meta(self)
        payload = {**meta, "rows": [asdict(row) for row in self.rows]}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        stem.with_suffix(".md").write_text(render(meta, self.rows))
        return stem.with_suffix(".md")


def _commit() -> str:
    """The commit the suite started at (with ``+changes`` when the tree was dirty)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=False, timeout=10,
        ).stdout.strip()  # fmt: skip
    except OSError:
        return "unknown"
    return f"{head}+changes" if head and dirty else head or "unknown"


def _meta(report: Report) -> dict[str, Any]:
    return {
        "mode": report.mode,
        "command": report.command,
        "commit": report.commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(report.started)),
        "duration_seconds": round(time.time() - report.started),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    }


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:+.1f} %" if value == value else "–"
    return str(value)


def render(meta: dict[str, Any], rows: list[Row]) -> str:
    lines = [
        f"# Reliability report ({meta['mode']} mode)",
        "",
        f"Written by the chaos suite (`tests/chaos`) on {meta['date_utc']} UTC at commit `{meta['commit']}`, "
        f"{meta['machine']}; the session took {meta['duration_seconds']} s. Every figure below was measured "
        "in that run. To reproduce:",
        "",
        "```sh",
        meta["command"],
        "```",
        "",
        "| test | scenario | " + " | ".join(title for _, title in COLUMNS) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " |",
    ]
    for row in rows:
        cells = [_cell(row.figures.get(key)) for key, _ in COLUMNS]
        lines.append(f"| `{row.test}` | {row.scenario} | " + " | ".join(cells) + " |")
    lines += ["", "## Details", ""]
    for row in rows:
        lines.append(f"### `{row.test}`")
        lines.append("")
        for key, value in sorted(row.details.items()):
            lines.append(f"- {key}: {value}")
        lines.append("")
    lines += [
        "A dash means the figure does not apply to that test. *Events lost* counts acknowledged events missing "
        "from Kafka (RAW) after the fault, or transitions of the uninterrupted run missing from TRANSITIONS; "
        "*duplicates* counts extra copies (allowed: the stream drops them, S1, S10); *seq gaps* counts missing "
        "(epoch, seq) numbers on TRANSITIONS.",
        "",
    ]
    return "\n".join(lines)
