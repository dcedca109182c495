"""Which memorized facts fired for which request, recorded in the engine's own forward.

A response's `mome_facts` names the facts whose experts fired while that request was served.
The engine's forward knows which request each token of a step belongs to (the runner's
batch, model/vllm_model.py), so the memory layer's firing decisions are recorded there, per
request, and the server takes a request's record once the request has finished. The server
asks through `collective_rpc`, which runs between engine steps: every step of that request
came before it. The last generated token is never forwarded, so it fires nothing.

A record cannot speak for tokens this forward did not compute: prompt tokens of the turn
being answered that the prefix cache served, or a step whose batch was not laid out as the
runner's. The record says so, and the server recomputes those tokens
(`FactsService.fired_owners`), so `mome_facts` stays exact.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

# The key in a request's `SamplingParams.extra_args` naming it for the log.
FIRED_KEY = "mome_fired_key"


@dataclass
class FiredRecord:
    owners: set[int] = field(default_factory=set)
    # Some in-scope prompt tokens came from the prefix cache: the prompt must be recomputed.
    prompt_cached: bool = False
    # Some step's firings could not be attributed: prompt and output must be recomputed.
    incomplete: bool = False

    def to_dict(self) -> dict:
        return {"owners": sorted(self.owners), "prompt_cached": self.prompt_cached,
                "incomplete": self.incomplete}


class FiredLog:
    """Records by the server's request id, oldest dropped beyond `capacity` (requests that are
    never taken: aborted ones, the server's own verification requests)."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._records: OrderedDict[str, FiredRecord] = OrderedDict()

    def open(self, key: str, first_position: int, turn_start: int) -> None:
        """A request seen in a step; on first sight, `first_position` is how many of its
        prompt tokens the prefix cache served (the engine computes from there)."""
        if key in self._records:
            return
        self._records[key] = FiredRecord(prompt_cached=first_position > turn_start)
        while len(self._records) > self.capacity:
            self._records.popitem(last=False)

    def add(self, key: str, owners: Iterable[int]) -> None:
        record = self._records.get(key)
        if record is not None:
            record.owners.update(int(o) for o in owners)

    def lose_step(self, keys: Iterable[str]) -> None:
        """A step whose tokens could not be told apart by request: every open record, and
        those of `keys` (the runner's requests of the step), may miss firings."""
        for key in keys:
            self.open(key, 0, 0)
        for record in self._records.values():
            record.incomplete = True

    def take(self, key: str) -> dict | None:
        """The request's record, removed; None when none was kept."""
        record = self._records.pop(key, None)
        return None if record is None else record.to_dict()

    def __len__(self) -> int:
        return len(self._records)
