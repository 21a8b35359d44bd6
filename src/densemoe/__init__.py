"""densemoe: Mixture-of-Experts as dense GEMMs for Hopper."""

from densemoe import reference
from densemoe.kernels.cute.fc1_sm90 import Fc1CuteConfig
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.kernels.triton.fc1 import Fc1Problem, Fc1TritonConfig
from densemoe.kernels.triton.fc2 import Fc2Problem, Fc2TritonConfig
from densemoe.layer import DenseMoE, experts_forward, fused_experts, register_hf
from densemoe.ops.fc1 import fc1
from densemoe.ops.fc2 import fc2
from densemoe.tuning import tune
from densemoe.weights import PreparedWeights, prepare_weights

__version__ = "0.1.0"

from densemoe import _hf_hook  # noqa: E402

_hf_hook.install()  # experts_implementation="densemoe" in transformers, no import of it here
__all__ = ["fc1", "fc2", "DenseMoE", "fused_experts", "experts_forward", "prepare_weights", "PreparedWeights",
           "register_hf", "tune", "reference", "Fc2Problem", "Fc2TritonConfig", "Fc2CuteConfig",
           "Fc1Problem", "Fc1TritonConfig", "Fc1CuteConfig", "__version__"]
