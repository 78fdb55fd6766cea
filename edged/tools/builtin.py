"""The seed's built-in tools: weather (simulated, deterministic), arithmetic, and a contacts lookup."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edged.tools.registry import Tool

_CONDITIONS = ["sunny", "partly cloudy", "cloudy", "light rain", "rain", "windy", "foggy", "snow"]


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WeatherArgs(_Args):
    city: str = Field(min_length=1, max_length=100, description="City name, e.g. Tokyo")


class AddArgs(_Args):
    a: float = Field(description="First number")
    b: float = Field(description="Second number")


class ContactsArgs(_Args):
    name: str = Field(min_length=1, max_length=100, description="Name or part of a name to look up")


def get_weather(args: WeatherArgs) -> dict[str, Any]:
    """Simulated weather: a stable function of the city name, so tests and demos are repeatable."""
    city = args.city.strip()
    digest = hashlib.sha256(city.lower().encode("utf-8")).digest()
    return {
        "city": city,
        "temperature_c": round(-5 + digest[0] / 255 * 40, 1),
        "conditions": _CONDITIONS[digest[1] % len(_CONDITIONS)],
        "humidity_pct": 20 + digest[2] % 75,
        "simulated": True,
    }


def add_numbers(args: AddArgs) -> dict[str, Any]:
    total = args.a + args.b
    return {"sum": int(total) if float(total).is_integer() else total}


def load_contacts(path: Path | None) -> list[dict[str, Any]]:
    """Contacts from the configured JSON file, or the small list that ships with edged."""
    if path is None:
        text = resources.files("edged.data").joinpath("contacts.json").read_text(encoding="utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(c, dict) and "name" in c for c in data):
        raise ValueError(f"{path}: contacts must be a JSON list of objects with a 'name'")
    return data


def make_search_contacts(contacts: list[dict[str, Any]], timeout_s: float = 5.0) -> Tool:
    def search_contacts(args: ContactsArgs) -> dict[str, Any]:
        needle = args.name.strip().lower()
        matches = [c for c in contacts if needle in str(c["name"]).lower()]
        return {"query": args.name, "matches": matches}

    return Tool(
        "search_contacts",
        "Search the address book for people whose name contains the given text",
        ContactsArgs,
        search_contacts,
        timeout_s,
        (("Find the phone number of Bob", {"name": "Bob"}),),
        inline=True,
    )


def builtin_tools(contacts_file: Path | None = None, timeout_s: float = 5.0) -> list[Tool]:
    return [
        Tool("get_weather", "Get the current weather for a city", WeatherArgs, get_weather, timeout_s,
             (("How warm is it in Oslo today?", {"city": "Oslo"}),), inline=True),
        Tool("add_numbers", "Add two numbers and return their sum", AddArgs, add_numbers, timeout_s,
             (("What is 12 plus 30?", {"a": 12, "b": 30}),), inline=True),
        make_search_contacts(load_contacts(contacts_file), timeout_s),
    ]
