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
    "PersistentMemory", "TitansBackbone", "TitansForecaster",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # lazy: the sktime estimator pulls in lightning and sktime (seconds); `import titans_ts` stays light
    if name == "TitansForecaster":
        from forecasters.sktime import TitansForecaster

        return TitansForecaster
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
