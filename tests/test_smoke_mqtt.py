"""End-to-end through a real mosquitto: the three built-in tools answered by direct calls."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.mqtt


def test_direct_calls_for_all_three_tools(daemon, client) -> None:
    r = client.request("dev1", {"id": "r2", "call": {"name": "add_numbers", "arguments": {"a": 25, "b": 17}}})
    assert r["status"] == "ok" and r["id"] == "r2"
    assert r["calls"][0]["result"] == {"sum": 42}

    r = client.request("dev1", {"id": "w", "call": {"name": "get_weather", "arguments": {"city": "Tokyo"}}})
    again = client.request("dev1", {"id": "w2", "call": {"name": "get_weather", "arguments": {"city": "Tokyo"}}})
    assert r["calls"][0]["result"]["city"] == "Tokyo"
    assert r["calls"][0]["result"] == again["calls"][0]["result"]  # simulated but deterministic

    r = client.request("dev1", {"id": "c", "call": {"name": "search_contacts", "arguments": {"name": "alice"}}})
    assert [m["name"] for m in r["calls"][0]["result"]["matches"]] == ["Alice Johnson"]
