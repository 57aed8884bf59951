"""Ranking the remedies that fit a finding. The remedies themselves (id, reason, snippet, the function
that applies them, former ids) are the one catalogue of `graddoctor.treat` (`treat/_catalogue.py`).

`rank_remedies` orders the ones that fit a finding's code and cause and apply to the model (`model_facts`:
what the run store knows of it); `remedy` turns a catalogue entry into a finding's `Remedy`.
"""
from __future__ import annotations

from typing import Optional

from ..treat._applicable import ModelFacts
from ..treat._catalogue import CATALOGUE
from ._data import RunData
from ._findings import Finding, Remedy

# (code, cause) -> ranked ids; (code, None) is the fallback for any other cause.
_RANKING: dict[tuple, tuple[str, ...]] = {
    ("vanishing_gradient", "activation"): ("relu", "leaky_relu", "elu", "batch_norm", "add_residual",
                                           "he_init", "layerwise_pretrain", "fewer_layers"),
    ("vanishing_gradient", "initialization"): ("@init", "lsuv_init", "batch_norm", "add_residual", "layer_norm"),
    ("vanishing_gradient", "recurrence"): ("rnn_to_lstm", "rnn_to_gru", "orthogonal_init", "truncated_bptt",
                                           "layer_norm"),
    ("vanishing_gradient", "depth"): ("add_residual", "batch_norm", "fewer_layers", "layerwise_pretrain",
                                      "zero_residual_init"),
    ("vanishing_gradient", "architecture"): ("lr_warmup", "pre_layer_norm", "lower_learning_rate", "clip_norm"),
    ("vanishing_gradient", None): ("add_residual", "batch_norm", "@init", "relu", "lr_warmup",
                                   "lower_learning_rate", "fewer_layers"),
    ("exploding_gradient", "mixed_precision"): ("pass_scaler",),
    ("exploding_gradient", "learning_rate"): ("lower_learning_rate", "clip_norm", "zclip", "auto_clip",
                                              "skip_nonfinite", "rollback"),
    ("exploding_gradient", "initialization"): ("@init", "clip_norm", "batch_norm", "l2_penalty",
                                               "skip_nonfinite"),
    ("exploding_gradient", "recurrence"): ("clip_norm", "rnn_to_lstm", "rnn_to_gru", "truncated_bptt",
                                           "orthogonal_init", "clip_value"),
    ("exploding_gradient", "data"): ("sanitize_inputs", "clip_norm", "zclip", "skip_nonfinite"),
    ("exploding_gradient", "depth"): ("clip_norm", "add_residual", "batch_norm", "fewer_layers",
                                      "clip_norm_per_tensor"),
    ("exploding_gradient", None): ("clip_norm", "clip_value", "agc", "l2_penalty", "l1_penalty",
                                   "smaller_batches"),
    ("nonfinite_gradient", "data"): ("sanitize_inputs", "skip_nonfinite", "rollback"),
    ("nonfinite_gradient", "recurrence"): ("clip_norm", "skip_nonfinite", "rnn_to_lstm", "truncated_bptt", "rollback"),
    ("nonfinite_gradient", "learning_rate"): ("lower_learning_rate", "skip_nonfinite", "rollback", "clip_norm"),
    ("nonfinite_gradient", "initialization"): ("@init", "skip_nonfinite", "clip_norm", "rollback"),
    ("nonfinite_gradient", None): ("skip_nonfinite", "rollback", "clip_norm", "lower_learning_rate"),
    ("loss_spike", "data"): ("sanitize_inputs", "zclip", "clip_norm", "rollback"),
    ("loss_spike", "learning_rate"): ("lower_learning_rate", "zclip", "rollback", "clip_norm"),
    ("loss_spike", None): ("zclip", "rollback", "clip_norm", "smaller_batches"),
    ("loss_not_decreasing", "learning_rate"): ("lower_learning_rate", "clip_norm", "rollback"),
    ("loss_not_decreasing", "architecture"): ("lr_warmup", "pre_layer_norm", "lower_learning_rate"),
    ("loss_not_decreasing", None): ("@init", "batch_norm", "add_residual", "lower_learning_rate"),
    ("saturated_activation", "initialization"): ("@init", "lsuv_init", "batch_norm", "relu"),
    ("saturated_activation", None): ("relu", "leaky_relu", "elu", "batch_norm", "layer_norm"),
    ("dead_relu", "learning_rate"): ("lower_learning_rate", "leaky_relu", "elu", "clip_norm"),
    ("dead_relu", None): ("leaky_relu", "elu", "he_init", "batch_norm", "lower_learning_rate"),
    ("poor_initialization", None): ("@init", "lsuv_init", "zero_residual_init", "batch_norm", "layer_norm"),
    ("input_outlier", None): ("sanitize_inputs", "skip_nonfinite", "zclip", "clip_norm"),
    ("large_weight_update", "data"): ("sanitize_inputs", "clip_norm", "agc"),
    ("large_weight_update", "initialization"): ("@init", "clip_norm", "agc", "lower_learning_rate"),
    ("large_weight_update", "recurrence"): ("clip_norm", "lower_learning_rate", "rnn_to_lstm", "truncated_bptt"),
    ("large_weight_update", None): ("lower_learning_rate", "clip_norm", "agc", "auto_clip", "l2_penalty"),
    # Wortsman et al. 2023: QK-layernorm removes attention logit growth; a lower lr delays it.
    ("attention_logit_growth", None): ("qk_norm", "lower_learning_rate", "lr_warmup"),
    # PaLM 2022: z-loss (1e-4) holds log Z near 0; Wortsman et al. 2023: so does weight decay.
    ("output_logit_divergence", None): ("z_loss", "lower_learning_rate", "l2_penalty"),
}


def remedy(remedy_id: str, act: str = "nn.ReLU") -> Remedy:
    """The catalogue entry for one id (a former id too), as a `Remedy` under its current id; `act` fills the
    activation class in swap snippets. `UnknownRemedyError` (a KeyError) for an unknown id."""
    cure = CATALOGUE[remedy_id]
    return Remedy(cure.id, cure.why, cure.snippet.replace("{act}", act), tuple(cure.aliases))


def present_remedies(module_classes: set[str]) -> set[str]:
    """Remedy ids the model already applies, from its module class names (suggesting them again helps no one)."""
    return {cure.id for cure in CATALOGUE.values() if cure.present_as & module_classes}


# A vanishing gradient or a stalled loss in post-LN residual blocks trained without warmup: Xiong et al. 2020's
# cures come first, whatever else the rule found.
_POST_LN_CODES = ("vanishing_gradient", "loss_not_decreasing")
_POST_LN_CURES = ("lr_warmup", "pre_layer_norm")
# When nothing in a ranking applies to the model: a cure that applies to any training run.
_ANY_MODEL = "lower_learning_rate"


def model_facts(d: RunData) -> ModelFacts:
    """What the run store knows of the model, for the catalogue's applicability tests."""
    s = d.structure or {}
    return ModelFacts(model_class=str(d.meta.get("model_class") or ""), modules=dict(d.modules),
                      shapes=dict(zip(d.tensors, d.tensor_shape)), residual=d.residual, post_norm=d.post_norm,
                      same_shape=frozenset(s["same_shape"]) if "same_shape" in s else None, lr_warmup=d.lr_warmup)


def rank_remedies(finding: Finding, fitting_init: str = "he_init", act: str = "nn.ReLU",
                  present: frozenset = frozenset(), facts: Optional[ModelFacts] = None) -> tuple[Remedy, ...]:
    """The remedies that fit a finding and apply to the model, best first.

    Args:
      finding: the finding (its code and cause pick the ranking).
      fitting_init: the init id that fits the model's activations; stands in for "@init".
      act: the model's activation class as code (e.g. "nn.Sigmoid"), for activation-swap snippets.
      present: remedy ids the model already applies (left out, unless nothing else would remain); former ids
        are accepted.
      facts: the model as recorded (`model_facts(run_data)`); cures whose `applies` test fails on it are left
        out. None: every cure is taken to apply (a finding without its run).
    """
    ids = _RANKING.get((finding.code, finding.cause)) or _RANKING[(finding.code, None)]
    if facts is not None and finding.code in _POST_LN_CODES and facts.post_norm and facts.lr_warmup is not True:
        ids = _POST_LN_CURES + ids
    ids = tuple(CATALOGUE[fitting_init].id if i == "@init" else i for i in ids)
    fits = [i for i in ids if facts is None or CATALOGUE[i].applies(facts)]
    present = frozenset(CATALOGUE[i].id if i in CATALOGUE else i for i in present)
    out = list(dict.fromkeys(i for i in fits if i not in present))
    return tuple(remedy(i, act) for i in out or fits[:1] or [_ANY_MODEL])
