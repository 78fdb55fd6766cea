"""edged: small language models at work on edge and IoT devices, over MQTT."""

__version__ = "0.1.0"
