"""densemoe: Mixture-of-Experts as dense GEMMs for Hopper."""

from densemoe import reference
from densemoe.kernels.cute.fc2_sm90 import Fc2CuteConfig
from densemoe.kernels.triton.fc2 import Fc2Problem, Fc2TritonConfig
from densemoe.ops.fc2 import fc2
from densemoe.tuning import tune

__version__ = "0.1.0"
__all__ = ["fc2", "tune", "reference", "Fc2Problem", "Fc2TritonConfig", "Fc2CuteConfig", "__version__"]
