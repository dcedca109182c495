"""Trial patches of model/trainer.py for chat_cost.py, chosen by environment variables.

EXP_BETAS=b1,b2: Adam with these betas instead of PyTorch's (0.9, 0.999). Every run also
counts the rows each training step forwards (ROWS_FORWARDED), the cost that does not move
with the machine's load.
"""

from __future__ import annotations

import os

import torch

import model.trainer as trainer

ROWS_FORWARDED = [0]

if betas := os.environ.get("EXP_BETAS"):
    b1, b2 = map(float, betas.split(","))
    trainer.optimizer_for = lambda values, cfg: torch.optim.Adam(
        [{"params": values, "lr": cfg.lr}], betas=(b1, b2))

_active_rows = trainer._Group.active_rows


def _counted(self, active, *args):
    batch = _active_rows(self, active, *args)
    if batch is not None:
        ROWS_FORWARDED[0] += len(batch.rows)
    return batch


trainer._Group.active_rows = _counted
