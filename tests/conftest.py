import os

import pytest
import torch

# The suite's models are tiny: one intra-op thread is faster for them than two on a
# 2-core box (no OpenMP spinning against the other test process), and deterministic.
torch.set_num_threads(1)


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    return 0


@pytest.fixture
def native():
    """graddoctor's native kernel, turned on; skipped where it cannot be built (a failure in CI)."""
    from graddoctor.core import _native
    previous = _native.set_enabled(True)
    if _native.sumsq_maxabs([torch.ones(1)]) is None:
        _native.set_enabled(previous)
        if os.environ.get("CI"):
            pytest.fail(f"the native kernel must build in CI: {_native.status()}")
        pytest.skip(_native.status())
    yield _native
    _native.set_enabled(previous)


@pytest.fixture(params=["native", "torch"])
def stats_path(request):
    """Run a test once with graddoctor's native statistics kernel and once with the PyTorch ops."""
    from graddoctor.core import _native
    if request.param == "native":
        request.getfixturevalue("native")  # on for this test, restored after it
        yield request.param
        return
    previous = _native.set_enabled(False)
    yield request.param
    _native.set_enabled(previous)


# ---------------------------------------------------------------- runs shared by the session
# Expensive runs several modules read are made once, here, under pytest's tmp dir (never in the
# repository), and reached through these fixtures: a test module never imports another.

def pytest_collection_modifyitems(config, items):
    """The tests that read the quick lab run go last, in their order: the run trains in the background
    while the others run (see below), so no test waits for it unless little else was selected."""
    import _lab
    lab = [item for item in items if _lab.reads_the_quick_lab(item)]
    if lab:
        items[:] = [item for item in items if not _lab.reads_the_quick_lab(item)] + lab


@pytest.fixture(scope="session", autouse=True)
def _helpers_use_the_session_tmp_dir(tmp_path_factory, request):
    """Tells tests/_lab.py where the session's tmp dir is, and starts the quick lab run in the background
    when a selected test reads it (`pytest -m "not slow"` selects none, and nothing starts)."""
    import _lab
    _lab.set_tmp_path_factory(tmp_path_factory)
    if any(_lab.reads_the_quick_lab(item) for item in request.session.items):
        _lab.start_quick_lab()
    yield
    _lab.stop_quick_lab()


@pytest.fixture(scope="session")
def artifacts():
    """A folder for screenshots and other files a test leaves for a person to look at."""
    import _lab
    return _lab.artifacts_dir()


@pytest.fixture(scope="session")
def quick_lab_run():
    """`graddoctor lab --preset quick --seed 0`, run once per session in a subprocess: (out dir, CompletedProcess).
    Started in the background at the session's start; this waits for it to end."""
    import _lab
    return _lab.quick_lab()


@pytest.fixture(scope="session")
def quick_lab_results(quick_lab_run) -> dict:
    """name -> result dict from the quick lab run's results.json."""
    from graddoctor.store import _nonfinite_json
    out, proc = quick_lab_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = _nonfinite_json.loads((out / "results.json").read_text())
    return {r["name"]: r for r in data["results"]}


class LabelledRuns:
    """The scenarios of tests/_diag_runs.py, each trained on first use and then kept for the session.

    `runs[name]` is (run_dir, findings reported live while training, FindingWarnings raised). Every
    scenario trains with watch's defaults (live diagnosis on), as test_diagnose_runs judges them."""

    def __init__(self, root):
        self.root, self._done = root, {}

    def __getitem__(self, name: str):
        if name not in self._done:
            import warnings

            from _diag_runs import by_name, train
            from graddoctor.diagnosis._live import FindingWarning
            live = []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run_dir = train(by_name(name), self.root / name, on_finding=live.append)
            self._done[name] = (run_dir, live, [w for w in caught if issubclass(w.category, FindingWarning)])
        return self._done[name]


@pytest.fixture(scope="session")
def labelled_runs(tmp_path_factory) -> LabelledRuns:
    return LabelledRuns(tmp_path_factory.mktemp("labelled_runs"))
