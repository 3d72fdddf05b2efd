"""titans-ts: time-series forecasting with the Titans neural long-term memory."""

from titans_ts.backbone import VARIANTS, TitansBackbone
from titans_ts.layers import PersistentMemory
from titans_ts.lmm import LMMBlock
from titans_ts.mac import MACBlock
from titans_ts.mag import MAGBlock
from titans_ts.mal import MALBlock
from titans_ts.memory import MemoryState, NeuralMemory

__all__ = [
    "VARIANTS", "LMMBlock", "MACBlock", "MAGBlock", "MALBlock", "MemoryState", "NeuralMemory",
    "PersistentMemory", "TitansBackbone",
]
__version__ = "0.1.0"
