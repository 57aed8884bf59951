"""Transformers: post-LN against pre-LN against post-LN with warmup; attention logit growth and QK-norm.

- Xiong et al. 2020: a deep post-LN `nn.TransformerEncoder` (the norm after each residual add) trained with
  Adam at a large learning rate from step 0 stalls; learning-rate warmup (`graddoctor.treat.lr_warmup`) or
  moving the norm before the sublayer (pre-LN, `norm_first=True`) lets the same model train.
- Wortsman et al. 2023 / Dehghani et al. 2023: at a high learning rate the attention logits q.k/sqrt(d) of
  a GPT grow without bound (the attention collapses to one token, and the loss suffers); LayerNorm on q and
  k per head (QK-norm) keeps them bounded.

Both train causal language models on a Markov chain (`_transformer_models`), whose entropy rate is the
best loss reachable: a model that learns only token frequencies stays near the unigram entropy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..report import _plots as P
from ..report._views import heatmap_figure
from ..store._run import open_run
from ._train import losses, seed_all, tail_mean, train
from ._transformer_models import GPT, EncoderLM, chain, entropy_rate, lm_loss, sample, unigram_entropy
from ._types import Context, Figure, experiment, result

NAME = "transformer"
# Post-LN vs pre-LN: 12 layers, d_model 32, Adam betas (0.9, 0.98) as in the paper, batch 16 x 16 tokens.
LAYERS, D_MODEL, LN_LR, WARMUP_FRAC = 12, 32, 7e-3, 0.3
# Logit growth: a 2-layer GPT at Adam lr 0.05 (nanoGPT-sized models train at ~1e-3).
QK_LAYERS, QK_LR = 2, 5e-2
KINDS = ("post_ln", "pre_ln", "post_ln_warmup")
LABELS = {"post_ln": "post-LN", "pre_ln": "pre-LN", "post_ln_warmup": "post-LN + warmup"}


def _seeds(preset: str, part: str) -> int:
    return {"ln": {"quick": 1, "default": 3, "full": 5}, "qk": {"quick": 1, "default": 2, "full": 5}}[part][preset]


def _runs(preset: str) -> int:
    return 3 * _seeds(preset, "ln") + 2 * _seeds(preset, "qk")


def _adam(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), fused=True)  # fused: 1 kernel per step


def _ln_run(ctx: Context, kind: str, seed: int, steps: int) -> Path:
    """One post-LN / pre-LN / post-LN-with-warmup run; returns its run directory."""
    gen, p = seed_all(seed), chain()
    model = EncoderLM(LAYERS, D_MODEL, norm_first=kind == "pre_ln")
    opt = _adam(model, LN_LR)
    before_step = None
    if kind == "post_ln_warmup":
        from ..treat import lr_warmup
        # made before watch starts, so watch's first-step record sees lr < initial_lr (a warmup)
        sched = lr_warmup(opt, warmup_steps=max(1, int(WARMUP_FRAC * steps)))

        def before_step(w, step, loss):  # the scheduler steps after each optimizer step (here: before the next)
            if step > 0:
                sched.step()
    run_dir = ctx.run_dir(NAME, f"{kind}_s{seed}")
    train(model, run_dir, steps, lambda s: sample(p, 16, gen), lm_loss, opt, before_step=before_step)
    ctx.tick(f"{NAME}/{kind}/seed {seed}")
    return run_dir


def _qk_run(ctx: Context, qk_norm: bool, seed: int, steps: int) -> tuple[Path, np.ndarray]:
    """One GPT run at QK_LR; returns its run directory and the max attention logit of each step."""
    gen, p = seed_all(seed), chain()
    model = GPT(QK_LAYERS, D_MODEL, 2, qk_norm)
    logits: list[float] = []

    def before_step(w, step, loss):  # the forward pass of this step has just set the attention's max logit
        logits.append(model.max_logit())
    run_dir = ctx.run_dir(NAME, f"gpt_{'qk_norm' if qk_norm else 'plain'}_s{seed}")
    train(model, run_dir, steps, lambda s: sample(p, 16, gen), lm_loss, _adam(model, QK_LR), before_step=before_step)
    ctx.tick(f"{NAME}/gpt/{'qk_norm' if qk_norm else 'plain'}/seed {seed}")
    return run_dir, np.asarray(logits, dtype=np.float64)


def recorded_max_logit(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """watch's attention series: (sampled steps, the largest max_logit over the attention modules at each)."""
    with open_run(run_dir) as run:
        steps, data = run.series("attn")
        fields = list(run.meta.get("attn_fields") or [])
    cols = [i for i, f in enumerate(fields) if f.endswith(":max_logit")]
    if data is None or not cols:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return steps, np.max(data[:, cols].astype(np.float64), axis=1)


def _codes(run_dir: Path) -> list[str]:
    from ..diagnosis import diagnose
    return [f.code for f in diagnose(str(run_dir)) if f.severity != "info"]


def _post_ln_verdict(run_dir: Path) -> dict:
    """What diagnose says about a post-LN run: codes, the first finding's cause and its first remedies."""
    from ..diagnosis import diagnose
    found = [f for f in diagnose(str(run_dir)) if f.severity != "info"]
    first = found[0] if found else None
    return {"codes": [f.code for f in found], "cause": first.cause if first else None,
            "remedies": [r.id for r in first.remedies[:2]] if first else []}


@experiment(NAME, "Transformers: post-LN vs pre-LN vs warmup; attention logit growth and QK-norm",
            "A deep post-LN transformer trained with Adam at a large learning rate from step 0 trains worse; "
            "learning-rate warmup or pre-LN fixes it (Xiong et al. 2020). At a high learning rate a GPT's "
            "attention logits grow large and training suffers; LayerNorm on q and k (QK-norm) keeps them "
            "bounded (Wortsman et al. 2023).",
            "Xiong et al. 2020, https://arxiv.org/abs/2002.04745; Wortsman et al. 2023, "
            "https://arxiv.org/abs/2309.14322; Dehghani et al. 2023, https://arxiv.org/abs/2302.05442",
            runs=_runs, order=55)
def run(ctx: Context):
    ln_steps, qk_steps = ctx.pick(120, 120, 240), ctx.pick(100, 100, 200)
    ln_seeds = [ctx.seed + k for k in range(_seeds(ctx.preset, "ln"))]
    qk_seeds = [ctx.seed + k for k in range(_seeds(ctx.preset, "qk"))]
    ln_runs = {(kind, s): _ln_run(ctx, kind, s, ln_steps) for s in ln_seeds for kind in KINDS}
    qk = {(q, s): _qk_run(ctx, q, s, qk_steps) for s in qk_seeds for q in (False, True)}
    m = _metrics(ln_runs, qk, ln_seeds, qk_seeds, ln_steps, qk_steps)
    m["post_ln_diagnosis"] = _post_ln_verdict(ln_runs["post_ln", ln_seeds[0]])
    m["gpt_findings"] = {name: _codes(qk[q, qk_seeds[0]][0]) for name, q in (("plain", False), ("qk_norm", True))}
    ok = _reproduced(m)
    ln, lg = m["final_loss"], m["max_attention_logit"]
    measured = (f"{LAYERS}-layer encoder LM, mean final loss over {len(ln_seeds)} seed(s): post-LN "
                f"{np.mean(ln['post_ln']):.3f}, pre-LN {np.mean(ln['pre_ln']):.3f}, post-LN + warmup "
                f"{np.mean(ln['post_ln_warmup']):.3f} (best possible {m['entropy_rate']:.3f}, unigram "
                f"{m['unigram_entropy']:.3f}); diagnose on post-LN: cause {m['post_ln_diagnosis']['cause']}, "
                f"remedies {', '.join(m['post_ln_diagnosis']['remedies']) or 'none'}. GPT at Adam lr {QK_LR:g}: "
                f"largest attention logit {min(lg['plain']):.0f}-{max(lg['plain']):.0f} without QK-norm, "
                f"{min(lg['qk_norm']):.1f}-{max(lg['qk_norm']):.1f} with it; final loss "
                f"{np.mean(m['qk_final_loss']['plain']):.3f} vs {np.mean(m['qk_final_loss']['qk_norm']):.3f}; "
                f"watch recorded up to {max(m['recorded_max_logit']['plain']):.0f} vs "
                f"{max(m['recorded_max_logit']['qk_norm']):.1f}, and diagnose found "
                f"{', '.join(m['gpt_findings']['plain']) or 'nothing'} without QK-norm, "
                f"{', '.join(m['gpt_findings']['qk_norm']) or 'nothing'} with it.")
    runs = list(ln_runs.values()) + [r[0] for r in qk.values()]
    return result(NAME, measured, ok, m, _figures(ln_runs, qk, ln_seeds, qk_seeds, m), runs, ctx,
                  notes=(f"Markov-chain language model (16 tokens, sequences of 16, batch 16). Encoder: "
                         f"{LAYERS} layers, d_model {D_MODEL}, 2 heads, Adam lr {LN_LR:g} betas (0.9, 0.98), "
                         f"{ln_steps} steps, warmup over the first {int(WARMUP_FRAC * 100)}% (lr_warmup). GPT: "
                         f"{QK_LAYERS} pre-LN blocks, d {D_MODEL}, GPT-2 init, {qk_steps} steps. The attention logit "
                         "is measured in the model's own forward pass. The paper's models are 6-12 layers of "
                         "d_model 512+ trained for days; ours are CPU-sized."),
                  rule=("in every seed the post-LN loss exceeds both the pre-LN and the warmup loss by at least "
                        "0.5 nats, and their means are within 0.5 nats of the best possible loss; in every seed "
                        "the largest attention logit without QK-norm is above 100 and at least 10x the one with "
                        "QK-norm, which stays below 50; the mean final loss with QK-norm is lower."))


def _metrics(ln_runs: dict, qk: dict, ln_seeds: list[int], qk_seeds: list[int], ln_steps: int,
             qk_steps: int) -> dict:
    p = chain().numpy()
    final = {k: [tail_mean(losses(ln_runs[k, s])[1]) for s in ln_seeds] for k in KINDS}
    lg = {name: [float(np.max(qk[q, s][1])) for s in qk_seeds] for name, q in (("plain", False), ("qk_norm", True))}
    qk_loss = {name: [tail_mean(losses(qk[q, s][0])[1]) for s in qk_seeds]
               for name, q in (("plain", False), ("qk_norm", True))}
    rec = {name: [float(np.max(recorded_max_logit(qk[q, s][0])[1], initial=np.nan)) for s in qk_seeds]
           for name, q in (("plain", False), ("qk_norm", True))}
    return {"seeds": ln_seeds, "qk_seeds": qk_seeds, "layers": LAYERS, "d_model": D_MODEL, "lr": LN_LR,
            "warmup_steps": int(WARMUP_FRAC * ln_steps), "steps": ln_steps, "qk_steps": qk_steps, "qk_lr": QK_LR,
            "entropy_rate": entropy_rate(p), "unigram_entropy": unigram_entropy(p), "final_loss": final,
            "max_attention_logit": lg, "qk_final_loss": qk_loss,
            "recorded_max_logit": rec,
            "max_attention_logit_per_step": {name: qk[q, qk_seeds[0]][1].tolist()
                                             for name, q in (("plain", False), ("qk_norm", True))}}


def _reproduced(m: dict) -> bool:
    f, lg, best = m["final_loss"], m["max_attention_logit"], m["entropy_rate"]
    ln_ok = all(f["post_ln"][i] > max(f["pre_ln"][i], f["post_ln_warmup"][i]) + 0.5 for i in range(len(m["seeds"])))
    ln_ok = ln_ok and np.mean(f["pre_ln"]) < best + 0.5 and np.mean(f["post_ln_warmup"]) < best + 0.5
    qk_ok = all(a > 100 and a >= 10 * b and b < 50 for a, b in zip(lg["plain"], lg["qk_norm"]))
    qk_ok = qk_ok and np.mean(m["qk_final_loss"]["qk_norm"]) < np.mean(m["qk_final_loss"]["plain"])
    return bool(ln_ok and qk_ok)


def _figures(ln_runs: dict, qk: dict, ln_seeds: list[int], qk_seeds: list[int], m: dict) -> list[Figure]:
    s0 = ln_seeds[0]
    fig, axes = P.figure(2)
    P.loss_curve(axes[0], {LABELS[k]: losses(ln_runs[k, s0]) for k in KINDS},
                 f"{LAYERS}-layer encoder LM, Adam lr {LN_LR:g} (seed {s0})", ylabel="cross-entropy (nats)",
                 baseline=(m["entropy_rate"], "best possible (entropy rate)"))
    x = np.arange(len(KINDS))
    for i, s in enumerate(ln_seeds):
        axes[1].scatter(x, [m["final_loss"][k][i] for k in KINDS], color=f"C{i}", label=f"seed {s}")
    axes[1].axhline(m["entropy_rate"], color="grey", linestyle=":", linewidth=1)
    axes[1].axhline(m["unigram_entropy"], color="grey", linestyle="--", linewidth=1)
    axes[1].set_xticks(x, [LABELS[k] for k in KINDS])
    axes[1].set(ylabel="final loss (nats)", title="every seed (dotted: best possible; dashed: unigram)")
    axes[1].legend()
    figs = [Figure("Post-LN, pre-LN and post-LN with warmup", P.to_uri(fig),
                   "Without warmup the post-LN model stays near the unigram entropy (it learns token frequencies "
                   "only); warmup or pre-LN reach the chain's entropy rate.")]
    figs.append(heatmap_figure(ln_runs["post_ln", s0], "gradient flow, post-LN without warmup"))
    fig, axes = P.figure(3, width=4.2)
    for i, s in enumerate(qk_seeds):
        for q, style in ((False, "-"), (True, "--")):
            y = qk[q, s][1]
            P.line(axes[0], np.arange(len(y)), y, label=f"{'QK-norm' if q else 'plain'}, seed {s}", log=True,
                   color=f"C{i}", linestyle=style)
    axes[0].set(xlabel="step", ylabel="max |q.k|/sqrt(d_head) (log)", title=f"attention logits, Adam lr {QK_LR:g}")
    axes[0].legend(fontsize=7)
    for i, s in enumerate(qk_seeds):
        for q, style in ((False, "-"), (True, "--")):
            steps, y = recorded_max_logit(qk[q, s][0])
            P.line(axes[1], steps, y, label=f"{'QK-norm' if q else 'plain'}, seed {s}", log=True, color=f"C{i}",
                   linestyle=style, marker=".")
    axes[1].set(xlabel="step", ylabel="max_logit recorded by watch (log)",
                title="watch's attn series (sampled steps)")
    P.loss_curve(axes[2], {("QK-norm" if q else "plain") + f", seed {s}": losses(qk[q, s][0])
                           for s in qk_seeds[:1] for q in (False, True)}, "GPT training loss",
                 ylabel="cross-entropy (nats)", baseline=(m["entropy_rate"], "best possible"))
    figs.append(Figure("Attention logit growth with and without QK-norm", P.to_uri(fig),
                       "Solid: plain attention; dashed: q and k LayerNormed per head. Left: measured in the "
                       "model's forward pass on every step (causal pairs); middle: what watch recorded on its "
                       "sampled steps (every query-key pair, masked ones included)."))
    return figs
