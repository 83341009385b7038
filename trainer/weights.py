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


def fitting_state(model: torch.nn.Module, state: dict[str, torch.Tensor], url: str) -> dict[str, torch.Tensor]:
    """The tensors of `state` that `model` takes. Left out: the label vectors (they come from the
    dataset being evaluated) and a frozen backbone's weights (from model.backbone_weights, or cached
    as the features), so a model trained on images evaluates on features and back. Any other key
    missing, unexpected or of another shape is one WeightsError naming them. `model` may live on
    the meta device: only its keys and shapes are read."""
    frozen = not getattr(model.backbone, "trainable", True)

    def taken(key: str) -> bool:
        return key != "label_vectors" and not (frozen and key.startswith("backbone."))

    expected = {k: v.shape for k, v in model.state_dict().items() if taken(k)}
    state = {k: v for k, v in state.items() if taken(k)}
    problems = [
        ("missing", [k for k in expected if k not in state]),
        ("unexpected", [k for k in state if k not in expected]),
        (
            "of another shape (file vs config)",
            [
                f"{k} {list(state[k].shape)} vs {list(shape)}"
                for k, shape in expected.items()
                if k in state and state[k].shape != shape
            ],
        ),
    ]
    said = [
        f"{what} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
        for what, keys in problems
        if keys
    ]
    if said:
        raise WeightsError(
            f"{url}: does not fit the configured model (model.name, model.backbone, model.num_attentions "
            f"and the dataset's label-vector size must be those it was trained with): {'; '.join(said)}"
        )
    return state


def load_model_state(model: torch.nn.Module, url: str) -> None:
    """Weights from a model.pt into `model`, checked first (`fitting_state`)."""
    model.load_state_dict(fitting_state(model, read_state_dict(url), url), strict=False)
