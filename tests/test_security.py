"""The suite's security properties: it makes no network connection, and every string that came
from an adapter is escaped in every report and on the terminal.

**No network.** The real CLI runs end to end (certify, report, report merge) in subprocesses
whose ``sitecustomize`` installs an audit hook (:func:`sys.addaudithook`) that records and
refuses every socket connection, datagram, name lookup and ``urllib`` request except over
AF_UNIX sockets, which multiprocessing's fork server uses to hand out workers. The hook is
inherited by every process the run starts: new interpreters (the fork server, the resource
tracker) import ``sitecustomize`` themselves, forked workers keep their parent's hooks. So that
the test cannot pass vacuously, the hook itself logs each process that starts or is forked, and
a control run shows it catching real connection attempts.

**Escaping.** ``tests/zoo/hostile_strings.py`` is PyTorch's LayerNorm under a name, and raising
an exception message (for float16), made of HTML, Markdown table breakers, line breaks that start
a heading or a link, backticks, ANSI escapes, bidi overrides, XML-invalid characters and ``]]>``;
it is certified from a directory with such a name too (the spec is in every reproduction
command). Each report must show the text as the literal text it is, and the terminal must get
no escape sequence. ``tests/test_report_html.py`` tests the HTML page's escaping rules on
made-up records; here the page is only checked for what the real run could smuggle in.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from markdown_helpers import (
    HEADING,
    assert_tables_keep_their_columns,
    markdown_blocks,
    unescaped,
)
from test_report_html import Page
from test_zoo import ZOO, _zoo_module

from conformance.cli import main
from conformance.coverage import AXES
from conformance.engine import select_cases
from conformance.merge import merge, render_merged_markdown
from conformance.messages import failure_message, is_control, visible
from conformance.report_json import read_json
from conformance.report_markdown import render_markdown
from conformance.results import SpeedResult

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 120

# --- no network ---------------------------------------------------------------------------------

NETWORK_LOG = "NORMCONF_TEST_NETWORK_LOG"
PROCESS_LOG = "NORMCONF_TEST_PROCESS_LOG"

#: Installed as ``sitecustomize`` in every interpreter the tests below start. The audit events
#: and their arguments are CPython's (the "Audit events table" of the Python docs):
#: ``socket.connect``/``sendto``/``sendmsg`` carry ``(socket, address)``, the lookups the host.
SITECUSTOMIZE = f'''
"""Written by tests/test_security.py: this process records and refuses network access."""

import os
import socket
import sys

_NETWORK_LOG = os.environ[{NETWORK_LOG!r}]
_PROCESS_LOG = os.environ[{PROCESS_LOG!r}]
# Refused unless the socket is AF_UNIX. connect_ex raises "socket.connect"; its own name is
# listed too, for a Python that raises one.
_ADDRESSED = frozenset(("socket.connect", "socket.connect_ex", "socket.sendto", "socket.sendmsg"))
# Refused whatever the host: a name lookup may itself go out to a DNS server.
_ANY_HOST = frozenset(
    ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request")
)
_WATCHED = "normconf_test.watched"


def _append(path, line):
    # One write of one line with O_APPEND: lines of concurrent processes do not interleave.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (line.replace("\\n", " ") + "\\n").encode("utf-8", "backslashreplace"))
    finally:
        os.close(fd)


def _hook(event, args):
    if event == _WATCHED:
        _append(_PROCESS_LOG, f"{{args[0]}} {{os.getpid()}} {{os.getppid()}} {{sys.orig_argv!r}}")
    elif event in _ANY_HOST or (
        event in _ADDRESSED and getattr(args[0], "family", None) != socket.AF_UNIX
    ):
        _append(_NETWORK_LOG, f"{{os.getpid()}} {{event}} {{args!r}}")
        raise PermissionError(f"network access refused by tests/test_security.py: {{event}}")


sys.addaudithook(_hook)
# Logged by the hook, so a line proves the hook is installed in that process.
sys.audit(_WATCHED, "start")
os.register_at_fork(after_in_child=lambda: sys.audit(_WATCHED, "fork"))
'''


@dataclass(frozen=True)
class Process:
    """One line of the process log: how the process came to be watched, and who it is."""

    how: str  # "start": a new interpreter; "fork": forked from a watched one
    pid: int
    ppid: int
    argv: list[str]

    @property
    def command(self) -> str:
        return " ".join(self.argv)


@dataclass(frozen=True)
class Watch:
    """An environment that puts every Python process under the audit hook, and its two logs."""

    env: dict[str, str]
    network_log: Path
    process_log: Path

    def python(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )

    def processes(self) -> list[Process]:
        if not self.process_log.exists():
            return []
        processes = []
        for line in self.process_log.read_text(encoding="utf-8").splitlines():
            how, pid, ppid, argv = line.split(" ", 3)
            processes.append(Process(how, int(pid), int(ppid), ast.literal_eval(argv)))
        return processes

    def network_events(self) -> list[str]:
        if not self.network_log.exists():
            return []
        return self.network_log.read_text(encoding="utf-8").splitlines()


def watch(tmp_path: Path) -> Watch:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    network_log, process_log = tmp_path / "network.log", tmp_path / "processes.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]),
        NETWORK_LOG: str(network_log),
        PROCESS_LOG: str(process_log),
    }
    return Watch(env, network_log, process_log)


def _ran(result: subprocess.CompletedProcess[str], expected: int) -> None:
    __tracebackhide__ = True
    if result.returncode != expected:
        pytest.fail(
            f"{' '.join(map(str, result.args))}\nexited {result.returncode}, not {expected}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )


def test_certify_report_and_merge_make_no_network_connection(tmp_path: Path) -> None:
    w = watch(tmp_path)
    runs, merged = tmp_path / "run", tmp_path / "merged"
    certify = w.python(
        "-m", "conformance", "certify", "--adapter", "torch", "--quick", "--norm", "rms_norm",
        "--dtype", "float32", "--device", "cpu", "--no-progress", "--report-dir", str(runs),
    )  # fmt: skip
    _ran(certify, 0)  # torch's float32 RMSNorm passes
    _ran(w.python("-m", "conformance", "report", str(runs)), 0)
    _ran(w.python("-m", "conformance", "report", "merge", str(runs), "--out", str(merged)), 0)
    assert (merged / "report.html").is_file()

    assert not w.network_log.exists(), "\n".join(["network access:", *w.network_events()])

    # The control: the hook ran in every kind of process the three commands started.
    processes = w.processes()
    (cli,) = [p for p in processes if p.how == "start" and "certify" in p.argv]
    servers = [p for p in processes if "forkserver" in p.command and p.ppid == cli.pid]
    assert len(servers) == 1, f"no fork server under the CLI ({cli.pid}): {processes}"
    workers = [p for p in processes if p.how == "fork" and p.ppid == servers[0].pid]
    assert workers, f"no worker forked from the fork server: {processes}"
    reports = [p.argv[p.argv.index("report") :] for p in processes if "report" in p.argv]
    assert reports == [["report", str(runs)], ["report", "merge", str(runs), "--out", str(merged)]]


#: Tries each kind of network access the hook watches, and one AF_UNIX exchange it must allow.
PROBE = """
import socket
import urllib.request

def attempt(name, call):
    try:
        call()
    except PermissionError as exc:
        if "tests/test_security.py" in str(exc):  # the hook's refusal, not the kernel's
            print("refused", name)
            return
    except OSError:  # the call reached the network stack, which failed it
        pass
    print("reached", name)

with socket.socket() as s:
    s.settimeout(0.1)
    attempt("connect", lambda: s.connect(("192.0.2.1", 9)))
    attempt("connect_ex", lambda: s.connect_ex(("192.0.2.1", 9)))
attempt("create_connection", lambda: socket.create_connection(("192.0.2.1", 9), timeout=0.1))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
    attempt("sendto", lambda: u.sendto(b"x", ("192.0.2.1", 9)))
    attempt("sendmsg", lambda: u.sendmsg([b"x"], [], 0, ("192.0.2.1", 9)))
attempt("gethostbyname", lambda: socket.gethostbyname("localhost"))
attempt("gethostbyaddr", lambda: socket.gethostbyaddr("127.0.0.1"))
attempt("urlopen", lambda: urllib.request.urlopen("http://192.0.2.1:9/", timeout=0.1))
a, b = socket.socketpair()
with a, b:
    attempt("unix", lambda: a.sendmsg([b"x"]))
"""


def test_the_hook_refuses_network_access_and_allows_unix_sockets(tmp_path: Path) -> None:
    w = watch(tmp_path)
    probe = w.python("-c", PROBE)
    _ran(probe, 0)
    outcomes = dict(reversed(line.split()) for line in probe.stdout.splitlines())
    assert outcomes == {
        "connect": "refused",
        "connect_ex": "refused",
        "create_connection": "refused",
        "sendto": "refused",
        "sendmsg": "refused",
        "gethostbyname": "refused",
        "gethostbyaddr": "refused",
        "urlopen": "refused",
        "unix": "reached",
    }, probe.stdout + probe.stderr
    events = [line.split()[1] for line in w.network_events()]
    assert events == [
        "socket.connect",  # connect
        "socket.connect",  # connect_ex
        "socket.getaddrinfo",  # create_connection looks the host up first
        "socket.sendto",
        "socket.sendmsg",
        "socket.gethostbyname",
        "socket.gethostbyaddr",
        "urllib.Request",
    ]
    assert any("192.0.2.1" in line for line in w.network_events())
    assert [p.how for p in w.processes()] == ["start"]


# --- escaping -----------------------------------------------------------------------------------

HOSTILE_MODULE = _zoo_module("hostile_strings")
HOSTILE_NAME: str = HOSTILE_MODULE.normconf_name
HOSTILE_LINE: str = HOSTILE_MODULE.HOSTILE_LINE
#: The directory the adapter is certified from: its path is the spec, in every command shown.
HOSTILE_DIR = "<b>|`x`\u202e\x1b[2J ]]> -->"


def controls(text: str) -> list[str]:
    """The control and format characters in ``text`` other than newline and tab."""
    return sorted({ch for ch in text if ch not in "\n\t" and is_control(ch)})


@dataclass(frozen=True)
class HostileRun:
    """The hostile adapter certified by the CLI, its reports merged, and what the CLI printed."""

    exit_code: int
    stdout: str
    stderr: str
    run: Path
    merged: Path
    spec: str


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> HostileRun:
    base = tmp_path_factory.mktemp("hostile")
    source = base / HOSTILE_DIR
    source.mkdir()
    spec = str(shutil.copy(ZOO / "hostile_strings.py", source))
    cases = [
        c.case_id
        for dtype in ("float32", "float16")
        for c in select_cases(norms=["layer_norm"], dtypes=[dtype], quick=True)[:2]
    ]
    run, merged = base / "run", base / "merged"
    argv = ["certify", "--adapter", spec, "--device", "cpu", "--report-dir", str(run)]
    argv += [arg for case_id in cases for arg in ("--case", case_id)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)  # with the progress lines: they go to stderr
        assert main(["report", "merge", str(run), "--out", str(merged)]) == 0
    return HostileRun(code, out.getvalue(), err.getvalue(), run, merged, spec)


def test_the_hostile_text_reaches_the_record(hostile: HostileRun) -> None:
    """Not vacuous: the name, the spec and the exception message are in the record unchanged."""
    assert hostile.exit_code == 1, hostile.stdout + hostile.stderr
    record = read_json(hostile.run / "report.json")
    assert record.adapter["name"] == HOSTILE_NAME
    assert record.adapter["spec"] == hostile.spec
    failed = [c for c in record.checks if c.verdict == "fail"]
    assert {c.dtype for c in failed} == {"float16"}
    assert {c.dtype for c in record.checks if c.verdict == "pass"} == {"float32"}
    assert {c.message for c in failed} == {f"raised RuntimeError: {HOSTILE_LINE}"}
    assert all(HOSTILE_DIR in c.reproduce for c in failed)


def test_the_terminal_gets_no_control_characters(hostile: HostileRun) -> None:
    assert controls(hostile.stdout) == []
    assert controls(hostile.stderr) == []
    assert "cases" in hostile.stderr  # the progress lines were printed
    # The name is shown, with its control characters as '?'.
    assert "normconf: zoo: hostile <script>alert(1)</script> | cell |" in hostile.stdout
    assert "?[2J" in hostile.stdout


def test_failure_messages_are_safe_to_print(hostile: HostileRun) -> None:
    """What ``normconf replay`` and the pytest plugin print for a failed check."""
    record = read_json(hostile.run / "report.json")
    for check in record.checks:
        text = failure_message(check)
        assert controls(text) == [], text
    failed = next(c for c in record.checks if c.verdict == "fail")
    assert "\\x1b[2J" in failure_message(failed)  # shown as an escape, not dropped


# Markdown -------------------------------------------------------------------------------------


def assert_literal_markdown(markdown: str, headings: tuple[str, ...]) -> list[str]:
    """That nothing from the adapter became markup in ``markdown``, whose own headings all start
    with one of ``headings``; returns the text of its code blocks."""
    __tracebackhide__ = True
    assert controls(markdown) == [], "control characters in the Markdown"
    prose, blocks = markdown_blocks(markdown)
    text = "\n".join(prose)
    assert "<" not in text, "raw HTML outside code blocks"
    for char in "`[]_~$":
        assert unescaped(char, text) == 0, f"unescaped {char!r} outside code blocks"
    assert unescaped("*", text.replace("**", "")) == 0, "emphasis outside the report's own bold"
    for line in prose:
        assert not HEADING.match(line) or line.startswith(headings), f"a heading: {line}"
        if "hostile" in line:  # the name: all of it on one line, in the title or a table
            assert line.startswith(("# normconf report: zoo: hostile", "|")), line
            assert " # heading" in line, line
            assert "\\\\r## second\\\\u2028- item" in line, line
    assert_tables_keep_their_columns(prose)
    return blocks


def test_markdown_report_shows_the_text_literally(hostile: HostileRun) -> None:
    markdown = (hostile.run / "report.md").read_text(encoding="utf-8")
    coverage = ("## Coverage", *(f"### {AXES[a][0].capitalize()}" for a in AXES))
    sections = ("## Grades by norm and dtype", *coverage, "## Checks by kind", "## Failures (2)")
    own = ("# normconf report: ", *sections, "### layer\\_norm", "#### layer\\_norm-float16-")
    blocks = assert_literal_markdown(markdown, own)
    title = markdown.splitlines()[0]
    assert title.startswith("# normconf report: zoo: hostile &lt;script&gt;alert(1)&lt;/script&gt;")
    assert "\\\\x1b\\[2J" in title  # renders as the text \x1b[2J
    # The exception message and the commands are code: shown as they are, escapes as text.
    messages = [b for b in blocks if b.startswith("raised RuntimeError")]
    assert messages == [f"raised RuntimeError: {visible(HOSTILE_LINE)}"] * 2
    commands = [b for b in blocks if b.startswith("normconf certify")]
    assert len(commands) == 3  # the run's, then one per failure
    assert all(visible(hostile.spec) in b for b in commands)


def test_merged_markdown_shows_the_text_literally(hostile: HostileRun) -> None:
    markdown = (hostile.merged / "report.md").read_text(encoding="utf-8")
    own = ("# normconf merged report: 1 runs", "## Runs", "## Grades by norm and dtype")
    assert_literal_markdown(markdown, own)
    assert "zoo: hostile &lt;script&gt;alert(1)&lt;/script&gt; \\| cell \\|" in markdown


def test_markdown_of_a_tampered_report_json(hostile: HostileRun) -> None:
    """A report directory is data, maybe from another machine: a ``report.json`` whose fields
    hold markup renders as literally as the adapter's own strings do."""
    record = read_json(hostile.run / "report.json")
    failed = next(c for c in record.checks if c.verdict == "fail")
    failed.dtype = "# dtype heading"
    failed.kind = "1. list"
    record.speed = [
        SpeedResult(
            speed_id="- speed id",
            norm="layer_norm",
            dtype="float32",
            direction="</td>|<script>alert(2)</script>|\n# direction",
            shape=(4, 8),
            device="cpu",
            bytes=256,
            method="perf_counter",
            rounds=3,
            median_s=1e-6,
            p25_s=1e-6,
            p75_s=1e-6,
            min_s=1e-6,
            gbps=0.25,
            fraction_of_ceiling=None,
            verdict="fail",
            message="slow\n## message heading",
        )
    ]
    single = render_markdown(record)
    coverage = tuple(f"### {AXES[a][0].capitalize()}" for a in AXES)
    own = ("# normconf report: ", "## ", "### layer\\_norm", *coverage, "#### ")
    assert_literal_markdown(single, own)
    prose, _ = markdown_blocks(single)
    assert not any(line.startswith(("# dtype", "1. list", "- speed id")) for line in prose)
    merged = render_merged_markdown(merge([record]))
    assert_literal_markdown(merged, ("# normconf merged report: 1 runs", "## "))
    assert "&lt;script&gt;alert(2)" in merged


# junit.xml and report.html ----------------------------------------------------------------------


def xml_strings(root: ET.Element) -> Iterator[str]:
    for element in root.iter():
        yield from (element.text or "", element.tail or "", *element.attrib.values())


def test_junit_parses_and_holds_the_text_as_text(hostile: HostileRun) -> None:
    root = ET.parse(hostile.run / "junit.xml").getroot()
    assert controls("".join(xml_strings(root))) == []
    assert {element.tag for element in root.iter()} == {
        "testsuites", "testsuite", "properties", "property", "testcase", "failure",
    }  # fmt: skip
    failures = root.findall(".//failure")
    assert len(failures) == 2
    message = f"raised RuntimeError: {visible(HOSTILE_LINE)}"
    assert all(f.get("message") == message for f in failures)
    assert all((f.text or "").startswith(message + "\nReproduce: ") for f in failures)
    adapter = root.find(".//property[@name='adapter']")
    assert adapter is not None
    assert adapter.get("value") == visible(HOSTILE_NAME)


@pytest.mark.parametrize("page", ["run/report.html", "merged/report.html"])
def test_html_holds_the_text_as_text(hostile: HostileRun, page: str) -> None:
    directory, name = page.split("/")
    text = getattr(hostile, directory).joinpath(name).read_text(encoding="utf-8")
    assert "<script>alert" not in text
    assert controls(text) == []
    parsed = Page(text)
    assert len(parsed.elements("script")) == 1  # the page's own
    assert "zoo: hostile <script>alert(1)</script> | cell | `tick`" in parsed.text
    assert "\\x1b[2J" in parsed.text


# --- the CLI's one-line errors -----------------------------------------------------------------

RAISES_ON_IMPORT = f"raise RuntimeError({HOSTILE_LINE!r})\n"
NAMED_WITHOUT_CASES = f"""
import torch.nn.functional as F

normconf_name = {HOSTILE_NAME!r}
layer_norm = F.layer_norm
"""


@pytest.mark.parametrize(
    ("source", "norm"),
    [(RAISES_ON_IMPORT, "layer_norm"), (NAMED_WITHOUT_CASES, "rms_norm")],
    ids=["raises-on-import", "no-cases-for-its-name"],
)
def test_an_error_line_gets_no_control_characters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], source: str, norm: str
) -> None:
    adapter = tmp_path / "adapter.py"
    adapter.write_text(source, encoding="utf-8")
    argv = ["certify", "--adapter", str(adapter), "--norm", norm, "--device", "cpu"]
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "<script>alert(1)</script>" in err  # the adapter's text is what is shown
    assert controls(err) == [], err
