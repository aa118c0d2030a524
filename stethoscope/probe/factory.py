"""Finding a representation's ``factory``: on ``sys.path``, or next to the config, without PYTHONPATH.

``factory: "my_encoders:make"`` loads ``my_encoders.py`` from the config's folder when it is there (by its
path, so a namesake imported earlier from elsewhere is not reused), else imports ``my_encoders`` (a module or
package) from ``sys.path``, then from the config's folder; ``factory: "models/encoders.py:make"`` loads that
file (relative to the config's folder). While the
module is imported and the factory runs, its folder is on ``sys.path``, so it can import its siblings.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stethoscope.probe.errors import ProbeModelError


@contextlib.contextmanager
def on_path(folder: Path | None) -> Iterator[None]:
    """``folder`` first on ``sys.path`` for the duration (not added twice, removed afterwards)."""
    entry = str(folder) if folder is not None else None
    if entry is None or entry in sys.path:
        yield
        return
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _is_file_spec(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def factory_folder(spec: str, base_dir: Path | None) -> Path | None:
    """The folder to put on ``sys.path`` while the factory module loads and runs (None: none needed)."""
    module = spec.rsplit(":", 1)[0]
    if "." not in module and base_dir is not None and (Path(base_dir) / f"{module}.py").is_file():
        return Path(base_dir).resolve()
    if _is_file_spec(module):
        path = Path(module).expanduser()
        return (path if path.is_absolute() else Path(base_dir or Path.cwd()) / path).resolve().parent
    top = module.split(".")[0]
    if base_dir is None or importlib.util.find_spec(top) is not None:
        return None
    return Path(base_dir).resolve()


def import_factory(spec: str, base_dir: Path | None = None) -> Callable[..., Any]:
    """The callable named by ``"package.module:function"`` or ``"path/to/file.py:function"``.

    Raises:
        ProbeModelError: a malformed spec, a module found nowhere (saying where it was looked for), a
            missing function.
    """
    if ":" not in spec:
        raise ProbeModelError(
            f"factory {spec!r} must look like 'package.module:function' or 'path/to/file.py:function'"
        )
    module, fn_name = spec.rsplit(":", 1)
    base = Path(base_dir) if base_dir is not None else None
    if "." not in module and base is not None and (base / f"{module}.py").is_file():
        module = f"{module}.py"  # a module file next to the config: that one, not a namesake imported before
    if _is_file_spec(module):
        path = Path(module).expanduser()
        path = (path if path.is_absolute() else (base or Path.cwd()) / path).resolve()
        if not path.is_file():
            raise ProbeModelError(
                f"factory file {str(path)!r} does not exist (factory {spec!r}, relative to the config's "
                f"folder {str(base or Path.cwd())!r})"
            )
        name = f"_stethoscope_factory_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
        mod = sys.modules.get(name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = mod  # dataclasses and pickling look their module up here
            try:
                with on_path(path.parent):
                    loader_spec.loader.exec_module(mod)
            except BaseException:
                del sys.modules[name]
                raise
    else:
        folder = factory_folder(spec, base)
        try:
            with on_path(folder):
                mod = importlib.import_module(module)
        except ImportError as exc:
            where = "sys.path" + (f" and the config's folder {str(base)!r}" if base is not None else "")
            raise ProbeModelError(
                f"cannot import factory {spec!r}: {exc} (looked in {where}; put the module next to the config, "
                "write its file path ('encoders.py:make'), or add its folder to PYTHONPATH)"
            ) from None
    fn = getattr(mod, fn_name, None)
    if fn is None or not callable(fn):
        public = [
            n
            for n, v in vars(mod).items()
            if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == mod.__name__
        ][:8]  # its own functions, not what it imported
        raise ProbeModelError(
            f"cannot import factory {spec!r}: {module} has no function {fn_name!r}"
            + (f" (it has {', '.join(public)})" if public else "")
        )
    return fn


def call_factory(fn: Callable[..., Any], kwargs: dict, sample_rate: int | None) -> Any:
    """``fn(**kwargs)``, adding ``sample_rate`` (the dataset's) when ``fn`` takes it and it is not set."""
    kwargs = dict(kwargs)
    if sample_rate is not None and "sample_rate" not in kwargs:
        with contextlib.suppress(TypeError, ValueError):  # builtins without a signature
            if "sample_rate" in inspect.signature(fn).parameters:
                kwargs["sample_rate"] = sample_rate
    return fn(**kwargs)
