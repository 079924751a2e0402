"""Runs at the start of every Python process whose ``PYTHONPATH`` holds this folder (``memkit run`` with a
launcher puts it there, with ``HF_MEMKIT_RECIPE``).

Launchers such as ``trl sft``, ``accelerate launch`` and ``deepspeed`` start training in child processes, out of
reach of a patch made in ``memkit run``'s own process; the environment is what they pass on. This module must
cost nothing in children that never train (compilers, tokenizer workers, the launcher itself): it imports only
what the interpreter has already loaded, and hooks the import of ``transformers.trainer``. When that module has
run, ``Trainer.__init__`` gets a shim; only the first Trainer actually built imports hf_memkit and installs the
recipe (``hf_memkit.integrations.child_hook.install``).

Python imports one ``sitecustomize``: this one shadows any further down ``sys.path`` (a venv's or the
distribution's), so that one is imported right after, as if this folder were not there.
"""

import functools
import os
import sys

_TARGET = "transformers.trainer"
_HERE = os.path.dirname(os.path.abspath(__file__))


def _install_recipe():
    try:
        from hf_memkit.integrations.child_hook import install
    except ImportError:  # hf_memkit not installed for this interpreter: take it from where this file lives
        sys.path.append(os.path.dirname(os.path.dirname(os.path.dirname(_HERE))))
        from hf_memkit.integrations.child_hook import install
    install()


def _shim(trainer_cls):
    original = trainer_cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        if trainer_cls.__init__ is __init__:  # the first Trainer of this process: install the real patch now
            trainer_cls.__init__ = original
            _install_recipe()
        return trainer_cls.__init__(self, *args, **kwargs)

    trainer_cls.__init__ = __init__


class _TrainerImportHook:
    """A one-shot meta-path finder: lets the normal finders locate ``transformers.trainer`` and wraps its loader
    so that the shim goes on ``Trainer`` as soon as the module has executed (before anyone can build one)."""

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        from importlib.util import find_spec

        spec = find_spec(name)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            if module.__name__ == _TARGET and hasattr(module, "Trainer"):
                _shim(module.Trainer)

        loader.exec_module = exec_module
        return spec


def _chain():
    """Import the ``sitecustomize`` this one shadows, if any; this folder leaves ``sys.path`` for good (nothing
    else in it is meant to be importable, and children still inherit it through the environment)."""
    ours = sys.modules.pop("sitecustomize", None)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    try:
        import sitecustomize  # noqa: F401  (the next one on sys.path)
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
        if ours is not None:
            sys.modules["sitecustomize"] = ours


if os.environ.get("HF_MEMKIT_RECIPE") and "transformers.trainer" not in sys.modules:
    sys.meta_path.insert(0, _TrainerImportHook())
_chain()
