import sys
from pathlib import Path

import torch

# Two cores: more threads than cores makes these small tests 100x slower.
torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))
