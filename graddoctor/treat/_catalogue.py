"""The remedy catalogue: every cure graddoctor knows, each listed once, with the code that applies it.

A `Cure` has:
- `id`: stable, used as it is in diagnose's findings and JSON. Where a graddoctor function applies
  the cure, the id is that function's name (`clip_norm` is `gd.treat.clip_norm`, `add_residual` is
  `gd.surgery.add_residual`); an init scheme `gd.init.<scheme>_` is `<scheme>_init` (the trailing
  underscore is PyTorch's mark of an in-place function); a cure that is one argument of a general
  function is named by that argument (`relu` is `swap_activation(model, old, nn.ReLU)`, `batch_norm`
  is `add_norm(model, kind="batch")`); a change to the user's own code has a descriptive id.
- `why`: one line, what it does and why that helps.
- `snippet`: code that calls graddoctor's API; `{act}` stands for the model's activation class.
- `apply`: the callable that applies it; None for a change to the user's own training code.
- `aliases`: former ids. Looking a cure up by one of them finds it, and the `--json` output lists them,
  so consumers that match the old id keep working.
- `present_as`: module class names that mean a model already has the cure (diagnose leaves it out).
- `applies`: a test over `ModelFacts` (what a run store knows of the model, `treat/_applicable.py`): False
  where the cure cannot be applied to that model, or would undo a deliberate choice; diagnose ranks only
  the cures whose test passes.

Diagnose ranks these cures for each finding (`graddoctor.diagnosis._remedies`); nothing else defines one.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Union

from torch import nn

from .._errors import GradDoctorError
from . import _applicable as can
from . import init, surgery
from ._adaptive import agc, auto_clip, zclip
from ._pretrain import layerwise_pretrain
from ._regularization import l1_penalty, l2_penalty
from ._rollback import rollback
from ._schedule import lr_warmup
from ._skip import skip_nonfinite
from ._transforms import clip_norm, clip_norm_per_tensor, clip_value


class UnknownRemedyError(GradDoctorError, KeyError):
    """A remedy id that is neither a catalogue id nor one of their aliases."""


@dataclass(frozen=True)
class Cure:
    """One remedy of the catalogue (see the module docstring for the fields)."""

    id: str
    why: str
    snippet: str
    apply: Optional[Callable[..., Any]] = None
    aliases: tuple[str, ...] = ()
    present_as: frozenset[str] = frozenset()
    applies: Callable[[can.ModelFacts], bool] = can.always


class Catalogue(Mapping[str, Cure]):
    """Cures by id. `catalogue[old_id]` (and `in`, `get`) also finds a cure by a former id; iteration,
    `len`, `keys()` and `items()` give each cure once, under its current id."""

    def __init__(self, cures: Iterable[Cure]):
        self._by_id: dict[str, Cure] = {}
        self._current: dict[str, str] = {}  # every accepted id -> the current one
        for cure in cures:
            for name in (cure.id, *cure.aliases):
                if name in self._current:  # a programming error in the table below
                    raise ValueError(f"remedy id {name!r} is listed twice")
                self._current[name] = cure.id
            self._by_id[cure.id] = cure

    def __getitem__(self, remedy_id: str) -> Cure:
        current = self._current.get(remedy_id)
        if current is None:
            raise UnknownRemedyError(f"unknown remedy id {remedy_id!r}; known ids: {', '.join(self._by_id)}")
        return self._by_id[current]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)


class Implementations(Mapping[str, Union[Callable[..., Any], str]]):
    """`REMEDIES`: the catalogue seen as id -> the callable that applies the cure, or its snippet when the
    cure is a change to the user's own code. Former ids are accepted, as by the catalogue."""

    def __init__(self, catalogue: Catalogue):
        self._catalogue = catalogue

    def __getitem__(self, remedy_id: str) -> Union[Callable[..., Any], str]:
        cure = self._catalogue[remedy_id]
        return cure.apply if cure.apply is not None else cure.snippet

    def __iter__(self) -> Iterator[str]:
        return iter(self._catalogue)

    def __len__(self) -> int:
        return len(self._catalogue)


_SATURATING = (nn.Sigmoid, nn.Tanh)
# LeakyReLU and ELU are also the cure for dying ReLUs: they replace ReLU as well.
_DYING = _SATURATING + (nn.ReLU,)


def _swap(kind: str, make: Callable[[], nn.Module],
          replaces: tuple[type, ...] = _SATURATING) -> Callable[..., tuple[nn.Module, list[str]]]:
    def swap(model: nn.Module, old: type | tuple[type, ...] = replaces) -> tuple[nn.Module, list[str]]:
        return surgery.swap_activation(model, old, make)
    swap.__name__ = f"swap_to_{kind}"
    swap.__doc__ = (f"Swap {', '.join(t.__name__ for t in replaces)} activations for {kind} "
                    "(surgery.swap_activation).")
    return swap


def _norm(kind: str) -> Callable[[nn.Module], tuple[nn.Module, list[str]]]:
    def add(model: nn.Module) -> tuple[nn.Module, list[str]]:
        return surgery.add_norm(model, kind=kind)
    add.__name__ = f"add_{kind}_norm"
    add.__doc__ = f"Insert {kind} normalization after each Linear/Conv feeding an activation (surgery.add_norm)."
    return add


_BATCH_NORMS = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"})

CATALOGUE = Catalogue([
    Cure("clip_value", "Caps every gradient entry (Keras' clipvalue default is 0.5), so one huge entry cannot "
         "blow up a step.",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.clip_value(0.5))', clip_value, ("clip_by_value",)),
    Cure("clip_norm", "Rescales the whole gradient to norm <= max_norm (scale = max_norm/||g||), keeping its "
         "direction.",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.clip_norm(1.0))', clip_norm, ("clip_by_norm",)),
    Cure("clip_norm_per_tensor", "Clips each layer's gradient norm on its own, so one exploding layer does not "
         "shrink the rest.",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.clip_norm_per_tensor(1.0))', clip_norm_per_tensor,
         ("clip_per_tensor",)),
    Cure("auto_clip", "Clips at a percentile of the run's own gradient-norm history: no threshold to tune "
         "(AutoClip).",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.auto_clip(percentile=10))', auto_clip),
    Cure("agc", "Adaptive gradient clipping: caps each unit's gradient relative to its weight norm (NFNets).",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.agc(clipping=0.01))', agc),
    Cure("zclip", "Clips gradient norms that are z-score outliers against a running mean/std, so spikes are "
         "cut early.",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.zclip(z_threshold=2.5))', zclip),
    Cure("skip_nonfinite", "Skips the optimizer step when any gradient is NaN/Inf instead of writing NaN into "
         "the weights.",
         'w = gd.watch(model, opt, run_dir, guard=gd.treat.skip_nonfinite())', skip_nonfinite),
    Cure("rollback", "Restores the last good weights and optimizer state after a loss spike or NaN, then "
         "continues.",
         'rb = gd.treat.rollback(model, opt, every=50)\n'
         '# in the loop: skip the batch while rb.skipping(); call rb.step(loss) after opt.step()', rollback),
    Cure("lower_learning_rate", "Smaller steps keep updates a small fraction of the weights (update/weight "
         "~1e-3).",
         'for g in opt.param_groups:\n    g["lr"] *= 0.1'),
    Cure("pass_scaler", "watch was not given the GradScaler: it recorded the scaled gradients (x the loss scale) "
         "and the scaler's skipped overflow steps as real ones; given the scaler it records the true gradients.",
         'scaler = torch.amp.GradScaler()   # the one that scales your loss\n'
         'w = gd.watch(model, opt, run_dir, scaler=scaler)'),
    Cure("sanitize_inputs", "Drops or clamps non-finite and extreme input values before they reach the model.",
         'x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp(-10, 10)   # after normalizing x'),
    Cure("l1_penalty", "Penalizes the sum of |w|, keeping weights small so products of layers stay bounded.",
         'loss = loss + gd.treat.l1_penalty(model, 1e-5)', l1_penalty, ("l1_regularization",)),
    Cure("l2_penalty", "Penalizes large weights (weight decay), which keeps the per-layer gain near 1.",
         'loss = loss + gd.treat.l2_penalty(model, 1e-4)   # the same as SGD(weight_decay=1e-4)', l2_penalty,
         ("l2_regularization",)),
    Cure("relu", "ReLU's derivative is 1 where active, instead of sigmoid's at most 0.25 per layer.",
         'model, _ = gd.surgery.swap_activation(model, {act}, nn.ReLU)', _swap("relu", nn.ReLU),
         present_as=frozenset({"ReLU"}), applies=can.swappable("Sigmoid", "Tanh")),
    Cure("leaky_relu", "A small negative slope keeps a gradient flowing through units that would otherwise die.",
         'model, _ = gd.surgery.swap_activation(model, {act}, lambda: nn.LeakyReLU(0.01))',
         _swap("leaky_relu", lambda: nn.LeakyReLU(0.01), _DYING), present_as=frozenset({"LeakyReLU"}),
         applies=can.swappable("Sigmoid", "Tanh", "ReLU")),
    Cure("elu", "ELU is smooth, non-saturating for x > 0 and has no dead region.",
         'model, _ = gd.surgery.swap_activation(model, {act}, nn.ELU)', _swap("elu", nn.ELU, _DYING),
         present_as=frozenset({"ELU"}), applies=can.swappable("Sigmoid", "Tanh", "ReLU")),
    Cure("he_init", "He init (std sqrt(2/fan_in)) keeps activation variance constant through ReLU layers.",
         'gd.init.he_(model)', init.he_, applies=can.fan_in_init),
    Cure("xavier_init", "Xavier init (std sqrt(2/(fan_in+fan_out))) keeps tanh/sigmoid pre-activations out of "
         "saturation.",
         'gd.init.xavier_(model)', init.xavier_, applies=can.fan_in_init),
    Cure("lsuv_init", "Layer-sequential unit-variance init rescales each layer on one batch so activations have "
         "std 1.",
         'gd.init.lsuv_(model, x_batch)', init.lsuv_, applies=can.fan_in_init),
    Cure("gpt2_init", "GPT-2's init: N(0, 0.02) weights and residual projections scaled by 1/sqrt(their count), "
         "so logits and the residual stream start at scale (Radford et al. 2019).",
         'gd.init.gpt2_(model)', init.gpt2_, applies=can.transformer_init),
    Cure("orthogonal_init", "Orthogonal weights preserve norms exactly in linear and recurrent chains.",
         'gd.init.orthogonal_(model)', init.orthogonal_, applies=can.orthogonal),
    Cure("zero_residual_init", "Zero-initialising each residual branch's last layer makes every block start as "
         "the identity.",
         'gd.init.zero_residual_(model)', init.zero_residual_, applies=can.residual_branches),
    Cure("batch_norm", "BatchNorm re-centres and re-scales each layer's input, so the per-layer gain stays near 1.",
         'model, _ = gd.surgery.add_norm(model, kind="batch")', _norm("batch"), present_as=_BATCH_NORMS,
         applies=can.batch_norm_insertable),
    Cure("layer_norm", "LayerNorm normalizes each example (works for sequences and small batches).",
         'model, _ = gd.surgery.add_norm(model, kind="layer")', _norm("layer"), present_as=frozenset({"LayerNorm"}),
         applies=can.norm_insertable),
    Cure("add_residual", "Identity skips give the gradient a path that multiplies by 1, not by each layer's "
         "Jacobian.",
         'model, _ = gd.surgery.add_residual(model)', surgery.add_residual, ("residual_connections",),
         applies=can.residual_insertable),
    Cure("rnn_to_lstm", "An LSTM's additive cell state carries gradients across time steps without repeated "
         "squashing.",
         'model, _ = gd.surgery.rnn_to_lstm(model)', surgery.rnn_to_lstm, ("lstm",),
         frozenset({"LSTM", "LSTMCell"}), can.vanilla_rnn),
    Cure("rnn_to_gru", "A GRU's gated update also keeps long-range gradients alive, with fewer parameters than an "
         "LSTM.",
         'model, _ = gd.surgery.rnn_to_gru(model)', surgery.rnn_to_gru, ("gru",), frozenset({"GRU", "GRUCell"}),
         can.vanilla_rnn),
    Cure("layerwise_pretrain", "Trains one layer at a time, then fine-tunes all: each stage is shallow (Hinton "
         "2006).",
         'gd.treat.layerwise_pretrain(model, x_train, steps_per_layer=200)   # then train all layers as usual',
         layerwise_pretrain, ("layerwise_pretraining",), applies=can.flat_mlp),
    Cure("fewer_layers", "Fewer layers means fewer factors in the backprop product.",
         'model = make_model(depth=depth // 2)   # rebuild with fewer layers'),
    Cure("smaller_batches", "Smaller batches make smaller, noisier steps, which can keep a run out of the "
         "exploding regime.",
         'loader = DataLoader(dataset, batch_size=batch_size // 4, shuffle=True)'),
    Cure("truncated_bptt", "Backpropagating through a limited number of time steps caps how many recurrent "
         "factors multiply.",
         'for chunk in seq.split(35, dim=1):   # backprop through at most 35 steps\n'
         '    out, h = rnn(chunk, h.detach())   # detach = truncate', applies=can.recurrent),
    Cure("lr_warmup", "Raising the lr linearly from ~0 over the first steps keeps Adam's first updates from "
         "wrecking a post-LN transformer (Xiong et al. 2020; the standard transformer recipe).",
         'scheduler = gd.treat.lr_warmup(opt, warmup_steps=100)   # then scheduler.step() after each opt.step()',
         lr_warmup, applies=can.without_warmup),
    Cure("pre_layer_norm", "Normalizing each block's input (x + f(norm(x))) keeps the skip path an identity, so "
         "gradients reach early layers without warmup (pre-LN; Xiong et al. 2020).",
         'model, _ = gd.surgery.pre_layer_norm(model)   # nn.TransformerEncoderLayer: norm_first=True\n'
         '# own blocks: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))   instead of x = ln(x + f(x))',
         surgery.pre_layer_norm, applies=can.post_layer_norm),
    Cure("qk_norm", "LayerNorm on each head's queries and keys bounds the attention logits (|q.k|/sqrt(d) <= "
         "sqrt(d) at unit gains), so they cannot grow until the softmax saturates (Dehghani et al. 2023; Wortsman "
         "et al. 2023).",
         'class QKNorm(nn.Module):   # LayerNorm over each head\'s q and k, before q @ k.T\n'
         '    def __init__(self, head_dim):\n'
         '        super().__init__()\n'
         '        self.q_norm, self.k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)\n\n'
         '    def forward(self, q, k):   # q, k: [batch, heads, time, head_dim]\n'
         '        return self.q_norm(q), self.k_norm(k)\n'
         '# in your attention\'s __init__: self.qk_norm = QKNorm(n_embd // n_head)\n'
         '# in its forward, once q, k are split into heads: q, k = self.qk_norm(q, k)', applies=can.attention),
    Cure("z_loss", "Penalizes log(Z)^2 of the output logits (coef 1e-4), holding the softmax normalizer near 0 so "
         "the logits cannot drift far and lose precision (PaLM, Chowdhery et al. 2022).",
         'logits = model(x)   # the output logits [batch, time, vocab] your loss is computed from\n'
         'loss = loss + gd.treat.z_loss(logits, 1e-4)',
         applies=can.language_model),  # no apply: it needs the logits, which only the user's loss code has
])

REMEDIES = Implementations(CATALOGUE)
