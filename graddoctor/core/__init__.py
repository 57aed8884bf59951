"""watch: the per-step gradient statistics, measured on the device and buffered until a flush.

`_watch` (the `Watch`), `_compose` (`graddoctor.watch()`, its composition root), `_stats` (the fused
statistics pass), `_native` (the CPU kernel), `_activations` (activation and input statistics),
`_amp` (GradScaler support), `_config` (`WatchConfig`), `_exit` (closing watches on the way out).
"""
