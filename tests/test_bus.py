"""bus.py without a broker: the hand-packed publish properties are the bytes paho's own Properties would send."""

from __future__ import annotations

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.bus import PackedProperties


@pytest.mark.parametrize("corr", [None, b"", b"abc", bytes(range(256)) * 255])
def test_packed_properties_match_paho(corr: bytes | None) -> None:
    reference = Properties(PacketTypes.PUBLISH)
    reference.ContentType = "application/json"
    if corr is not None:
        reference.CorrelationData = corr
    packed = PackedProperties(corr).pack()
    assert packed == reference.pack()
    decoded = Properties(PacketTypes.PUBLISH)
    decoded.unpack(packed)
    assert decoded.ContentType == "application/json" and getattr(decoded, "CorrelationData", None) == corr
