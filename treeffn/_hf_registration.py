"""Make ``AutoModelForCausalLM.from_pretrained(<saved tree model>)`` work after a bare ``import treeffn``.

The Auto classes only know a model type once it is registered, and our config and model
classes import transformers' model code (seconds, and torch). ``import treeffn`` must stay light
(the CLI prints configs without torch), and importing model code from inside transformers' own
import sequence re-enters half-imported modules (``modeling_opt`` imports the auto modules, and
config modules' docstrings read ``modeling_auto``). So:

* right after ``transformers.models.auto.configuration_auto`` has been imported, a stand-in
  class per tree model type goes into AutoConfig's mapping (nothing is imported for it);
* the stand-in's first use (AutoConfig / AutoModelForCausalLM.from_pretrained reading a
  config.json with model_type treeffn_*) imports treeffn.models.hf, which registers the real
  config and model classes with both Auto classes, and hands the call to the real config class.
  By then no import is in progress, so nothing is re-entered.

When transformers' auto module is already imported, the stand-ins go in at once.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import importlib.abc
import sys

CONFIG_MODULE = "transformers.models.auto.configuration_auto"
TREE_MODEL_TYPES = ("treeffn_opt", "treeffn_gpt2", "treeffn_llama")


class _LazyTreeConfig:
    """Stands in for a tree config class in AutoConfig's mapping until first use."""

    model_type = ""

    @classmethod
    def _real(cls):
        from treeffn.models import hf  # registers the real config and model classes

        return hf.TREE_CLASSES[hf.TREE_MODEL_TYPES[cls.model_type]][1]

    def __new__(cls, *args, **kwargs):  # AutoConfig.for_model(model_type, ...)
        return cls._real()(*args, **kwargs)

    @classmethod
    def from_dict(cls, *args, **kwargs):  # AutoConfig.from_pretrained(dir)
        return cls._real().from_dict(*args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)


def register_stand_ins() -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if "treeffn.models.hf" in sys.modules and hasattr(sys.modules["treeffn.models.hf"], "register"):
        sys.modules["treeffn.models.hf"].register()
        return
    for model_type in TREE_MODEL_TYPES:
        if model_type in CONFIG_MAPPING and not issubclass(CONFIG_MAPPING[model_type], _LazyTreeConfig):
            continue  # the real class is already there
        stand_in = type(f"LazyConfig_{model_type}", (_LazyTreeConfig,),
                        {"model_type": model_type, "__module__": "treeffn.models.hf_config"})
        CONFIG_MAPPING.register(model_type, stand_in, exist_ok=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for the hooked module names it asks the other finders and wraps the
    loader they return, so that the hook runs once the module has finished executing."""

    def __init__(self, hooks: dict):
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.hooks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _HookedLoader(spec.loader, self._done(fullname))
                return spec
        return None

    def _done(self, fullname):
        def run():
            hook = self.hooks.pop(fullname, None)
            if not self.hooks and self in sys.meta_path:
                sys.meta_path.remove(self)
            if hook is not None:
                hook()
        return run


class _HookedLoader(importlib.abc.Loader):
    """The original loader, plus a call after ``exec_module``; everything else is delegated."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


def install() -> None:
    """Register the stand-ins now if AutoConfig's module is loaded, else right after it loads."""
    if CONFIG_MODULE in sys.modules and hasattr(sys.modules[CONFIG_MODULE], "CONFIG_MAPPING"):
        register_stand_ins()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport({CONFIG_MODULE: register_stand_ins}))
