"""Tolaria: the trainer (host network with seed slots; decisions from Tamiyo; checkpoints, rollback, emergencies)."""
