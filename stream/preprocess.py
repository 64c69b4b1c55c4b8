"""Pixel preprocessing for LLaVA-Mini, matching the official implementation.

LLaVA-Mini feeds CLIP ViT-L/14-336 with two different paths:

* **video frames** (`preprocess_video_frames`): the decoded uint8 frames
  ``(T, H, W, 3)`` are turned into a ``(T, 3, H, W)`` tensor and squashed to
  ``size x size`` with ``torch.nn.functional.interpolate(x, size=(size, size))``
  (default ``mode="nearest"``, aspect ratio *not* kept), then go through
  ``CLIPImageProcessor``.  `resize_frame_nearest` does that resize for one
  frame, bit for bit the same, so a decoder can shrink frames as they come
  (`stream.decode.VideoSource(..., resize_to=size)`); frames that are already
  ``size x size`` pass through the resize unchanged.  On an image that is
  already ``size x size`` the processor's shortest-edge resize and centre
  crop are identities (PIL returns an unchanged copy when asked for the same
  size), so what remains is rescale by 1/255 and normalize with the CLIP
  mean/std;
* **still images** (`preprocess_image`): ``expand2square`` pads the image to
  a square with the CLIP mean colour, then ``CLIPImageProcessor`` resizes the
  shortest edge to ``size`` with PIL bicubic, centre crops ``size x size``,
  rescales and normalizes.

Both reproduce the processor's arithmetic bit for bit: pixels are multiplied
by 1/255 in float64, cast to float32, then ``(x - mean) / std`` in float32,
as ``transformers.image_transforms.rescale`` / ``normalize`` do (computed here
as an equivalent, bit-identical float32 division; see `_rescale_normalize`).  Nothing
here needs ``transformers`` at run time.

``torch.nn.functional.interpolate`` accepts uint8 input for ``mode="nearest"``
on CPU (verified in the tests), so the video path resizes the uint8 tensor
directly, as the official code does.  Nearest resampling only copies source
pixels (row ``floor(i * H / size)``, column ``floor(j * W / size)``), so
resizing in uint8 or in float gives identical values.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from lmcore.errors import BadArgument, NotAVideo

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "NotAnImage",
    "expand2square",
    "load_image",
    "preprocess_image",
    "preprocess_video_frames",
    "resize_frame_nearest",
]

#: OpenAI CLIP normalisation constants (RGB order), as in ``CLIPImageProcessor``.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

class NotAnImage(NotAVideo):
    """The input exists but Pillow cannot read it as an image.

    A subclass of `NotAVideo` (same exit code and HTTP status: unsupported
    media), with its own error code.
    """

    code = "E_NOT_AN_IMAGE"


# ---------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise BadArgument(f"expected size to be a positive integer, got {size!r}")
    return int(size)


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean/std as float32 tensors of shape (3,), validated."""
    try:
        m = torch.tensor([float(v) for v in mean], dtype=torch.float32)
        s = torch.tensor([float(v) for v in std], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise BadArgument(f"expected mean and std to be 3 numbers each, got mean={mean!r}, std={std!r}") from exc
    if m.shape != (3,) or s.shape != (3,):
        raise BadArgument(f"expected mean and std to be 3 numbers each, got {len(m)} and {len(s)}")
    if not bool(torch.all(s > 0)):
        raise BadArgument(f"expected every std value to be > 0, got {tuple(std)}")
    return m, s


def _rescale_normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 ``(x / 255 - mean) / std``, like ``CLIPImageProcessor``.

    The processor multiplies by ``1/255`` in float64, casts to float32 and
    normalizes in float32.  For uint8 inputs, float32 division by 255 (IEEE,
    correctly rounded) gives the very same float32 value for all 256 pixel
    values (checked exhaustively in the tests) and is about twice as fast, so
    results are bit-identical to the processor's.
    """
    y = x.to(torch.float32).div_(255)
    return y.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


def _frames_to_uint8(frames) -> torch.Tensor:
    """Accept ``(T, H, W, 3)`` uint8 array/tensor or a list of ``(H, W, 3)`` arrays / `Frame`s."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise BadArgument("expected at least one frame, got an empty list")
        arrays = [getattr(f, "rgb", f) for f in frames]  # stream.decode.Frame -> its pixels
        arrays = [a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a) for a in arrays]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise BadArgument(f"expected frames of one shape (H, W, 3), got shapes {sorted(shapes)}")
        dtypes = {a.dtype for a in arrays}
        if dtypes != {np.dtype(np.uint8)}:
            raise BadArgument(f"expected uint8 frames, got dtype {', '.join(sorted(map(str, dtypes)))}")
        x = torch.from_numpy(np.stack(arrays))
    elif isinstance(frames, torch.Tensor):
        x = frames.detach()
    elif isinstance(frames, np.ndarray):
        # torch cannot wrap read-only arrays without a warning; copy those (the
        # input is never written to either way)
        x = torch.from_numpy(np.ascontiguousarray(frames) if frames.flags.writeable else frames.copy())
    else:
        raise BadArgument(
            f"expected frames as a (T, H, W, 3) uint8 numpy array, torch tensor or list, got {type(frames).__name__}"
        )
    if x.dtype != torch.uint8:
        raise BadArgument(f"expected uint8 frames, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise BadArgument(f"expected frames of shape (T, H, W, 3), got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise BadArgument(f"expected at least one non-empty frame, got shape {tuple(x.shape)}")
    return x


# ---------------------------------------------------------------------------
# video path
# ---------------------------------------------------------------------------


def preprocess_video_frames(
    frames: np.ndarray | torch.Tensor | list,
    size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Official LLaVA-Mini video preprocessing.

    Args:
        frames: uint8 RGB frames, shape ``(T, H, W, 3)`` (numpy array or torch
            tensor, CPU or GPU), or a list of ``(H, W, 3)`` arrays / `Frame`s.
        size: output side length (336 for CLIP ViT-L/14-336).
        mean, std: per-channel normalisation (RGB).

    Returns:
        float32 tensor ``(T, 3, size, size)`` on the input's device:
        ``(nearest_resize(frames) / 255 - mean) / std``.

    Memory: the whole batch is resized at once, so pass frames in chunks
    (e.g. the frames of one streaming step), not a whole long video.
    """
    size = _check_size(size)
    m, s = _check_stats(mean, std)
    x = _nearest_resize(_frames_to_uint8(frames).permute(0, 3, 1, 2), size)  # (T, 3, size, size) uint8
    return _rescale_normalize(x, m.to(x.device), s.to(x.device))


def _nearest_resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(T, 3, H, W)`` (a channels-last view of ``(T, H, W, 3)`` frames) -> ``(T, 3, size, size)``.

    The one place the video path resizes: ``F.interpolate`` with its default
    ``mode="nearest"`` on uint8, like the official code.  Frames that are
    already ``size x size`` are returned as they are (nearest resizing to the
    same size is the identity).  Shared by `preprocess_video_frames` and
    `resize_frame_nearest`, so that frames resized one at a time while decoding
    equal frames resized here in a batch, bit for bit.
    """
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size))


def resize_frame_nearest(rgb: np.ndarray, size: int = 336) -> np.ndarray:
    """One ``(H, W, 3)`` uint8 RGB frame -> a new ``(size, size, 3)`` uint8 array, with
    exactly the pixels `preprocess_video_frames` would pick (nearest neighbour,
    aspect ratio not kept).

    For decoders that shrink each frame as it is decoded (an 8K frame is
    reduced before the next one is decoded): ``preprocess_video_frames`` of
    the results equals ``preprocess_video_frames`` of the full frames.  Any
    strides are accepted (a rotated view, say); the result never shares memory
    with ``rgb``.
    """
    size = _check_size(size)
    if isinstance(rgb, torch.Tensor):
        rgb = rgb.detach().cpu().numpy()
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[-1] != 3 or 0 in a.shape:
        raise BadArgument(f"expected an (H, W, 3) uint8 RGB frame, got shape {a.shape} dtype {a.dtype}")
    if a.shape[:2] == (size, size):  # nothing to resize: still a copy, never the caller's buffer
        return np.array(a, order="C", copy=True)
    # the layout of a frame in the batch path: a C-contiguous (H, W, 3) array seen as (1, 3, H, W)
    a = np.ascontiguousarray(a) if a.flags.writeable else a.copy()
    y = _nearest_resize(torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0), size)
    return y[0].permute(1, 2, 0).contiguous().numpy()


# ---------------------------------------------------------------------------
# image path
# ---------------------------------------------------------------------------


def expand2square(img: Image.Image, background_color: tuple[int, ...]) -> Image.Image:
    """Pad ``img`` to a square canvas of ``background_color``, the image centred (LLaVA's ``expand2square``).

    Wide images are pasted at ``(0, (w - h) // 2)``, tall ones at ``((h - w) // 2, 0)``;
    a square image is returned unchanged.
    """
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background_color)
    canvas.paste(img, (0, (width - height) // 2) if width > height else ((height - width) // 2, 0))
    return canvas


def _to_rgb_image(img: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3 or 0 in img.shape:
            raise BadArgument(f"expected an (H, W, 3) uint8 RGB array, got shape {img.shape} dtype {img.dtype}")
        return Image.fromarray(np.ascontiguousarray(img))
    raise BadArgument(f"expected a PIL image or an (H, W, 3) uint8 array, got {type(img).__name__}")


def _shortest_edge_size(width: int, height: int, size: int) -> tuple[int, int]:
    """``(new_w, new_h)`` with the shorter side == ``size``, as ``get_resize_output_image_size``
    (``default_to_square=False``): the long side is ``int(size * long / short)``, truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess_image(
    img: Image.Image | np.ndarray,
    size: int = 336,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """Official LLaVA-Mini image preprocessing (``image_aspect_ratio="pad"``).

    Steps: convert to RGB; `expand2square` with background
    ``tuple(int(x * 255) for x in mean)``; resize so the shortest edge is
    ``size`` (PIL bicubic); centre crop ``size x size`` (offsets
    ``(H - size) // 2``, ``(W - size) // 2``); rescale 1/255; normalize.

    Args:
        img: a PIL image (any mode; converted to RGB) or an ``(H, W, 3)`` uint8 RGB array.
        size: output side length.
        mean, std: per-channel normalisation (RGB); ``mean`` also sets the pad colour.

    Returns:
        float32 tensor ``(1, 3, size, size)``.
    """
    size = _check_size(size)
    m, s = _check_stats(mean, std)
    pil = expand2square(_to_rgb_image(img), tuple(int(v * 255) for v in mean))
    new_w, new_h = _shortest_edge_size(*pil.size, size)
    pil = pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)  # same size: PIL returns a copy
    arr = np.array(pil, dtype=np.uint8)  # (H, W, 3), a writable copy
    top, left = (new_h - size) // 2, (new_w - size) // 2
    arr = arr[top : top + size, left : left + size]
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)  # (1, 3, size, size)
    return _rescale_normalize(x, m, s)


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image file fully (decoded, file closed) and return it in RGB mode.

    Raises:
        BadArgument: ``path`` is not a str / os.PathLike.
        InputNotFound: the file does not exist.
        InputUnreadable: a FIFO, socket, device, symbolic link loop or unreadable file.
        NotAnImage: the path is a directory or Pillow cannot decode the file.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise BadArgument(f"expected an image path (str or os.PathLike), got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise NotAnImage(f"expected an image file that Pillow can read, got {path} (a directory)")
    from .decode import check_input_path  # a FIFO would block Pillow forever; a loop is no "no such file"

    check_input_path(path, what="image file")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise NotAnImage(f"expected an image file that Pillow can read, got {path} ({reason})") from exc
