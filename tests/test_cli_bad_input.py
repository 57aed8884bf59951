"""Bad input to every command gives one line naming the bad value, exit status 2, and no traceback.

The table below is the probe of issue 13 item 9: each row is a command line that must be refused.
Rows run in this process (`graddoctor.cli.main`, argparse's SystemExit caught); a handful run again
through the installed console script. Nothing here trains: demo and lab rows are refused before
training starts (a guard fails the row if one is not), and serve rows before it listens.
"""
from __future__ import annotations

import math
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Union

import pytest
import torch
from torch import nn

import graddoctor as gd
from graddoctor.cli import main
from graddoctor.diagnosis import DiagnoseConfig
from graddoctor.diagnosis._config import RANGES
from graddoctor._errors import ConfigError

GRADDOCTOR = str(Path(sys.executable).parent / "graddoctor")
LONG_NAME = "x" * 300                      # one component over NAME_MAX (255)
LONG_PATH = "/tmp/" + "/".join(["y" * 200] * 25)  # over PATH_MAX (4096)
NON_UTF8 = os.fsdecode(b"bad\xff\xfename")  # a directory name that is not UTF-8 (surrogate-escaped)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A tiny real run: two Linear layers and a Tanh, six steps, flushed every two."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path_factory.mktemp("bad_input") / "run"
    with gd.watch(model, opt, run, flush_every=2, activation_every=2, sample_every=2, live_diagnosis=False) as w:
        for _ in range(6):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            w.step(loss)
            opt.step()
    return run


class Env:
    """What a row builds its command line from: the good run, a scratch folder, broken copies of the run."""

    def __init__(self, run: Path, tmp: Path):
        self.run, self.tmp = str(run), tmp

    @property
    def file(self) -> str:
        """An existing regular file."""
        f = self.tmp / "afile"
        f.write_text("not a directory\n")
        return str(f)

    def corrupt(self, sql: str) -> str:
        """A copy of the run whose store was edited with `sql` (an SQL script)."""
        d = self.tmp / "broken"
        shutil.copytree(self.run, d)
        con = sqlite3.connect(d / "graddoctor.sqlite")
        con.executescript(sql)
        con.commit()
        con.close()
        return str(d)

    def store_file(self, data: bytes) -> str:
        d = self.tmp / "store_only"
        d.mkdir()
        (d / "graddoctor.sqlite").write_bytes(data)
        return str(d)

    def cut_store(self) -> str:
        """A copy of the run whose store file lost its second half."""
        d = self.tmp / "cut"
        shutil.copytree(self.run, d)
        f = d / "graddoctor.sqlite"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        return str(d)

    def dir(self, name: str) -> str:
        d = self.tmp / name
        d.mkdir(parents=True)
        return str(d)


Text = Union[str, Callable[[Env], str]]
CASES: list = []


def row(id: str, argv: Callable[[Env], list[str]], *names: Text) -> None:
    """A bad command line; `names` must all appear in the one line of the error (the bad value, what is allowed)."""
    CASES.append(pytest.param(argv, names, id=id))


def rename_table(table: str, columns: str) -> str:
    """SQL that rebuilds `table` with only `columns` (a wrong column count)."""
    return (f"ALTER TABLE {table} RENAME TO old_{table}; CREATE TABLE {table}({columns}); "
            f"INSERT INTO {table} SELECT {columns} FROM old_{table}; DROP TABLE old_{table};")


# ---------------------------------------------------------------- the command line itself (argparse)
row("no-command", lambda e: [], "required: COMMAND")
row("unknown-command", lambda e: ["frobnicate"], "'frobnicate'", "invalid choice")
row("unknown-option", lambda e: ["--bogus"], "--bogus")
row("runs-no-action", lambda e: ["runs"], "ACTION")
row("runs-unknown-action", lambda e: ["runs", "list"], "'list'", "summary")
row("summary-no-run-dir", lambda e: ["runs", "summary"], "RUN_DIR")
row("summary-two-run-dirs", lambda e: ["runs", "summary", e.run, "other"], "unrecognized arguments: other")
row("summary-unknown-option", lambda e: ["runs", "summary", e.run, "--json"], "--json")

# ---------------------------------------------------------------- run directories that are not runs
for cmd in (["runs", "summary"], ["diagnose"], ["report"]):
    c = cmd[-1]
    row(f"{c}-missing-dir", lambda e, cmd=cmd: [*cmd, str(e.tmp / "nothing")], "nothing", "does not exist")
    row(f"{c}-dir-is-a-file", lambda e, cmd=cmd: [*cmd, e.file], "afile", "not a directory")
    row(f"{c}-empty-dir", lambda e, cmd=cmd: [*cmd, e.dir("empty")], "empty", "no run store")
    row(f"{c}-long-name", lambda e, cmd=cmd: [*cmd, str(e.tmp / LONG_NAME)], "xxxx", "File name too long")
    row(f"{c}-non-utf8-missing", lambda e, cmd=cmd: [*cmd, str(e.tmp / NON_UTF8)], "bad\\udcff\\udcfename",
        "does not exist")
    row(f"{c}-garbage-store", lambda e, cmd=cmd: [*cmd, e.store_file(b"garbage" * 200)], "store_only",
        "not a readable graddoctor store")
row("summary-long-path", lambda e: ["runs", "summary", LONG_PATH], "yyyy", "File name too long")
row("summary-empty-run-dir", lambda e: ["runs", "summary", ""], "''", "run directory")
row("diagnose-empty-run-dir", lambda e: ["diagnose", ""], "RUN_DIR", "''")
row("report-empty-run-dir", lambda e: ["report", e.run, ""], "RUN_DIR", "''")
row("summary-non-utf8-empty-dir", lambda e: ["runs", "summary", e.dir(NON_UTF8)], "bad\\udcff\\udcfename",
    "no run store")
row("summary-empty-store-file", lambda e: ["runs", "summary", e.store_file(b"")], "missing tables")
row("summary-store-is-a-dir", lambda e: ["runs", "summary", os.path.dirname(e.dir("sd/graddoctor.sqlite"))],
    "graddoctor.sqlite")

# ---------------------------------------------------------------- stores corrupted in one part
CORRUPT = [
    # meta
    ("meta-bad-json", "UPDATE meta SET value='{bad' WHERE key='modules'", "'modules'", "not valid JSON"),
    ("meta-schema-version-bad-json", "UPDATE meta SET value='{x' WHERE key='schema_version'", "schema version",
     "{x"),
    ("meta-schema-version-2", "UPDATE meta SET value='2' WHERE key='schema_version'", "schema version 2"),
    ("meta-modules-a-list", "UPDATE meta SET value='[1, 2]' WHERE key='modules'", "'modules'", "[1, 2]",
     "JSON object"),
    ("meta-act-fields-a-number", "UPDATE meta SET value='5' WHERE key='act_fields'", "'act_fields'", "5",
     "JSON list"),
    ("meta-closed-at-huge", "UPDATE meta SET value='1e20' WHERE key='closed_at'", "'closed_at'", "1e+20"),
    ("meta-closed-at-text", "UPDATE meta SET value='\"soon\"' WHERE key='closed_at'", "'closed_at'", "soon"),
    ("meta-created-nan", "UPDATE meta SET value='\"NaN\"' WHERE key='created'", "'created'", "nan"),
    ("meta-no-schema-version", "DELETE FROM meta WHERE key='schema_version'", "schema_version"),
    ("meta-wrong-columns", rename_table("meta", "key"), "'meta'", "['key']"),
    ("meta-table-gone", "DROP TABLE meta", "missing tables ['meta']"),
    # tensors
    ("tensors-last-row-missing", "DELETE FROM tensors WHERE idx=3", "'grad_norm'", "width 4", "3 tensors"),
    ("tensors-middle-row-missing", "DELETE FROM tensors WHERE idx=1", "tensors table", "[0, 2, 3]"),
    ("tensors-all-rows-missing", "DELETE FROM tensors", "'grad_norm'", "width 4", "0 tensors"),
    ("tensors-shape-bad-json", "UPDATE tensors SET shape='{{' WHERE idx=0", "'0.weight'", "shape", "{{"),
    ("tensors-shape-not-a-list", "UPDATE tensors SET shape='7' WHERE idx=0", "'0.weight'", "shape", "7"),
    ("tensors-numel-text", "UPDATE tensors SET numel='many' WHERE idx=2", "'2.weight'", "numel", "'many'"),
    ("tensors-duplicate-name", "UPDATE tensors SET name='0.weight' WHERE idx=2", "'0.weight'", "twice"),
    ("tensors-wrong-columns", rename_table("tensors", "idx, name"), "'tensors'", "['idx', 'name']"),
    # activation modules
    ("act-rows-missing", "DELETE FROM act_modules", "'act'", "width 6", "0 activation modules"),
    ("act-kind-a-blob", "UPDATE act_modules SET kind=x'00ff'", "activation module", "kind", "expected text"),
    ("act-wrong-columns", rename_table("act_modules", "idx, name, kind"), "'act_modules'", "['idx', 'name', 'kind']"),
    # chunks
    ("chunk-width-3", "UPDATE chunks SET width=3 WHERE series='grad_norm'", "'grad_norm'", "width 3", "expected 4"),
    ("chunk-width-0", "UPDATE chunks SET width=0 WHERE series='loss'", "'loss'", "width 0"),
    ("chunk-width-negative", "UPDATE chunks SET width=-1 WHERE series='loss'", "'loss'", "width -1"),
    ("chunk-width-text", "UPDATE chunks SET width='wide' WHERE series='loss'", "'loss'", "'wide'"),
    ("chunk-blob-cut-short", "UPDATE chunks SET data=substr(data, 1, 5) WHERE series='loss'", "'loss'",
     "cannot be decoded"),
    ("chunk-blob-text", "UPDATE chunks SET data='abc' WHERE series='loss'", "'loss'", "cannot be decoded"),
    ("chunk-steps-cut", "UPDATE chunks SET steps=x'00' WHERE series='loss'", "'loss'", "cannot be decoded"),
    ("chunk-more-rows-than-steps", "UPDATE chunks SET data=zeroblob(48) WHERE series='loss'", "'loss'",
     "steps but"),
    ("chunk-dtype-unknown", "UPDATE chunks SET dtype='xx' WHERE series='loss'", "'loss'", "'xx'"),
    ("chunk-dtype-text", "UPDATE chunks SET dtype='<U2' WHERE series='loss'", "'loss'", "'<U2'"),
    ("chunk-dtype-object", "UPDATE chunks SET dtype='O' WHERE series='loss'", "'loss'", "'O'"),
    ("chunk-dtype-bytes", "UPDATE chunks SET dtype='|S8' WHERE series='loss'", "'loss'", "'|S8'"),
    ("chunk-codec-unknown", "UPDATE chunks SET codec='lz4' WHERE series='loss'", "'loss'", "'lz4'"),
    ("chunk-codec-wrong", "UPDATE chunks SET codec='zlib' WHERE series='loss'", "'loss'", "cannot be decoded"),
    ("chunk-flush-missing", "DELETE FROM chunks WHERE series='grad_norm' AND first_step=2", "'grad_norm'",
     "flushes are missing"),
    ("chunk-widths-differ", "UPDATE chunks SET width=2, dtype='<f4' WHERE series='grad_norm' AND first_step=2",
     "'grad_norm'", "different widths"),
    ("chunks-wrong-columns", rename_table("chunks", "series, first_step, last_step, steps"), "'chunks'",
     "['series', 'first_step', 'last_step', 'steps']"),
    # events
    ("event-bad-json", "INSERT INTO events(step, kind, data) VALUES (1, 'guard', '{bad')", "event", "'{bad'",
     "not valid JSON"),
    ("event-data-a-list", "INSERT INTO events(step, kind, data) VALUES (1, 'guard', '[1]')", "event", "[1]",
     "JSON object"),
    ("event-finding-a-list", "INSERT INTO events(step, kind, data) VALUES (1, 'finding', '[1]')", "event", "[1]",
     "JSON object"),
    ("event-skip-a-number", "INSERT INTO events(step, kind, data) VALUES (1, 'skipped_step', '7')", "event", "7",
     "JSON object"),
    ("event-finding-code-a-list", "INSERT INTO events(step, kind, data) VALUES (1, 'finding', '{\"code\": [1]}')",
     "event", "code [1]", "expected text"),
    ("event-skip-bad-a-number", "INSERT INTO events(step, kind, data) VALUES (1, 'skipped_step', '{\"bad\": 5}')",
     "event", "bad 5", "list of tensor names"),
    ("event-step-text", "INSERT INTO events(step, kind, data) VALUES ('later', 'guard', '{}')", "event", "'later'",
     "integer"),
    ("events-wrong-columns", rename_table("events", "id, step"), "'events'", "['id', 'step']"),
]
# Each corruption is read by the command that is most likely to trip over it, and a few by all three.
READERS = {"runs summary": lambda d: ["runs", "summary", d], "diagnose": lambda d: ["diagnose", d],
           "report": lambda d: ["report", d]}
EVERYWHERE = {"meta-bad-json", "tensors-last-row-missing", "chunk-blob-cut-short", "event-bad-json", "act-rows-missing",
              "meta-modules-a-list", "event-data-a-list"}
ONLY = {"event-finding-a-list": ["runs summary"], "event-finding-code-a-list": ["runs summary"],
        "event-skip-bad-a-number": ["runs summary", "diagnose"]}  # findings recorded while training: only the summary reads them
for i, (name, sql, *names) in enumerate(CORRUPT):
    readers = list(READERS) if name in EVERYWHERE else ONLY.get(name, [list(READERS)[i % 3]])
    for reader in readers:
        row(f"{reader.split()[-1]}-{name}", lambda e, sql=sql, reader=reader: READERS[reader](e.corrupt(sql)), *names)
row("summary-store-cut-in-half", lambda e: ["runs", "summary", e.cut_store()], "cut")
row("diagnose-store-cut-in-half", lambda e: ["diagnose", e.cut_store()], "cut")

# ---------------------------------------------------------------- diagnose --set: thresholds out of range
SETS = [
    ("large_update_ratio=0", "number > 0"), ("stall_grad_ratio=0", "(0, 1]"), ("explode_grad_ratio=0", "> 0"),
    ("stall_update_ratio=0", "(0, 1]"), ("baseline_window=10000000000", "an integer from 2 to 10000"),
    ("baseline_window=1", "from 2"), ("baseline_window=50.5", "an integer"), ("spike_z=nan", "spike_z=nan"),
    ("spike_z=inf", "spike_z=inf"), ("spike_z=-inf", "spike_z=-inf"), ("spike_z=-1", "> 0"),
    ("explode_z=1e400", "explode_z=inf"), ("min_fraction=0", "(0, 1]"), ("min_fraction=1.5", "(0, 1]"),
    ("dead_fraction=2", "(0, 1]"), ("trend_p=1", "(0, 1)"), ("trend_p=0", "(0, 1)"), ("spike_factor=0.5", ">= 1"),
    ("baseline_min=0", "from 1"), ("baseline_min=80", "baseline_window (50)"), ("explode_min_steps=0", "from 1"),
    ("min_depth=1", "from 2"), ("trend_max_points=2", "from 4"), ("zero_init_rms=-1", ">= 0"),
    ("init_max_step=-1", "from 0"), ("amp_min_scale=-1", ">= 0"), ("vanish_depth_orders=1000", "(0, 100]"),
    ("explode_over_start_orders=-1", "[0, 100]"), ("spike_min_history=100000", "from 1 to 10000"),
    ("amp_overflow_fraction=2", "(0, 1]"), ("trend_min_steps=0", "from 1"),
]
for item, allowed in SETS:
    row(f"diagnose-set-{item}", lambda e, item=item: ["diagnose", e.run, "--set", item], item.split("=")[0], allowed)
row("diagnose-set-no-equals", lambda e: ["diagnose", e.run, "--set", "spike_z"], "'spike_z'", "NAME=NUMBER")
row("diagnose-set-not-a-number", lambda e: ["diagnose", e.run, "--set", "spike_z=high"], "'spike_z=high'",
    "NAME=NUMBER")
row("diagnose-set-empty-value", lambda e: ["diagnose", e.run, "--set", "spike_z="], "'spike_z='", "NAME=NUMBER")
row("diagnose-set-unknown-name", lambda e: ["diagnose", e.run, "--set", "no_such=1"], "'no_such'", "allowed")
row("diagnose-set-true", lambda e: ["diagnose", e.run, "--set", "min_depth=true"], "'min_depth=true'", "NAME=NUMBER")
row("diagnose-fail-on-bogus", lambda e: ["diagnose", e.run, "--fail-on", "error"], "'error'", "'warning', 'critical'")
row("diagnose-json-with-value", lambda e: ["diagnose", e.run, "--json=yes"], "--json", "'yes'")
row("diagnose-no-run-dir", lambda e: ["diagnose"], "RUN_DIR")

# ---------------------------------------------------------------- report -o: places that cannot be written
row("report-to-dev-full", lambda e: ["report", e.run, "-o", "/dev/full"], "'/dev/full'", "No space left on device")
row("report-to-read-only-place", lambda e: ["report", e.run, "-o", "/sys/report.html"],
    "cannot write the report to '/sys/report.html'")
row("report-into-proc", lambda e: ["report", e.run, "-o", "/proc/nowhere/report.html"], "'/proc/nowhere",
    "No such file or directory")
row("report-folder-is-a-file", lambda e: ["report", e.run, "-o", e.file + "/report.html"], "afile",
    "is not a directory")
row("report-folder-under-a-file", lambda e: ["report", e.run, "-o", e.file + "/sub/report.html"], "afile",
    "Not a directory")
row("report-to-a-directory", lambda e: ["report", e.run, "-o", str(e.tmp)], "is a directory")
row("report-to-empty-name", lambda e: ["report", e.run, "-o", ""], "''", "file name")
row("report-o-long-name", lambda e: ["report", e.run, "-o", str(e.tmp / (LONG_NAME + ".html"))], "xxxx",
    "File name too long")
row("report-over-the-run-store", lambda e: ["report", e.run, "-o", e.run + "/graddoctor.sqlite"], "graddoctor.sqlite",
    "is the run store of")
row("report-second-run-missing", lambda e: ["report", e.run, str(e.tmp / "gone"), "-o", str(e.tmp / "r.html")],
    "gone", "does not exist")
row("report-no-run-dir", lambda e: ["report"], "RUN_DIR")
row("report-o-without-value", lambda e: ["report", e.run, "-o"], "-o", "expected one argument")

# ---------------------------------------------------------------- demo: refused before it trains
row("demo-out-is-a-file", lambda e: ["demo", "--out", e.file], "afile", "not a directory")
row("demo-out-under-a-file", lambda e: ["demo", "--out", e.file + "/runs"], "afile", "Not a directory")
row("demo-out-read-only", lambda e: ["demo", "--out", "/sys/graddoctor-demo"], "'/sys/graddoctor-demo'",
    "cannot be created")
row("demo-out-long-name", lambda e: ["demo", "--out", str(e.tmp / LONG_NAME)], "xxxx", "File name too long")
row("demo-out-empty", lambda e: ["demo", "--out", ""], "--out", "''")
row("demo-seed-2**70", lambda e: ["demo", "--seed", str(2 ** 70), "--out", str(e.tmp)], str(2 ** 70),
    "from 0 to 4294967295")
row("demo-seed-negative", lambda e: ["demo", "--seed", "-1", "--out", str(e.tmp)], "'-1'", "from 0 to 4294967295")
row("demo-seed-text", lambda e: ["demo", "--seed", "abc", "--out", str(e.tmp)], "'abc'", "an integer")
row("demo-steps-0", lambda e: ["demo", "--steps", "0", "--out", str(e.tmp)], "--steps", "'0'", "from 1")
row("demo-steps-huge", lambda e: ["demo", "--steps", "10000000000", "--out", str(e.tmp)], "--steps", "10000000000")
row("demo-steps-float", lambda e: ["demo", "--steps", "2.5", "--out", str(e.tmp)], "--steps", "'2.5'")
row("demo-depth-1", lambda e: ["demo", "--depth", "1", "--out", str(e.tmp)], "--depth", "'1'", "from 2")
row("demo-depth-huge", lambda e: ["demo", "--depth", "1000000000", "--out", str(e.tmp)], "--depth", "1000000000")
row("demo-unknown-option", lambda e: ["demo", "--width", "3"], "--width")

# ---------------------------------------------------------------- lab: refused before it trains
row("lab-out-is-a-file", lambda e: ["lab", "--out", e.file, "--no-progress"], "afile", "not a directory")
row("lab-out-under-a-file", lambda e: ["lab", "--out", e.file + "/lab", "--no-progress"], "afile", "Not a directory")
row("lab-out-read-only", lambda e: ["lab", "--out", "/sys/graddoctor-lab", "--no-progress"], "'/sys/graddoctor-lab'",
    "cannot be created")
row("lab-out-long-name", lambda e: ["lab", "--out", str(e.tmp / LONG_NAME), "--no-progress"], "xxxx",
    "File name too long")
row("lab-seed-2**70", lambda e: ["lab", "--seed", str(2 ** 70), "--out", str(e.tmp)], str(2 ** 70),
    "from 0 to 4294967295")
row("lab-seed-negative", lambda e: ["lab", "--seed", "-3", "--out", str(e.tmp)], "'-3'", "from 0")
row("lab-seed-text", lambda e: ["lab", "--seed", "x", "--out", str(e.tmp)], "'x'", "an integer")
row("lab-preset-unknown", lambda e: ["lab", "--preset", "huge"], "'huge'", "'quick', 'default', 'full'")
row("lab-only-unknown", lambda e: ["lab", "--only", "no_such_experiment", "--out", str(e.tmp)], "no_such_experiment",
    "choose from")
row("lab-only-empty", lambda e: ["lab", "--only"], "--only", "expected at least one argument")

# ---------------------------------------------------------------- serve: refused before it listens
row("serve-port-negative", lambda e: ["serve", e.run, "--port", "-5"], "port=-5", "65535")
row("serve-port-too-big", lambda e: ["serve", e.run, "--port", "70000"], "port=70000", "65535")
row("serve-port-text", lambda e: ["serve", e.run, "--port", "http"], "'http'", "int")
row("serve-refresh-0", lambda e: ["serve", e.run, "--port", "0", "--refresh", "0"], "refresh=0", "seconds")
row("serve-refresh-0.1", lambda e: ["serve", e.run, "--port", "0", "--refresh", "0.1"], "refresh=0.1", "seconds")
row("serve-refresh-nan", lambda e: ["serve", e.run, "--port", "0", "--refresh", "nan"], "refresh=nan")
row("serve-busy-2", lambda e: ["serve", e.run, "--port", "0", "--busy", "2"], "busy=2", "<= 1")
row("serve-busy-0", lambda e: ["serve", e.run, "--port", "0", "--busy", "0"], "busy=0")
row("serve-run-dir-is-a-file", lambda e: ["serve", e.file, "--port", "0"], "afile", "is a file")
row("serve-bad-token", lambda e: ["serve", e.run, "--port", "0", "--token", "a b"], "token='a b'", "letters")
row("serve-keyfile-without-certfile", lambda e: ["serve", e.run, "--port", "0", "--keyfile", e.file], "keyfile",
    "without certfile")
row("serve-certfile-missing", lambda e: ["serve", e.run, "--port", "0", "--certfile", str(e.tmp / "c.pem")],
    "c.pem", "not a file")
row("serve-certfile-not-pem", lambda e: ["serve", e.run, "--port", "0", "--certfile", e.file], "afile", "PEM")
row("serve-no-run-dir", lambda e: ["serve"], "RUN_DIR")
row("serve-token-and-no-token", lambda e: ["serve", e.run, "--token", "t", "--no-token"], "--no-token",
    "not allowed with")


@pytest.fixture(autouse=True)
def nothing_trains_or_listens(monkeypatch):
    """A row that gets past the checks fails here instead of training for minutes or serving forever."""
    import graddoctor.lab._demo
    import graddoctor.lab._runner
    import graddoctor.serve

    def started(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"bad input was not refused: {what} started")
        return fail
    monkeypatch.setattr(graddoctor.lab._demo, "run_demo", started("demo training"))
    monkeypatch.setattr(graddoctor.lab._runner, "Context", started("lab training"))
    monkeypatch.setattr(graddoctor.serve._server._DashboardHTTPServer, "serve_forever", started("the server"))


def run_main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse exits
        return e.code


def assert_one_line_error(code, out: str, err: str, names=()) -> str:
    assert "Traceback" not in out + err, err
    assert code == 2, (code, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graddoctor: error: "), err
    assert out == "", out
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def test_the_probe_has_over_100_bad_inputs_for_every_command():
    assert len(CASES) >= 100
    commands = {p.id.split("-")[0] for p in CASES}
    assert {"summary", "demo", "lab", "report", "diagnose", "serve"} <= commands


@pytest.mark.parametrize("argv,names", CASES)
def test_bad_input_gives_one_line_and_exit_2(argv, names, base_run, tmp_path, capsys, request):
    if any(k in request.node.callspec.id for k in ("read-only", "proc", "dev-full")) and not sys.platform.startswith("linux"):
        pytest.skip("needs Linux's /dev/full, /proc and /sys")
    env = Env(base_run, tmp_path)
    code = run_main(argv(env))
    out, err = capsys.readouterr()
    assert_one_line_error(code, out, err, [n(env) if callable(n) else n for n in names])


def test_interrupt_is_one_line_and_exit_130(base_run, monkeypatch, capsys):
    import graddoctor.report._summary

    def interrupted(run):
        raise KeyboardInterrupt
    monkeypatch.setattr(graddoctor.report._summary, "format_summary", interrupted)
    assert main(["runs", "summary", str(base_run)]) == 130
    out, err = capsys.readouterr()
    assert out == "" and err == "graddoctor: interrupted\n"


def test_a_non_utf8_run_directory_is_read_and_printed(base_run, tmp_path, capsys):
    """A run in a directory whose name is not UTF-8 is read; its name is printed with backslash escapes."""
    run = tmp_path / NON_UTF8
    shutil.copytree(base_run, run)
    assert main(["runs", "summary", str(run)]) == 0
    assert "bad\\udcff\\udcfename" in capsys.readouterr().out
    assert main(["report", str(run), "-o", str(tmp_path / "r.html")]) == 0
    assert "bad\\udcff\\udcfename" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_every_diagnose_threshold_has_a_range_that_holds_its_default():
    names = [f.name for f in fields(DiagnoseConfig)]
    assert sorted(RANGES) == sorted(names)
    DiagnoseConfig().validate()
    for name in names:
        for bad in (math.nan, math.inf, -math.inf, True, "1", None, 10 ** 400):
            with pytest.raises(ConfigError, match=f"DiagnoseConfig.{name}=.* is not allowed: use an? "):
                DiagnoseConfig(**{name: bad}).validate()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="writes to Linux's /dev/full")
def test_console_script_end_to_end(base_run, tmp_path):
    """A few rows through the installed `graddoctor`, as a user's shell runs them (in parallel: each imports torch)."""
    broken = Env(base_run, tmp_path).corrupt("UPDATE meta SET value='{bad' WHERE key='modules'")
    lines = {
        "diagnose-zero-ratio": ([GRADDOCTOR, "diagnose", str(base_run), "--set", "large_update_ratio=0"],
                                ["large_update_ratio=0", "> 0"]),
        "report-dev-full": ([GRADDOCTOR, "report", str(base_run), "-o", "/dev/full"], ["No space left on device"]),
        "summary-corrupt-meta": ([GRADDOCTOR, "runs", "summary", broken], ["'modules'", "not valid JSON"]),
        "demo-huge-seed": ([GRADDOCTOR, "demo", "--seed", str(2 ** 70), "--out", str(tmp_path / "d")],
                           [str(2 ** 70), "4294967295"]),
        "summary-non-utf8": ([GRADDOCTOR.encode(), b"runs", b"summary", os.fsencode(tmp_path) + b"/bad\xff"],
                             ["bad\\udcff", "does not exist"]),
    }
    procs = {k: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for k, (cmd, _) in lines.items()}
    try:
        for k, p in procs.items():
            out, err = p.communicate(timeout=120)
            assert_one_line_error(p.returncode, out.decode(), err.decode("utf-8", "backslashreplace"), lines[k][1])
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not (tmp_path / "d").exists()
