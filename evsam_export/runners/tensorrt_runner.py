"""TensorRT runner on the TensorRT 10/11 Python API (execute_async_v3 with named tensors).

Device buffers come from torch when it is installed, else from Polygraphy's ctypes CUDA wrapper, so a
GPU box without torch can run engines. Where TensorRT or a GPU is missing, `tensorrt_availability`
says why and callers report the runner as unavailable instead of failing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evsam_export.manifest import TensorSpec
from evsam_export.runners.base import Availability, Runner

INSTALL_HINT = "TensorRT wheels come from NVIDIA's index: pip install --extra-index-url https://pypi.nvidia.com tensorrt"


def cuda_device_count() -> tuple[int, str]:
    """(number of CUDA devices, reason when 0), without requiring torch."""
    import ctypes
    import sys

    torch = sys.modules.get("torch")  # use torch only if the caller already imported it (runtime stays torch-free)
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.device_count(), ""

    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcuda.so.1"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if name.startswith("libcuda.so"):
            if lib.cuInit(0) != 0:
                return 0, "CUDA driver present but cuInit failed"
            status = lib.cuDeviceGetCount(ctypes.byref(count))
        else:
            status = lib.cudaGetDeviceCount(ctypes.byref(count))
        if status == 0 and count.value > 0:
            return count.value, ""
        return 0, "no CUDA GPU visible"
    return 0, "no CUDA runtime or driver library found (no GPU)"


def tensorrt_availability() -> Availability:
    try:
        import tensorrt as trt
    except ImportError as exc:
        return Availability(False, f"{exc} ({INSTALL_HINT})")
    count, reason = cuda_device_count()
    if count == 0:
        return Availability(False, reason, version=trt.__version__)
    return Availability(True, version=trt.__version__)


_NP_FROM_TRT = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_, "INT8": np.int8}


class TensorRTRunner(Runner):
    runtime = "tensorrt"

    def __init__(
        self, path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], label: str | None = None, allow_host_code: bool = False
    ) -> None:
        super().__init__(inputs, outputs, label or Path(path).name)
        self.path = Path(path)
        # Version-compatible engines (tensorrt target: version_compatible=True) embed a lean runtime, which
        # TensorRT only deserializes when the runtime allows engine host code. Off by default: an engine is
        # executable code, so allow it only for engines this tool built (settings["version_compatible"]).
        self.allow_host_code = allow_host_code

    def _load(self) -> None:
        import tensorrt as trt

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime_obj = trt.Runtime(self.logger)
        if self.allow_host_code:
            self.runtime_obj.engine_host_code_allowed = True
        self.engine = self.runtime_obj.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise RuntimeError(
                f"{self.path}: TensorRT {trt.__version__} could not deserialize the engine (engines only load on the GPU "
                "and TensorRT version that built them, unless built hardware/version compatible)"
            )
        self.context = self.engine.create_execution_context()
        self.io_names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]

    def _dtype(self, name: str):
        return _NP_FROM_TRT[self.engine.get_tensor_dtype(name).name]

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt = self.trt
        inputs = [n for n in self.io_names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in self.io_names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        for name in inputs:
            self.context.set_input_shape(name, tuple(feeds[name].shape))
        host_inputs = {n: np.ascontiguousarray(feeds[n].astype(self._dtype(n))) for n in inputs}
        output_shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in outputs}
        import sys

        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            return self._run_with_torch(torch, host_inputs, output_shapes)
        return self._run_with_polygraphy(host_inputs, output_shapes)

    def _run_with_torch(self, torch, host_inputs, output_shapes):
        device_inputs = {n: torch.from_numpy(a).cuda() for n, a in host_inputs.items()}
        device_outputs = {
            n: torch.empty(shape, dtype=getattr(torch, np.dtype(self._dtype(n)).name), device="cuda")
            for n, shape in output_shapes.items()
        }
        for name, tensor in {**device_inputs, **device_outputs}.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.label}: TensorRT execution failed")
        stream.synchronize()
        return {n: t.cpu().numpy() for n, t in device_outputs.items()}

    def _run_with_polygraphy(self, host_inputs, output_shapes):
        from polygraphy import cuda

        stream = cuda.Stream()
        buffers = {}
        for name, array in host_inputs.items():
            buffers[name] = cuda.DeviceArray(shape=array.shape, dtype=array.dtype).copy_from(array, stream)
        for name, shape in output_shapes.items():
            buffers[name] = cuda.DeviceArray(shape=shape, dtype=self._dtype(name))
        for name, buffer in buffers.items():
            self.context.set_tensor_address(name, buffer.ptr)
        if not self.context.execute_async_v3(stream.ptr):
            raise RuntimeError(f"{self.label}: TensorRT execution failed")
        results = {n: buffers[n].numpy() for n in output_shapes}
        stream.synchronize()
        for buffer in buffers.values():
            buffer.free()
        return results

    def _close(self) -> None:
        self.context = None
        self.engine = None
