"""Routing state of one model: a :class:`ForwardCall` per forward, and the two things that span calls.

The tuner's forward pre-hook on the wrapped model starts a new :class:`ForwardCall` with the
inputs the routers may read (the table ``CAPTURED_INPUTS``: attention masks, token ids, task and
group ids), so every call path (``PeftModel.forward``, ``generate``, a direct call of the base
model) sees its own batch. Layers read the call's token mask and record what their aux losses
need; the tuner's forward hook ends the call and turns its records into the losses. An ended call
stays readable (recording nothing) until the next one starts, and a gradient-checkpointing
recomputation in the backward pass gets its own forward's call back
(:func:`recomputing_with_its_call`), whatever forwards ran since.

Two things outlive a call, each an explicit object owned by :class:`RoutingContext`:

- ``given``: inputs handed to every call inside a block (``generate`` gives its ``mope_task_ids``
  to each decoding step, which PEFT and transformers call without them);
- ``decisions``: the :class:`~mope.routing.levels.DecisionCache` of sequence-level decisions
  (later KV-cached tokens reuse the prompt's; ``generate`` pins them to the prompt).

How task ids reach the routers: pass ``mope_task_ids=LongTensor[batch]`` to the model (or to
``generate``). PEFT's task classes (``PeftModelForCausalLM``, ...) claim the name ``task_ids`` for
their own methods and drop it for any other, so mope never relies on it there; where ``task_ids``
does reach the wrapped model (a ``PeftModel`` without ``task_type``, ``generate``, a direct call of
the base model) it is read too. ``group_ids`` (LoRAMoE's localized balancing) is a name PEFT does
not claim. Hugging Face's ``Trainer`` keeps only dataset columns the base model's ``forward``
names: train with ``remove_unused_columns=False`` to keep these columns.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from .base import Router, RoutingInputs
from .levels import DecisionCache, per_example
from .schedule import schedules_at


@dataclass(frozen=True)
class CapturedInput:
    """A forward argument the tuner's pre-hook records for the routers, under the name ``key``.

    ``consumed``: the argument is mope's own (the base model does not know it), so the pre-hook
    removes it from the call; otherwise it is passed on unchanged.
    """

    name: str
    consumed: bool = False
    key: str = ""

    @property
    def routing_key(self) -> str:
        return self.key or self.name

    def check(self, value: Any) -> None:
        """mope's own per-example ids must be tensors: a list (or numpy array) was taken out of the call unread, and
        the routing fell back to a fixed task, or said the ids were missing."""
        if self.consumed and value is not None and not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{self.name} must be a 1-D integer tensor [batch] (torch.tensor(...)), got a {type(value).__name__}."
            )


# Later entries win for the same key: mope_task_ids over task_ids.
CAPTURED_INPUTS: tuple[CapturedInput, ...] = (
    CapturedInput("attention_mask"),
    CapturedInput("decoder_attention_mask"),
    CapturedInput("input_ids"),
    CapturedInput("decoder_input_ids"),
    CapturedInput("task_ids", consumed=True),
    CapturedInput("mope_task_ids", consumed=True, key="task_ids"),
    CapturedInput("group_ids", consumed=True),
)
# The token ids that go with the tokens an attention mask covers (hash routing reads them).
TOKEN_IDS_FOR_MASK: dict[str, str] = {"attention_mask": "input_ids", "decoder_attention_mask": "decoder_input_ids"}


@dataclass
class LossRecord:
    """What one layer's aux loss needs, kept during the forward; the loss itself is computed after it.

    Computing every layer's loss at the end, batched over the layers (``AuxLoss.values``), takes a
    handful of kernels instead of a dozen per layer: on a GPU a step is mostly kernel launches.
    """

    adapter_name: str
    loss_name: str
    routing: Any  # mope.routing.Routing
    mask: torch.Tensor | None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ForwardCall:
    """One forward of the wrapped model: its routing inputs, and what its layers record for the losses."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    collecting: bool = False
    records: list[LossRecord] = field(default_factory=list)
    # (adapter name, block name) -> Routing of the block's leader layer in this forward
    block_routings: dict[tuple[str, str], Any] = field(default_factory=dict)
    # the losses' token weights of each mask, computed once per call (mope.losses.cached_token_weights)
    token_weights: dict = field(default_factory=dict)
    # whether the call continues a KV cache that holds tokens (a decoding step): only then may a layer that sees
    # fewer tokens than the mask reuse a kept decision; otherwise it sees the last ones (logits_to_keep)
    continues_cache: bool = False
    # logits_to_keep=k of a causal LM's forward (its lm_head sees the last k tokens), 0 if not given
    kept_logits: int = 0
    # the aux loss's share of an accumulated batch (mope.outputs.accumulation_share), None outside Trainer's
    aux_share: torch.Tensor | None = None
    # (router schedule, its step) at the start of the call: the step advances at the call's end, before gradient
    # checkpointing recomputes its layers in backward, which must route with the call's top_k and temperature
    schedule_counts: list[tuple[Any, int]] = field(default_factory=list)
    # an audio model's mask over its frames, from its mask over samples (Wav2Vec2's
    # _get_feature_vector_attention_mask(frames, mask)), or None; computed once per frame count
    frame_mask: Any = None
    frame_masks: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class RoutingContext:
    """The routing state shared by all MoPE layers of one model (see the module docstring). One call at a time:
    two threads running the same model's forwards at once would read each other's inputs."""

    call: ForwardCall = field(default_factory=ForwardCall)
    given: dict[str, torch.Tensor] = field(default_factory=dict)
    decisions: DecisionCache = field(default_factory=DecisionCache)
    # an encoder-decoder's: its layers over the encoder's tokens never run in a cached step (set by the tuner)
    encoder_decoder: bool = False

    def begin(self, inputs: dict[str, torch.Tensor], collecting: bool, continues_cache: bool = False) -> ForwardCall:
        """Start a new call with these routing inputs; ``collecting``: record aux-loss inputs (training)."""
        self.call = ForwardCall(inputs, collecting, continues_cache=continues_cache)
        return self.call

    def finish(self) -> list[LossRecord]:
        """End the current call's recording and hand over its records. Its block leaders' routings go too: they
        held the forward's autograd graph after its output was freed (a checkpointed block's recomputation routes
        its leader again before its followers)."""
        call = self.call
        call.collecting = False
        records, call.records = call.records, []
        call.block_routings.clear()
        return records

    @property
    def block_routings(self) -> dict[tuple[str, str], Any]:
        return self.call.block_routings

    def record(self, record: LossRecord) -> None:
        """Keep ``record`` if the call is collecting; outside one (e.g. a checkpointing recomputation) drop it."""
        if self.call.collecting:
            self.call.records.append(record)

    def token_mask(self, key: str, token_shape: torch.Size) -> torch.Tensor | None:
        """The ``[batch, seq]`` mask (1 = real token) for a layer input of leading shape ``token_shape``.

        With a KV cache the layer sees only the newest tokens while the attention mask covers
        past and new ones; the new tokens are its last columns (so too for one token without a
        cache: an lm_head under ``logits_to_keep=1``). Inside generate, a prompt given a 4-D mask (a
        static cache) gets the prompt's own. An input of one vector per example
        (``[batch, hidden]``) gets whether each example has a real token. Inputs whose shape fits no
        mask get None: every token counts. So do layers that see more than one token, but fewer than
        the mask, outside a cached step: their tokens are not the mask's (a vision tower beside the
        text its mask covers), except an audio model's frames against its mask over samples, where the
        model says which frames are real (``frame_mask``).
        """
        mask = self.call.inputs.get(key)
        if (mask is None or mask.dim() != 2) and key == "attention_mask":
            # a static cache's prompt forward inside generate gets a 4-D mask (or a dict of them): the prompt's own
            return self.decisions.mask_of_prompt(token_shape)
        if mask is None or mask.dim() != 2 or mask.shape[0] != token_shape[0]:
            return None
        if len(token_shape) == 1:  # one vector per example (BERT's pooler): an example of padding only is padding
            return mask.any(-1).to(mask.dtype)
        if len(token_shape) != 2:
            return None
        seq = token_shape[1]
        if mask.shape[1] == seq:
            return mask
        if self.newest_tokens(mask.shape[1], seq):
            return mask[:, -seq:]
        if key == "attention_mask" and self.call.frame_mask is not None and seq < mask.shape[1]:
            if seq not in self.call.frame_masks:
                self.call.frame_masks[seq] = self.call.frame_mask(seq, mask).to(mask.dtype)
            return self.call.frame_masks[seq]
        return None

    def newest_tokens(self, covered: int, seq: int) -> bool:
        """Whether a layer's ``seq`` tokens are the last of the ``covered`` a mask or ids cover: a cached step's,
        or an lm_head's under ``logits_to_keep`` (one token, or the k the call keeps: TRL's GRPO keeps a completion)."""
        return seq < covered and (self.call.continues_cache or seq in (1, self.call.kept_logits))

    def flattened(self, key: str, token_shape: torch.Size) -> tuple[int, int] | None:
        """``(batch, seq)`` if a layer's input ``[rows, hidden]`` is the mask's tokens flattened, else None.

        Some blocks flatten the tokens before a linear (Qwen2-MoE's shared expert): ``batch * seq`` rows for a
        ``[batch, seq]`` mask (a static cache's prompt: its own mask), or ``batch * new`` rows
        (1 < new < seq) in a forward that continues a KV cache. ``[batch, hidden]`` (a pooler, a head, one decoded
        token per example) is not flattened.
        """
        if len(token_shape) != 1:
            return None
        mask, rows = self.call.inputs.get(key), token_shape[0]
        if (mask is None or mask.dim() != 2) and key == "attention_mask" and not self.call.continues_cache:
            # a static cache's prompt forward inside generate gets a 4-D mask: the prompt's own (beams repeat it)
            prompt = self.decisions.prompt_mask if self.decisions.pinned else None
            if prompt is not None:
                if prompt.shape[1] < 2 or rows % prompt.shape[1] or rows // prompt.shape[1] % len(prompt):
                    return None
                return rows // prompt.shape[1], prompt.shape[1]
        if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
            return None
        batch, seq = mask.shape
        if rows == batch * seq:
            return batch, seq
        if (
            self.call.continues_cache
            and not torch.compiler.is_compiling()
            and rows % batch == 0
            and 1 < rows // batch < seq
        ):
            return batch, rows // batch
        return None

    def aligned(self, key: str, token_shape: torch.Size) -> torch.Tensor | None:
        """Input ``key`` (``[batch, seq]``) cut to the layer's tokens: its last columns, as for the mask."""
        value = self.call.inputs.get(key)
        if value is None or value.dim() != 2 or token_shape[0] % value.shape[0] != 0:
            return None
        if len(token_shape) == 1:  # [batch, hidden]: a cached step's new token per example, where a block flattens
            newest = self.call.continues_cache and not torch.compiler.is_compiling()  # (see routing_inputs)
            return value[:, -1] if newest and value.shape[0] == token_shape[0] else None
        if len(token_shape) != 2:
            return None
        if value.shape[0] != token_shape[0]:  # generate's encoder ids, under beams / num_return_sequences
            value = value.repeat_interleave(token_shape[0] // value.shape[0], dim=0)
        seq = token_shape[1]
        if value.shape[1] == seq:
            return value  # no slice (a few us) when it already fits
        return value[:, -seq:] if self.newest_tokens(value.shape[1], seq) else None

    def routing_inputs(self, mask_key: str, token_shape: torch.Size) -> RoutingInputs:
        """Everything a router of a layer whose tokens the mask ``mask_key`` covers may look at."""
        inputs = self.call.inputs
        mask = inputs.get(mask_key)
        cache_step = False
        if mask is not None and mask.dim() == 2 and self.call.continues_cache:
            new = token_shape[1] if len(token_shape) == 2 else None
            if token_shape == mask.shape[:1] and not torch.compiler.is_compiling():
                # [batch, hidden]: one new token per example where a block flattens them (see flattened); compiled,
                # every call counts as continuing a cache (the tuner's hook), and a pooler's input would too
                new = 1
            cache_step = new is not None and mask.shape[1] > new
        elif self.call.continues_cache and not torch.compiler.is_compiling():
            # no [batch, seq] mask (none given, a 4-D one, a dict of them): a forward continuing a cache that holds
            # tokens runs its layers on the new tokens only (a hand-written loop; transformers' own generate). Not
            # an encoder's layers: the encoder called directly after a cached step reads that step's call
            encoder = self.encoder_decoder and mask_key == "attention_mask"
            cache_step = len(token_shape) in (1, 2) and not encoder
        return RoutingInputs(
            token_mask=self.token_mask(mask_key, token_shape),
            token_ids=self.aligned(TOKEN_IDS_FOR_MASK.get(mask_key, "input_ids"), token_shape),
            task_ids=inputs.get("task_ids"),
            group_ids=inputs.get("group_ids"),
            cache_step=cache_step,
            decisions=self.decisions,
            captured=inputs,
        )

    @contextmanager
    def giving(self, **inputs: torch.Tensor) -> Iterator[None]:
        """Make ``inputs`` part of every call captured inside the block (they override nothing passed directly)."""
        previous = self.given
        self.given = {**previous, **{k: v for k, v in inputs.items() if v is not None}}
        try:
            yield
        finally:
            self.given = previous


def refuse_packed_rows(position_ids: Any) -> None:
    """Refuse rows that hold several sequences, for sequence-level routing: one decision would pool them all.

    Packed and padding-free batches (TRL's ``packing`` / ``padding_free``, transformers'
    ``DataCollatorWithFlattening``) give no attention mask and restart ``position_ids`` at 0 inside a row.
    Only forwards without an attention mask are looked at (one device sync there).
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return
    if bool((position_ids[:, 1:] == 0).any()):
        raise ValueError(
            "routing_level='sequence': a row of this batch holds several sequences (its position_ids restart at 0: "
            "a packed or padding-free batch), and its one decision would pool them all. Train on padded batches "
            "(TRL: packing=False, padding_free=False), or route per token."
        )


def complete_inputs(module: Any, kwargs: dict[str, Any], inputs: dict[str, torch.Tensor]) -> None:
    """What a forward's captured ``inputs`` lack and the model derives itself: multiple choice's ``[batch, choices,
    seq]`` ids and mask (and its per-question task and group ids) as the rows its layers see, and an
    encoder-decoder's decoder ids and mask from its labels (hash routing in the decoder had no token ids; seq2seq
    collators give no decoder mask)."""
    ids = inputs.get("input_ids")
    if ids is not None and ids.dim() == 3:
        for key in ("input_ids", "attention_mask"):
            if key in inputs and inputs[key].shape == ids.shape:
                inputs[key] = inputs[key].flatten(0, 1)
        for key in ("task_ids", "group_ids"):  # one per question (or per choice): one per row its layers see
            labels = inputs.get(key)
            if labels is not None and labels.shape == ids.shape[:1]:
                inputs[key] = labels.repeat_interleave(ids.shape[1])
            elif labels is not None and labels.shape == ids.shape[:2]:
                inputs[key] = labels.flatten()
    if not getattr(getattr(module, "config", None), "is_encoder_decoder", False):
        return
    labels = kwargs.get("labels")
    prepare = getattr(module, "prepare_decoder_input_ids_from_labels", None)
    if "decoder_input_ids" not in inputs and isinstance(labels, torch.Tensor) and prepare is not None:
        inputs["decoder_input_ids"] = prepare(labels=labels)  # the labels shifted right, as the model does
    if "decoder_attention_mask" not in inputs:
        mask = decoder_mask_from_labels(labels, inputs.get("decoder_input_ids"))
        if mask is not None:
            inputs["decoder_attention_mask"] = mask


def decoder_mask_from_labels(labels: Any, decoder_input_ids: torch.Tensor | None) -> torch.Tensor | None:
    """An encoder-decoder's decoder mask where the batch gives none: 1 up to each row's last label that is not -100.

    Seq2seq collators pad labels with -100 and pass no ``decoder_attention_mask``; the decoder input is the
    labels shifted right, so position t is padding where labels t and after are all -100.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
        return None
    if decoder_input_ids is not None and decoder_input_ids.shape != labels.shape:
        return None
    return (labels != -100).flip(1).cummax(dim=1).values.flip(1).long()


def generate_inputs(args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """The captured inputs found in a ``generate`` call (its first positional argument is the ids)."""
    found = {
        spec.name: kwargs[spec.name] for spec in CAPTURED_INPUTS if isinstance(kwargs.get(spec.name), torch.Tensor)
    }
    first = args[0] if args else kwargs.get("inputs")
    if isinstance(first, torch.Tensor) and not first.is_floating_point():
        found.setdefault("input_ids", first)
    return found


def generate_with_routing(model: Any, context: RoutingContext, *args: Any, **kwargs: Any) -> Any:
    """``model.generate`` with mope's inputs given to every step and sequence decisions pinned to the prompt.

    ``generate`` calls the model many times and may call the encoder of an encoder-decoder model
    directly, so mope's own inputs are taken out of its kwargs and given to every call. The routers
    route as in inference even if the model is in training mode (TRL's GRPO generates so): no
    capacity drops, expert choice, noise or jitter, which would make a token depend on the batch's
    later tokens, and cached and uncached generation differ.
    """
    for spec in CAPTURED_INPUTS:
        spec.check(kwargs.get(spec.name))
    given = {
        spec.routing_key: kwargs.pop(spec.name) for spec in CAPTURED_INPUTS if spec.consumed and spec.name in kwargs
    }
    found = generate_inputs(args, kwargs)
    embeds = kwargs.get("inputs_embeds")
    shapes = [found[key].shape for key in ("input_ids", "attention_mask") if key in found]
    shapes += [embeds.shape] if isinstance(embeds, torch.Tensor) else []  # prompts given as embeddings only
    prompts = shapes[0][0] if shapes else None
    if "task_ids" in given and prompts is not None:  # one per prompt; the steps then see them repeated for beams
        given["task_ids"] = per_example(given["task_ids"], prompts, "mope_task_ids", "generate")
    routers = [module for module in model.modules() if isinstance(module, Router)]
    if any(r.level.name == "sequence" for r in routers):
        check_prompt_comes_whole(model, kwargs)
    encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    if encoder_decoder and "input_ids" in found:
        # decoding steps get encoder_outputs, not input_ids, yet the decoder's cross-attention k/v layers
        # route encoder tokens: hash routing reads their ids from here
        given["input_ids"] = found["input_ids"]
    with context.giving(**given):
        # steps that do not pass through the model's forward (an encoder-decoder's encoder) see these
        context.begin({**found, **context.given}, collecting=False)
        context.decisions.clear()
        context.decisions.pinned = True
        mask = found.get("attention_mask")
        if not encoder_decoder and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            context.decisions.prompt_mask = mask
        training = [router for router in routers if router.training]
        for router in training:
            router.train(False)
        inferred = encoder_decoder or context.decisions.prompt_mask is not None
        try:
            with nullcontext() if inferred else recording_inferred_prompt_mask(model, context):
                return model.generate(*args, **kwargs)
        finally:
            context.decisions.pinned = False
            context.decisions.clear()
            # a model whose own generate calls its encoder directly (Whisper) read the last step's call after it:
            # a continued cache, and a plain generate then failed
            context.begin({}, collecting=False)
            for router in training:
                router.train(True)


@contextmanager
def recording_inferred_prompt_mask(model: Any, context: RoutingContext) -> Iterator[None]:
    """Keep the ``[batch, seq]`` mask generate infers for a prompt given without one (from ``pad_token_id``) as the
    prompt's: a static cache gives the prompt's forward only a 4-D mask, and a left-padded row's decision pooled its
    padding (every token of it differed). Set on the instance for this generate only."""
    previous = vars(model).get("prepare_inputs_for_generation")
    prepare = model.prepare_inputs_for_generation

    @functools.wraps(prepare)  # transformers reads its signature (inputs_embeds)
    def recording(*args: Any, **kwargs: Any) -> Any:
        mask = kwargs.get("attention_mask")
        if context.decisions.prompt_mask is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            context.decisions.prompt_mask = mask
        return prepare(*args, **kwargs)

    model.prepare_inputs_for_generation = recording
    try:
        yield
    finally:
        if previous is None:
            del model.prepare_inputs_for_generation
        else:
            model.prepare_inputs_for_generation = previous


# generate's options whose first forward is not the prompt alone: the prompt and draft tokens, or its first chunk
PROMPT_SPLITTING = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "prefill_chunk_size")


def check_prompt_comes_whole(model: Any, kwargs: dict[str, Any]) -> None:
    """Sequence-level routing decides on generate's first forward, which must be the whole prompt and nothing else."""
    if holds_tokens(kwargs.get("cache", kwargs.get("past_key_values"))):
        raise ValueError(
            "routing_level='sequence': generate was given a past_key_values cache that already holds tokens, so "
            "the prompt's decision would see only its uncached tokens; pass the whole prompt without the cache. "
            "(transformers passes one to a model used as another's assistant_model: such a model cannot be one.)"
        )
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    for name in PROMPT_SPLITTING:
        if kwargs.get(name) is not None or getattr(config, name, None) is not None:
            raise ValueError(
                f"routing_level='sequence': generate's {name} makes the first forward something other than the "
                "prompt (the prompt with draft tokens, or its first chunk), and the prompt's decision would be made "
                "on it; generate without it."
            )


def recomputing_with_its_call(checkpoint: Any, context: RoutingContext) -> Any:
    """transformers' checkpoint function, recomputing a layer with the routing call of the forward that ran it: a
    later forward (a reference or metrics pass before ``backward``) replaces ``context.call``, and sequence- or
    task-level routers recomputed with its mask or task ids gave wrong gradients (6.7x off). The checkpointed
    function sets the call itself (a ``context_fn`` doing it was skipped under ``torch.compile``, which takes only
    selective-checkpoint contexts: 1.6x off there), in whichever thread recomputes it. Partials of module-level
    functions, not closures, so a model that trained with checkpointing still pickles."""
    checkpointed = functools.partial(checkpoint_with_the_call, checkpoint, context)
    checkpointed.mope_context, checkpointed.__wrapped__ = context, checkpoint
    return checkpointed


def checkpoint_with_the_call(checkpoint: Any, context: RoutingContext, function: Any, *args: Any, **kwargs: Any) -> Any:
    return checkpoint(functools.partial(run_with_call, context, context.call, function), *args, **kwargs)


def run_with_call(context: RoutingContext, call: ForwardCall, function: Any, *args: Any, **kwargs: Any) -> Any:
    """``function`` (the forward, and its recomputation in backward) with ``call`` as the context's call."""
    current, context.call = context.call, call
    try:
        with schedules_at(call.schedule_counts):
            return function(*args, **kwargs)
    finally:
        context.call = current


def keep_calls_in_recomputation(layers: list[Any], context: RoutingContext) -> None:
    """Wrap each checkpointed layer's ``_gradient_checkpointing_func`` once (see :func:`recomputing_with_its_call`);
    the wrapped function puts the call back itself, so any checkpoint (reentrant or not, compiled or not) recomputes
    with it. A wrapper of another (an unloaded tuner's) context is replaced, not wrapped again."""
    for layer in layers:
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if checkpoint is not None and getattr(checkpoint, "mope_context", None) is not context:
            while getattr(checkpoint, "mope_context", None) is not None:
                checkpoint = checkpoint.__wrapped__
            layer._gradient_checkpointing_func = recomputing_with_its_call(checkpoint, context)


def release_recomputation(layers: list[Any], context: RoutingContext) -> None:
    """Give ``layers`` back transformers' own checkpoint function (unload: the wrapper kept the routing context and
    its last call's inputs alive)."""
    for layer in layers:
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(checkpoint, "mope_context", None) is context:
            layer._gradient_checkpointing_func = checkpoint.__wrapped__


def holds_tokens(cache: Any) -> bool:
    """Whether a forward's KV cache (a transformers ``Cache``, or the legacy tuple of layers) holds any token."""
    if cache is None:
        return False
    length = getattr(cache, "get_seq_length", None)
    if length is not None:
        return length() > 0
    if not isinstance(cache, (tuple, list)):  # another kind (paged attention's, TRL GRPO's paged generation)
        return False
    return len(cache) > 0 and cache[0] is not None and len(cache[0]) > 0 and cache[0][0].shape[-2] > 0
