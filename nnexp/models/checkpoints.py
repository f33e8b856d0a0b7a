"""Training checkpoints: a user's own weights, loaded into a base architecture.

A checkpoint is a file of tensors: what `torch.save(model.state_dict(), path)` writes
(also nested in a training checkpoint, under "model_state_dict", "state_dict",
"model"...), or a `.safetensors` file. It is read with `torch.load(weights_only=True)`,
which never runs code from the file: one that holds pickled Python objects (a whole
`nn.Module`, a custom class, argparse's Namespace) is refused rather than unpickled.

Keys keep whatever the training wrappers added (torch.compile's `_orig_mod.`,
DataParallel's `module.`); they are removed, and the result must name every weight of
the base model, with its shape, before anything is loaded. Its SHA-256 goes into the
model's description, so a run's identity names the exact weights.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ModelError

# Where training checkpoints usually keep the model's weights, most specific first.
NESTED_KEYS = ("model_state_dict", "state_dict", "model", "module")

# Key segments that training wrappers add, named so that no Hugging Face module uses them:
# torch.compile's OptimizedModule, FSDP's and activation checkpointing's wrappers. They are
# dropped wherever they appear (a compiled block puts `_orig_mod` mid-key).
_WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
# DataParallel / DistributedDataParallel's `module`: dropped at the start of a key only,
# where it stands for the wrapper (an inner module could be called "module").
_WRAPPER_PREFIX = "module"

_SAVE_WEIGHTS = "save the weights alone with torch.save(model.state_dict(), path) or safetensors"


def locate(checkpoint) -> Path:
    """The checkpoint file, resolved; or a one-line refusal."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        raise ModelError(f"checkpoint {path} is a folder; give the file torch.save or safetensors wrote "
                         "(a saved Hugging Face folder goes in --model)")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    return path.resolve()


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file's bytes: what identifies the weights in a run."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def describe(path: Path) -> dict:
    """What a model's source records about its checkpoint (enough to load and check it again)."""
    return {"path": str(path), "sha256": file_sha256(path)}


def check_unchanged(recorded: dict, run_dir) -> Path:
    """The checkpoint a run recorded, refused when it is gone or its bytes changed since."""
    path = Path(recorded["path"])
    if not path.is_file():
        raise ModelError(f"the run in {run_dir} was computed from checkpoint {path}, which no longer exists; "
                         "put it back there to resume")
    now = file_sha256(path)
    if now != recorded["sha256"]:
        raise ModelError(
            f"checkpoint {path} has changed since the run in {run_dir} started (SHA-256 {recorded['sha256'][:12]}... "
            f"then, {now[:12]}... now); restore it to resume, or start a new run with `nnexp run ... --checkpoint`")
    return path


# -- reading ------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, found where training code usually puts them."""
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # noqa: BLE001 - any failure to parse is a bad file
            raise ModelError(f"checkpoint {path} is not a readable safetensors file ({_first_line(error)})") from None
    try:
        # weights_only: tensors and plain containers only; never a class or a function
        # from the file, so reading a checkpoint cannot run code.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # A class or function the file names is what weights_only refuses to import (any
        # object, a whole module); other refusals are of bytes that are no checkpoint.
        if "Unsupported global" in str(error):
            raise ModelError(_pickled_objects(path, str(error))) from None
        reason = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(error))
        raise ModelError(f"checkpoint {path} is not a file torch.save or safetensors wrote "
                         f"({reason.group(1) if reason else _first_line(error)})") from None
    except Exception as error:  # noqa: BLE001 - weights_only runs no code of the file: any error is a bad file
        raise ModelError(f"checkpoint {path} is not a file torch.save or safetensors wrote, or it is damaged "
                         f"({type(error).__name__}: {_first_line(error)})") from None
    return find_state_dict(content, path)


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte header length, then the JSON header."""
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _pickled_objects(path: Path, message: str) -> str:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    what = f" ({found.group(1)})" if found else ""
    return (f"checkpoint {path} holds pickled Python objects{what}, which nnexp does not unpickle: it loads only "
            f"tensors (torch.load with weights_only=True); {_SAVE_WEIGHTS}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_tensor_dict(value) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _tensor_dicts(value, where: tuple = ()):
    """(where, dict) for every dict of tensors inside `value`, at any depth."""
    if _is_tensor_dict(value):
        yield where, value
    elif isinstance(value, Mapping):
        for key, inner in value.items():
            yield from _tensor_dicts(inner, (*where, key))
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            yield from _tensor_dicts(inner, (*where, index))


def find_state_dict(content, path: Path) -> dict[str, torch.Tensor]:
    """The model's dict of tensors in what torch.load read: the file itself, the one
    under a usual key ("model_state_dict", "state_dict", "model", "module"), or the only
    one there is. A training checkpoint also holds the optimizer's (per-parameter dicts
    of tensors), hence the usual keys first."""
    found = list(_tensor_dicts(content))
    if not found:
        raise ModelError(f"checkpoint {path} holds no dict of named tensors (it holds a {type(content).__name__}); "
                         f"{_SAVE_WEIGHTS}")
    if found[0][0] == ():
        return dict(found[0][1])
    for key in NESTED_KEYS:
        under = [tensors for where, tensors in found if where[:1] == (key,)]
        if len(under) == 1:
            return dict(under[0])
    if len(found) == 1:
        return dict(found[0][1])
    places = ", ".join(_place(where) for where, _ in found[:3]) + (", ..." if len(found) > 3 else "")
    raise ModelError(f"checkpoint {path} holds {len(found)} dicts of tensors ({places}) and none under "
                     f"{', '.join(NESTED_KEYS)}, so which is the model's is unclear; save that one alone with "
                     "torch.save(checkpoint[...], path)")


def _place(where: tuple) -> str:
    return "".join(f"[{key!r}]" for key in where)


# -- fitting a model ----------------------------------------------------------------


def strip_wrappers(key: str) -> str:
    """A key without what torch.compile, DataParallel/DDP, FSDP or activation
    checkpointing added, in any combination and any number of times."""
    parts = [part for part in key.split(".") if part not in _WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == _WRAPPER_PREFIX:
        parts = parts[1:]
    return ".".join(parts)


def rename_keys(state_dict: dict, expected: set[str], base_prefix: str, path: Path) -> dict:
    """The checkpoint's tensors under the model's names: a key the model has is kept;
    another loses its wrappers' segments, and gains the base model's prefix
    (`transformer.`, `model.`) when that alone makes it a key of the model (a state dict
    of the inner model, saved without the head)."""
    renamed, origin = {}, {}
    for key, tensor in state_dict.items():
        name = key if key in expected else strip_wrappers(key)
        if name not in expected and base_prefix and f"{base_prefix}.{name}" in expected:
            name = f"{base_prefix}.{name}"
        if name in renamed:
            raise ModelError(f"checkpoint {path} has two keys for the weight {name} ({origin[name]} and {key}) once "
                             "the wrappers' prefixes are removed; save the state dict of one model")
        renamed[name], origin[name] = tensor, key
    return renamed


def check_fit(hf_model, state_dict: dict, path: Path, base_name: str) -> None:
    """Refuse, in one line, a checkpoint that does not name every weight of the model
    with its shape: before loading, since load_state_dict raises a wall of text for a
    shape, and a missing weight would stay as initialised (here: uninitialised)."""
    expected = hf_model.state_dict(keep_vars=True)
    ignorable = _ignorable(hf_model, expected)
    unexpected = [key for key in state_dict if key not in expected and not ignorable(key)]
    missing = [key for key in expected if key not in state_dict and not _tie_covered(key, expected, state_dict)]
    misshaped = [f"{key}: checkpoint {list(state_dict[key].shape)}, model {list(expected[key].shape)}"
                 for key in state_dict if key in expected and state_dict[key].shape != expected[key].shape]
    if missing or unexpected or misshaped:
        raise _does_not_fit(path, base_name, missing, unexpected, misshaped)
    _check_ties(expected, state_dict, path, base_name)


def _does_not_fit(path: Path, base_name: str, missing: list, unexpected: list, misshaped: list = ()) -> ModelError:
    """One line: how many keys are missing, unexpected, mis-shaped, and the first few of each."""
    problems = [_listed(missing, "missing key", "missing keys"), _listed(unexpected, "unexpected key", "unexpected keys"),
                _listed(misshaped, "mis-shaped", "mis-shaped")]
    return ModelError(f"checkpoint {path} does not fit {base_name}: {', '.join(p for p in problems if p)}")


def _listed(names: list[str], one: str, many: str) -> str:
    if not names:
        return ""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} {one if len(names) == 1 else many} ({shown})"


def _ignorable(hf_model, expected: dict):
    """Whether an extra key may be dropped: a buffer the model computes itself (saved
    by older transformers as part of the state, e.g. GPT-2's causal mask or rotary
    `inv_freq`), or one transformers itself ignores when loading this class."""
    computed = {name for name, _ in hf_model.named_buffers()} - set(expected)
    patterns = [re.compile(p) for p in getattr(hf_model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    return lambda key: key in computed or any(p.search(key) for p in patterns)


def _tie_covered(key: str, expected: dict, state_dict: dict) -> bool:
    """A weight the model ties to another that the checkpoint has (GPT-2's lm_head.weight
    is wte.weight): one tensor, loaded through the other name."""
    tensor = expected[key]
    return any(other in state_dict for other, value in expected.items() if value is tensor and other != key)


def _check_ties(expected: dict, state_dict: dict, path: Path, base_name: str) -> None:
    """Tied names given different values would keep only one of them: refuse instead."""
    seen: dict[int, str] = {}
    for key, tensor in expected.items():
        if key not in state_dict:
            continue
        first = seen.setdefault(id(tensor), key)
        if first != key and not torch.equal(state_dict[first], state_dict[key]):
            raise ModelError(
                f"checkpoint {path} has different values for {first} and {key}, which {base_name} ties into one "
                "weight (tie_word_embeddings in its config), so one of them would be lost; use a base whose config "
                "unties them")


def load_into(hf_model, state_dict: dict, path: Path, base_name: str) -> None:
    """Load the checkpoint's tensors into `hf_model` in place (cast to its dtype), after
    renaming its keys and checking that they fit."""
    expected = hf_model.state_dict(keep_vars=True)
    renamed = rename_keys(state_dict, set(expected), getattr(hf_model, "base_model_prefix", ""), path)
    check_fit(hf_model, renamed, path, base_name)
    # the extra keys left are computed buffers or keys transformers ignores (check_fit)
    result = hf_model.load_state_dict({k: v for k, v in renamed.items() if k in expected}, strict=False)
    # check_fit found these already; this is torch's own account, kept as a guard.
    missing = [key for key in result.missing_keys if not _tie_covered(key, expected, renamed)]
    if missing or result.unexpected_keys:
        raise _does_not_fit(path, base_name, missing, list(result.unexpected_keys))
