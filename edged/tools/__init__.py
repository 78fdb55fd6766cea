"""Tools the daemon can run: a registry plus the built-in ones."""

from edged.tools.registry import Tool, ToolError, ToolRegistry

__all__ = ["Tool", "ToolError", "ToolRegistry"]
