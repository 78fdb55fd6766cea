"""Shared pieces of `edged bench`: statistics, the seed's requests and a synthetic tool catalogue."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.router import ToolSpec

Command = dict[str, Any]


def percentiles(samples_ms: list[float]) -> dict[str, float | int | None]:
    """p50/p95/mean/min/max of a list of milliseconds (linear interpolation); None values when empty."""
    if not samples_ms:
        return {"n": 0, "p50": None, "p95": None, "mean": None, "min": None, "max": None}
    arr = np.asarray(samples_ms, dtype=float)
    return {"n": len(samples_ms), "p50": round(float(np.percentile(arr, 50)), 3),
            "p95": round(float(np.percentile(arr, 95)), 3), "mean": round(float(arr.mean()), 3),
            "min": round(float(arr.min()), 3), "max": round(float(arr.max()), 3)}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None










def time_bounded(runs: int, budget_s: float, fn: Callable[[int], None]) -> int:
    """Call fn(i) for i < runs while the time budget lasts (at least once); returns how many ran."""
    end = time.monotonic() + budget_s
    done = 0
    for i in range(runs):
        if done and time.monotonic() > end:
            break
        fn(i)
        done += 1
    return done


# --- the seed's requests ------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    query: str
    tools: list[dict[str, Any]]  # OpenAI-style schemas, as in a command's `tools`
    expected: list[dict[str, Any]] = field(default_factory=list)

    @property
    def specs(self) -> list[ToolSpec]:
        return [ToolSpec.from_openai(t) for t in self.tools]

    @property
    def multi(self) -> bool:
        return len(self.expected) > 1


def _tool(name: str, description: str, props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": props, "required": list(props) if required is None else required}}}


_S: dict[str, str] = {"type": "string"}
_N: dict[str, str] = {"type": "number"}
_I: dict[str, str] = {"type": "integer"}
_B: dict[str, str] = {"type": "boolean"}

SEED_TOOLS: list[dict[str, Any]] = [
    _tool("get_weather", "Get the current weather for a city", {"city": _S}),
    _tool("add_numbers", "Add two numbers and return their sum", {"a": _N, "b": _N}),
    _tool("search_contacts", "Search the address book for people whose name contains the given text", {"name": _S}),
]

SEED_CASES: list[Case] = [
    Case("seed1", "What is the weather in Tokyo?", SEED_TOOLS,
         [{"name": "get_weather", "arguments": {"city": "Tokyo"}}]),
    Case("seed2", "Add 25 and 17", SEED_TOOLS, [{"name": "add_numbers", "arguments": {"a": 25, "b": 17}}]),
    Case("seed3", "Find contact info for Alice", SEED_TOOLS,
         [{"name": "search_contacts", "arguments": {"name": "Alice"}}]),
    Case("seed4", "Weather in London and find Bob's contact", SEED_TOOLS,
         [{"name": "get_weather", "arguments": {"city": "London"}},
          {"name": "search_contacts", "arguments": {"name": "Bob"}}]),
]


def load_cases(path: Path | None) -> list[Case]:
    """The seed's requests from a JSONL case file (id, query, tools, expected), else the built-in copy."""
    if path is None or not path.is_file():
        return list(SEED_CASES)
    cases = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            cases.append(Case(row["id"], row["query"], row["tools"], row.get("expected", [])))
    return cases


_ROOMS = {"type": "string", "enum": ["kitchen", "living_room", "bedroom", "bathroom", "office", "garage"]}
_ONOFF = {"type": "string", "enum": ["on", "off"]}

# Distinct, realistic tools of a home/IoT device, to grow a tool set from the seed's 3 to 50.
SYNTHETIC_TOOLS: list[dict[str, Any]] = [
    _tool("set_light", "Switch the light in a room on or off", {"room": _ROOMS, "state": _ONOFF}),
    _tool("set_thermostat", "Set the target temperature of a room's thermostat in degrees Celsius",
          {"room": _ROOMS, "temperature": _N}),
    _tool("lock_door", "Lock or unlock a door",
          {"door": {"type": "string", "enum": ["front", "back", "garage"]},
           "action": {"type": "string", "enum": ["lock", "unlock"]}}),
    _tool("read_sensor", "Read the current value of a sensor in a room",
          {"sensor": {"type": "string", "enum": ["temperature", "humidity", "co2", "motion"]}, "room": _ROOMS}),
    _tool("set_timer", "Start a countdown timer", {"minutes": _I, "label": _S}),
    _tool("play_music", "Play a song, artist or playlist on the speakers", {"query": _S}),
    _tool("set_volume", "Set the speaker volume in percent", {"level": _I}),
    _tool("send_email", "Send an email to a recipient", {"to": _S, "subject": _S, "body": _S}),
    _tool("send_sms", "Send a text message to a phone number", {"number": _S, "text": _S}),
    _tool("create_reminder", "Create a reminder at a given time", {"text": _S, "time": _S}),
    _tool("get_calendar_events", "List the calendar events of a day", {"date": _S}),
    _tool("add_calendar_event", "Add an event to the calendar", {"title": _S, "date": _S, "time": _S}),
    _tool("convert_currency", "Convert an amount between two currencies", {"amount": _N, "source": _S, "target": _S}),
    _tool("convert_units", "Convert a value from one unit to another", {"value": _N, "source": _S, "target": _S}),
    _tool("get_stock_price", "Get the latest price of a stock by its ticker symbol", {"ticker": _S}),
    _tool("translate_text", "Translate a text into another language", {"text": _S, "language": _S}),
    _tool("search_web", "Search the web and return the top results", {"query": _S}),
    _tool("get_news", "Get the latest news headlines on a topic", {"topic": _S}),
    _tool("start_vacuum", "Start the robot vacuum cleaner in a room", {"room": _ROOMS}),
    _tool("open_blinds", "Open or close the window blinds of a room",
          {"room": _ROOMS, "position": {"type": "string", "enum": ["open", "closed"]}}),
    _tool("set_fan_speed", "Set the speed of a ceiling fan from 0 to 5", {"room": _ROOMS, "speed": _I}),
    _tool("arm_alarm", "Arm or disarm the home alarm system",
          {"mode": {"type": "string", "enum": ["away", "home", "off"]}}),
    _tool("get_energy_usage", "Report the electricity used over a number of days", {"days": _I}),
    _tool("water_garden", "Run the garden sprinklers for some minutes", {"zone": _S, "minutes": _I}),
    _tool("feed_pet", "Dispense a portion of food from the pet feeder", {"portions": _I}),
    _tool("get_traffic", "Get the travel time by car to a destination", {"destination": _S}),
    _tool("book_taxi", "Order a taxi to a destination", {"destination": _S, "time": _S}),
    _tool("order_groceries", "Add an item to the grocery order", {"item": _S, "quantity": _I}),
    _tool("get_package_status", "Track a parcel by its tracking number", {"tracking_number": _S}),
    _tool("take_snapshot", "Take a picture with a security camera",
          {"camera": {"type": "string", "enum": ["front_door", "backyard", "garage", "driveway"]}}),
    _tool("get_air_quality", "Get the air quality index of a city", {"city": _S}),
    _tool("get_sunrise_sunset", "Get sunrise and sunset times for a city", {"city": _S, "date": _S}),
    _tool("set_alarm_clock", "Set a wake-up alarm", {"time": _S, "repeat_daily": _B}, ["time"]),
    _tool("start_washing_machine", "Start the washing machine with a program",
          {"program": {"type": "string", "enum": ["cotton", "synthetics", "wool", "quick"]}}),
    _tool("preheat_oven", "Preheat the oven to a temperature in degrees Celsius", {"temperature": _I}),
    _tool("brew_coffee", "Brew coffee with the coffee machine",
          {"size": {"type": "string", "enum": ["small", "medium", "large"]}}),
    _tool("get_battery_level", "Read the charge of the home battery in percent", {}),
    _tool("charge_car", "Start or stop charging the electric car",
          {"action": {"type": "string", "enum": ["start", "stop"]}}),
    _tool("open_garage", "Open or close the garage door",
          {"action": {"type": "string", "enum": ["open", "close"]}}),
    _tool("ring_doorbell_history", "List the people who rang the doorbell today", {"limit": _I}),
    _tool("check_mailbox", "Tell whether the mailbox has new post", {}),
    _tool("set_scene", "Activate a lighting scene",
          {"scene": {"type": "string", "enum": ["movie", "dinner", "reading", "night"]}}),
    _tool("get_recipe", "Find a recipe for a dish", {"dish": _S}),
    _tool("calculate_tip", "Calculate the tip for a bill amount", {"amount": _N, "percent": _N}),
    _tool("get_time_in", "Tell the local time in a city", {"city": _S}),
    _tool("find_restaurant", "Find restaurants of a cuisine near a place", {"cuisine": _S, "near": _S}),
    _tool("report_leak", "Read the water leak sensors of the house", {"floor": _I}),
]


def tool_set(size: int) -> list[dict[str, Any]]:
    """The seed's 3 tools plus synthetic ones, `size` in all (3..50)."""
    if not 3 <= size <= len(SEED_TOOLS) + len(SYNTHETIC_TOOLS):
        raise ValueError(f"tool set size {size} out of range")
    return SEED_TOOLS + SYNTHETIC_TOOLS[: size - len(SEED_TOOLS)]


def call_key(name: str, arguments: dict[str, Any]) -> tuple[str, str]:
    """A call compared loosely: the name, and the argument values as lower-case text (25 == 25.0 == "25")."""
    def norm(v: Any) -> str:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return str(v).strip().lower()
    return name, json.dumps({k: norm(v) for k, v in sorted(arguments.items())})


def calls_match(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> dict[str, Any]:
    """How many expected calls are among `got` (by name; and by name and argument values)."""
    got_names = [c.get("name") for c in got]
    got_keys = {call_key(str(c.get("name")), c.get("arguments") or {}) for c in got}
    names = sum(1 for e in expected if e["name"] in got_names)
    exact = sum(1 for e in expected if call_key(e["name"], e["arguments"]) in got_keys)
    return {"expected": len(expected), "got": len(got), "names_ok": names, "calls_ok": exact,
            "correct": exact == len(expected) and len(got) == len(expected)}
