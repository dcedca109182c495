"""Which memorized facts fired for which request, recorded in the engine's own forward.

A response's `mome_facts` names the facts whose experts fired while that request was served.
The engine's forward knows which request each token of a step belongs to (the runner's
batch, model/vllm_model.py), so the memory layer's firing decisions are recorded there, per
request, and the server takes a request's record once the request has finished. The server
asks through `collective_rpc`, which runs between engine steps: every step of that request
came before it. The server counts firings before the last generated token's position: that
token is not forwarded, or when it is (one more step runs while the API process finds a stop
string), nothing the client got depends on it.

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
    # Owner -> the lowest position it fired at: a token forwarded after the answer ended
    # (the step that runs while a stop string is being found) must not count.
    first_fired: dict[int, int] = field(default_factory=dict)
    computed_to: int = 0  # positions below this were computed in logged steps, or flagged
    # Some in-scope prompt tokens were not computed here (the prefix cache served them).
    prompt_cached: bool = False
    # Some generated tokens were not computed here: prompt and output must be recomputed.
    incomplete: bool = False

    def to_dict(self, before: int | None) -> dict:
        owners = [o for o, at in self.first_fired.items() if before is None or at < before]
        return {"owners": sorted(owners), "prompt_cached": self.prompt_cached,
                "incomplete": self.incomplete}


class FiredLog:
    """Records by the server's request id, oldest dropped beyond `capacity` (requests that are
    never taken). A record dropped while its request still runs comes back flagged: its
    next step starts past position 0, as after a prefix-cache hit."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._records: OrderedDict[str, FiredRecord] = OrderedDict()

    def step(self, key: str, first_position: int, n_tokens: int, turn_start: int,
             prompt_len: int) -> None:
        """A request computed `n_tokens` from `first_position` in this step. Positions it
        jumps over were served by the prefix cache (at first sight, or when a preempted
        request resumes past blocks another request computed meanwhile)."""
        record = self._records.get(key)
        if record is None:
            record = self._records[key] = FiredRecord()
            while len(self._records) > self.capacity:
                self._records.popitem(last=False)
        if first_position > record.computed_to:
            if record.computed_to < prompt_len and first_position > turn_start:
                record.prompt_cached = True
            if first_position > prompt_len:
                record.incomplete = True
        record.computed_to = max(record.computed_to, first_position + n_tokens)

    def add(self, key: str, owners: Iterable[int], positions: Iterable[int]) -> None:
        record = self._records.get(key)
        if record is None:
            return
        for owner, at in zip(owners, positions):
            owner, at = int(owner), int(at)
            record.first_fired[owner] = min(at, record.first_fired.get(owner, at))

    def lose_step(self, keys: Iterable[str]) -> None:
        """A step whose tokens could not be told apart by request: every open record, and
        those of `keys` (the runner's requests of the step), may miss firings."""
        for key in keys:
            self._records.setdefault(key, FiredRecord())
        for record in self._records.values():
            record.incomplete = True

    def take(self, key: str, before: int | None = None) -> dict | None:
        """The request's record, removed, naming the facts that fired at positions below
        `before`; None when none was kept."""
        record = self._records.pop(key, None)
        return None if record is None else record.to_dict(before)

    def __len__(self) -> int:
        return len(self._records)
