"""Fault-injection tools, registered only with `[tools] enable_debug_tools = true` (default false).

They exist so the tests can drive the daemon into states real traffic reaches only by accident, through the real
MQTT path: `debug_sleep` blocks the worker that runs it, the way an inference stuck in llama.cpp would (a normal
tool runs on the tool pool under a timeout, so it can never hold a worker past its deadline). Never enable them on
a production device: anyone who may send commands could tie up the workers.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edged.tools.registry import Tool


class SleepArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: float = Field(ge=0, le=600, description="How long to block the worker")


def debug_sleep(args: SleepArgs) -> dict[str, Any]:
    time.sleep(args.seconds)
    return {"slept_s": args.seconds}


def debug_tools() -> list[Tool]:
    return [
        Tool("debug_sleep", "Debug only: block the worker for some seconds, like a stuck inference", SleepArgs,
             debug_sleep, timeout_s=600.0, inline=True),
    ]
