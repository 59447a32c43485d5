"""Where the model runs: `--device {auto,cpu,cuda,cuda:N}`, parsed once at the command line's edge.

`auto` is CUDA when PyTorch sees a GPU, else the CPU (so a CPU-only machine behaves as before).
A bare `cuda` is resolved here, once, to the current device's index, so the model, the
prefetcher's buffers and stream, and the rows' decoding all name the same GPU even if
`torch.cuda.set_device` is called later.
"""

from __future__ import annotations

import argparse

import torch

from memstore.errors import InvalidArgumentError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(text: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a torch.device with its index resolved; anything else, or a
    GPU that is not there, raises InvalidArgumentError saying what to pass instead."""
    name = text.strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InvalidArgumentError(f"unknown device {text!r}; pass {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device {text!r} asked for, but PyTorch sees no CUDA GPU here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); pass --device cpu or auto"
        )
    count = torch.cuda.device_count()
    number = int(index) if index else torch.cuda.current_device()
    if number >= count:
        raise InvalidArgumentError(f"device {text!r} asked for, but there are {count} CUDA GPUs (cuda:0..{count - 1})")
    return torch.device("cuda", number)


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """`--device` (default auto), parsed to a torch.device; a bad value is a usage error, not a traceback."""
    parser.add_argument(
        "--device",
        type=_device_argument,
        default="auto",  # argparse runs `type` on a string default too: resolved like a given value
        metavar="{auto,cpu,cuda,cuda:N}",
        help="where the model runs and its rows land (auto: cuda if PyTorch sees a GPU, else cpu)",
    )


def _device_argument(text: str) -> torch.device:
    try:
        return resolve_device(text)
    except InvalidArgumentError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two devices are one (a bare `cuda` is the current GPU)."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return a.index == b.index or (a.index in (None, 0) and b.index in (None, 0))
    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def check_rows_device(model_device: torch.device, rows_device: torch.device, what: str) -> None:
    """Refuse rows that would land on another device than the model's (each layer would then copy them,
    blocking and unseen by the stall figures): say how to configure `what` instead."""
    if not same_device(model_device, rows_device):
        raise InvalidArgumentError(
            f"the model is on {model_device} but {what} delivers rows on {rows_device}; "
            f"create it with PrefetchConfig(device={str(model_device)!r}) (or move the model)"
        )
