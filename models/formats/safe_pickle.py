"""Read a torch zip checkpoint that pickles foreign objects, without running their code.

MDLM's Lightning `.ckpt` files pickle its OmegaConf config and its Hugging Face tokenizer in
`hyper_parameters`, so `torch.load(weights_only=True)` refuses them, and `weights_only=False`
would execute whatever the file's pickle asks for. This unpickler admits only tensors (rebuilt
from the archive's storages), torch dtypes/sizes and plain containers; every other global it
is asked for becomes an inert `StandIn` class named after it, which records the arguments and
state it is given and never calls the original. `plain()` turns OmegaConf's pickled nodes
into dicts and lists.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from models.formats.common import FormatError


class StandIn:
    """An object of a class this reader refuses to import: its pickled args and state, inert."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEMS on a dict subclass
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # APPENDS on a list subclass
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<stand-in for {self.qualname}>"


_STAND_INS: dict[str, type] = {}


def stand_in(module: str, name: str) -> type:
    """One inert StandIn subclass per refused global (so `isinstance` tells them apart)."""
    qualname = f"{module}.{name}"
    if qualname not in _STAND_INS:
        _STAND_INS[qualname] = type(name, (StandIn,), {"qualname": qualname})
    return _STAND_INS[qualname]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, *args: Any) -> torch.Tensor:
    if not isinstance(storage, torch.storage.TypedStorage):
        raise ValueError(f"a tensor record names {type(storage).__name__}, not a storage")
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or any(int(n) < 0 for n in size) or int(offset) < 0:
        raise ValueError(f"a tensor record has size {size}, stride {stride}, offset {offset}")
    if all(int(n) > 0 for n in size):
        last = int(offset) + sum((int(n) - 1) * int(st) for n, st in zip(size, stride))
        if last >= storage._size():
            raise ValueError(
                f"a tensor of size {size} (stride {stride}, offset {offset}) exceeds its "
                f"storage of {storage._size()} elements (corrupt header?)"
            )
    t = torch.empty(0, dtype=storage.dtype)
    t.set_(storage._untyped_storage, offset, torch.Size(size), stride)
    return t


def _meta_tensor(storage, offset, size, *args: Any) -> torch.Tensor:
    return torch.empty(size, dtype=storage.dtype, device="meta")


def _rebuild_parameter(data, requires_grad=False, *args: Any) -> torch.Tensor:
    return data  # a plain tensor: the caller copies it into its own parameter


_DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint8", "bool", "complex64",
    )
}  # fmt: skip
_STORAGES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}  # fmt: skip


class _Frozen:
    """What `find_class` hands out for an allowed function or storage type: a fresh, immutable
    wrapper per request, so a pickle's BUILD (or attribute writes) can change neither this file's
    reading of later records nor any other file read in the process."""

    __slots__ = ("target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "target", target)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise ValueError(f"the pickle tries to set {name!r} on an allowed global")

    def __setstate__(self, state: Any) -> None:
        raise ValueError("the pickle tries to change the state of an allowed global")


class _StorageType(_Frozen):
    """A storage class of the pickle (torch.FloatStorage, ...): only its dtype is used."""

    __slots__ = ()

    @property
    def dtype(self) -> torch.dtype:
        return self.target


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
_ALLOWED.update({("torch", n): d for n, d in _DTYPES.items()})
_STORAGE_GLOBALS = {("torch", n): d for n, d in _STORAGES.items()}


class RestrictedUnpickler(pickle.Unpickler):
    """Tensors and plain containers; stand-ins for everything else; storages from the zip."""

    def __init__(self, file, archive: zipfile.ZipFile | None, prefix: str, source: str) -> None:
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _STORAGE_GLOBALS:
            return _StorageType(_STORAGE_GLOBALS[module, name])
        allowed = _ALLOWED.get((module, name))
        if self.archive is None and allowed is _rebuild_tensor:
            return _Frozen(_meta_tensor)  # peek: shapes only
        if callable(allowed) and not isinstance(allowed, type):
            return _Frozen(allowed)  # our rebuild functions: never the shared object
        if allowed is not None:
            return allowed  # immutable: torch dtypes, built-in classes
        return stand_in(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise FormatError(f"{self.source}: unexpected persistent id {pid!r} in the pickle")
        _, storage_type, key, _location, numel = pid
        dtype = storage_type.dtype if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise FormatError(f"{self.source}: storage {key} has an unknown type {storage_type!r}")
        if self.archive is None:  # peek: no tensor data wanted
            return _StorageType(dtype)
        name = f"{self.prefix}data/{key}"
        try:
            raw = self.archive.read(name)
        except (KeyError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise FormatError(f"{self.source}: tensor storage {name} is missing or cut: {e}") from e
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if len(raw) < numel * itemsize:
            raise FormatError(
                f"{self.source}: tensor storage {name} holds {len(raw)} bytes, expected "
                f"{numel * itemsize} (truncated file?)"
            )
        untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage()
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def load_restricted(path: str | Path, tensors: bool = True) -> Any:
    """The object pickled in torch zip checkpoint `path`, foreign classes stood in for.

    `tensors=False` reads only the pickle (tensors come back empty): a cheap look at the keys.
    """
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
        pkl = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
        if pkl is None:
            raise FormatError(f"{path}: no data.pkl inside: not a torch zip checkpoint")
        prefix = pkl[: -len("data.pkl")]
        with archive.open(pkl) as f:
            return RestrictedUnpickler(f, archive if tensors else None, prefix, str(path)).load()
    except FormatError:
        raise
    except (
        zipfile.BadZipFile,
        EOFError,
        OSError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        RuntimeError,
        IndexError,
        KeyError,
    ) as e:  # fmt: skip  (a corrupt or crafted pickle: BUILD on an immutable global, bad records)
        raise FormatError(
            f"cannot read {path} (truncated, corrupt or not a torch checkpoint): {e}"
        ) from e


def plain(obj: Any) -> Any:
    """OmegaConf's pickled DictConfig/ListConfig/ValueNode stand-ins -> plain dicts, lists and
    values (interpolations stay strings); other objects pass through."""
    if isinstance(obj, StandIn):
        state = obj.state if isinstance(obj.state, dict) else {}
        name = obj.qualname
        if name.endswith("DictConfig") and isinstance(state.get("_content"), dict):
            return {k: plain(v) for k, v in state["_content"].items()}
        if name.endswith("ListConfig") and isinstance(state.get("_content"), list):
            return [plain(v) for v in state["_content"]]
        if name.startswith("omegaconf.nodes.") and "_val" in state:
            return plain(state["_val"])
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj
