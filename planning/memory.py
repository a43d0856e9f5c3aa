"""Analytic model of the memory a plain U-Net needs to train, in bytes. No torch needed.

The network modelled is the plain U-Net autoliver trains (the nnU-Net "PlainConvUNet"):

* encoder stage s: two conv blocks at feature map size N_s (voxels) with F_s channels; the
  first conv of stages s > 0 has the stage's stride (it does the downsampling);
* a conv block is conv (with bias) -> instance norm (affine) -> leaky ReLU (in place);
* decoder stage s (every stage but the bottleneck): transposed conv F_{s+1} -> F_s with
  kernel = stride, concatenation with the encoder's skip (2 F_s channels), two conv blocks;
* deep supervision: a 1x1(x1) conv head to the class count after every decoder stage.

Training memory = fixed overhead + fragmentation x (activations + backward transient +
parameter state), each term described where it is computed. Under AMP (bf16/fp16 autocast
on a GPU) activations take 2 bytes per element; in fp32 (CPU) 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planning.topology import Topology

GIB = 2**30


@dataclass(frozen=True)
class MemoryModel:
    """Constants of the memory model for one kind of device.

    bytes_per_activation: 2 with AMP (autocast conv/norm outputs are half precision), 4 in fp32.
    bytes_per_parameter: fp32 weight (4) + fp32 gradient (4) + SGD momentum buffer (4), plus
        with AMP the half-precision weight copy autocast caches for the step (2).
    fixed_bytes: what does not scale with the network: on a GPU the CUDA context, cuDNN and
        cuBLAS handles and loaded kernels (about 0.5-1 GiB on current drivers); on a CPU the
        interpreter with torch and the data-loading buffers.
    fragmentation: factor on everything allocated dynamically. The caching allocator rounds
        blocks up and keeps freed blocks of other sizes reserved; cuDNN's benchmark mode adds
        convolution workspaces (largest for the full-resolution 3D convs). Measured peaks as
        seen by the driver are typically 1.2-1.4x the sum of live tensors.
    inplace_activation: the leaky ReLU overwrites the norm output, so norm and activation
        outputs share one tensor (False counts them as two).
    """

    name: str
    bytes_per_activation: int
    bytes_per_parameter: int
    fixed_bytes: float
    fragmentation: float
    inplace_activation: bool = True


GPU_AMP = MemoryModel("gpu_amp", bytes_per_activation=2, bytes_per_parameter=14, fixed_bytes=0.75 * GIB, fragmentation=1.35)
CPU_FP32 = MemoryModel("cpu_fp32", bytes_per_activation=4, bytes_per_parameter=12, fixed_bytes=1.0 * GIB, fragmentation=1.15)


def model_for(device: str) -> MemoryModel:
    if device == "gpu":
        return GPU_AMP
    if device == "cpu":
        return CPU_FP32
    raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")


def _voxels(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def parameter_count(topology: Topology, in_channels: int = 1, n_classes: int = 3) -> int:
    """Trainable parameters: conv weights and biases, norm scales and shifts, heads."""
    f = topology.features_per_stage
    k = [math.prod(ks) for ks in topology.kernel_sizes]
    total = 0
    prev = in_channels
    for s in range(topology.n_stages):
        total += prev * f[s] * k[s] + f[s] + 2 * f[s]  # first conv + norm
        total += f[s] * f[s] * k[s] + f[s] + 2 * f[s]  # second conv + norm
        prev = f[s]
    for s in range(topology.n_stages - 1):
        total += f[s + 1] * f[s] * math.prod(topology.strides[s + 1]) + f[s]  # transposed conv
        total += 2 * f[s] * f[s] * k[s] + f[s] + 2 * f[s]  # conv on the concatenation + norm
        total += f[s] * f[s] * k[s] + f[s] + 2 * f[s]
        total += f[s] * n_classes + n_classes  # deep supervision head
    return total


def activation_elements(topology: Topology, in_channels: int = 1, n_classes: int = 3, inplace_activation: bool = True) -> int:
    """Elements of the tensors autograd keeps for the backward pass, for one sample.

    * the input (saved by the first conv);
    * per conv block: the conv output (instance norm needs its input) and the norm output,
      which the in-place leaky ReLU turns into the activation output (saved by the ReLU and
      by the next conv); a separate activation tensor when the ReLU is not in place;
    * per decoder stage: the concatenation of upsampled features and skip (2 F_s N_s, saved by
      the conv that reads it); the transposed conv output itself is only a transient, since
      concatenation needs no saved input; the transposed conv's input is the previous
      stage's activation, already counted;
    * per deep supervision head: logits, probabilities and log-probabilities of the loss.
    """
    per_block = 2 if inplace_activation else 3
    shapes = topology.stage_shapes()
    f = topology.features_per_stage
    total = in_channels * _voxels(shapes[0])
    for s in range(topology.n_stages):
        total += 2 * per_block * f[s] * _voxels(shapes[s])
    for s in range(topology.n_stages - 1):
        n = _voxels(shapes[s])
        total += 2 * f[s] * n + 2 * per_block * f[s] * n + 3 * n_classes * n
    return total


def backward_transient_elements(topology: Topology) -> int:
    """Gradient tensors alive on top of the saved activations at the peak, for one sample.

    The peak comes early in the backward pass, at the full-resolution decoder stage, when
    nearly every saved tensor is still alive and that stage's gradients are being formed: the
    gradient of the concatenation (2 F_0 N_0) and those of one conv's output and input
    (F_0 N_0 each): 4 F_0 N_0 elements.
    """
    return 4 * topology.features_per_stage[0] * _voxels(topology.stage_shapes()[0])


def memory_breakdown(
    topology: Topology, batch_size: int, in_channels: int = 1, n_classes: int = 3, model: MemoryModel = GPU_AMP
) -> dict[str, float]:
    """Each term of the estimate in bytes, and their total (see ``MemoryModel``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    act = batch_size * activation_elements(topology, in_channels, n_classes, model.inplace_activation) * model.bytes_per_activation
    transient = batch_size * backward_transient_elements(topology) * model.bytes_per_activation
    params = parameter_count(topology, in_channels, n_classes) * model.bytes_per_parameter
    dynamic = act + transient + params
    fragmentation = (model.fragmentation - 1.0) * dynamic
    return {
        "activations": float(act),
        "backward_transient": float(transient),
        "parameter_state": float(params),
        "fragmentation": float(fragmentation),
        "fixed": float(model.fixed_bytes),
        "total": float(dynamic + fragmentation + model.fixed_bytes),
    }


def training_memory_bytes(
    topology: Topology, batch_size: int, in_channels: int = 1, n_classes: int = 3, model: MemoryModel = GPU_AMP
) -> float:
    """Estimated peak memory (bytes) to train ``topology`` at ``batch_size``."""
    return memory_breakdown(topology, batch_size, in_channels, n_classes, model)["total"]


def max_batch_size(
    topology: Topology, budget_bytes: float, in_channels: int = 1, n_classes: int = 3, model: MemoryModel = GPU_AMP
) -> int:
    """Largest batch whose estimate fits in ``budget_bytes`` (0 if not even one sample fits)."""
    one = training_memory_bytes(topology, 1, in_channels, n_classes, model)
    two = training_memory_bytes(topology, 2, in_channels, n_classes, model)
    per_sample = two - one
    if one > budget_bytes:
        return 0
    return 1 + int((budget_bytes - one) // per_sample)
