"""Entry point: python -m internlm_app."""

import sys

from .cli import main

sys.exit(main())
