"""Plain decoding with llama.cpp through `llama-cpp-python`: the bench's `llama.cpp` rows (`hf-specdec bench
--backends ...,llama.cpp`), the reference for what ONNX Runtime's int4 graphs gain or lose against llama.cpp's own
kernels on the same GGUF weights.

The runner feeds token ids (the bench's prompts, tokenized by the Hugging Face tokenizer, which transformers built
from the same GGUF), decodes one token per forward, greedy at temperature 0 and at temperature T > 0 samples from the
full distribution (top-k, top-p, min-p and typical-p off, no repetition penalty: what the bench's other rows do), and
stops at an eos token or after `max_new_tokens`. `prompt_lookup(n)` is the same model with llama-cpp-python's own
speculation (`LlamaPromptLookupDecoding`: up to n tokens copied from where the last two tokens occurred before in the
prompt or the reply, scored in one forward; a drafted token is kept where the token sampled at its position equals
it, which keeps greedy and sampled output the model's).

`llama-cpp-python` is an optional dependency (`pip install "hf-specdec[llama-cpp]"`) that builds llama.cpp from
source. A default build targets the build machine's CPU (GGML_NATIVE) and, on machines whose CPUs differ from what
the compiler detects, dies with "Illegal instruction" at the first model load; build it for AVX2 instead (`BUILD`).
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"
BUILD = f'CMAKE_ARGS="{CMAKE_ARGS}" pip install --no-cache-dir "hf-specdec[llama-cpp]"'
INSTALL_HINT = (
    f"llama.cpp rows need llama-cpp-python, which builds llama.cpp from source: pip install llama-cpp-python with "
    f"CMAKE_ARGS=\"{CMAKE_ARGS}\" ({BUILD}); a default native build dies with \"Illegal instruction\" on these "
    "machines; see export/README.md (Quantized exports)"
)


class LlamaCppUnavailable(ImportError):
    """llama-cpp-python is not installed; the message says how to build it."""


def available() -> bool:
    """Whether `llama_cpp` can be imported (without importing it: it loads the native library)."""
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass
class LlamaCppGeneration:
    """One prompt's continuation: the new tokens, the seconds to the first one (prompt evaluation and the first
    sample) and in all."""

    tokens: list[int]
    prefill_seconds: float
    seconds: float
    forwards: int  # llama.cpp evaluations, the prompt's included (plain decoding: one per token)


class LlamaCppRunner:
    """A GGUF model in llama.cpp (`llama_cpp.Llama`), CPU only, `threads` threads for decoding and prompts."""

    def __init__(self, gguf_path: "str | Path", threads: int | None = None, context: int = 2048, seed: int = 0,
                 prompt_lookup_tokens: int | None = None):
        try:
            from llama_cpp import Llama
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        except ImportError as error:
            raise LlamaCppUnavailable(INSTALL_HINT) from error
        if not Path(gguf_path).is_file():
            raise FileNotFoundError(f"no GGUF file at {gguf_path}")
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.path, self.threads, self.seed = Path(gguf_path), threads, seed
        self.prompt_lookup_tokens = prompt_lookup_tokens
        draft = None if prompt_lookup_tokens is None else LlamaPromptLookupDecoding(num_pred_tokens=prompt_lookup_tokens)
        self.model = Llama(model_path=str(gguf_path), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                           n_gpu_layers=0, seed=seed, verbose=False, draft_model=draft)
        self._with_lookup: dict[int, LlamaCppRunner] = {}
        self.vocab_size = self.model.n_vocab()
        self.context = self.model.n_ctx()
        self.eos_token_id = self.model.token_eos()

    def prompt_lookup(self, tokens: int) -> "LlamaCppRunner":
        """The same GGUF with llama-cpp-python's prompt-lookup speculation of up to `tokens` tokens (loaded once)."""
        if tokens not in self._with_lookup:
            self._with_lookup[tokens] = LlamaCppRunner(self.path, self.threads, self.context, self.seed, tokens)
        return self._with_lookup[tokens]

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                 eos_token_ids: Sequence[int] | None = None) -> LlamaCppGeneration:
        """Decode up to `max_new_tokens` after `prompt_ids` (greedy at temperature 0), from an empty cache."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("llama.cpp needs at least one prompt token")
        if len(prompt) + max_new_tokens > self.context:
            raise ValueError(f"{len(prompt)} prompt + {max_new_tokens} new tokens exceed the llama.cpp context of "
                             f"{self.context} (LlamaCppRunner(context=...))")
        if temperature < 0 or math.isnan(temperature):
            raise ValueError(f"temperature {temperature}: expected >= 0 (0 = greedy)")
        stop = {self.eos_token_id} if eos_token_ids is None else {int(t) for t in eos_token_ids}
        self.model.reset()  # no prefix reuse from the previous prompt: every prompt is evaluated in full
        self.model.set_seed(seed)
        sampling = dict(temp=float(temperature), top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)
        tokens, first, forwards = [], None, 0
        evaluate = self.model.eval

        def counted(batch):  # every llama.cpp forward goes through Llama.eval
            nonlocal forwards
            forwards += 1
            return evaluate(batch)

        self.model.eval = counted
        start = time.perf_counter()
        try:
            if max_new_tokens > 0:
                for token in self.model.generate(prompt, reset=True, **sampling):
                    if first is None:
                        first = time.perf_counter() - start
                    tokens.append(int(token))
                    if tokens[-1] in stop or len(tokens) >= max_new_tokens:
                        break
        finally:
            del self.model.eval  # the class's method again
        seconds = time.perf_counter() - start
        return LlamaCppGeneration(tokens, seconds if first is None else first, seconds, forwards)
