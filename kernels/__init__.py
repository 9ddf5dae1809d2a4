"""Triton kernels (installed as fastpeft.kernels): @triton.jit functions and their launch
wrappers, one file per hot path.  No autograd here: fastpeft.ops owns that."""

if __name__ == "kernels":
    # Imported as a top-level `kernels`: the repository root is on sys.path (pytest and `python -m ...` run from
    # a checkout put it there).  That name belongs to Hugging Face's `kernels` package, which transformers >= 5.25
    # and bitsandbytes import; this folder is fastpeft.kernels.  Hand the import over to that package where it is
    # installed (the module that `import kernels` returns is whatever sys.modules holds once this runs).
    def _hand_over() -> None:
        import importlib.machinery
        import importlib.util
        import os
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != root]
        spec = importlib.machinery.PathFinder.find_spec("kernels", path)
        if spec is None or spec.loader is None:
            return  # not installed: nothing else answers to the name
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop("kernels", None)
            raise

    _hand_over()
    del _hand_over
