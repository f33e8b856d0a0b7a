"""`load_model`: a hub id, a local folder or a built-in alias, ready to trace;
optionally with the weights of a training checkpoint (`nnexp.models.checkpoints`).

The result is a `Model`: the Hugging Face model and tokenizer, the nnsight wrapper
that traces them, and the resolved `Architecture` that says where everything lives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from . import checkpoints, hub
from .aliases import ALIASES, alias_folder, suggestion
from .architectures import Architecture

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# A Hugging Face repo id: "name" or "owner/name" of letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class Model:
    """A loaded causal LM, with what nnexp needs to trace it.

    Attributes:
        name: short name used in results paths (the alias, the repo id, or the folder name).
        source: where it came from: {"kind": "alias" | "hub" | "folder" | "config" | "remote", ...},
            with {"checkpoint": {"path", "sha256"}} for a model given a training checkpoint.
        hf: the Hugging Face `*ForCausalLM` module, in eval mode.
        tokenizer: its tokenizer (nnsight sets left padding and a pad token).
        nn: the nnsight `TransformersModel` wrapping `hf`.
        arch: the resolved architecture (module paths, layer and head counts).
        executor: what runs its traces (`nnexp.tracing.jobs`): here by default, in-process
            through nnsight's remote serialisation (`use_backend("remote-local")`), or on
            an NDIF server (`nnexp.remote`).
        remote_id: for a model run on a server, the repo id the server knows it by; its
            weights are not loaded here (the module tree is built on the meta device).
    """

    name: str
    source: dict
    hf: torch.nn.Module
    tokenizer: object
    nn: object
    arch: Architecture
    quantization: str | None = None  # "8bit" when loaded with bitsandbytes
    executor: object = None
    remote_id: str | None = None

    def __post_init__(self) -> None:
        if self.executor is None:
            from ..tracing.jobs import LocalExecutor

            self.executor = LocalExecutor(self)

    def use_backend(self, backend: str = "local", **options) -> Model:
        """Run this model's traces here ("local"), through nnsight's in-process remote
        serialisation ("remote-local", a check that every request would run on a server
        without nnexp), or on an NDIF server ("remote"; options as for
        `nnexp.remote.RemoteExecutor`). Returns the model."""
        from ..tracing.jobs import LocalExecutor, SimulatedRemoteExecutor

        if backend == "local":
            self.executor = LocalExecutor(self)
        elif backend == "remote-local":
            self.executor = SimulatedRemoteExecutor(self)
        elif backend == "remote":
            from ..remote import RemoteExecutor

            self.executor = RemoteExecutor(self, **options)
        else:
            raise ModelError(f"unknown backend {backend!r}; use local, remote or remote-local")
        return self

    @property
    def is_remote(self) -> bool:
        """Whether the weights live on a server rather than here."""
        return self.remote_id is not None

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def require_parameters(self, paths: list[str]) -> None:
        """Make the parameters of the modules at `paths` real here. A no-op for a model
        loaded here; for a remote model (built on the meta device) they are read from
        the server once, for analyses that project activations through weights
        (the unembedding, a final norm) on this side."""
        from .architectures import _get_module

        modules = {path: _get_module(self.hf, path) for path in paths}
        missing = [path for path, module in modules.items()
                   if any(t.is_meta for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])]
        if not missing:
            return
        from ..tracing.execute import fetch_parameters

        for path, fetched in fetch_parameters(self, missing).items():
            module = modules[path]
            for name, value in fetched["parameters"].items():
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
            for name, value in fetched["buffers"].items():
                module._buffers[name] = value

    @property
    def dtype(self) -> torch.dtype:
        # the first floating parameter: 8-bit models also hold int8 weights
        return next((p.dtype for p in self.hf.parameters() if p.is_floating_point()), torch.float32)

    def describe(self) -> dict:
        """What a results spec records about the model (enough to load it again)."""
        if self.is_remote:
            # The server decides dtype and device; the spec says where the numbers came from.
            return {
                "name": self.name,
                "source": self.source,
                "dtype": "server",
                "device": "remote",
                "class": type(self.hf).__name__,
                "attn_implementation": getattr(self.hf.config, "_attn_implementation", None),
                "backend": self.executor.describe(),
                **self.arch.describe(),
            }
        return {
            "name": self.name,
            "source": self.source,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "class": type(self.hf).__name__,
            "attn_implementation": getattr(self.hf.config, "_attn_implementation", None),
            **({"quantization": self.quantization} if self.quantization else {}),
            **self.arch.describe(),
        }


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return DTYPES[key]


def _placement(device: str | None) -> dict:
    """from_pretrained arguments for a device choice: cpu, cuda, cuda:N or auto."""
    device = (device or "cpu").lower()
    if device == "auto":
        # Shard across every visible GPU when there is one; otherwise stay on the CPU.
        return {"device_map": "auto"} if torch.cuda.is_available() else {}
    if device == "cpu":
        return {}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device {device!r} asked for, but this machine has no CUDA GPU visible to torch; "
                "use --device cpu (or auto)"
            )
        return {"device_map": {"": device}}
    raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def wrap_model(hf_model, tokenizer, name: str, source: dict) -> Model:
    """Wrap an already-built HF causal LM and its tokenizer for nnexp (no download)."""
    from nnsight import TransformersModel

    arch = Architecture(hf_model)  # raises a clear error for an unsupported family
    hf_model.eval()
    _check_bos(tokenizer, arch.model_type, name)
    nn = TransformersModel(hf_model, tokenizer=tokenizer)
    return Model(name=name, source=source, hf=hf_model, tokenizer=tokenizer, nn=nn, arch=arch)


def _check_bos(tokenizer, model_type: str, name: str) -> None:
    # Gemma is trained with <bos> first. transformers releases before 5.23 build a
    # Gemma tokenizer from GGUF that silently drops it, and Gemma then gets simple
    # tasks wrong; refuse such a tokenizer rather than report wrong numbers.
    if not model_type.startswith("gemma"):
        return
    ids = tokenizer("x").input_ids
    if tokenizer.bos_token_id is None or not ids or ids[0] != tokenizer.bos_token_id:
        raise ModelError(
            f"the tokenizer of {name} does not add <bos>, which Gemma models need; upgrade "
            "transformers to 5.23 or later and delete the cached folder so it is converted again"
        )


def load_model(
    name_or_path: str,
    device: str | None = "cpu",
    dtype="float32",
    attn_implementation: str | None = None,
    load_in_8bit: bool = False,
    backend: str = "local",
    remote_model: str | None = None,
    checkpoint: str | Path | None = None,
    **remote_options,
) -> Model:
    """Load a causal LM by built-in alias, local folder, or Hugging Face Hub id; or
    the weights of a training checkpoint into such a model's architecture.

    Args:
        name_or_path: an alias (`nnexp list` shows them), a folder holding a saved
            HF model and tokenizer, or a hub repo id such as "openai-community/gpt2".
        device: "cpu", "cuda", "cuda:N", or "auto" (shard across GPUs when present).
        dtype: "float32" (default), "float16" or "bfloat16".
        attn_implementation: passed to transformers ("eager", "sdpa"); None keeps its default.
        load_in_8bit: quantise the linear layers to 8 bits with bitsandbytes (LLM.int8(), as
            for GPT-2 XL on a small GPU); needs a CUDA GPU and the `bitsandbytes` package.
        backend: "local" (default); "remote" runs every trace on an NDIF server, with no
            weights loaded here (only the config and tokenizer); "remote-local" loads the
            model here and runs each request through nnsight's in-process serialisation.
        remote_model: with backend="remote", the repo id the server knows the model by
            (default: the hub id itself, or an alias's original checkpoint; a local
            folder needs it).
        checkpoint: a file of weights to use instead of the base's: a state dict saved
            with `torch.save` (alone or nested in a training checkpoint) or a
            `.safetensors` file. `name_or_path` then gives the architecture and tokenizer,
            and may also be a `config.json` path (its folder must hold the tokenizer).
            Read with `weights_only=True`; see `nnexp.models.checkpoints`.
        remote_options: with backend="remote", options of `nnexp.remote.RemoteExecutor`
            (host, timeout, retries, backoff, trusted_hosts).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if checkpoint is not None and backend == "remote":
        raise ModelError("a checkpoint's weights are on this machine, and a remote server cannot load them; run "
                         "locally (or with --backend remote-local)")
    if checkpoint is not None and load_in_8bit:
        raise ModelError("8-bit loading (--load-in-8bit) is not available with a checkpoint; load it in float16 or "
                         "bfloat16 instead (--dtype)")
    if backend == "remote":
        return _load_remote(name_or_path, dtype, attn_implementation, remote_model, remote_options)
    if backend not in ("local", "remote-local"):
        raise ModelError(f"unknown backend {backend!r}; use local, remote or remote-local")

    torch_dtype = parse_dtype(dtype)
    placement = _placement(device)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if load_in_8bit:
        placement, extra["quantization_config"] = _eight_bit(device, placement)

    if checkpoint is not None:
        return _load_checkpoint(name_or_path, checkpoint, device, torch_dtype, extra).use_backend(backend)
    path, name, source = _locate(name_or_path)
    if source["kind"] == "config":
        raise ModelError(f"{path} is a config file: an architecture without weights; give the weights with "
                         "--checkpoint (checkpoint=), or pass a folder holding a saved model")
    cache = _hub_access(name_or_path, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **cache)
        hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement, **extra, **cache)
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, path, source, error) from None

    if "device_map" not in placement and str(device or "cpu").lower() not in ("cpu", "auto"):
        hf_model.to(device)
    model = wrap_model(hf_model, tokenizer, name, source)
    model.quantization = "8bit" if load_in_8bit else None
    return model.use_backend(backend)


def _load_error(name_or_path: str, path, source: dict, error: Exception) -> ModelError:
    """One line for a model, config or tokenizer that transformers could not load."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if source["kind"] == "hub":
        return ModelError(
            f"could not load model {name_or_path!r}: it is not a built-in alias "
            f"({', '.join(ALIASES)}) or a local folder, and the Hugging Face Hub could not "
            f"provide it ({first_line}); check the id and the network, or pass a local folder"
            f"{suggestion(name_or_path)}"
        )
    return ModelError(f"could not load model from {path}: {first_line}")


def _load_checkpoint(name_or_path: str, checkpoint, device, torch_dtype, extra: dict) -> Model:
    """The base's architecture (from its config alone: its weights are never read, nor
    downloaded) and tokenizer, with the checkpoint's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    checkpoint = checkpoints.locate(checkpoint)
    path, name, source = _locate(name_or_path)
    tokenizer_folder = _tokenizer_folder(path) if source["kind"] == "config" else path
    cache = _hub_access(name_or_path, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, **cache)
        config = AutoConfig.from_pretrained(path, **cache)
    except (OSError, ValueError) as error:
        raise _load_error(name_or_path, path, source, error) from None
    identity = checkpoints.describe(checkpoint)  # hashed before reading: the run records these bytes
    state_dict = checkpoints.read_state_dict(checkpoint)
    # Every weight is overwritten by the checkpoint (check_fit refuses one that would not
    # be), so random initialisation would be wasted time; tying is part of it, so redo it.
    with no_init_weights():
        hf_model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, **extra)
    hf_model.tie_weights()
    checkpoints.load_into(hf_model, state_dict, checkpoint, name)
    del state_dict
    _place(hf_model, device, torch_dtype)
    return wrap_model(hf_model, tokenizer, f"{name}+{checkpoint.stem}", {**source, "checkpoint": identity})


# Files a saved tokenizer leaves in its folder (any one of them will do for AutoTokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _tokenizer_folder(config_path: Path) -> Path:
    """The folder of a config file, which must hold the tokenizer too."""
    folder = config_path.parent
    if not any((folder / file).exists() for file in _TOKENIZER_FILES):
        raise ModelError(f"{folder} has {config_path.name} but no tokenizer files; pass a folder with a tokenizer "
                         "(tokenizer.save_pretrained(folder) beside the config)")
    return folder


def _place(hf_model, device: str | None, torch_dtype) -> None:
    """Move a model built here to `device` (cpu, cuda, cuda:N; auto shards over the GPUs
    as from_pretrained's device_map="auto" does, and stays on the CPU without one)."""
    device = (device or "cpu").lower()
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    if device != "auto":
        hf_model.to(device)
        return
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(hf_model, no_split_module_classes=sorted(hf_model._no_split_modules or ()),
                                       dtype=torch_dtype)
    dispatch_model(hf_model, device_map, skip_keys=sorted(hf_model._skip_keys_device_placement or ()) or None)
    hf_model.hf_device_map = device_map


def _hub_access(name_or_path: str, source: dict) -> dict:
    """from_pretrained arguments for a hub id: none when the hub answers; the local cache
    only when it does not and the model was downloaded before; otherwise an error at
    once, rather than a minute of retries before the same conclusion."""
    if source["kind"] != "hub" or hub.offline_by_choice():
        return {}  # HF_HUB_OFFLINE: transformers reads the cache alone, and fails fast
    reason = hub.unreachable()
    if reason is None:
        return {}
    if hub.is_cached(name_or_path):
        return {"local_files_only": True}
    raise ModelError(
        f"could not load model {name_or_path!r}: it is not a built-in alias ({', '.join(ALIASES)}) or a local "
        f"folder, and the Hugging Face Hub is unreachable from here ({reason}); check the name, or pass a local "
        f"folder or a built-in alias{suggestion(name_or_path)}"
    )


def _locate(name_or_path: str) -> tuple[Path | str, str, dict]:
    """Where a model name points: (what from_pretrained takes, the results name, the source)."""
    if name_or_path in ALIASES:
        return alias_folder(name_or_path), name_or_path, {"kind": "alias", "alias": name_or_path}
    if Path(name_or_path).expanduser().is_file():
        return _config_file(Path(name_or_path).expanduser().resolve())
    if Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser().resolve()
        if not (path / "config.json").exists():
            raise ModelError(
                f"folder {path} has no config.json, so it is not a saved Hugging Face model; "
                "save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)"
            )
        return path, path.name, {"kind": "folder", "path": str(path)}
    if _REPO_ID.match(name_or_path):
        return name_or_path, name_or_path.replace("/", "--"), {"kind": "hub", "repo_id": name_or_path}
    raise ModelError(
        f"unknown model {name_or_path!r}: not a built-in alias ({', '.join(ALIASES)}), "
        f"not an existing folder, and not a Hugging Face repo id (owner/name){suggestion(name_or_path)}"
    )


def _config_file(path: Path) -> tuple[Path, str, dict]:
    """A model given as a config file: an architecture, for a checkpoint's weights."""
    if path.suffix != ".json":
        raise ModelError(
            f"model {path} is a file; give a built-in alias, a saved model's folder, a hub id, or a config.json "
            "(with a checkpoint). A checkpoint of weights goes in --checkpoint (checkpoint=), with its base in --model")
    name = path.parent.name if path.name == "config.json" else path.stem
    return path, name, {"kind": "config", "path": str(path)}


def _load_remote(name_or_path: str, dtype, attn_implementation, remote_model, options) -> Model:
    """A model that runs on a server: its module tree on the meta device (no weights),
    its tokenizer here, and a remote executor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, _, source = _locate(name_or_path)
    if source["kind"] == "config":
        raise ModelError(f"{path} is a config file, which a remote run cannot use; give the hub id or alias of the "
                         "model the server serves (or a saved model's folder with --remote-model)")
    if source["kind"] == "folder" and remote_model is None:
        raise ModelError(
            f"{path} is a local folder; a remote server cannot load it. Pass the repo id the server serves "
            "the same model under (--remote-model owner/name), or run locally"
        )
    default_id = {"alias": ALIASES[name_or_path].hub_id if name_or_path in ALIASES else None,
                  "hub": name_or_path, "folder": None}[source["kind"]]
    repo_id = remote_model or default_id
    if not _REPO_ID.match(repo_id or ""):
        raise ModelError(f"remote model {repo_id!r} is not a Hugging Face repo id (owner/name)")
    cache = _hub_access(name_or_path, source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **cache)
        config = AutoConfig.from_pretrained(path, **cache)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"could not read the config and tokenizer of {name_or_path!r} ({first_line}); a remote "
                         "run needs them here (from the hub, a folder or an alias)") from None
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        hf_model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(dtype), **extra)
    # Tells the pipeline nnsight builds around the module that it is placed already
    # (it would otherwise try to move meta tensors to the CPU).
    hf_model.hf_device_map = {"": "meta"}
    name = repo_id.replace("/", "--")
    model = wrap_model(hf_model, tokenizer, name, {"kind": "remote", "repo_id": repo_id, "from": str(path)})
    model.remote_id = repo_id
    return model.use_backend("remote", **options)


def _eight_bit(device: str | None, placement: dict) -> tuple[dict, object]:
    """Placement and quantisation config for 8-bit loading, or a clear refusal."""
    if not torch.cuda.is_available():
        raise ModelError(
            "8-bit loading (--load-in-8bit) runs on CUDA GPUs only (bitsandbytes' LLM.int8() kernels), and this "
            "machine has no CUDA GPU visible to torch; drop --load-in-8bit (and use float32 or bfloat16), or run "
            "on a machine with an NVIDIA GPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError(
            "8-bit loading needs the bitsandbytes package: pip install 'nnexp[8bit]' (or pip install bitsandbytes)"
        ) from None
    from transformers import BitsAndBytesConfig

    if str(device or "cpu").lower() == "cpu":
        raise ModelError("8-bit loading puts the model on a CUDA GPU; use --device cuda (or auto) with --load-in-8bit")
    return placement, BitsAndBytesConfig(load_in_8bit=True)
