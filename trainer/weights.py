"""Reading a state dict this system wrote (model.pt, a backbone's weights), from a path or URL.

Tensors only: `weights_only=True` never runs code, and a file holding anything else is refused
with one line naming it.
"""

from __future__ import annotations

import io
import pickle

import fsspec
import torch


class WeightsError(ValueError):
    """A weights file cannot be read as a plain state dict."""


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{url}: cannot be read ({type(exc).__name__}: {exc})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise WeightsError(f"{url}: holds more than plain tensors, refused unread ({reason})") from None
    except (RuntimeError, EOFError) as exc:
        raise WeightsError(f"{url}: not a torch state dict, or damaged ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{url}: not a state dict (a mapping of names to tensors)")
    return state


def load_model_state(model: torch.nn.Module, url: str) -> None:
    """Weights from a model.pt into `model`. The label vectors come from the dataset being
    evaluated, not from the file; a frozen backbone's weights come from model.backbone_weights (or
    were cached as the features), so a model trained on images evaluates on features and back."""
    state = read_state_dict(url)
    state.pop("label_vectors", None)
    frozen = not getattr(model.backbone, "trainable", True)
    if frozen:
        state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "label_vectors" and not (frozen and k.startswith("backbone."))]
    if missing or unexpected:
        raise WeightsError(
            f"{url}: does not match model.name/model.backbone of the config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
