"""``python -m batchnorm.demo [EXPERIMENT] [options]``: see :mod:`batchnorm.demo.cli`."""

import sys

from .cli import main

sys.exit(main())
