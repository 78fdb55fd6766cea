"""Is a proposed call grounded in the request? Small models invent entities; a value the request never
mentioned is a sign the router is guessing (used to accept extra calls and, later, to escalate)."""

from __future__ import annotations

import functools
import re
from typing import Any

from edged.router import ProposedCall

_WORD = re.compile(r"[\w.+-]+", re.UNICODE)
_COMPOUND = re.compile(r"\b(and|also|then|as well as)\b|[,;&]", re.IGNORECASE)
_STOP = {"the", "a", "an", "of", "in", "at", "on", "for", "to", "me", "my"}


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower().replace("'s", "").replace("_", " ")))


def value_grounded(value: Any, query: str) -> bool:
    """A string whose words (or a number whose digits) appear in the request; other types cannot be checked."""
    if isinstance(value, bool) or value is None:
        return True
    if isinstance(value, (int, float)):
        numbers = {float(n) for n in re.findall(r"-?\d+(?:\.\d+)?", query)}
        return float(value) in numbers
    if isinstance(value, str):
        words = [w for w in _norm(value).split() if w not in _STOP]
        haystack = set(_norm(query).split())
        return bool(words) and all(w in haystack for w in words)
    if isinstance(value, list):
        return all(value_grounded(v, query) for v in value)
    if isinstance(value, dict):
        return all(value_grounded(v, query) for v in value.values())
    return True


def ungrounded_arguments(call: ProposedCall, query: str, exempt: set[str] | None = None) -> list[str]:
    """Names of the call's arguments (other than `exempt` ones) whose values the request does not contain."""
    return [k for k, v in call.arguments.items()
            if (exempt is None or k not in exempt) and not value_grounded(v, query)]


_DEPENDENT = re.compile(r"\b(then|after that|afterwards|and use|using)\b.*\b(her|his|their|its|him|them|there)\b",
                        re.IGNORECASE)


def looks_dependent(query: str) -> bool:
    """A request whose later step needs what an earlier one finds ("look up Alice, then the weather in her city"):
    tier 1 writes all calls at once from the request's own words, so it would fill "her city" with "Alice"."""
    return bool(_DEPENDENT.search(query))


def looks_compound(query: str) -> bool:
    """A request that may need more than one call ("... and ...")."""
    return bool(_COMPOUND.search(query))


_FILLER = {"what", "which", "that", "this", "then", "tell", "please", "with", "from", "your", "have", "does",
           "give", "show", "current", "return", "given", "their", "there", "about", "into", "when", "where"}


@functools.lru_cache(maxsize=2048)
def _stems(text: str) -> frozenset[str]:
    """Cached: the router asks for every offered tool's name and description on every request."""
    words = re.findall(r"[a-z]+", text.lower().replace("_", " "))
    return frozenset(w.rstrip("s") for w in words if len(w) >= 4 and w not in _FILLER)


def relevant(tool_name: str, tool_description: str, query: str) -> bool:
    """Does the request mention what the tool is about? Used to stop a chain of calls that drifts off topic."""
    return bool(_stems(tool_name + " " + tool_description) & _stems(query))


def mention_score(tool_name: str, tool_description: str, query: str) -> float:
    """How much of the request names the tool (its name's words count double): a draft for the router to guess
    the tool before the model has chosen it, never a choice."""
    query_stems = _stems(query)
    return 2.0 * len(_stems(tool_name) & query_stems) + len(_stems(tool_description) & query_stems)
