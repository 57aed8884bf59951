"""The remedy catalogue: every cure in the seeds plus the adaptive ones, keyed by the shared ids.

The ids are shared with `graddoctor.treat` (which implements them) and appear as they are in
the JSON output. Each entry has a one-line reason and a short snippet that calls graddoctor's
API. `rank_remedies` orders the ones that fit a finding's code and cause.
"""
from __future__ import annotations

from ._findings import Finding, Remedy

# id -> (one-line why, snippet)
CATALOGUE: dict[str, tuple[str, str]] = {
    "clip_by_value": ("Caps every gradient entry (Keras' clipvalue default is 0.5), so one huge entry cannot blow up a step.",
                      'w = gd.watch(model, opt, run_dir, guard=gd.treat.clip_value(0.5))'),
    "clip_by_norm": ("Rescales the whole gradient to norm <= max_norm (scale = max_norm/||g||), keeping its direction.",
                     'w = gd.watch(model, opt, run_dir, guard=gd.treat.clip_norm(1.0))'),
    "clip_per_tensor": ("Clips each layer's gradient norm on its own, so one exploding layer does not shrink the rest.",
                        'w = gd.watch(model, opt, run_dir, guard=gd.treat.clip_norm_per_tensor(1.0))'),
    "auto_clip": ("Clips at a percentile of the run's own gradient-norm history: no threshold to tune (AutoClip).",
                  'w = gd.watch(model, opt, run_dir, guard=gd.treat.auto_clip(percentile=10))'),
    "agc": ("Adaptive gradient clipping: caps each unit's gradient relative to its weight norm (NFNets).",
            'w = gd.watch(model, opt, run_dir, guard=gd.treat.agc(clipping=0.01))'),
    "zclip": ("Clips gradient norms that are z-score outliers against a running mean/std, so spikes are cut early.",
              'w = gd.watch(model, opt, run_dir, guard=gd.treat.zclip(z_threshold=2.5))'),
    "skip_nonfinite": ("Skips the optimizer step when any gradient is NaN/Inf instead of writing NaN into the weights.",
                       'w = gd.watch(model, opt, run_dir, guard=gd.treat.skip_nonfinite())'),
    "rollback": ("Restores the last good weights and optimizer state after a loss spike or NaN, then continues.",
                 'rb = gd.treat.rollback(model, opt, every=50)\n# in the loop: skip the batch while rb.skipping(); call rb.step(loss) after opt.step()'),
    "lower_learning_rate": ("Smaller steps keep updates a small fraction of the weights (update/weight ~1e-3).",
                            'for g in opt.param_groups:\n    g["lr"] *= 0.1'),
    "sanitize_inputs": ("Drops or clamps non-finite and extreme input values before they reach the model.",
                        'x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0).clamp(-10, 10)   # after normalizing x'),
    "l1_regularization": ("Penalizes the sum of |w|, keeping weights small so products of layers stay bounded.",
                          'loss = loss + gd.treat.l1_penalty(model, 1e-5)'),
    "l2_regularization": ("Penalizes large weights (weight decay), which keeps the per-layer gain near 1.",
                          'loss = loss + gd.treat.l2_penalty(model, 1e-4)   # the same as SGD(weight_decay=1e-4)'),
    "relu": ("ReLU's derivative is 1 where active, instead of sigmoid's at most 0.25 per layer.",
             'model, _ = gd.surgery.swap_activation(model, {act}, nn.ReLU)'),
    "leaky_relu": ("A small negative slope keeps a gradient flowing through units that would otherwise die.",
                   'model, _ = gd.surgery.swap_activation(model, {act}, lambda: nn.LeakyReLU(0.01))'),
    "elu": ("ELU is smooth, non-saturating for x > 0 and has no dead region.",
            'model, _ = gd.surgery.swap_activation(model, {act}, nn.ELU)'),
    "he_init": ("He init (std sqrt(2/fan_in)) keeps activation variance constant through ReLU layers.",
                'gd.init.he_(model)'),
    "xavier_init": ("Xavier init (std sqrt(2/(fan_in+fan_out))) keeps tanh/sigmoid pre-activations out of saturation.",
                    'gd.init.xavier_(model)'),
    "lsuv_init": ("Layer-sequential unit-variance init rescales each layer on one batch so activations have std 1.",
                  'gd.init.lsuv_(model, x_batch)'),
    "orthogonal_init": ("Orthogonal weights preserve norms exactly in linear and recurrent chains.",
                        'gd.init.orthogonal_(model)'),
    "zero_residual_init": ("Zero-initialising each residual branch's last layer makes every block start as the identity.",
                           'gd.init.zero_residual_(model)'),
    "batch_norm": ("BatchNorm re-centres and re-scales each layer's input, so the per-layer gain stays near 1.",
                   'model, _ = gd.surgery.add_norm(model, kind="batch")'),
    "layer_norm": ("LayerNorm normalizes each example (works for sequences and small batches).",
                   'model, _ = gd.surgery.add_norm(model, kind="layer")'),
    "residual_connections": ("Identity skips give the gradient a path that multiplies by 1, not by each layer's Jacobian.",
                             'model, _ = gd.surgery.add_residual(model)'),
    "lstm": ("An LSTM's additive cell state carries gradients across time steps without repeated squashing.",
             'model, _ = gd.surgery.rnn_to_lstm(model)'),
    "gru": ("A GRU's gated update also keeps long-range gradients alive, with fewer parameters than an LSTM.",
            'model, _ = gd.surgery.rnn_to_gru(model)'),
    "layerwise_pretraining": ("Trains one layer at a time, then fine-tunes all: each stage is shallow (Hinton 2006).",
                              'gd.treat.layerwise_pretrain(model, x_train, steps_per_layer=200)   # then train all layers as usual'),
    "fewer_layers": ("Fewer layers means fewer factors in the backprop product.",
                     'model = make_model(depth=depth // 2)   # rebuild with fewer layers'),
    "smaller_batches": ("Smaller batches make smaller, noisier steps, which can keep a run out of the exploding regime.",
                        'loader = DataLoader(dataset, batch_size=batch_size // 4, shuffle=True)'),
    "truncated_bptt": ("Backpropagating through a limited number of time steps caps how many recurrent factors multiply.",
                       'for chunk in seq.split(35, dim=1):   # backprop through at most 35 steps\n    out, h = rnn(chunk, h.detach())   # detach = truncate'),
}

# (code, cause) -> ranked ids; (code, None) is the fallback for any other cause.
_RANKING: dict[tuple, tuple[str, ...]] = {
    ("vanishing_gradient", "activation"): ("relu", "leaky_relu", "elu", "batch_norm", "residual_connections",
                                           "he_init", "layerwise_pretraining", "fewer_layers"),
    ("vanishing_gradient", "initialization"): ("@init", "lsuv_init", "batch_norm", "residual_connections", "layer_norm"),
    ("vanishing_gradient", "recurrence"): ("lstm", "gru", "orthogonal_init", "truncated_bptt", "layer_norm"),
    ("vanishing_gradient", "depth"): ("residual_connections", "batch_norm", "fewer_layers", "layerwise_pretraining",
                                      "zero_residual_init"),
    ("vanishing_gradient", None): ("residual_connections", "batch_norm", "@init", "relu", "fewer_layers"),
    ("exploding_gradient", "learning_rate"): ("lower_learning_rate", "clip_by_norm", "zclip", "auto_clip",
                                              "skip_nonfinite", "rollback"),
    ("exploding_gradient", "initialization"): ("@init", "clip_by_norm", "batch_norm", "l2_regularization",
                                               "skip_nonfinite"),
    ("exploding_gradient", "recurrence"): ("clip_by_norm", "lstm", "gru", "truncated_bptt", "orthogonal_init",
                                           "clip_by_value"),
    ("exploding_gradient", "data"): ("sanitize_inputs", "clip_by_norm", "zclip", "skip_nonfinite"),
    ("exploding_gradient", "depth"): ("clip_by_norm", "residual_connections", "batch_norm", "fewer_layers",
                                      "clip_per_tensor"),
    ("exploding_gradient", None): ("clip_by_norm", "clip_by_value", "agc", "l2_regularization", "l1_regularization",
                                   "smaller_batches"),
    ("nonfinite_gradient", "data"): ("sanitize_inputs", "skip_nonfinite", "rollback"),
    ("nonfinite_gradient", "recurrence"): ("clip_by_norm", "skip_nonfinite", "lstm", "truncated_bptt", "rollback"),
    ("nonfinite_gradient", "learning_rate"): ("lower_learning_rate", "skip_nonfinite", "rollback", "clip_by_norm"),
    ("nonfinite_gradient", "initialization"): ("@init", "skip_nonfinite", "clip_by_norm", "rollback"),
    ("nonfinite_gradient", None): ("skip_nonfinite", "rollback", "clip_by_norm", "lower_learning_rate"),
    ("loss_spike", "data"): ("sanitize_inputs", "zclip", "clip_by_norm", "rollback"),
    ("loss_spike", "learning_rate"): ("lower_learning_rate", "zclip", "rollback", "clip_by_norm"),
    ("loss_spike", None): ("zclip", "rollback", "clip_by_norm", "smaller_batches"),
    ("loss_not_decreasing", "learning_rate"): ("lower_learning_rate", "clip_by_norm", "rollback"),
    ("loss_not_decreasing", None): ("@init", "batch_norm", "residual_connections", "lower_learning_rate"),
    ("saturated_activation", "initialization"): ("@init", "lsuv_init", "batch_norm", "relu"),
    ("saturated_activation", None): ("relu", "leaky_relu", "elu", "batch_norm", "layer_norm"),
    ("dead_relu", "learning_rate"): ("lower_learning_rate", "leaky_relu", "elu", "clip_by_norm"),
    ("dead_relu", None): ("leaky_relu", "elu", "he_init", "batch_norm", "lower_learning_rate"),
    ("poor_initialization", None): ("@init", "lsuv_init", "zero_residual_init", "batch_norm", "layer_norm"),
    ("input_outlier", None): ("sanitize_inputs", "skip_nonfinite", "zclip", "clip_by_norm"),
    ("large_weight_update", "data"): ("sanitize_inputs", "clip_by_norm", "agc"),
    ("large_weight_update", "initialization"): ("@init", "clip_by_norm", "agc", "lower_learning_rate"),
    ("large_weight_update", "recurrence"): ("clip_by_norm", "lower_learning_rate", "lstm", "truncated_bptt"),
    ("large_weight_update", None): ("lower_learning_rate", "clip_by_norm", "agc", "auto_clip", "l2_regularization"),
}


def remedy(remedy_id: str, act: str = "nn.ReLU") -> Remedy:
    """The catalogue entry for one id; `act` fills the activation class in swap snippets. KeyError for an unknown id."""
    why, snippet = CATALOGUE[remedy_id]
    return Remedy(remedy_id, why, snippet.replace("{act}", act))


# Module classes that mean a remedy is already in the model (suggesting it again helps no one).
_PRESENT = {"batch_norm": {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"}, "layer_norm": {"LayerNorm"},
            "lstm": {"LSTM", "LSTMCell"}, "gru": {"GRU", "GRUCell"}, "relu": {"ReLU"}, "leaky_relu": {"LeakyReLU"},
            "elu": {"ELU"}}


def present_remedies(module_classes: set[str]) -> set[str]:
    """Remedy ids the model already applies, from its module class names."""
    return {rid for rid, classes in _PRESENT.items() if classes & module_classes}


def rank_remedies(finding: Finding, fitting_init: str = "he_init", act: str = "nn.ReLU",
                  present: frozenset = frozenset()) -> tuple[Remedy, ...]:
    """The remedies that fit a finding, best first.

    Args:
      finding: the finding (its code and cause pick the ranking).
      fitting_init: the init id that fits the model's activations; stands in for "@init".
      act: the model's activation class as code (e.g. "nn.Sigmoid"), for activation-swap snippets.
      present: remedy ids the model already applies (left out, unless nothing else would remain).
    """
    ids = _RANKING.get((finding.code, finding.cause)) or _RANKING[(finding.code, None)]
    out: list[str] = []
    for i in ids:
        i = fitting_init if i == "@init" else i
        if i not in out and i not in present:
            out.append(i)
    return tuple(remedy(i, act) for i in out or ids[:1])
