"""ONNX Runtime implementation of the `VerifyTree` node, so that the verify graph runs on CPU.

The node's kernel is the PyTorch reference itself, registered as an onnxruntime-extensions Python op (domain
ai.onnx.contrib): ONNX Runtime calls it with the node's input arrays and attributes.
"""

from __future__ import annotations

from functools import lru_cache

from hf_specdec.trt_plugins.verify_op import INPUTS, OP_TYPE, OUTPUTS, result_of, run_reference, verify_model
from hf_specdec.verification import VerifyInputs, VerifyResult


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError as error:
        raise ImportError(
            "the VerifyTree node runs in ONNX Runtime through onnxruntime-extensions: pip install onnxruntime-extensions "
            "(or pip install 'hf-specdec[tensorrt]')"
        ) from error
    return onnxruntime_extensions


@lru_cache(maxsize=None)
def register() -> str:
    """Register the op with onnxruntime-extensions (once per process); returns the custom-op library to load."""
    ext = _extensions()
    dtype = {"int32": ext.PyCustomOpDef.dt_int32, "float32": ext.PyCustomOpDef.dt_float}

    @ext.onnx_op(
        op_type=OP_TYPE,
        inputs=[dtype[spec.dtype.__name__] for spec in INPUTS],
        outputs=[dtype[spec.dtype.__name__] for spec in OUTPUTS],
        attrs={"rule": ext.PyCustomOpDef.dt_string, "plugin_namespace": ext.PyCustomOpDef.dt_string,
               "plugin_version": ext.PyCustomOpDef.dt_string},
    )
    def verify_tree_op(*inputs, rule, **_plugin_attributes):
        return run_reference(rule, *inputs)

    return ext.get_library_path()


def session_options():
    """`onnxruntime.SessionOptions` that know the VerifyTree node."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.register_custom_ops_library(register())
    return options


@lru_cache(maxsize=None)
def verify_session(rule: str):
    """An ONNX Runtime CPU session of the verify graph for `rule`."""
    import onnxruntime

    model = verify_model(rule).SerializeToString()
    return onnxruntime.InferenceSession(model, session_options(), providers=["CPUExecutionProvider"])


def verify_tree_onnxruntime(inputs: VerifyInputs) -> VerifyResult:
    """The verifier interface through ONNX Runtime's verify graph."""
    draft_probs = inputs.target_probs[..., :1] if inputs.draft_probs is None else inputs.draft_probs
    arrays = (inputs.paths, inputs.node_tokens, inputs.target_probs, draft_probs, inputs.accept_uniforms, inputs.sample_uniforms)
    feed = {spec.name: array.cpu().numpy().astype(spec.dtype) for spec, array in zip(INPUTS, arrays)}
    return result_of(verify_session(inputs.rule).run(None, feed))
