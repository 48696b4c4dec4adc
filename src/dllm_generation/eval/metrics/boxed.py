"""Find the content of the last ``\\boxed{...}`` in a model answer.

Chat prompts ask the model to put its final answer in ``\\boxed{}``; the
content can itself hold braces (``\\boxed{\\frac{1}{2}}``), so a regex cannot
find where it ends and the braces are counted instead.
"""

from __future__ import annotations

import re

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed_content(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), else None.

    Also accepts the brace-less ``\\boxed 5`` form (content runs to the next
    ``$`` or whitespace). An unclosed last box (a truncated generation) yields
    None rather than a half answer.
    """
    starts = list(_BOX_COMMAND.finditer(text))
    if not starts:
        return None
    match = starts[-1]
    i = match.end()
    if i >= len(text):
        return None
    if text[i] != "{":
        if match.group(0) == match.group(0).rstrip():  # "\boxedx": another command
            return None
        bare = re.match(r"[^\s$]+", text[i:])
        return bare.group(0) if bare else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None
