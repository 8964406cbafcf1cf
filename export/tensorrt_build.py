"""TensorRT engines for an export (`hf-specdec export --out DIR`): draft, target and the verify engines.

    DIR/target.engine, DIR/draft.engine    from target.onnx / draft.onnx, one optimization profile over the export's
                                           limits (manifest `max_dims`: batch, new tokens, past slots; a
                                           feature draft's `features` input over batch and new tokens)
    DIR/verify_<rule>.engine               the VerifyTree plugin alone, one engine per verification rule
    manifest.json "tensorrt"               library and version, compute capabilities, limits, each engine's profile

Works with `tensorrt` or `tensorrt_rtx` (imported lazily). TensorRT for RTX builds on machines without a GPU, for the
compute capabilities it is asked for; its networks are strongly typed, so engine precision is the ONNX graph's
(export in float16/bfloat16 for a half-precision engine). The plugin's Python classes must be registered in every
process that builds or runs the verify engines (`hf_specdec.trt_plugins.tensorrt_plugin.register`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import onnx

from hf_specdec.export.manifest import ROLES, Manifest, TensorSpec
from hf_specdec.trt_plugins.tensorrt_library import import_tensorrt, library_name
from hf_specdec.trt_plugins.verify_op import INPUTS as VERIFY_INPUTS
from hf_specdec.trt_plugins.verify_op import OUTPUTS as VERIFY_OUTPUTS
from hf_specdec.trt_plugins.verify_op import verify_model
from hf_specdec.verification import RULES

# the compute capabilities TensorRT for RTX builds for (it has no SM90 kernels: H100/H200 need NVIDIA's tensorrt);
# SM75 (Turing) has no float32 GEMM there, so it is built only on request, for half-precision exports
RTX_CAPABILITIES = ("SM75", "SM80", "SM86", "SM89", "SM120")
DEFAULT_RTX_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120")


class EngineIOError(ValueError):
    """An engine whose inputs/outputs do not match what the manifest promises; the message names the fix."""


@dataclass(frozen=True)
class IOTensor:
    name: str
    dtype: str  # numpy name
    shape: list  # ints; -1 for dynamic axes (engines) or axis names (manifest)
    is_input: bool


@dataclass(frozen=True)
class Limits:
    """Sizes the optimization profiles cover: largest (`max_*`, from the export) and typical (`opt_*`)."""

    max_batch: int
    max_new: int
    max_past: int
    vocab: int
    opt_batch: int = 1
    opt_new: int = 16
    opt_past: int = 512

    def model_axes(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every named axis of the exported models (`hf_specdec.export.graph`)."""
        opt_new, opt_past = min(self.opt_new, self.max_new), min(self.opt_past, self.max_past)
        return {
            "batch": (1, min(self.opt_batch, self.max_batch), self.max_batch),
            "new": (1, opt_new, self.max_new),
            "kept": (1, opt_new, self.max_new),
            "past": (1, opt_past, self.max_past),
            "past_plus_new": (2, opt_past + opt_new, self.max_past + self.max_new),
        }

    def verify_axes(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of the verify node's axes: a tree scored in one forward has at most `max_new` nodes."""
        opt_new = min(self.opt_new, self.max_new)
        return {
            "batch": (1, min(self.opt_batch, self.max_batch), self.max_batch),
            "paths": (0, max(opt_new // 2, 1), self.max_new),
            "depth": (0, max(opt_new // 4, 1), self.max_new),
            "nodes": (1, opt_new, self.max_new),
            "vocab": (self.vocab, self.vocab, self.vocab),
            "draft_vocab": (1, self.vocab, self.vocab),
        }


def compute_capabilities(trt, requested: list[str] | None) -> list[str]:
    """The capabilities to build for: the requested ones, else (TensorRT for RTX) the Ampere and newer ones it supports,
    else (NVIDIA's tensorrt) the current GPU's."""
    if not hasattr(trt, "ComputeCapability"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(
                "NVIDIA's tensorrt builds engines for the GPU it runs on and there is none here: build on the target "
                "machine, or install TensorRT for RTX (pip install tensorrt-rtx-cu12), which builds for chosen GPUs"
            )
        if requested:
            raise ValueError("compute capabilities can be chosen with TensorRT for RTX only; NVIDIA's tensorrt builds for this GPU")
        major, minor = torch.cuda.get_device_capability()
        return [f"SM{major}{minor}"]
    if requested:
        unknown = [c for c in requested if c not in RTX_CAPABILITIES]
        if unknown:
            raise ValueError(f"compute capabilities {unknown} are not supported by TensorRT for RTX; choose from {RTX_CAPABILITIES}")
        return list(requested)
    return list(DEFAULT_RTX_CAPABILITIES)


def _builder_config(trt, builder, capabilities: list[str]):
    config = builder.create_builder_config()
    if hasattr(trt, "ComputeCapability"):
        config.num_compute_capabilities = len(capabilities)
        for index, capability in enumerate(capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, capability), index)
    return config


def _parse(trt, builder, logger, onnx_path: Path):
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    return network, parser


def _profile_shapes(declared: dict[str, list], axes: dict[str, tuple[int, int, int]]) -> dict[str, list[list[int]]]:
    """(min, opt, max) shape of every input from its declared dims (ints or axis names)."""
    shapes = {}
    for name, dims in declared.items():
        bounds = []
        for dim in dims:
            if isinstance(dim, int):
                bounds.append((dim, dim, dim))
            elif dim in axes:
                bounds.append(axes[dim])
            else:
                raise ValueError(f"input {name!r} has axis {dim!r}, for which no optimization profile range is known")
        shapes[name] = [list(b) for b in zip(*bounds)] if bounds else [[], [], []]
    return shapes


def network_io(trt, network) -> list[IOTensor]:
    """The inputs and outputs a network (and so its engine) has."""
    tensors = [(network.get_input(i), True) for i in range(network.num_inputs)]
    tensors += [(network.get_output(i), False) for i in range(network.num_outputs)]
    return [IOTensor(t.name, trt.nptype(t.dtype).__name__, list(t.shape), is_input) for t, is_input in tensors]


def engine_io(trt, engine) -> list[IOTensor]:
    """The inputs and outputs of a deserialized engine."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return [
        IOTensor(name, trt.nptype(engine.get_tensor_dtype(name)).__name__, list(engine.get_tensor_shape(name)),
                 engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT)
        for name in names
    ]


def check_io(found: list[IOTensor], expected: list[IOTensor], what: str, fix: str) -> None:
    """Same names, directions, dtypes and ranks, and equal static sizes (-1 or a name is dynamic)."""

    def key(tensor: IOTensor):
        static = [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]
        return tensor.name, tensor.is_input, tensor.dtype, static

    missing = sorted({key(t)[0] for t in expected} - {key(t)[0] for t in found})
    different = [
        f"{e.name}: engine {f.dtype}{f.shape}, manifest {e.dtype}{e.shape}"
        for e in expected for f in found if f.name == e.name and key(f) != key(e)
    ]
    extra = sorted({t.name for t in found} - {t.name for t in expected})
    if missing or different or extra:
        details = "; ".join(filter(None, [
            f"missing {missing}" if missing else "", "; ".join(different), f"unexpected {extra}" if extra else "",
        ]))
        raise EngineIOError(f"{what} does not match its manifest ({details}): {fix}")


def build_engine(onnx_path: Path, declared_inputs: dict[str, list], axes: dict, capabilities: list[str]):
    """Build one engine from an ONNX file; returns (serialized engine, its I/O, its profile)."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path)  # the parser owns what the network refers to
    config = _builder_config(trt, builder, capabilities)
    profile = builder.create_optimization_profile()
    shapes = _profile_shapes(declared_inputs, axes)
    for name, (low, typical, high) in shapes.items():
        profile.set_shape(name, low, typical, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine from {onnx_path} (see the errors it logged above)")
    return bytes(plan), network_io(trt, network), shapes


def declared_io(inputs, outputs) -> list[IOTensor]:
    """Manifest tensor specs (`hf_specdec.export.manifest.TensorSpec`) as engine I/O."""
    return [IOTensor(spec.name, spec.dtype, list(spec.shape), is_input) for is_input, specs in ((True, inputs), (False, outputs))
            for spec in specs]


def verify_specs() -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The verify node's inputs and outputs as manifest tensor specs."""
    def spec(s):
        return TensorSpec(s.name, list(s.dims), s.dtype.__name__)

    return [spec(s) for s in VERIFY_INPUTS], [spec(s) for s in VERIFY_OUTPUTS]


def build_engines(
    model_dir: "str | Path",
    capabilities: list[str] | None = None,
    rules: tuple[str, ...] = RULES,
    opt_batch: int = 1,
    opt_new: int = 16,
    opt_past: int = 512,
) -> Manifest:
    """Build the draft, target and verify engines of an export into its directory and record them in its manifest
    (`manifest.tensorrt`); returns the updated manifest."""
    from hf_specdec.trt_plugins import tensorrt_plugin

    trt = import_tensorrt()
    tensorrt_plugin.register()
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    dims = manifest.max_dims
    limits = Limits(dims["batch"], dims["new"], dims["past"], manifest.vocab_size, opt_batch, opt_new, opt_past)
    capabilities = compute_capabilities(trt, capabilities)
    record = {"library": library_name(trt), "version": trt.__version__, "compute_capabilities": capabilities,
              "limits": asdict(limits), "engines": {}}

    def build(name: str, onnx_path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], axes: dict) -> None:
        plan, io, profile = build_engine(onnx_path, {s.name: list(s.shape) for s in inputs}, axes, capabilities)
        check_io(io, declared_io(inputs, outputs), f"the {name} engine built from {onnx_path}",
                 f"re-export with this hf-specdec (`hf-specdec export --out {model_dir}`)")
        (model_dir / f"{name}.engine").write_bytes(plan)
        record["engines"][name] = {"file": f"{name}.engine", "profile": profile}

    for role in ROLES:
        entry = manifest.entry(role)
        build(role, model_dir / entry.file, entry.inputs, entry.outputs, limits.model_axes())
    for rule in rules:
        onnx_path = model_dir / f"verify_{rule}.onnx"
        onnx.save(verify_model(rule), onnx_path)
        build(f"verify_{rule}", onnx_path, *verify_specs(), limits.verify_axes())
    manifest = replace(manifest, tensorrt=record)
    manifest.save(model_dir)
    return manifest
