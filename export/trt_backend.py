"""The TensorRT backend of the one speculative loop: the engines of `hf-specdec export --tensorrt` behind the
`ModelBackend` protocol, and the verify engines behind `verify_tree`'s signature.

The KV cache is `OrtBackend`'s (one preallocated device tensor per model; past K/V bound in place as the engine's
`past_*` inputs, only the new tokens' K/V written back); only the execution differs: tensor addresses and input shapes
are set on an execution context and `execute_async_v3` runs on PyTorch's current CUDA stream, so a step never waits
for the GPU except where the loop reads results on the host. Feature pairs run as on ONNX Runtime: `features` and
`hidden_states` are bound like every other input and output (`OrtBackend._run`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hf_specdec.export.manifest import Manifest, ManifestError
from hf_specdec.export.ort_backend import ExportedPair, OrtBackend, load_exported_pair
from hf_specdec.export.tensorrt_build import check_io, declared_io, engine_io, verify_specs
from hf_specdec.trt_plugins.tensorrt_library import import_tensorrt
from hf_specdec.trt_plugins.verify_op import INPUTS as VERIFY_INPUTS
from hf_specdec.verification import VerifyInputs, VerifyResult


def check_gpu(manifest: Manifest, model_dir: Path) -> None:
    """A CUDA GPU whose compute capability the engines were built for."""
    if not manifest.tensorrt:
        raise ManifestError(f"{model_dir} has no TensorRT engines: build them with `hf-specdec export --tensorrt --out {model_dir}`")
    if not torch.cuda.is_available():
        raise RuntimeError("the tensorrt backend needs a CUDA GPU and there is none; use --backend onnxruntime on this machine")
    major, minor = torch.cuda.get_device_capability()
    capability, built_for = f"SM{major}{minor}", manifest.tensorrt["compute_capabilities"]
    if capability not in built_for:
        hint = (" (TensorRT for RTX has no SM90 kernels: on H100/H200 use NVIDIA's tensorrt)"
                if manifest.tensorrt["library"] == "tensorrt_rtx" and capability == "SM90" else "")
        raise RuntimeError(
            f"the engines in {model_dir} were built for {built_for}, this GPU is {capability}{hint}: rebuild with "
            f"`hf-specdec export --tensorrt --compute-capability {capability} --out {model_dir}`"
        )


class EngineRunner:
    """One deserialized engine and its execution context."""

    def __init__(self, path: Path, expected_io, what: str):
        trt = import_tensorrt()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path} (built with another TensorRT version or for another GPU?)")
        check_io(engine_io(trt, self.engine), expected_io, f"{path} ({what})", "rebuild it with `hf-specdec export --tensorrt`")
        self.context = self.engine.create_execution_context()

    def __call__(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine (see its log above)")


class TensorRTBackend(OrtBackend):
    """`ModelBackend` on a TensorRT engine (see the module docstring)."""

    def __init__(self, model_dir: "str | Path", role: str, manifest: Manifest, device="cuda"):
        self.engine_file = manifest.tensorrt["engines"][role]["file"]
        super().__init__(model_dir, role, manifest, device)

    def _open(self, threads: int | None) -> None:
        if self.device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on a CUDA device, not {self.device}")
        self.runner = EngineRunner(self.model_dir / self.engine_file, declared_io(self.entry.inputs, self.entry.outputs), self.role)

    def _execute(self, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
        self.runner(inputs, outputs)


class TensorRTVerifier:
    """`verify_tree` on the verify engines (the VerifyTree plugin, whose enqueue runs the Triton kernel)."""

    def __init__(self, model_dir: Path, manifest: Manifest):
        from hf_specdec.trt_plugins import tensorrt_plugin

        tensorrt_plugin.register()  # the engines hold a Python plugin: its creator must be registered to load them
        self.model_dir, self.engines = model_dir, manifest.tensorrt["engines"]
        self.runners: dict[str, EngineRunner] = {}

    def __call__(self, verify: VerifyInputs) -> VerifyResult:
        verify = verify.dense()  # the engines take [B, N+1, V] distributions
        rule, paths, target_probs, draft_probs = verify.rule, verify.paths, verify.target_probs, verify.draft_probs
        if rule not in self.runners:
            inputs, outputs = verify_specs()
            path = self.model_dir / self.engines[f"verify_{rule}"]["file"]
            self.runners[rule] = EngineRunner(path, declared_io(inputs, outputs), f"verify {rule}")
        if draft_probs is None:
            draft_probs = target_probs[..., :1]
        arrays = (paths, verify.node_tokens, target_probs, draft_probs, verify.accept_uniforms, verify.sample_uniforms)
        dtypes = {"int32": torch.int32, "float32": torch.float32}
        inputs = {spec.name: array.to("cuda", dtypes[spec.dtype.__name__]).contiguous() for spec, array in zip(VERIFY_INPUTS, arrays)}
        batch, depth = paths.shape[0], paths.shape[2]
        int32 = dict(dtype=torch.int32, device="cuda")
        outputs = {"accepted_nodes": torch.empty(batch, depth, **int32), "accepted_tokens": torch.empty(batch, depth, **int32),
                   "num_accepted": torch.empty(batch, **int32), "next_tokens": torch.empty(batch, **int32)}
        self.runners[rule](inputs, outputs)
        return VerifyResult(*(output.long() for output in outputs.values()))


def load_tensorrt_pair(model_dir: "str | Path", device="cuda") -> ExportedPair:
    """Both models of an export on their TensorRT engines, verification on the verify engines."""
    model_dir = Path(model_dir)
    manifest = Manifest.load(model_dir)
    check_gpu(manifest, model_dir)
    return load_exported_pair(model_dir, lambda path, role, m: TensorRTBackend(path, role, m, device),
                              TensorRTVerifier(model_dir, manifest))
