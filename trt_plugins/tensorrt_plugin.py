"""TensorRT plugin of the `VerifyTree` node: IPluginV3 Python classes whose enqueue launches the Triton kernel.

`register()` adds the creator to TensorRT's plugin registry; the ONNX parser then turns every VerifyTree node into
this plugin (build and runtime both need the registration in the process, as for any Python plugin). Build-time
methods (shapes, types, formats, workspace) run without a GPU, so engines containing the node build on any machine.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from hf_specdec.trt_plugins.tensorrt_library import import_tensorrt
from hf_specdec.trt_plugins.verify_op import INPUTS, OP_TYPE, OUTPUTS, PLUGIN_NAMESPACE, PLUGIN_VERSION, check_rule

trt = import_tensorrt()

_TRT_TYPES = {np.int32: trt.DataType.INT32, np.float32: trt.DataType.FLOAT}
_TARGET_PROBS = [spec.name for spec in INPUTS].index("target_probs")


def _rule_field(rule: str):
    return trt.PluginField("rule", np.frombuffer(rule.encode(), dtype=np.int8), trt.PluginFieldType.CHAR)


def _rule_of(fields) -> str:
    for field in fields:
        if field.name == "rule":
            return check_rule(bytes(np.asarray(field.data, dtype=np.int8)).decode().rstrip("\0"))
    raise ValueError(f"{OP_TYPE} plugin: the node has no 'rule' attribute")


class _DeviceArray:
    """A device pointer seen as a torch tensor (through __cuda_array_interface__) without copying."""

    _TYPESTR = {trt.DataType.INT32: "<i4", trt.DataType.FLOAT: "<f4"}

    def __init__(self, pointer: int, shape, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (pointer, False), "version": 2}

    @classmethod
    def tensor(cls, pointer: int, desc):
        import torch

        return torch.as_tensor(cls(pointer, desc.dims, cls._TYPESTR[desc.type]), device="cuda")


class VerifyTreePlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
    def __init__(self, rule: str):
        trt.IPluginV3.__init__(self)
        trt.IPluginV3OneCore.__init__(self)
        trt.IPluginV3OneBuild.__init__(self)
        trt.IPluginV3OneRuntime.__init__(self)
        self.plugin_name, self.plugin_namespace, self.plugin_version = OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION
        self.num_outputs = len(OUTPUTS)
        self.timing_cache_id = ""
        self.rule = check_rule(rule)

    # ------------------------------------------------------------------ core and build
    def get_capability_interface(self, capability):
        return self

    def clone(self):
        return VerifyTreePlugin(self.rule)

    def get_fields_to_serialize(self):
        return trt.PluginFieldCollection([_rule_field(self.rule)])

    def get_output_data_types(self, input_types):
        return [_TRT_TYPES[spec.dtype] for spec in OUTPUTS]

    def get_output_shapes(self, inputs, shape_inputs, expr_builder):
        batch, depth = inputs[0][0], inputs[0][2]  # paths [batch, paths, depth]
        return [trt.DimsExprs([batch, depth]), trt.DimsExprs([batch, depth]), trt.DimsExprs([batch]), trt.DimsExprs([batch])]

    def supports_format_combination(self, pos, in_out, num_inputs):
        desc = in_out[pos].desc
        return desc.format == trt.TensorFormat.LINEAR and desc.type == _TRT_TYPES[(INPUTS + OUTPUTS)[pos].dtype]

    def configure_plugin(self, inputs, outputs):
        pass

    def get_workspace_size(self, inputs, outputs):
        """The kernel's float64 residual row per batch row (sampling rules)."""
        if self.rule == "greedy":
            return 8
        batch, _, vocab = inputs[_TARGET_PROBS].max
        return 8 * batch * vocab

    def get_valid_tactics(self):
        return []

    # ------------------------------------------------------------------ runtime
    def set_tactic(self, tactic):
        pass

    def on_shape_change(self, inputs, outputs):
        pass

    def attach_to_context(self, context):
        return self.clone()

    def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
        import torch

        from hf_specdec.trt_plugins.triton_kernel import verify_tree_triton
        from hf_specdec.verification import VerifyInputs

        tensors = [_DeviceArray.tensor(pointer, desc) for pointer, desc in zip(inputs, input_desc)]
        results = tuple(_DeviceArray.tensor(pointer, desc) for pointer, desc in zip(outputs, output_desc))
        batch, _, vocab = input_desc[_TARGET_PROBS].dims
        residual = torch.as_tensor(_DeviceArray(workspace, (batch, vocab) if self.rule != "greedy" else (1,), "<f8"), device="cuda")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            verify_tree_triton(VerifyInputs(self.rule, *tensors), out=results, residual=residual)
        return 0


class VerifyTreePluginCreator(trt.IPluginCreatorV3One):
    def __init__(self):
        trt.IPluginCreatorV3One.__init__(self)
        self.name, self.plugin_namespace, self.plugin_version = OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION
        self.field_names = trt.PluginFieldCollection([trt.PluginField("rule", np.array([]), trt.PluginFieldType.CHAR)])

    def create_plugin(self, name, fields, phase):
        return VerifyTreePlugin(_rule_of(fields))


@lru_cache(maxsize=None)
def register() -> VerifyTreePluginCreator:
    """Register the plugin creator with TensorRT (once per process; the registry keeps a reference)."""
    creator = VerifyTreePluginCreator()
    if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
        raise RuntimeError(f"TensorRT refused to register the {PLUGIN_NAMESPACE}::{OP_TYPE} plugin creator")
    return creator
