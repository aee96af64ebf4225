"""config.py — one way to declare a setting: a dataclass field with its default and its help text.

What this file is
    Every setting of train.py, sft.py and eval.py is a field declared with `config_field(default, help, choices)`, and
    the command-line flags are built from the fields (`add_config_flags`: `--max-turns` for `max_turns`), so a flag
    exists exactly when its field does and its --help is the field's own text. A group of settings that one part of
    the method reads (rollout.RolloutConfig, ofr.OFRConfig, reward.JudgeConfig, models.ImageBounds) is declared once,
    in that part's file; the stage configs inherit the groups they carry (`TrainConfig(RolloutConfig, OFRConfig, ...)`)
    and hand each part its group with `derive`, which copies the same-named fields: no setting is restated by hand.

How to run
    python train.py --help      # every flag, with its default
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import field
from typing import Sequence, TypeVar

Config = TypeVar("Config")


def config_field(default, help: str, choices: Sequence | None = None):
    """A config dataclass field with its --help text and, for a choice, its allowed values (checked when the flags are
    parsed, before any work). Fields declared without it (plain dataclass fields) get no flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


def flag_fields(config_cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if "help" in f.metadata]


def add_config_flags(parser: argparse.ArgumentParser, config_cls) -> argparse.ArgumentParser:
    """One flag per declared field, help from the field's metadata. Defaults are None so callers can tell given flags
    from defaults (presets apply underneath given flags)."""
    for f in flag_fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        text = f.metadata["help"].replace("%", "%%") + f" (default: {f.default!r})"
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            parser.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None, help=text,
                                choices=f.metadata.get("choices"))
    return parser


def given_flags(namespace: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(namespace).items() if v is not None}


def flag_values(config) -> dict:
    """The settings a user can give, as JSON-ready values (what a run writes to its config.json)."""
    return {f.name: getattr(config, f.name) for f in flag_fields(type(config))}


def derive(config_cls: type[Config], source, **overrides) -> Config:
    """A `config_cls` from the same-named fields of `source` (a stage config that inherits them), then `overrides`."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**({name: getattr(source, name) for name in names if hasattr(source, name)} | overrides))
