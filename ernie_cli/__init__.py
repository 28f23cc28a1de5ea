"""ernie: run Baidu's ERNIE 4.5 text models in plain PyTorch."""

import os as _os
import sys as _sys

__version__ = "0.1.0"

if _sys.argv and (_sys.argv[0] == "-m" or _os.path.basename(_sys.argv[0]) == "ernie"):
    # Running as the `ernie` program (`python -m ernie_cli` imports this with argv[0] still "-m"): a
    # Ctrl-C that lands while the CLI itself is being imported, before cli.main installs its
    # handler, must end like any other (exit 130, no traceback). Nothing has been written yet.
    import signal as _signal

    _signal.signal(_signal.SIGINT, lambda *_: _os._exit(130))
