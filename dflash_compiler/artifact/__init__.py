"""Compiled artifacts: `dflash-compile` writes one per hardware profile (build.py); the runtime loads and runs it
(load.py, `Engine.from_artifact`)."""
