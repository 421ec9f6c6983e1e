"""``junit.xml``: the run in the JUnit XML that CI systems display.

One ``<testsuite name="normconf.<norm>">`` per norm and one ``<testcase>`` per check, with
``classname="normconf.<norm>.<dtype>"``, ``name=<check_id>`` and ``time`` its duration in
seconds. A failed check carries ``<failure message="<first line>" type="<grade or kind>">``
whose text is the full :func:`~conformance.messages.failure_message`; a skipped check carries
``<skipped message="...">``. Counts (``tests``, ``failures``, ``errors``, ``skipped``) and
times are totalled on every suite and on the root ``<testsuites>``.

The XML is built with :mod:`xml.etree.ElementTree`, which escapes markup. Every string goes
through :func:`xml_text` first: an adapter's name, its spec and its exception texts may hold
characters that XML 1.0 cannot hold at all (most C0 controls, lone surrogates; one of them makes
the file unreadable) or that drive a terminal or reorder text where a CI system shows it (ANSI
escapes, bidi overrides), and each of those is written as its escape instead.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from conformance.messages import failure_message, first_line, visible
from conformance.results import CheckResult, RunRecord
from conformance.summary import NORM_ORDER, ordered

# XML 1.0's Char production: tab, newline, carriage return, and the ranges below.
_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(text: object) -> str:
    """``text`` for an XML attribute or element: control and format characters other than
    newline and tab written as escapes (:func:`~conformance.messages.visible`), and anything
    else XML 1.0 cannot represent replaced by U+FFFD."""
    return _NOT_XML_CHAR.sub("\ufffd", visible(str(text)))


def render_junit(record: RunRecord) -> str:
    """The JUnit XML document for ``record`` (UTF-8 declaration, ends with a newline)."""
    root = ET.Element("testsuites", {"name": "normconf"})
    adapter = str(record.adapter.get("name") or record.adapter.get("spec") or "adapter")
    for norm in ordered((c.norm for c in record.checks), NORM_ORDER):
        checks = [c for c in record.checks if c.norm == norm]
        suite = ET.SubElement(root, "testsuite", {"name": xml_text(f"normconf.{norm}")})
        _set_counts(suite, checks)
        suite.set("timestamp", xml_text(record.started))
        _properties(suite, adapter, record)
        for check in checks:
            _testcase(suite, check)
    _set_counts(root, record.checks)
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'


def _set_counts(element: ET.Element, checks: Sequence[CheckResult]) -> None:
    element.set("tests", str(len(checks)))
    element.set("failures", str(sum(c.verdict == "fail" for c in checks)))
    element.set("errors", "0")
    element.set("skipped", str(sum(c.verdict == "skip" for c in checks)))
    element.set("time", _seconds(sum(c.duration_s for c in checks)))


def _properties(suite: ET.Element, adapter: str, record: RunRecord) -> None:
    properties = ET.SubElement(suite, "properties")
    for name, value in (("adapter", adapter), ("seed", record.seed), ("command", record.command)):
        ET.SubElement(properties, "property", {"name": name, "value": xml_text(value)})


def _testcase(suite: ET.Element, check: CheckResult) -> None:
    case = ET.SubElement(
        suite,
        "testcase",
        {
            "classname": xml_text(f"normconf.{check.norm}.{check.dtype}"),
            "name": xml_text(check.check_id),
            "time": _seconds(check.duration_s),
        },
    )
    if check.verdict == "fail":
        failure = ET.SubElement(
            case,
            "failure",
            {"message": xml_text(first_line(check)), "type": xml_text(check.grade or check.kind)},
        )
        failure.text = xml_text(failure_message(check))
    elif check.verdict == "skip":
        ET.SubElement(case, "skipped", {"message": xml_text(check.message or "skipped")})


def _seconds(duration: float) -> str:
    # JUnit readers parse time as a decimal number; a NaN or negative duration would reject it.
    return f"{duration:.6f}" if math.isfinite(duration) and duration >= 0.0 else "0.000000"
