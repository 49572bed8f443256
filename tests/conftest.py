"""Suite-wide: a run that skipped tests for want of a system tool ends by saying what to install."""
from __future__ import annotations

import re

# A skip reason that names a missing tool: "<what> is not installed" / "needs <tool>".
_MISSING = re.compile(r"(not installed|needs )")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if _MISSING.search(reason):
            reasons[reason] = reasons.get(reason, 0) + 1
    if not reasons:
        return
    total = sum(reasons.values())
    terminalreporter.section(f"{total} tests skipped for something not installed", sep="!", yellow=True, bold=True)
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        terminalreporter.line(f"  {count:3d}  {reason}")
    terminalreporter.line("  `make test` installs the system packages when run as root with apt-get "
                          "(make system-packages); the weights packages come with `make setup`.")
