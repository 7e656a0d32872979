"""Settings declared once: a config dataclass field carries its flag's help, argparse type (with its range)
and choices, and both the command line and the checks of a config built in Python come from it.

    @dataclass
    class RLConfig:
        max_steps: int = setting(100, "optimizer steps", type=positive_int(1 << 30))
        bf16: str = setting("auto", "bf16 autocast (auto = on with a GPU)", choices=("auto", "on", "off"))

    add_arguments(parser, RLConfig)          # --max-steps (snake_case spelling accepted by the CLIs)
    check_settings(config, "training.rl")    # the same ranges and choices for run(RLConfig(...)) callers

A bool field becomes a store_true flag (or, with `flag="--no-x"`, a store_false flag for a True default);
`flag=False` keeps a field off the command line. Only checks that involve one field live here; a config's
own `validate` adds the rules that tie fields together.
"""

from __future__ import annotations

import argparse
import dataclasses

from aquainterp.cliargs import Number


def setting(default, help: str = "", *, type=None, choices=None, flag: str | bool | None = None):
    """A dataclass field with its command-line description (see the module docstring)."""
    metadata = {"help": help, "type": type, "choices": choices, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    flag = field.metadata.get("flag")
    return flag if isinstance(flag, str) else "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per declared field of `cls` (fields without setting() metadata or with flag=False are
    skipped); defaults are the dataclass defaults."""
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta or meta.get("flag") is False:
            continue
        help_text = meta["help"] or None
        if isinstance(field.default, bool):
            action = "store_false" if field.default else "store_true"
            parser.add_argument(flag_of(field), dest=field.name, action=action, help=help_text)
            continue
        kwargs = {"default": field.default, "help": help_text}
        if meta.get("type") is not None:
            kwargs["type"] = meta["type"]
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        parser.add_argument(flag_of(field), dest=field.name, **kwargs)


def check_settings(config, prog: str) -> None:
    """ValueError naming the flag for a value outside its declared choices or numeric range."""
    for field in dataclasses.fields(config):
        meta, value = field.metadata, getattr(config, field.name)
        if "help" not in meta or value is None or isinstance(value, bool):
            continue
        choices, kind = meta.get("choices"), meta.get("type")
        if choices is not None and value not in choices:
            raise ValueError(f"{prog}: {flag_of(field)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if isinstance(kind, Number):
            if not isinstance(value, int | float) or not kind.accepts(value):
                raise ValueError(f"{prog}: {flag_of(field)} must be {kind.describe()}, got {value!r}")
