"""JUnit XML for CI (parity and evaluation reports): test cases that pass, fail with their lines, or are skipped."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from xml.etree import ElementTree as ET


def junit_xml(suite_name: str, cases: Iterable[tuple[str, str, list[str]]], skipped: Mapping[str, str]) -> str:
    """One <testsuite>: `cases` are (classname, name, failure lines, empty when it passed); `skipped` maps a
    classname to why it could not run (a test case named "runtime")."""
    suite = ET.Element("testsuite", name=suite_name)
    count = failures = 0
    for classname, name, failed in cases:
        case = ET.SubElement(suite, "testcase", classname=classname, name=name)
        count += 1
        if failed:
            failures += 1
            ET.SubElement(case, "failure", message=failed[0]).text = "\n".join(failed)
    for classname, reason in skipped.items():
        case = ET.SubElement(suite, "testcase", classname=classname, name="runtime")
        ET.SubElement(case, "skipped", message=reason)
    suite.set("tests", str(count + len(skipped)))
    suite.set("failures", str(failures))
    suite.set("skipped", str(len(skipped)))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
