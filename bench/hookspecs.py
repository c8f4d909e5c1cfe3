"""The hooks a plugin implements. Each takes a `register` callback and calls it per item."""

import pluggy

hookspec = pluggy.HookspecMarker("bench")


@hookspec
def register_samplers(register):
    """Register `bench.Sampler` objects."""


@hookspec
def register_schedules(register):
    """Register `bench.Schedule` objects."""


@hookspec
def register_models(register):
    """Register `bench.ModelSource` objects."""


@hookspec
def register_modifiers(register):
    """Register `bench.Modifier` objects."""


@hookspec
def register_metrics(register):
    """Register `bench.Metric` objects."""


@hookspec
def register_reporters(register):
    """Register `bench.Reporter` objects."""


@hookspec
def register_commands(subparsers):
    """Add subcommands to the `bench` CLI (an argparse subparsers object)."""
