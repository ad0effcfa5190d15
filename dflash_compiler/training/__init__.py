"""Drafter training: the target's own continuations as data, and the DFlash block objective."""
