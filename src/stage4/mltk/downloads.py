"""Downloads an mltk module makes inside the layer (module.build calling download, download_untar, wget,
curl or git clone), served from stage4's source cache: no layer reaches the network for them.

Modules build most of these URLs at run time (from a version, a loop variable, lsb_release), so the host
cannot know each one ahead. It knows how they begin: the URLs written in module.build and the URL values
of module.conf's REQUIRED_* variables, each `${VAR}`, `$VAR` and `%VAR%` standing for any text. The
cache entries whose URL begins so (files imported with `stage4 sources import URL FILE --download`, git
URLs at a ref) go into the layer, where the driver's download, wget, curl and git clone serve them and
fail on any other URL, naming it. A module with no such entry at all is refused before the layer.

A call inside a `for X in $REQUIRED_Y` loop or an `if [ -n "$REQUIRED_Y" ]` block whose REQUIRED_Y
module.conf leaves empty never runs (xorg clones drivers only when REQUIRED_XORG_DRIVERS names some)
and does not count.
"""

from __future__ import annotations

import re

from stage4.mltk.modules import Module
from stage4.provisioning.source_cache import Entry, SourceCache

# A call where a command starts (not the word in a message: pwarning "Could not download ...").
CALL = re.compile(
    r"(?:^|[;&|(!]|\b(?:then|do|if|while|until|else|elif)\b)\s*"
    r"(download_untar|download|wget|curl|git\s+clone)(?![\w-])",
    re.MULTILINE,
)
URL = re.compile(r"""(?:https?|ftp|git)://(?:\$\{[^}]*\}|[^\s"'<>;|)`\\])+""")
VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*|%[A-Z_]+%")
GUARD = re.compile(r"""^\s*(?:for\s+\w+\s+in\s+"?\$\{?|if\s+\[\[?\s+-n\s+"?\$\{?)(REQUIRED_\w+)""")
FUNCTION = re.compile(r"^\s*(?:function\s+)?(\w+)\s*\(\)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def calls(code: str, module: Module) -> list[tuple[str, str]]:
    """(call, the function it is in) for each download call of module.build (its code without comments)
    that can run: not inside a loop or block that a REQUIRED_* variable module.conf leaves empty guards.
    A call in post_copy runs in the prod layer: the dev run's result carries what was served."""
    lines = code.splitlines()
    found = []
    for number, line in enumerate(lines):
        here = [" ".join(c.split()) for c in CALL.findall(line)]
        if not here:
            continue
        depth, guarded, function = _indent(line), False, ""
        for above in reversed(lines[:number]):
            if not above.strip() or _indent(above) >= depth:
                continue
            depth = _indent(above)
            if (guard := GUARD.match(above)) and not module.words(guard[1]):
                guarded = True
            if name := FUNCTION.match(above):
                function = name[1]
                break
        if not guarded:
            found += [(call, function) for call in here]
    return found


def beginnings(code: str, module: Module) -> list[str]:
    """How the module's URLs begin: those written in module.build and module.conf's URL values (not
    REQUIRED_GIT: stage4 fetches those on the host)."""
    written = URL.findall(code)
    written += [
        value
        for key, values in module.required.items()
        if key != "REQUIRED_GIT"
        for value in values
        if URL.fullmatch(value)
    ]
    return sorted({url.rstrip("/") for url in written})


def pattern(beginning: str) -> re.Pattern[str]:
    """A URL beginning as a regular expression; its variables stand for any text."""
    parts = VARIABLE.split(beginning)
    return re.compile(".*".join(re.escape(part) for part in parts))


def cached(cache: SourceCache, starts: list[str]) -> list[Entry]:
    """The source cache's entries (files and git URLs at a ref) whose URL begins like one of `starts`."""
    patterns = [pattern(start) for start in starts]
    if not patterns:
        return []
    return [entry for entry in cache.entries() if any(p.match(entry.url) for p in patterns)]
