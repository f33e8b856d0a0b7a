"""One stored example: a safetensors file whose header says what it holds, whose run
wrote it, and a checksum of all of it.

    tensors            the example's tensors, by name
    header "nnexp"     JSON: run_id (the identity of the run that wrote it), index,
                       each tensor's axis names and labels, scalars, info (prompts,
                       tokens...), writer (the process id), and checksum

The checksum is a SHA-256 over the header (every field but the checksum, as canonical
JSON) and every tensor's name, dtype, shape and bytes. It is checked on every read, so
a file damaged on disk (a flipped byte in a tensor changes a value by any amount and
still loads) is reported by name instead of read as numbers.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save

from .errors import ResultsError
from .labelled import LabelledTensor
from .results import ExampleRecord


class DamagedExampleError(ResultsError):
    """An example file that cannot be trusted: unreadable, or its checksum does not match."""

    def __init__(self, path, why: str) -> None:
        super().__init__(f"{path} is damaged ({why}); `nnexp resume` computes that example again")
        self.path = path
        self.why = why


class ForeignExampleError(ResultsError):
    """An intact example file that another run (another identity) wrote."""


def checksum(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    fields = {key: value for key, value in header.items() if key != "checksum"}
    digest.update(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"\0{name}:{tensor.dtype}:{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def encode(record: ExampleRecord, run_id: str) -> bytes:
    """The bytes of `record`'s file, written by the run `run_id`."""
    tensors = {name: t.values.detach().to("cpu").contiguous() for name, t in record.tensors.items()}
    header = {
        "run_id": run_id,
        "index": record.index,
        "dims": {name: list(t.dims) for name, t in record.tensors.items()},
        "coords": {name: t.coords for name, t in record.tensors.items()},
        "scalars": record.scalars,
        "info": record.info,
        "writer": {"pid": os.getpid()},
    }
    header["checksum"] = checksum(header, tensors)
    return save(tensors, metadata={"nnexp": json.dumps(header)})


def decode(path, run_id: str) -> ExampleRecord:
    """The record in the file at `path`, checked: DamagedExampleError if it is unreadable
    or its checksum does not match, ForeignExampleError if another run wrote it."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            header = json.loads(metadata["nnexp"])
            raw = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 - a safe_open handle
    except Exception as error:  # noqa: BLE001 - whatever the damage, the file is unreadable
        raise DamagedExampleError(path, f"unreadable: {_first_line(error)}") from None
    if not isinstance(header, dict) or "checksum" not in header:
        raise DamagedExampleError(path, "no checksum in its header")
    if checksum(header, raw) != header["checksum"]:
        raise DamagedExampleError(path, "its contents do not match the checksum in its header")
    if header.get("run_id") != run_id:
        raise ForeignExampleError(
            f"{path} was written by another run ({header.get('run_id')}) than the one this directory holds "
            f"({run_id}); it was copied or moved here: delete it (resuming computes that example for this run)"
        )
    try:
        tensors = {name: LabelledTensor(raw[name], tuple(dims), header["coords"].get(name, {}))
                   for name, dims in header["dims"].items()}
        return ExampleRecord(int(header["index"]), tensors, header["scalars"], header["info"])
    except (KeyError, TypeError, ValueError) as error:
        raise DamagedExampleError(path, f"its header does not describe its tensors: {_first_line(error)}") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
