"""``python -m timm_exits``: the ``timm-exits`` command."""
import sys

from .cli import main

sys.exit(main())
