"""The two spellings of a model's cache across the transformers releases we support.

transformers up to 5.23 passes the cache to a model's `forward` as `past_key_values` and reads it back
from `output.past_key_values`; from 5.24 on it passes `cache=` and reads `output["cache"]` (the old
names still work there, but print a deprecation warning, and a `forward` that reads only
`past_key_values` silently gets no cache from `generate`). Our models take both spellings from users
and from transformers, and hand the cache on, and return it, under the name the running transformers
uses, so no release prints a warning per forward.
"""
from __future__ import annotations

import inspect

from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutputWithPast

# the keyword `generate` passes to `forward` in this transformers ("cache" from 5.24 on)
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"
# the field the output classes declare for it
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def one_cache(cache, past_key_values, where: str):
    """The cache passed under either name (`cache=` or `past_key_values=`); both at once must be the
    same object (generate in one release may hold it under both names)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError(f"{where}: got both `cache` and `past_key_values`; pass the cache once, as `cache` "
                         f"(transformers >= 5.24) or `past_key_values`")
    return cache if cache is not None else past_key_values


def cache_field(cache) -> dict:
    """`{field: cache}` for building a transformers output class without its deprecation warning."""
    return {CACHE_FIELD: cache}


def output_cache(output):
    """The cache held by a model output (a transformers `ModelOutput`), without a deprecation warning."""
    return output.get(CACHE_FIELD)


def generate_cache_kwargs(kwargs: dict, where: str) -> dict:
    """`generate` kwargs with a user's cache under the name this transformers expects."""
    cache = one_cache(kwargs.pop("cache", None), kwargs.pop("past_key_values", None), where)
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    return kwargs
