"""The test run's closing summary and its timing record (a pytest plugin, loaded by pyproject's addopts).

At the end of every run (on the controller when the run is spread over xdist workers) it prints one
block: wall time, passed/failed/skipped, each skipped test of the core path (netboot end to end, the
desktop greeter, mltk modules) with the one thing that would enable it, and the other skips counted by
their reason. A green run with a hole in the core path is visible there, not among forty skip lines.
The same facts, with the 15 slowest tests, go to `tests/output/last-run.json`: the suite's time budget
(about 35 minutes on a 2-core machine without KVM) is checked against that record, never in a test.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

RECORD = Path(__file__).parent / "output" / "last-run.json"
# Test modules on the product's core path: a skip there means the run did not prove what stage4 is for.
CORE_PATH = {
    "tests/test_netboot.py": "netboot end to end (real dnbd3 and xloop)",
    "tests/test_desktop.py": "desktop greeter",
    "tests/test_mltk_image.py": "mltk modules",
}
# Skips that are part of the design: the full matrix repeats covered cases at other steps.
BY_DESIGN = "STAGE4_TEST_FULL=1"
SLOWEST = 15


class RunReport:
    def __init__(self, config: pytest.Config):
        self.config = config
        self.started = time.monotonic()
        self.seconds: dict[str, float] = defaultdict(float)
        self.skips: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skips[report.nodeid] = reason.removeprefix("Skipped: ")

    # The outermost wrapper: the block comes after pytest's own summaries, just before its closing line.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter, exitstatus: int):
        yield
        wall = time.monotonic() - self.started
        counts = {
            kind: len(terminalreporter.stats.get(kind, []))
            for kind in ("passed", "failed", "error", "skipped")
        }
        core = {
            nodeid: reason
            for nodeid, reason in sorted(self.skips.items())
            if nodeid.split("::")[0] in CORE_PATH and BY_DESIGN not in reason
        }
        others = Counter(reason for nodeid, reason in self.skips.items() if nodeid not in core)
        slowest = sorted(self.seconds.items(), key=lambda item: -item[1])[:SLOWEST]

        write = terminalreporter.write_line
        terminalreporter.section("stage4 test run", sep="=")
        write(
            f"wall time {wall / 60:.1f} min: {counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['error']} errors, {counts['skipped']} skipped"
        )
        if core:
            write(f"CORE PATH NOT TESTED: {len(core)} test(s) skipped", red=True, bold=True)
            for nodeid, reason in core.items():
                write(f"  {nodeid} [{CORE_PATH[nodeid.split('::')[0]]}]: {reason}")
        else:
            write("core path (netboot end to end, desktop greeter, mltk modules): every test ran")
        for reason, count in others.most_common():
            write(f"  skipped {count}x: {reason}")
        write(f"slowest (setup + call + teardown; all in {RECORD.relative_to(self.config.rootpath)}):")
        for nodeid, seconds in slowest[:5]:
            write(f"  {seconds:7.1f} s  {nodeid}")

        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(
            json.dumps(
                {
                    "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "arguments": list(self.config.invocation_params.args),
                    "workers": getattr(self.config.option, "numprocesses", None),
                    "wall_seconds": round(wall, 1),
                    "counts": counts,
                    "core_path_skipped": core,
                    "slowest": [{"test": nodeid, "seconds": round(s, 1)} for nodeid, s in slowest],
                },
                indent=2,
            )
            + "\n"
        )


def pytest_configure(config: pytest.Config) -> None:
    # The controller sees every worker's reports; a collection alone is no run.
    if not hasattr(config, "workerinput") and not config.option.collectonly:
        config.pluginmanager.register(RunReport(config), "stage4-run-report")
