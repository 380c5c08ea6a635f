"""Entry point: python -m internlm_app."""

import sys

from internlm_app.cli import main

sys.exit(main())
