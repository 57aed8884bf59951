"""The views of a model with ~150 tensors (`graddoctor report`, `graddoctor serve`): one labelled row per block.

The run is a nanoGPT-style GPT written here (12 blocks, 149 tensors), trained for a few real steps and
recorded by watch. Oracles: the block names written out by hand (not from `block_of`), and each block's
gradient norm computed in float64 from the per-tensor norms read back from the store (`gd.open_run`).
The plots are checked on their matplotlib axes (every row's label drawn, none overlapping another) and in
Debian's headless Chromium (the dashboard page).
"""
from __future__ import annotations

import json
import sqlite3
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from _browser import ARGS, CHROMIUM, needs_chromium
from torch import nn
from torch.nn import functional as F

import graddoctor as gd
from graddoctor.report import write_run_report
from graddoctor.report._rows import PER_LAYER_BELOW, act_rows, grad_rows, short_labels
from graddoctor.report._summary import format_summary
from graddoctor.report._views import activation_plot, chosen_steps, heatmap_plot, profile_plot, run_figures
from graddoctor.store._nonfinite_json import decode_nonfinite

N_LAYER, VOCAB, T = 12, 64, 16
BLOCKS = (["transformer.wte", "transformer.wpe"] + [f"transformer.h.{i}" for i in range(N_LAYER)]
          + ["transformer.ln_f", "lm_head"])


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.c_attn, self.c_proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        B, T_, C = x.shape
        q, k, v = (t.view(B, T_, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T_, C))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc, self.gelu, self.c_proj = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(d), Attention(d, heads), nn.LayerNorm(d), MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(VOCAB, d), wpe=nn.Embedding(T, d),
            h=nn.ModuleList(Block(d, heads) for _ in range(N_LAYER)), ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.shape[1]))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    """A 12-block GPT trained 8 steps (AdamW), activations sampled every 2 steps."""
    run_dir = tmp_path_factory.mktemp("views") / "gpt"
    torch.manual_seed(0)
    model = GPT()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, run_dir, activation_every=2, flush_every=4) as w:
            for _ in range(8):
                idx = torch.randint(0, VOCAB, (4, T))
                loss = F.cross_entropy(model(idx).flatten(0, 1), torch.roll(idx, -1, 1).flatten())
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    return run_dir


def _block_norms_oracle(run_dir) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """(steps, [T, blocks] float64 norms, tensors per block) from the stored per-tensor norms."""
    with gd.open_run(run_dir) as run:
        members = [[t for t in run.tensors if t.startswith(b + ".")] for b in BLOCKS]
        hist = {t: run.tensor_history(t) for t in run.tensors}
    steps = hist[members[0][0]].steps
    norms = np.stack([np.sqrt(sum(hist[t].grad_norm.astype(np.float64) ** 2 for t in ts)) for ts in members], axis=1)
    return steps, norms, members


def _drawn_labels(fig, axis: str) -> list:
    """The tick labels of the figure's first axes on `axis`, after drawing, as (text, window extent)."""
    fig.canvas.draw()
    ax = fig.axes[0]
    ticks = ax.get_yticklabels() if axis == "y" else ax.get_xticklabels()
    renderer = fig.canvas.get_renderer()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in ticks if t.get_visible()]


def _assert_apart(extents: list, axis: str) -> None:
    """No two labels overlap along `axis` (each row or column keeps its own label)."""
    spans = sorted((e.y0, e.y1) if axis == "y" else (e.x0, e.x1) for e in extents)
    for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
        assert a1 <= b0 + 0.5, (a0, a1, b0, b1)


# ------------------------------------------------------------------------------------------ labels
def test_short_labels_keep_the_right_end_and_stay_distinct():
    assert short_labels(["transformer.h.3.attn.c_attn.weight"], 24) == ["…h.3.attn.c_attn.weight"]
    assert short_labels(["transformer.h.3"], 24) == ["transformer.h.3"]
    assert short_labels([""], 24) == ["(root)"]
    assert short_labels(["x" * 40], 10) == ["…" + "x" * 9]
    acts = [f"transformer.h.{i}.mlp.act" for i in range(12)]
    labels = short_labels(acts, 14)
    assert labels[3] == "…h.3.mlp.act" and len(set(labels)) == 12
    # At a width where every block's label would read "…mlp.act", they are given their block back.
    narrow = short_labels(acts, 9)
    assert len(set(narrow)) == 12 and all(f"{i}.mlp.act" in s for i, s in enumerate(narrow))
    for name, label in zip(acts, narrow):
        assert name.endswith(label.lstrip("…"))


# ---------------------------------------------------------------------------------------- the report
@pytest.mark.slow
def test_the_heat_map_has_one_labelled_row_per_block_with_its_float64_norm(gpt_run):
    steps, oracle, members = _block_norms_oracle(gpt_run)
    with gd.open_run(gpt_run) as run:
        assert len(run.tensors) == len(list(GPT().parameters())) >= PER_LAYER_BELOW  # every tensor watched
        rows = grad_rows(run)
    assert rows.by_block and rows.names == BLOCKS and rows.tensors == members
    assert rows.labels == BLOCKS  # they fit: printed whole
    np.testing.assert_array_equal(rows.steps, steps)
    np.testing.assert_allclose(rows.values, oracle, rtol=1e-12, atol=0)
    fig = heatmap_plot(rows)
    drawn = _drawn_labels(fig, "y")
    assert [text for text, _ in drawn] == BLOCKS  # every row labelled, in order, input side at the top
    _assert_apart([e for _, e in drawn], "y")
    image = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.ma.getdata(image), oracle.T, rtol=1e-12)  # the cells are the block norms


@pytest.mark.slow
def test_the_profiles_name_every_block_and_the_activations_their_block(gpt_run):
    steps, oracle, _ = _block_norms_oracle(gpt_run)
    with gd.open_run(gpt_run) as run:
        rows, acts = grad_rows(run), act_rows(run)
    fig = profile_plot(rows)
    drawn = _drawn_labels(fig, "x")
    assert [text for text, _ in drawn] == BLOCKS
    _assert_apart([e for _, e in drawn], "x")
    picked = chosen_steps(steps)
    lines = [ln for ln in fig.axes[0].lines if ln.get_label().startswith("step ")]
    assert [ln.get_label() for ln in lines] == [f"step {int(steps[i])}" for i in picked]
    for ln, i in zip(lines, picked):
        np.testing.assert_allclose(ln.get_ydata(), oracle[i], rtol=1e-12)
    assert acts is not None and acts.names == [f"transformer.h.{i}.mlp.gelu" for i in range(N_LAYER)]
    assert len(set(acts.labels)) == N_LAYER
    assert all(label.endswith(f"h.{i}.mlp.gelu") for i, label in enumerate(acts.labels)), acts.labels
    drawn = _drawn_labels(activation_plot(acts), "x")
    assert [text for text, _ in drawn] == acts.labels
    _assert_apart([e for _, e in drawn], "x")


@pytest.mark.slow
def test_the_report_page_names_the_blocks_in_order(gpt_run, tmp_path):
    html = write_run_report([gpt_run], tmp_path / "gpt.html").read_text()
    assert html.count("<figure class=\"plot\">") == 4
    assert "Rows, input side first: " + ", ".join(BLOCKS) + "." in html
    assert "per-block gradient norm" in html


def _small_run(run_dir, **watch_kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, run_dir, flush_every=4, **watch_kw) as w:
            for _ in range(6):
                loss = F.cross_entropy(model(torch.randn(16, 6)), torch.randint(0, 2, (16,)))
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()


def test_a_small_model_keeps_one_row_per_layer(tmp_path):
    _small_run(tmp_path / "mlp", activation_every=2)
    with gd.open_run(tmp_path / "mlp") as run:
        assert len(run.tensors) == 6 < PER_LAYER_BELOW
        rows = grad_rows(run)
        layers = [run.layer_history(n).grad_norm for n in run.layers]
        assert not rows.by_block and rows.names == run.layers == ["0", "2", "4"]
    np.testing.assert_allclose(rows.values, np.stack(layers, axis=1), rtol=1e-12)
    assert [t for t, _ in _drawn_labels(heatmap_plot(rows), "y")] == ["0", "2", "4"]


# ------------------------------------------------------------------------------------ runs summary
def test_the_summary_says_why_activation_statistics_are_off(tmp_path):
    _small_run(tmp_path / "off", activation_every=0)
    _small_run(tmp_path / "on", activation_every=2)
    with gd.open_run(tmp_path / "off") as run:
        assert "activation statistics: off (activation_every=0)" in format_summary(run)
    with gd.open_run(tmp_path / "on") as run:
        assert "activation statistics: on, sampled every 2 steps" in format_summary(run)
    torch.manual_seed(0)  # no activation module at all: watch's own reason
    linear = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(linear, None, tmp_path / "linear") as w:
            linear(torch.randn(8, 4)).pow(2).mean().backward()
            w.step()
    with gd.open_run(tmp_path / "linear") as run:
        reason = run.meta["activations_off"]
        assert reason.startswith("no activation modules found in Sequential")
        assert f"activation statistics: off ({reason})" in format_summary(run)
    con = sqlite3.connect(tmp_path / "off" / "graddoctor.sqlite")  # a store written before watch said why
    with con:
        con.execute("DELETE FROM meta WHERE key='activations_off'")
    con.close()
    with gd.open_run(tmp_path / "off") as run:
        assert "activation statistics" not in format_summary(run)


@pytest.mark.slow
def test_the_structure_event_is_no_intervention_in_the_report_or_the_summary(gpt_run):
    with gd.open_run(gpt_run) as run:
        assert run.events("structure"), "premise: watch recorded the GPT's residual blocks"
        assert "interventions: none" in format_summary(run)
    (loss_plot,) = [f for f in run_figures(gpt_run) if f.title.startswith("loss")]
    assert "0 step(s) where a recorded intervention acted (none)" in loss_plot.caption


# ------------------------------------------------------------------------------------------- serve
def _views_json(url: str) -> dict:
    with urllib.request.urlopen(url + "views", timeout=60) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json"
        text = r.read().decode()

    def refuse(name):  # standard JSON only: NaN must arrive spelled
        raise AssertionError(f"non-standard JSON constant {name}")
    return decode_nonfinite(json.loads(text, parse_constant=refuse))


@pytest.mark.slow
def test_the_dashboard_json_has_the_block_rows_and_their_norms(gpt_run, tmp_path):
    steps, oracle, members = _block_norms_oracle(gpt_run)
    _small_run(tmp_path / "mlp", activation_every=0)
    with gd.serve.start([gpt_run, tmp_path / "mlp", tmp_path / "later"], port=0) as dash:
        gpt, mlp, later = _views_json(dash.url)["runs"]
    assert gpt["state"] == "closed" and gpt["rows"] == "block"
    assert gpt["names"] == gpt["labels"] == BLOCKS and gpt["tensors"] == members
    picked = chosen_steps(steps)
    assert [p["step"] for p in gpt["profiles"]] == [int(steps[i]) for i in picked]
    for p, i in zip(gpt["profiles"], picked):
        np.testing.assert_allclose(p["grad_norm"], oracle[i], rtol=1e-12)
    acts = gpt["activations"]
    assert len(set(acts["labels"])) == N_LAYER and acts["names"] == [f"transformer.h.{i}.mlp.gelu" for i in range(12)]
    assert all(f"h.{i}.mlp" in label for i, label in enumerate(acts["labels"]))
    assert gpt["activations_off"] is None
    assert mlp["rows"] == "layer" and mlp["names"] == ["0", "2", "4"] and mlp["activations"] is None
    assert mlp["activations_off"] == "activation_every=0"
    assert later == {"run": str(tmp_path / "later"), "state": "waiting", "error": None}


@pytest.mark.slow
@needs_chromium
def test_the_dashboard_renders_the_block_rows_with_labels_in_chromium(gpt_run, artifacts):
    from playwright.sync_api import sync_playwright
    errors = []
    with gd.serve.start([gpt_run], port=0) as dash, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(dash.url, wait_until="load")
        heat = page.evaluate("""() => [...document.querySelectorAll('figure.plot')].map(f => {
            const img = f.querySelector('img');
            return {caption: f.querySelector('figcaption').innerText, complete: img.complete,
                    nh: img.naturalHeight, nw: img.naturalWidth, h: img.getBoundingClientRect().height};
        }).filter(f => f.caption.startsWith('gradient flow'))""")
        page.screenshot(path=str(artifacts / "serve-blocks.png"), full_page=True)
        browser.close()
    assert errors == []
    (fig,) = heat
    assert fig["caption"].endswith("Rows, input side first: " + ", ".join(BLOCKS) + ".")
    # The image is drawn at its own size, tall enough for one 8 pt label per row (0.16 in at 90 dpi each).
    assert fig["complete"] and fig["nh"] >= len(BLOCKS) * 0.16 * 90 and fig["h"] >= 0.95 * fig["nh"], fig


@pytest.mark.slow
def test_an_hf_gpt2_gets_block_rows_and_block_named_activations(tmp_path, monkeypatch):
    """HF GPT-2 built from a config (no download): its ~150 tensors in 15 block rows; NewGELU as `h.N.mlp.act`."""
    for name, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, opt, tmp_path / "gpt2", activation_every=2, flush_every=4) as w:
            for _ in range(4):
                idx = torch.randint(0, 64, (4, 16))
                loss = model(idx, labels=idx).loss
                opt.zero_grad()
                loss.backward()
                w.step(loss)
                opt.step()
    blocks = BLOCKS[:-1]  # the head is tied to wte: named_parameters() lists it once, as wte
    with gd.open_run(tmp_path / "gpt2") as run:
        assert len(run.tensors) == len(list(model.parameters()))  # every tensor watched, the tied head once
        rows, acts = grad_rows(run), act_rows(run)
        hist = {t: run.tensor_history(t).grad_norm.astype(np.float64) for t in run.tensors}
    assert rows.by_block and rows.names == blocks
    oracle = np.stack([np.sqrt(sum(hist[t] ** 2 for t in hist if t.startswith(b + "."))) for b in blocks], axis=1)
    np.testing.assert_allclose(rows.values, oracle, rtol=1e-12, atol=0)
    assert acts is not None and acts.names == [f"transformer.h.{i}.mlp.act" for i in range(N_LAYER)]
    assert acts.labels == [f"…h.{i}.mlp.act" for i in range(N_LAYER)]


def test_beyond_64_activation_modules_the_panel_shows_each_block_s_largest_fraction(tmp_path):
    """70 ReLUs (a deep MLP): 35 bars, each the largest fraction exactly 0 of two neighbouring modules."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(70) for m in (nn.Linear(4, 4), nn.ReLU())], nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gd.watch(model, None, tmp_path / "deep", activation_every=1) as w:
            for _ in range(2):
                model.zero_grad()
                model(torch.randn(32, 4)).pow(2).mean().backward()
                w.step()
    with gd.open_run(tmp_path / "deep") as run:
        acts = act_rows(run)
        steps, stats = run.activations()
        mods = run.activation_modules
    assert mods == [str(2 * i + 1) for i in range(70)]
    assert acts is not None and acts.grouped and acts.names == [f"{4 * k + 1}..{4 * k + 3}" for k in range(35)]
    zero = stats[:, :, 3]  # frac_zero: the ReLU family's statistic
    for k in range(35):
        np.testing.assert_array_equal(acts.values[:, k], np.maximum(zero[[0, -1], 2 * k], zero[[0, -1], 2 * k + 1]))
    assert len(set(acts.labels)) == 35
    drawn = _drawn_labels(activation_plot(acts), "x")
    assert [text for text, _ in drawn] == acts.labels
    _assert_apart([e for _, e in drawn], "x")
