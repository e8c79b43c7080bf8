"""Expert routing pinned to the oracle's, so an MoE family is judged on its maths, not on a coin flip.

An MoE router picks each token's top-k experts. In bfloat16 two experts' scores can round to the same side of
each other in one run and to the other side in another: a packed run and a run of each sample alone then send a
token to different experts, and its output moves by a whole expert's contribution. That is not a packing bug
(the attention, the thing packing changes, can be exact to the last bit), but the tolerance rule cannot tell it
from one: the plain bfloat16 run (the yardstick) may keep the oracle's choice while the packed run flips one token.

So the oracle run records each MoE block's choice, token by token, and the other runs replay it::

    oracle (fp32/fp64, each sample alone)     record   block l, token t -> experts {e1, e2}
    yardstick (test dtype, each sample alone) replay   the same experts, weights from its own scores
    packed (test dtype, patched)              replay   the same experts, weights from its own scores

Only the selection is imposed: the routing weights are still the run's own scores gathered at those experts,
so the router's weights keep their gradient and any error in the scores themselves still shows. How many tokens
a replaying run would have routed otherwise is counted (``flips``) and reported with the case.

The blocks are the family's ``FamilySpec.moe_blocks`` classes. Inside one, the choice is the ``torch.topk`` call
over all ``E`` experts (``E`` rows of the router's weight) taking ``num_experts_per_tok``; GLM-4V-MoE's group
pre-selection calls ``topk`` over groups and is left alone (the imposed choice overrides its outcome). Tokens are
taken in order: a block sees the samples' tokens one forward after the other, alone or packed, in the same order.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["RoutingPin", "moe_blocks"]


def moe_blocks(model, class_names) -> list[torch.nn.Module]:
    """The model's MoE blocks (instances of the named classes), in module order."""
    names = set(class_names)
    return [m for m in model.modules() if type(m).__name__ in names]


def _experts(block) -> int:
    gate = block.gate
    weight = getattr(gate, "weight", None)
    if weight is None or weight.dim() != 2:
        raise TypeError(f"{type(block).__name__}.gate has no (experts, hidden) weight: cannot pin its routing")
    return int(weight.shape[0])


class RoutingPin:
    """Record the routing of one run of a model, then replay it in runs of (copies of) the same model.

    ``record(model)`` and ``replay(model)`` are context managers over whole runs: every forward inside adds to
    (or consumes from) the record, block by block. After a replay, ``flips`` holds how many tokens that run would
    have sent to other experts, summed over the blocks.
    """

    def __init__(self, class_names, top_k: int):
        self.class_names = tuple(class_names)
        self.top_k = int(top_k)
        self.choices: list[list[torch.Tensor]] = []  # per block, the (tokens, k) indices of each call in order
        self.flips = 0

    @contextlib.contextmanager
    def record(self, model):
        blocks = moe_blocks(model, self.class_names)
        self.choices = [[] for _ in blocks]

        def choose(i, real, scores, k):
            values, indices = real(scores, k, dim=-1)
            self.choices[i].append(indices.detach().cpu())
            return values, indices

        with self._intercept(blocks, choose):
            yield self

    @contextlib.contextmanager
    def replay(self, model):
        blocks = moe_blocks(model, self.class_names)
        if len(blocks) != len(self.choices):
            raise ValueError(f"recorded {len(self.choices)} MoE blocks, the model has {len(blocks)}")
        pending = [torch.cat(calls) if calls else torch.empty(0, self.top_k, dtype=torch.long) for calls in self.choices]
        cursor = [0] * len(blocks)
        self.flips = 0

        def choose(i, real, scores, k):
            tokens = scores.reshape(-1, scores.shape[-1]).shape[0]
            start, end = cursor[i], cursor[i] + tokens
            if end > pending[i].shape[0]:
                raise ValueError(f"MoE block {i}: the replay asks for more tokens ({end}) than were recorded")
            cursor[i] = end
            imposed = pending[i][start:end].to(scores.device).reshape(*scores.shape[:-1], k)
            own = real(scores, k, dim=-1)[1]
            self.flips += int((own.sort(-1).values != imposed.sort(-1).values).any(-1).sum())
            return scores.gather(-1, imposed), imposed

        with self._intercept(blocks, choose):
            yield self
        unused = [i for i, (c, p) in enumerate(zip(cursor, pending)) if c != p.shape[0]]
        if unused:
            raise ValueError(f"MoE blocks {unused}: the replay used fewer tokens than were recorded")

    @contextlib.contextmanager
    def _intercept(self, blocks, choose):
        """Route the expert choice (``torch.topk`` over all experts, k = top_k) of each block through ``choose``
        while the block runs; every other ``topk`` goes to torch's own."""
        if not blocks:
            yield
            return
        real = torch.topk
        active: list[int] = []  # the block running now (blocks do not nest)
        experts = [_experts(b) for b in blocks]

        def topk(input, k, dim=-1, largest=True, sorted=True, *, out=None):
            if active and out is None and largest and dim in (-1, input.dim() - 1):
                i = active[-1]
                if input.shape[-1] == experts[i] and k == self.top_k:
                    return torch.return_types.topk(choose(i, real, input, k))
            if out is not None:
                return real(input, k, dim=dim, largest=largest, sorted=sorted, out=out)
            return real(input, k, dim=dim, largest=largest, sorted=sorted)

        def enter(i):
            return lambda module, args: active.append(i)

        def leave(module, args, output):
            active.pop()

        handles = []
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(enter(i)))
            handles.append(block.register_forward_hook(leave))
        eager = _routers_eager(blocks)
        torch.topk = topk
        try:
            yield
        finally:
            torch.topk = real
            for handle in handles:
                handle.remove()
            for router in eager:
                del router.forward


def _routers_eager(blocks) -> list[torch.nn.Module]:
    """Run each block's router outside torch.compile (``qwenvl verify --compile``): the replay's bookkeeping
    (a cursor, the flip count) is host state that breaks the compiled graph inside the router, and transformers'
    routers divide the top-k scores in place right after ``topk``. Broken there, that division is an in-place
    change of the resumed graph's input, which the graph saved for its backward, and the backward fails
    (seen with torch 2.13 on the CPU). Run eagerly, the router's choice, division and cast stay out of the graph; the experts and
    the rest of the layer stay compiled. Where the gate is a bare ``nn.Linear`` (transformers 4.57's Qwen3-Omni
    thinker routes in the block's own forward), the whole block runs eagerly. Returns the modules changed (their
    instance ``forward`` to delete)."""
    changed = []
    for block in blocks:
        gate = getattr(block, "gate", None)
        router = block if type(gate) is torch.nn.Linear else gate
        if isinstance(router, torch.nn.Module) and "forward" not in router.__dict__:
            router.forward = torch.compiler.disable(router.forward)
            changed.append(router)
    return changed
