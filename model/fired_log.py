"""Which memorized facts fired for which request, recorded in the engine's own forward.

A response's `mome_facts` names the facts whose experts fired while that request was served.
The engine's forward knows which request each token of a step belongs to (the runner's
batch, model/vllm_model.py), so the memory layer's firing decisions are recorded there, per
request, and the server takes a request's record once the request has finished. The server
asks through `collective_rpc`, which runs between engine steps: every step of that request
came before it. The server counts firings before the last generated token's position: that
token is not forwarded, or when it is (one more step runs while the API process finds a stop
string), nothing the client got depends on it.

A record cannot speak for tokens this forward did not compute. Prompt tokens the prefix
cache served were computed for an earlier request with the same prompt: the log keeps what
fired in each fully computed prompt, by the prompt's cache key (its prefix-cache salt and
tokens: the same KV, computed under the same experts and words), and a request whose prompt
the cache served takes the firings from there. What it still cannot see the record says,
and the server recomputes those tokens (`FactsService.fired_owners`), so `mome_facts`
stays exact: a prompt that shares only a prefix with earlier ones, an equal prompt whose
entry is not there (evicted, or its first computation still running: vLLM shares blocks
as soon as they are allocated, so concurrent equal prompts and the choices of one `n > 1`
request are recomputed), a step whose batch was not laid out as the runner's.

One inexactness is the prefix cache's own: blocks cached by one computation and the entry
kept by another can differ where firing depended on something the key does not hold (a
chunk computed before the turn's relation-word sum was known; a request salted just before
a store refresh). Both are rare and bounded by what the cache itself reuses.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

# The keys in a request's `SamplingParams.extra_args` naming it for the log, and its prompt
# as the prefix cache sees it (salt and tokens, `prompt_cache_key`).
FIRED_KEY = "mome_fired_key"
PROMPT_KEY = "mome_prompt_key"


def prompt_cache_key(salt: str, prompt_ids: Sequence[int]) -> str:
    """Names a prompt as the prefix cache does: requests with equal keys share its KV."""
    tokens = np.asarray(prompt_ids, dtype=np.int64).tobytes()
    return f"{salt}:{hashlib.blake2b(tokens, digest_size=12).hexdigest()}"


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
        # Prompt cache key -> owner -> the lowest prompt position it fired at, for prompts
        # computed whole (by this request or, in turn, from this table); the newest kept.
        self._prompts: OrderedDict[str, dict[int, int]] = OrderedDict()

    def step(self, key: str, first_position: int, n_tokens: int, turn_start: int,
             prompt_len: int, prompt_key: str | None = None) -> None:
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
                if not self._fill_prompt(record, prompt_key, first_position, prompt_len):
                    record.prompt_cached = True
            if first_position > prompt_len:
                record.incomplete = True
        record.computed_to = max(record.computed_to, first_position + n_tokens)

    def _fill_prompt(self, record: FiredRecord, prompt_key: str | None, upto: int,
                     prompt_len: int) -> bool:
        """Take the firings of the prompt positions below `upto` from an earlier request
        with the same prompt, if one was kept."""
        known = self._prompts.get(prompt_key) if prompt_key else None
        if known is None or upto > prompt_len:
            return False
        self._prompts.move_to_end(prompt_key)
        for owner, at in known.items():
            if at < upto:
                record.first_fired[owner] = min(at, record.first_fired.get(owner, at))
        return True

    def keep_prompt(self, key: str, prompt_key: str | None, prompt_len: int) -> None:
        """After the firings of the step that completed a request's prompt are added: if the
        whole prompt is accounted for, keep what fired in it for later requests the prefix
        cache serves."""
        record = self._records.get(key)
        if (prompt_key is None or record is None or record.computed_to < prompt_len
                or record.prompt_cached or record.incomplete):
            return
        self._prompts[prompt_key] = {o: at for o, at in record.first_fired.items()
                                     if at < prompt_len}
        self._prompts.move_to_end(prompt_key)
        while len(self._prompts) > self.capacity:
            self._prompts.popitem(last=False)

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
