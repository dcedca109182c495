"""Trial settings for chat_cost.py, and the count of rows each training step forwards.

EXP_TRAIN=name=value,name=value sets TrainConfig fields (e.g. EXP_TRAIN=adam_beta1=0.9,
adam_beta2=0.999 for PyTorch's Adam betas). ROWS_FORWARDED is the cost that does not move
with the machine's load.
"""

from __future__ import annotations

import ast
import os
from dataclasses import fields

import model.trainer as trainer
from model.config import TrainConfig

ROWS_FORWARDED = [0]


def train_config() -> TrainConfig:
    """TrainConfig's defaults with the fields EXP_TRAIN names (booleans as true/false)."""
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    chosen = {}
    for item in filter(None, os.environ.get("EXP_TRAIN", "").split(",")):
        name, value = item.split("=")
        if name not in types:
            raise SystemExit(f"EXP_TRAIN: TrainConfig has no field {name!r}")
        chosen[name] = (value.lower() == "true" if types[name] is bool
                        else types[name](ast.literal_eval(value)))
    return TrainConfig(**chosen)


_active_rows = trainer._Group.active_rows


def _counted(self, active, *args):
    batch = _active_rows(self, active, *args)
    if batch is not None:
        ROWS_FORWARDED[0] += len(batch.rows)
    return batch


trainer._Group.active_rows = _counted
