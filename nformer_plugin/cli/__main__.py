"""``python -m nformer_plugin.cli``: the ``nformer`` command."""
import sys

from .main import main

sys.exit(main())
