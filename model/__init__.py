"""LLaVA-Mini: the released model, exactly, split for streaming.

    from model import LlavaMini
    m = LlavaMini.from_pretrained(path, vision_tower=None, dtype=None, device=None)
"""
from .config import IMAGE_TOKEN_INDEX, LlavaMiniConfig
from .llava_mini import PrefusedRows, Answer, ContextCache, FusionPolicy, LlavaMini, VideoContext
from .states import FrameSource, FrameStates

__all__ = ["LlavaMini", "LlavaMiniConfig", "FrameStates", "FrameSource", "FusionPolicy", "Answer", "VideoContext", "ContextCache", "PrefusedRows", "IMAGE_TOKEN_INDEX"]
