"""The benchmark behind `hf-specdec bench`: plain generate, HF assisted generation and every speculative method on
the same prompts, in one process, interleaved prompt by prompt, with the RSD paper's metrics.

Metrics (DESIGN §3): block efficiency = generated tokens / target forward passes; MBSU = block efficiency /
(c L + 1) with c = draft parameters / target parameters and L sequential draft passes per step; token rate in
tokens/s and relative to plain `generate` of the same run; accuracy = the target's mean log-likelihood per generated
token, relative to plain decoding at the same temperature (lossless methods stay at 1.0 within its confidence
interval).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from hf_specdec.config import SpeculativeConfig
from hf_specdec.planner import MachineSpeed

# "ar-loop": plain autoregressive decoding through hf_specdec's own loop and backend (speculative_config="ar"), which
# separates what the backend's kernels gain from what speculation gains
# "auto": the planner's pick at each generate call (it learns from the runs before it; plain decoding where no tree pays);
# on onnxruntime, the config the export planned from its own graphs' forwards (`hf_specdec.planner.exported`)
# "prompt-lookup": llama.cpp with llama-cpp-python's own prompt-lookup speculation (llama.cpp only)
METHODS = ("ar", "ar-loop", "hf-assisted", "sd", "spectr", "rsd-c", "rsd-s", "auto", "prompt-lookup")
PROMPT_LOOKUP_TOKENS = 10  # llama-cpp-python's default number of tokens it copies
# "llama.cpp": plain decoding of the target's GGUF through llama-cpp-python (`hf_specdec.llama_cpp_runner`): the
# reference for the int4 ONNX Runtime rows (`--quantize int4`); it runs "ar" and "prompt-lookup" only
BACKENDS = ("pytorch", "onnxruntime", "llama.cpp")
BUDGETS = (6, 10, 14, 21, 30)
# HF assisted generation: its defaults, then a sweep of num_assistant_tokens (constant schedule) for its best
ASSISTED_TOKENS = (1, 2, 3, 4, 5, 6, 8)

# Tree shapes per target budget N (draft tokens the target scores per step). SD drafts a chain of N tokens, as in
# the RSD paper; SpecTr and RSD-S spend the budget as K sequences / W beams of depth N / K; RSD-C branches at the top
# two levels and continues in chains. All tree methods keep a depth of 3 to 10 draft passes.
TREE_SHAPES = {
    6: {"spectr": "spectr:k=2,l=3", "rsd-c": "rsd-c:b=2-2", "rsd-s": "rsd-s:w=2,d=3"},
    10: {"spectr": "spectr:k=2,l=5", "rsd-c": "rsd-c:b=2-2-1", "rsd-s": "rsd-s:w=2,d=5"},
    14: {"spectr": "spectr:k=2,l=7", "rsd-c": "rsd-c:b=2-2-1-1", "rsd-s": "rsd-s:w=2,d=7"},
    21: {"spectr": "spectr:k=3,l=7", "rsd-c": "rsd-c:b=3-2-1-1", "rsd-s": "rsd-s:w=3,d=7"},
    30: {"spectr": "spectr:k=3,l=10", "rsd-c": "rsd-c:b=2-2-1-1-1-1-1-1", "rsd-s": "rsd-s:w=3,d=10"},
}


def config_for_budget(method: str, budget: int) -> SpeculativeConfig:
    """The tree shape `method` uses at target budget `budget` (see TREE_SHAPES)."""
    if method == "sd":
        return SpeculativeConfig.sd(budget)
    if budget not in TREE_SHAPES:
        raise ValueError(f"no {method} shape for budget {budget}; budgets with shapes: {sorted(TREE_SHAPES)}")
    return SpeculativeConfig.parse(TREE_SHAPES[budget][method])


@dataclass
class Setting:
    """One measured setting: a method with a config (or HF assisted with num_assistant_tokens) at a temperature, with
    one of the bench's drafts (HF assisted: always the standalone one, the only kind it can run)."""

    method: str
    config: str
    budget: int
    temperature: float
    draft_passes: int  # L: sequential draft forwards per step
    assistant_tokens: int | None = None  # hf-assisted only; None = HF's defaults
    backend: str = "pytorch"
    draft: str = ""  # a key of the bench's drafts ("" for plain decoding)
    weights: str = ""  # how the backend stores the weights where not as the PyTorch model ("int4", "gguf:Q4_1")


@dataclass
class Record:
    method: str
    config: str
    budget: int
    temperature: float
    block_efficiency: float
    mbsu: float
    tokens_per_s: float
    speedup: float
    accuracy: float
    accuracy_ci: tuple[float, float]
    generated_tokens: int
    seconds: float
    target_calls: int
    draft_calls: int
    backend: str = "pytorch"
    draft: str = ""
    weights: str = ""
    ran: str = ""  # auto: the configs it ran (one per prompt, distinct, in order)
    step_ms: float = float("nan")  # measured: decoding time per target call (our loop; HF's: per forward)
    predicted_step_ms: float = float("nan")  # the planner's prediction of the steps that ran, at their depths
    log_likelihoods: list[float] = field(default_factory=list, repr=False)  # per prompt, mean per token
    # 95% interval of block_efficiency over the prompts (bootstrap of tokens / target calls, prompts resampled)
    block_efficiency_ci: tuple[float, float] = (float("nan"), float("nan"))
    prompt_tokens: list[int] = field(default_factory=list, repr=False)  # per prompt: tokens generated
    prompt_target_calls: list[int] = field(default_factory=list, repr=False)  # per prompt: target forwards

    def as_json(self) -> dict:
        record = asdict(self)
        record.pop("log_likelihoods")
        return record


def settings_for(methods, budgets, temperatures, backends=("pytorch",), assisted_tokens=ASSISTED_TOKENS,
                 drafts=("draft",), assistant: str | None = "draft", weights: dict[str, str] | None = None) -> list[Setting]:
    """Every (backend, temperature, method, shape, draft) to measure: the speculative methods with each of `drafts`,
    HF assisted generation (on PyTorch only) with `assistant` (None: no HF assisted rows); llama.cpp runs plain
    decoding ("ar") and its own prompt lookup ("prompt-lookup") only. `weights`: backend -> how it stores the weights,
    recorded with its settings."""
    settings = []
    for backend in backends:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        stored = (weights or {}).get(backend, "")
        if backend == "llama.cpp":
            lookup = PROMPT_LOOKUP_TOKENS
            for t in temperatures:
                if "ar" in methods:
                    settings.append(Setting("ar", "ar", 0, t, 0, backend=backend, weights=stored))
                if "prompt-lookup" in methods:
                    settings.append(Setting("prompt-lookup", f"prompt-lookup:n={lookup}", lookup, t, 0,
                                            backend=backend, weights=stored))  # drafting is a lookup: no forwards
            continue
        before = len(settings)
        for temperature in temperatures:
            for method in methods:
                if method == "ar":
                    settings.append(Setting("ar", "ar", 0, temperature, 0, backend=backend))
                elif method == "ar-loop":
                    if backend == "pytorch":  # on other backends "ar" already runs through the loop
                        settings.append(Setting("ar-loop", "ar", 0, temperature, 0))
                elif method == "prompt-lookup":
                    continue  # llama.cpp's own (above)
                elif method == "auto":
                    if backend == "pytorch":  # the planner's pick at each call
                        settings += [Setting("auto", "auto", 0, temperature, 0, draft=draft) for draft in drafts]
                    elif backend == "onnxruntime":  # the config the export planned (`export.planned`)
                        settings.append(Setting("auto", "auto", 0, temperature, 0, backend=backend, draft=drafts[0]))
                elif method == "hf-assisted":
                    if backend != "pytorch" or assistant is None:
                        continue
                    settings.append(Setting("hf-assisted", "hf-assisted:default", 20, temperature, 20, draft=assistant))
                    for tokens in assisted_tokens:
                        settings.append(Setting("hf-assisted", f"hf-assisted:n={tokens}", tokens, temperature, tokens,
                                                tokens, draft=assistant))
                elif method in ("sd", "spectr", "rsd-c", "rsd-s"):
                    for budget in budgets:
                        config = config_for_budget(method, budget)
                        # an export holds one pair: the first draft
                        settings += [Setting(method, str(config), config.tree_size, temperature, config.depth,
                                             backend=backend, draft=draft)
                                     for draft in (drafts if backend == "pytorch" else drafts[:1])]
                else:
                    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
        for setting in settings[before:]:
            setting.weights = stored
    return settings


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def mean_log_likelihood(target, prompt_ids: torch.Tensor, sequence: torch.Tensor) -> float:
    """The target's mean log-probability (temperature 1, no processors) of the generated part of `sequence`."""
    generated = sequence.shape[-1] - prompt_ids.shape[-1]
    if generated <= 0:
        return float("nan")
    with torch.no_grad():
        logits = target(sequence[None]).logits[0, prompt_ids.shape[-1] - 1 : -1].float()
    log_probs = logits.log_softmax(-1).gather(-1, sequence[prompt_ids.shape[-1] :, None]).squeeze(-1)
    return float(log_probs.mean())


def bootstrap_ratio_ci(values: list[float], reference: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of mean(values) / mean(reference), resampling prompts (paired: entry i of both is prompt
    i's), e.g. of a block efficiency from each prompt's tokens and target calls."""
    a, b = torch.tensor(values, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(a), (resamples, len(a)), generator=generator)
    ratios = a[index].mean(1) / b[index].mean(1)
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


class ForwardCounter:
    """Counts forward calls of a module while active (a forward hook); of no module (None): zero."""

    def __init__(self, module):
        self.module, self.calls, self.handle = module, 0, None

    def _count(self, *_):
        self.calls += 1

    def __enter__(self):
        if self.module is not None:
            self.handle = self.module.register_forward_hook(self._count)
        return self

    def __exit__(self, *_):
        if self.handle is not None:
            self.handle.remove()


class Bench:
    """Runs settings on a target, its drafts (name -> model: a setting's `draft` picks one) and tokenizer over fixed
    prompts; `exported` (an `hf_specdec.export.ort_backend.ExportedPair` of the target and the first draft) serves the
    onnxruntime settings, `llama_cpp` (an `hf_specdec.llama_cpp_runner.LlamaCppRunner` of the target's GGUF) the
    llama.cpp ones."""

    def __init__(self, target, drafts: dict, tokenizer, prompts: list[str], max_new_tokens: int, seed: int = 0,
                 exported=None, predict: bool = True, llama_cpp=None):
        """`predict`: ask the planner for each speculative setting's step time first (it calibrates each model on
        first use, about a minute for SmolLM2-135M)."""
        self.target, self.drafts, self.tokenizer, self.exported = target, drafts, tokenizer, exported
        self.llama_cpp = llama_cpp
        self.predict = predict
        self.prompt_ids = [tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids for p in prompts]
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.cost_ratios = {name: parameter_count(draft) / parameter_count(target) for name, draft in drafts.items()}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = pad

    def _generate(self, setting: Setting, input_ids: torch.Tensor, max_new_tokens: int):
        from hf_specdec import speculative_generate

        sampling = {"do_sample": False}
        if setting.temperature > 0:
            sampling = {"do_sample": True, "temperature": setting.temperature, "top_k": 0, "top_p": 1.0}
        common = dict(max_new_tokens=max_new_tokens, pad_token_id=self.pad_token_id, **sampling)
        if setting.backend == "onnxruntime":
            return self._exported(setting, input_ids, common)
        if setting.backend == "llama.cpp":
            return self._llama_cpp(setting, input_ids, max_new_tokens)
        if setting.method == "ar":
            return self.target.generate(input_ids, **common), None  # plain generate
        if setting.method == "hf-assisted":
            return self._assisted(setting, input_ids, common), None
        out = self.target.generate(input_ids, custom_generate=speculative_generate, draft_model=self.drafts.get(setting.draft),
                                   speculative_config=setting.config, return_dict_in_generate=True, **common)
        return out.sequences, out.speculative_stats

    def _exported(self, setting: Setting, input_ids, common):
        from transformers import GenerationConfig

        from hf_specdec.generation import decode

        if self.exported is None:
            raise ValueError("onnxruntime settings need the exported pair (Bench(..., exported=...))")
        generation_config = GenerationConfig(eos_token_id=self.target.generation_config.eos_token_id, **common)
        config = self.exported.manifest.speculative_config if setting.config == "auto" else setting.config
        result = decode(self.exported.target, self.exported.draft, input_ids, generation_config, config)
        return result.sequences, result.stats

    def _llama_cpp(self, setting: Setting, input_ids, max_new_tokens: int):
        """llama.cpp's plain decoding or its prompt-lookup speculation; its stats as the loop reports them (target
        calls: llama.cpp's forwards, the prompt's included, which yields the first token)."""
        from types import SimpleNamespace

        if self.llama_cpp is None:
            raise ValueError("llama.cpp settings need the GGUF model (Bench(..., llama_cpp=LlamaCppRunner(...)))")
        eos = self.target.generation_config.eos_token_id
        eos = None if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        seed = int(torch.randint(0, 2**31 - 1, ()))  # from the prompt's seed (`run` seeds torch per prompt)
        runner = self.llama_cpp if setting.method == "ar" else self.llama_cpp.prompt_lookup(setting.budget)
        out = runner.generate(input_ids[0].tolist(), max_new_tokens, setting.temperature, seed, eos)
        sequence = torch.cat([input_ids[0], torch.tensor(out.tokens, dtype=input_ids.dtype)])[None]
        stats = SimpleNamespace(target_calls=out.forwards, draft_calls=0, time_total=out.seconds,
                                time_prefill=out.prefill_seconds)
        return sequence, stats

    def _assisted(self, setting: Setting, input_ids, common):
        assistant = self.drafts[setting.draft]
        config = assistant.generation_config
        saved = (config.num_assistant_tokens, config.num_assistant_tokens_schedule)
        if setting.assistant_tokens is not None:
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = setting.assistant_tokens, "constant"
        try:
            return self.target.generate(input_ids, assistant_model=assistant, **common)
        finally:
            config.num_assistant_tokens, config.num_assistant_tokens_schedule = saved

    def warm_up(self, setting: Setting) -> None:
        self._generate(setting, self.prompt_ids[0], max_new_tokens=4)

    def step_model(self, setting: Setting) -> "StepModel | None":
        """The planner's step model for a speculative PyTorch setting (None for the others), loaded (each model
        calibrated, the loop measured) before anything is timed."""
        if not self.predict or setting.backend != "pytorch" or setting.method not in ("sd", "spectr", "rsd-c", "rsd-s"):
            return None
        from hf_specdec.planner.loop_cost import Sampling

        context = int(sum(len(ids[0]) for ids in self.prompt_ids) / len(self.prompt_ids)) + self.max_new_tokens // 2
        sampling = Sampling(True, 0, 1.0) if setting.temperature > 0 else Sampling.greedy()  # as `_generate` runs
        return StepModel(self.target, self.drafts[setting.draft], SpeculativeConfig.parse(setting.config), context,
                         sampling)

    def drafted_depths(self, setting: Setting, stats) -> list[int]:
        """The depth of every step of one generation: the loop drafts no deeper than the tokens left to generate
        allow (batch 1: each step commits its accepted tokens and one more)."""
        depth, generated, depths = SpeculativeConfig.parse(setting.config).depth, 0, []
        for accepted in stats.accepted_lengths[0]:
            depths.append(min(depth, max(self.max_new_tokens - generated - 1, 0)))
            generated += accepted + 1
        return depths

    def run(self, setting: Setting, progress=None) -> Record:
        return self.run_all([setting], progress)[0]

    def run_all(self, settings: list[Setting], progress=None) -> list[Record]:
        """Every setting on every prompt, interleaved: prompt by prompt, each setting in turn, so that a shared
        machine's drift (tens of percent within a bench run) weighs on every setting alike and the ratios compare
        like with like. Each setting is warmed up (and its step model loaded) first. A round (one prompt, every
        setting) predicts its speculative generations at the machine's speed during the round: the median of the
        probes (`planner.machine_speed`) timed before each of them."""
        models = []
        for setting in settings:
            self.warm_up(setting)
            models.append(self.step_model(setting))
        tallies = [Tally() for _ in settings]
        for index, input_ids in enumerate(self.prompt_ids):
            probes, ran = [], []
            for setting, model, tally in zip(settings, models, tallies):
                if progress is not None:
                    progress.set_postfix_str(f"{setting.backend} {setting.config} T={setting.temperature:g}")
                if model is not None:
                    probes.append((setting.draft, model.speed()))
                stats = self._measure(setting, index, input_ids, tally)
                if model is not None:
                    ran.append((setting, model, tally, self.drafted_depths(setting, stats)))
                if progress is not None:
                    progress.update(1)
            round_speed = MachineSpeed.median([speed for _, speed in probes]) if probes else MachineSpeed()
            for setting, model, tally, depths in ran:  # the draft's factor from the probes of the same draft
                draft_speed = MachineSpeed.median([speed for draft, speed in probes if draft == setting.draft]).draft
                tally.predicted_seconds += model.seconds(depths, replace(round_speed, draft=draft_speed))
                tally.predicted_steps += len(depths)
        return [self._record(setting, tally) for setting, tally in zip(settings, tallies)]

    def _measure(self, setting: Setting, index: int, input_ids, tally: "Tally"):
        """One generation of `setting` on prompt `index`, added to `tally`; returns the loop's stats (None for
        plain and HF assisted generation)."""
        draft = self.drafts.get(setting.draft)  # None for plain decoding
        torch.manual_seed(self.seed + index)
        with ForwardCounter(self.target) as target_counter, ForwardCounter(draft) as draft_counter:
            start = time.perf_counter()
            sequence, stats = self._generate(setting, input_ids, self.max_new_tokens)
            tally.seconds += time.perf_counter() - start
        tally.prompt_tokens.append(sequence.shape[-1] - input_ids.shape[-1])
        # decoding forwards only: our loop reports them; plain and HF assisted generation have no separate prefill
        # (their first forward over the prompt already yields tokens)
        tally.prompt_target_calls.append(stats.target_calls if stats is not None else target_counter.calls)
        tally.draft_calls += stats.draft_calls if stats is not None else draft_counter.calls
        tally.decode_seconds += (stats.time_total - stats.time_prefill) if stats is not None else float("nan")
        if setting.method == "auto":
            tally.ran.append(stats.config)
        tally.log_likelihoods.append(mean_log_likelihood(self.target, input_ids[0], sequence[0]))
        return stats

    def _record(self, setting: Setting, tally: "Tally") -> Record:
        block_efficiency = tally.tokens / max(tally.target_calls, 1)
        block_efficiency_ci = bootstrap_ratio_ci(tally.prompt_tokens, tally.prompt_target_calls) \
            if tally.target_calls else (float("nan"), float("nan"))
        # L: sequential draft passes per step (HF assisted stops drafting early on low confidence: use what it did)
        draft_passes = setting.draft_passes if setting.method != "hf-assisted" else \
            tally.draft_calls / max(tally.target_calls, 1)
        mbsu = block_efficiency / (self.cost_ratios.get(setting.draft, 0.0) * draft_passes + 1)
        return Record(
            backend=setting.backend,
            draft=setting.draft,
            weights=setting.weights,
            method=setting.method,
            config=setting.config,
            budget=setting.budget,
            temperature=setting.temperature,
            block_efficiency=block_efficiency,
            mbsu=mbsu,
            tokens_per_s=tally.tokens / tally.seconds,
            speedup=float("nan"),
            accuracy=float("nan"),
            accuracy_ci=(float("nan"), float("nan")),
            generated_tokens=tally.tokens,
            seconds=tally.seconds,
            target_calls=tally.target_calls,
            draft_calls=tally.draft_calls,
            ran=", ".join(dict.fromkeys(tally.ran)),
            step_ms=1e3 * tally.decode_seconds / max(tally.target_calls, 1),
            predicted_step_ms=1e3 * tally.predicted_seconds / tally.predicted_steps if tally.predicted_steps
            else float("nan"),
            log_likelihoods=tally.log_likelihoods,
            block_efficiency_ci=block_efficiency_ci,
            prompt_tokens=tally.prompt_tokens,
            prompt_target_calls=tally.prompt_target_calls,
        )


@dataclass
class Tally:
    """What one setting's generations add up to."""

    seconds: float = 0.0
    draft_calls: int = 0
    decode_seconds: float = 0.0
    predicted_seconds: float = 0.0  # the step model's, summed over the steps that ran
    predicted_steps: int = 0
    ran: list[str] = field(default_factory=list)  # `auto`: the config each generation ran
    log_likelihoods: list[float] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    prompt_target_calls: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(self.prompt_tokens)

    @property
    def target_calls(self) -> int:
        return sum(self.prompt_target_calls)


@dataclass
class StepModel:
    """The planner's step model for one speculative setting: calibrated forwards plus the loop's measured work, without
    the corrections `auto` takes from recorded steps (so that it tests the model), for steps at the depth they drafted
    (near the end of a generation the loop drafts shallower trees) and at a measured machine speed (`speed`,
    `machine_speed`: a shared machine drifts more within a bench run than the model's tolerance)."""

    target: object
    draft: object
    config: SpeculativeConfig
    context: int
    sampling: object  # planner.loop_cost.Sampling

    def __post_init__(self):
        self.seconds([self.config.depth], MachineSpeed())  # calibrate, measure the loop: before anything is timed

    def speed(self) -> MachineSpeed:
        from hf_specdec.planner import machine_speed

        return machine_speed(self.target, self.draft, self.context)

    def seconds(self, depths: list[int], speed: MachineSpeed) -> float:
        """The predicted seconds of steps drafting to `depths`, at `speed`."""
        from hf_specdec.planner import predict_step_seconds

        step = {depth: predict_step_seconds(self.target, self.draft, self.config.truncated(depth), 1, self.context,
                                            self.sampling, corrections=False, speed=speed) for depth in set(depths)}
        return sum(step[depth] for depth in depths)


def relate_to_plain(records: list[Record]) -> None:
    """Fill `speedup` and `accuracy` of every record from plain `generate` (the PyTorch `ar` record) at its
    temperature; where the run has no PyTorch `ar`, from the `ar` record of the record's own backend."""
    plain = {}
    for record in records:
        if record.method == "ar" and (record.backend == "pytorch" or record.temperature not in plain):
            plain[record.temperature] = record
    for record in records:
        reference = plain.get(record.temperature)
        if reference is None:
            continue
        record.speedup = record.tokens_per_s / reference.tokens_per_s
        pairs = [(a, b) for a, b in zip(record.log_likelihoods, reference.log_likelihoods) if not (math.isnan(a) or math.isnan(b))]
        if pairs:
            ours, theirs = zip(*pairs)
            # log-likelihoods are negative: the ratio of means is ~1 when the two follow the same distribution
            record.accuracy = sum(ours) / sum(theirs)
            record.accuracy_ci = bootstrap_ratio_ci(list(ours), list(theirs))
