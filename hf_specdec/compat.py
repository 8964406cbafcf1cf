"""What differs between the transformers 5.x releases hf_specdec runs on, kept in one place.

From 5.24 on, a model's forward takes its KV cache as `cache` and returns it as `cache`; `past_key_values` still works
there but warns on every call, and goes in 5.40. Before 5.24 only `past_key_values` exists. Which one a model takes is
read from its forward's signature (the deprecation wrapper keeps the new one), once per class.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def _cache_keyword(model_class: type) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model) -> str:
    """The keyword under which the forward of `model` (a module, or a module class) takes its KV cache."""
    return _cache_keyword(model if isinstance(model, type) else type(model))


def cache_argument(model, cache) -> dict:
    """The keyword argument that hands `cache` to the forward of `model` (a module, or a module class)."""
    return {cache_keyword(model): cache}


def user_cache(model_kwargs: dict):
    """The KV cache a user passed to `generate` (under `cache` from 5.24 on, whichever keyword they used)."""
    return model_kwargs.get("cache", model_kwargs.get("past_key_values"))


def returned_cache(output):
    """The KV cache a model's forward returned (`cache` from 5.24 on, `past_key_values` before)."""
    return output["cache"] if "cache" in output else output.get("past_key_values")
