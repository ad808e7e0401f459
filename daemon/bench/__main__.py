"""python -m memplug.daemon.bench"""

import sys

from memplug.daemon.bench.cli import main

sys.exit(main())
