"""Quoting a tool's log in an error: the lines that say what went wrong."""
import re
from pathlib import Path

PATTERN = re.compile(r"error|Error|ERROR|failed|Failed|FAIL|Traceback|Exception|not found|No module|"
                     r"not support|Unsupport|Abort")


def relevant_lines(log: Path, count: int = 10) -> str:
    """The lines of a log that say what went wrong (else its last lines), indented for a message."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    picked = [line for line in lines if PATTERN.search(line)] or lines
    return "\n".join("    " + line[:300] for line in picked[-count:])
