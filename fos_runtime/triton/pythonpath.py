"""The Python backend stub runs its interpreter in isolated mode (``sys.flags.ignore_environment``),
so PYTHONPATH never reaches ``sys.path``. The pip tritonserver relies on it to find the project's
virtual environment; honour it here, before numpy is imported.
"""

import os
import sys


def honour_pythonpath() -> None:
    # transformers imports scikit-learn (hence scipy) whenever it is installed, for assisted generation only;
    # the numpy this stub may be given (1.26: nvidia-pytriton 0.7.0's stub mangles string tensors under
    # numpy 2) can be older than what the environment's scipy was built for. Tokenizers never need it.
    sys.modules.setdefault("sklearn", None)  # type: ignore[arg-type]
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    if not entries:
        return
    # Ahead of the system's dist-packages, whose older copies would otherwise win.
    at = next((i for i, p in enumerate(sys.path) if p.endswith(("dist-packages", "site-packages"))), len(sys.path))
    sys.path[at:at] = entries
