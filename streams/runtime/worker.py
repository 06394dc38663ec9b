"""Running a Faust app in the foreground with the product's logging."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import uvloop

from core.logs import configure_logging
from streams.config import WorkerSettings


def use_uvloop() -> None:
    """Make the event loops created from now on uvloop's (what ``mode.loop.use("uvloop")`` does).

    Called before anything creates a loop: Faust's services take the loop current when they first need one.
    """
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run_worker(app: faust.App, settings: WorkerSettings) -> None:
    """Run ``app`` until SIGTERM/SIGINT."""
    _Worker(
        app,
        loglevel=settings.log_level.lower().replace("warning", "warn"),
        quiet=True,
        redirect_stdouts=False,
        settings=settings,
    ).execute_from_commandline()


class _Worker(faust.Worker):
    """Faust's worker with the product's log format (JSON lines by default, like the gateway)."""

    def __init__(self, *args: Any, settings: WorkerSettings, **kwargs: Any) -> None:
        self._presence_settings = settings
        super().__init__(*args, **kwargs)

    def on_setup_root_logger(self, logger: Any, level: int) -> None:
        self.spinner = None  # the terminal spinner would interleave with JSON lines
        configure_logging(self._presence_settings.log_level, self._presence_settings.log_format)
