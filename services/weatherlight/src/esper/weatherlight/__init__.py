"""Weatherlight: Esper's supervisor (starts, watches and restarts the local fleet) and the `esper` CLI."""
