"""Settings declared once: a config dataclass field carries its flag's help, argparse type (with its range)
and choices, and both the command line and the checks of a config built in Python come from it.

    @dataclass
    class RLConfig:
        max_steps: int = setting(100, "optimizer steps", type=positive_int(1 << 30))
        bf16: str = setting("auto", "bf16 autocast (auto = on with a GPU)", choices=("auto", "on", "off"))

    add_arguments(parser, RLConfig)          # --max-steps (snake_case spelling accepted by the CLIs)
    check_settings(config, "training.rl")    # the same ranges and choices for run(RLConfig(...)) callers

A bool field becomes a store_true flag (or, with `flag="--no-x"`, a store_false flag for a True default);
`flag=False` keeps a field off the command line. `required=True` makes the flag required (the field's
default, None, then means "not given"); fields sharing a `group` name are mutually exclusive flags of
which exactly one is required (`--checkpoint | --hf-dir`); `metavar` names the value in --help. Only checks that involve one field live here; a config's
own `validate` adds the rules that tie fields together.
"""

from __future__ import annotations

import argparse
import dataclasses

from aquainterp.cli.args import Number


def setting(default, help: str = "", *, type=None, choices=None, flag: str | bool | None = None,
            required: bool = False, group: str | None = None, metavar: str | None = None):
    """A dataclass field with its command-line description (see the module docstring)."""
    metadata = {"help": help, "type": type, "choices": choices, "flag": flag, "required": required,
                "group": group, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def flag_of(field: dataclasses.Field) -> str:
    flag = field.metadata.get("flag")
    return flag if isinstance(flag, str) else "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per declared field of `cls` (fields without setting() metadata or with flag=False are
    skipped); defaults are the dataclass defaults."""
    groups = {}
    for field in dataclasses.fields(cls):
        meta = field.metadata
        if "help" not in meta or meta.get("flag") is False:
            continue
        help_text = meta["help"] or None
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=True)
            target = groups[meta["group"]]
        if isinstance(field.default, bool):
            action = "store_false" if field.default else "store_true"
            target.add_argument(flag_of(field), dest=field.name, action=action, help=help_text)
            continue
        kwargs = {"default": field.default, "help": help_text}
        for key in ("type", "choices", "metavar"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        if meta.get("required"):
            kwargs["required"] = True
        target.add_argument(flag_of(field), dest=field.name, **kwargs)


def check_settings(config, prog: str) -> None:
    """ValueError naming the flag for a value outside its declared choices or numeric range, a required
    setting left None, or a group with not exactly one setting given."""
    groups: dict[str, list[str]] = {}
    for field in dataclasses.fields(config):
        meta, value = field.metadata, getattr(config, field.name)
        if meta.get("group"):
            groups.setdefault(meta["group"], [])
            if value is not None:
                groups[meta["group"]].append(flag_of(field))
        if meta.get("required") and value is None:
            raise ValueError(f"{prog}: {flag_of(field)} is required")
        if "help" not in meta or value is None or isinstance(value, bool):
            continue
        choices, kind = meta.get("choices"), meta.get("type")
        if choices is not None and value not in choices:
            raise ValueError(f"{prog}: {flag_of(field)} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if isinstance(kind, Number):
            if not isinstance(value, int | float) or not kind.accepts(value):
                raise ValueError(f"{prog}: {flag_of(field)} must be {kind.describe()}, got {value!r}")
    for name, given in groups.items():
        if len(given) != 1:
            members = [flag_of(f) for f in dataclasses.fields(config) if f.metadata.get("group") == name]
            raise ValueError(f"{prog}: exactly one of {', '.join(members)} is needed, got "
                             f"{', '.join(given) if given else 'none'}")
