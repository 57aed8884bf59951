"""The run store: one SQLite file per run directory, written by watch and read by everything else.

`_store` (schema, writer, read connections), `_run` (`Run`, `open_run`), `_lock` (one writer per
run directory), `_nonfinite_json` (JSON that keeps NaN and Inf).
"""
